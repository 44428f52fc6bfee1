/// Why a rule file, or its plan for a stream, is refused: one case per rule, located by the
/// rule file and line (and the tensor, where one is at fault).
public struct RuleError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        // The file
        case includeCycle(chain: [String])
        case unreadable(detail: String)
        case notUTF8
        // A line
        case includeWithoutFile
        case takesOnePattern(keyword: String)
        /// A pattern that does not parse (`RulePattern.ParseError`'s text).
        case invalidPattern(detail: String)
        case malformedLine
        /// `${name}` with no `default name=...` before it and no `ckpt-slice --set name=...`.
        case undefinedName(name: String)
        case malformedDefault
        case targetCaptureUnbound(capture: String)
        case stackedAxesNotLeading(captures: [String])
        // An operation
        case rearrangeNotQuoted
        case rearrangeSizeMalformed(item: String)
        /// A rearrange expression that does not parse (`Rearrange.Failure`'s text).
        case invalidRearrange(detail: String)
        case indexNotBracketed(operation: String)
        case indexItemMalformed(item: String)
        case castTargetUnsupported(argument: String)
        case numberExpected(operation: String, argument: String)
        case whereRankNotInteger
        case whereDTypeUnknown
        case whereConditionUnknown(condition: String)
        case whereEmpty
        case unknownOperation(name: String)
        // Planning against the stream's tensors
        case severalInputsWithoutStacking
        case stackIndicesNotConsecutive(capture: String, indices: [Int])
        case stackWordsMissing(capture: String, missing: [String])
        case stackWithoutOrder(capture: String)
        case stackCountMismatch(captures: [String], inputs: Int, places: Int)
        case stackPartsDiffer(tensor: String, dtype: String, shape: [Int], first: String, firstDType: String, firstShape: [Int])
        /// A rearrange that does not fit the tensor (`Rearrange.Failure`'s text).
        case rearrangeDoesNotFit(detail: String)
        case castNotFloat(dtype: String)
        case operationNotFloat(operation: String, dtype: String)
        case mulOperandMissing
        case mulOperandMismatch(operand: String, operandDType: String, operandShape: [Int], dtype: String, shape: [Int])
        case mulCaptureMissing(pattern: String)
        case mulOperandNotInInput(operand: String)
        case unstackAxisMissing(capture: String, axes: [String])
        case unstackNamesMismatch(capture: String, names: Int, size: Int)
        case targetUnbound(target: String)
        case invalidOutput(name: String, detail: String)
        case indexTooManyItems(items: Int, shape: [Int])
        case indexOutOfRange(index: Int, axis: Int, size: Int, shape: [Int])
        case twoRulesWrite(output: String, first: String, second: String)
        case unmatched(tensors: [String])
        // Running
        case needsManifest(stacks: Bool)
        case twoInputsWrite(output: String, first: String, second: String)
        case productsNotFinite(operand: String, count: Int, input: String)
        /// Every problem a plan found, reported together.
        case several(errors: [RuleError])
    }

    public var reason: Reason
    public var file: String?
    public var line: Int?
    public var tensor: String?

    public init(_ reason: Reason, file: String? = nil, line: Int? = nil, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.line = line
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        var s = ""
        if let file { s += file + (line.map { ":\($0)" } ?? "") + ": " }
        if let tensor { s += tensor + ": " }
        return s + reasonText
    }

    private var reasonText: String {
        switch reason {
        case .includeCycle(let chain): return "include cycle: \(chain.joined(separator: " -> "))"
        case .unreadable(let detail): return "cannot read the rule file (\(detail))"
        case .notUTF8: return "not UTF-8"
        case .includeWithoutFile: return "include needs a file name"
        case .takesOnePattern(let keyword): return "\(keyword) takes one pattern"
        case .invalidPattern(let detail): return detail
        case .malformedLine: return "expected 'SOURCE -> TARGET | op | ...', 'drop SOURCE' or 'keep SOURCE'"
        case .undefinedName(let name):
            return "${\(name)} is not defined: add 'default \(name)=VALUE' to the rule file, or give ckpt-slice --set \(name)=VALUE"
        case .malformedDefault: return "default takes NAME=VALUE (letters, digits and _ in the name)"
        case .targetCaptureUnbound(let c): return "target {\(c)} is neither captured by the source nor an axis of the last rearrange's right side"
        case .stackedAxesNotLeading(let c):
            return "stacking along \(c.joined(separator: ", ")): the first rearrange must start with those axes (\"\(c.joined(separator: " ")) ...\")"
        case .rearrangeNotQuoted: return "rearrange takes a quoted expression: rearrange \"i o -> o i\""
        case .rearrangeSizeMalformed(let item): return "rearrange: '\(item)' is not NAME=SIZE"
        case .invalidRearrange(let detail): return detail
        case .indexNotBracketed(let op): return "\(op) takes numpy-style indices: [:, 0] or [2:4]"
        case .indexItemMalformed(let item): return "index item '\(item)' is not ':', an integer or a:b"
        case .castTargetUnsupported(let arg): return "cast takes F32, F64, BF16, F16, F8_E4M3 or F8_E5M2, not '\(arg)'"
        case .numberExpected(let op, let arg): return "\(op) takes a number, not '\(arg)'"
        case .whereRankNotInteger: return "where rank= takes an integer"
        case .whereDTypeUnknown: return "where dtype= takes a type such as F32 or BF16"
        case .whereConditionUnknown(let c): return "where takes rank=N and/or dtype=T, not '\(c)'"
        case .whereEmpty: return "where needs rank=N or dtype=T"
        case .unknownOperation(let name):
            return "unknown operation '\(name)' (known: where, rearrange, index, select, cast, cast?, scale, add, mul, mul?)"
        case .severalInputsWithoutStacking: return "internal: several inputs without stacked captures"
        case .stackIndicesNotConsecutive(let c, let ints):
            return "stacking {\(c)}: indices \(ints.map(String.init).joined(separator: ",")) are not 0..<\(ints.count)"
        case .stackWordsMissing(let c, let missing): return "stacking {\(c)}: \(missing.joined(separator: ", ")) missing"
        case .stackWithoutOrder(let c): return "cannot stack over {\(c)}: only {\(c):int} or {\(c)=a,b,...} captures give an order"
        case .stackCountMismatch(let c, let inputs, let places): return "stacking \(c.joined(separator: ", ")): \(inputs) inputs for \(places) places"
        case .stackPartsDiffer(let t, let d, let s, let f, let fd, let fs): return "stacking: \(t) is \(d)\(s), \(f) is \(fd)\(fs)"
        case .rearrangeDoesNotFit(let detail): return detail
        case .castNotFloat(let d): return "cast: \(d) is not a float type"
        case .operationNotFloat(let op, let d): return "\(op): \(d) is not a float type"
        case .mulOperandMissing: return "mul: the operand is not in the input"
        case .mulOperandMismatch(let o, let od, let os, let d, let s): return "mul: \(o) is \(od)\(os), the tensor is \(d)\(s)"
        case .mulCaptureMissing(let p): return "mul \(p) uses a capture the source does not have"
        case .mulOperandNotInInput(let o): return "mul needs \(o), which is not in the input"
        case .unstackAxisMissing(let c, let axes): return "target {\(c)} is not an axis of the result (axes: \(axes.joined(separator: " ")))"
        case .unstackNamesMismatch(let c, let names, let size): return "target {\(c)} lists \(names) names, the axis has \(size)"
        case .targetUnbound(let t): return "target \(t) has an unbound capture"
        case .invalidOutput(let name, let detail): return "output \(name): \(detail)"
        case .indexTooManyItems(let items, let shape): return "index has \(items) items for \(shape.count) axes \(shape)"
        case .indexOutOfRange(let i, let axis, let size, let shape): return "index \(i) is out of range for axis \(axis) of size \(size) in \(shape)"
        case .twoRulesWrite(let o, let a, let b): return "two rules write \(o): \(a) and \(b)"
        case .unmatched(let names):
            return "no rule matches \(names.count) input tensors (add rules, 'drop PATTERN', or --keep-unmatched): \(names.joined(separator: ", "))"
        case .needsManifest(let stacks):
            return "this rule \(stacks ? "stacks tensors" : "multiplies by another tensor"), which needs the stream's manifest (ckpt-read writes one)"
        case .twoInputsWrite(let o, let a, let b): return "two inputs write \(o): \(a) and \(b)"
        case .productsNotFinite(let o, let n, let input): return "mul \(o): \(n) products are not finite (NaN or Inf in \(input) or \(o))"
        case .several(let errors): return errors.map(\.description).joined(separator: "; ")
        }
    }
}
