import Glibc

/// One operation of a rule, applied in order to the tensor a rule builds.
public enum SliceOp: Equatable, Sendable {
    case rearrange(Rearrange)
    /// numpy basic indexing: an integer drops the axis, `a:b` keeps a slice of it.
    case index([IndexItem])
    case cast(DType)
    /// `cast? T` (and `ckpt-slice --cast T`): cast float tensors, leave others as they are.
    case castFloats(DType)
    case scale(Double)
    case add(Double)
    /// Multiply element by element by another input tensor (consumed by this rule); with
    /// `optional` (`mul?`), a missing operand skips the op.
    case mul(RulePattern, optional: Bool)
    /// A condition on the input: the rule matches only tensors of this rank and/or type.
    case `where`(rank: Int?, dtype: DType?)
    /// `insert-zeros AXIS INDEX`: a slice of zeros inserted before `index` along `axis` (a
    /// part the source does not store, e.g. the zero k bias of a fused qkv bias `[q, 0, v]`).
    case insertZeros(axis: Int, index: Int)

    public enum IndexItem: Equatable, Sendable {
        case all
        case at(Int)
        case range(Int?, Int?)
    }
}

/// A rule: `SOURCE -> TARGET | op | op`, `drop SOURCE` or `keep SOURCE`, from `file:line`.
public struct SliceRule: Sendable {
    public enum Action: Sendable { case map, drop, keep }
    public var action: Action
    public var source: RulePattern
    public var target: RulePattern?
    public var ops: [SliceOp]
    public var file: String
    public var line: Int
    public var location: String { "\(file):\(line)" }

    /// The rule's source pattern matches `d`'s name and its `where` conditions hold.
    public func matches(_ d: TensorDescriptor) -> [String: String]? {
        for case .where(let rank, let dtype) in ops {
            if let rank, d.shape.count != rank { return nil }
            if let dtype, d.dtype != dtype { return nil }
        }
        return source.match(d.name)
    }
}

/// Parses rule files (docs/rules.md).
public enum SliceRuleParser {
    /// - Parameter values: `--set NAME=VALUE` from the command line, for `${NAME}` in the rules;
    ///   they win over the files' `default NAME=VALUE` lines.
    public static func parse(file path: String, including: [String] = [], values: [String: String] = [:]) throws -> [SliceRule] {
        guard !including.contains(path) else { throw RuleError(.includeCycle(chain: including + [path])) }
        let bytes: [UInt8]
        do { bytes = try readWholeFile(path, limit: 1 << 24) } catch {
            throw RuleError(.unreadable(detail: "\(error)"), file: path)
        }
        guard let text = String(validating: bytes, as: UTF8.self) else { throw RuleError(.notUTF8, file: path) }
        return try parse(text, file: path, including: including, values: values)
    }

    public static func parse(_ text: String, file: String, including: [String] = [], values given: [String: String] = [:]) throws -> [SliceRule] {
        var rules: [SliceRule] = []
        var values = given
        let dir = file.contains("/") ? String(file[..<file.lastIndex(of: "/")!]) : "."
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let lineNumber = n + 1
            func fail(_ r: RuleError.Reason) -> RuleError { RuleError(r, file: file, line: lineNumber) }
            // Tabs first: a line of blanks and tabs is empty (trimming spaces before replacing tabs left
            // a lone space, which split into no words: fuzz finding 11).
            let stripped = stripComment(String(raw)).replacingTabs().trimmingCharacters(in: " ")
            if stripped.isEmpty { continue }
            if stripped.hasPrefix("default ") {
                // `default NAME=VALUE`: a value for `${NAME}` unless the command line set one.
                let kv = stripped.dropFirst("default ".count).trimmingCharacters(in: " ").split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, !kv[0].isEmpty, kv[0].allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }), !kv[1].isEmpty else {
                    throw fail(.malformedDefault)
                }
                if values[kv[0]] == nil { values[kv[0]] = kv[1] }
                continue
            }
            let line = try substitute(stripped, values, fail)
            let words = line.split(separator: " ", maxSplits: 1).map(String.init)
            switch words[0] {
            case "include":
                guard words.count == 2 else { throw fail(.includeWithoutFile) }
                let name = words[1].trimmingCharacters(in: " ")
                rules += try parse(file: name.hasPrefix("/") ? name : dir + "/" + name, including: including + [file], values: values)
                continue
            case "drop", "keep":
                guard words.count == 2, !words[1].contains("->") else { throw fail(.takesOnePattern(keyword: words[0])) }
                let source: RulePattern
                do { source = try RulePattern(words[1].trimmingCharacters(in: " ")) } catch { throw fail(.invalidPattern(detail: error.description)) }
                rules.append(SliceRule(action: words[0] == "drop" ? .drop : .keep, source: source, target: nil, ops: [], file: file, line: lineNumber))
                continue
            default: break
            }
            let pieces = splitOutsideQuotes(line, on: "|")
            let arrow = pieces[0].split(separator: "->", omittingEmptySubsequences: false).map { String($0).trimmingCharacters(in: " ") }
            guard arrow.count == 2, !arrow[0].isEmpty, !arrow[1].isEmpty else {
                throw fail(.malformedLine)
            }
            let source: RulePattern, target: RulePattern
            do {
                source = try RulePattern(arrow[0])
                target = try RulePattern(arrow[1])
            } catch { throw fail(.invalidPattern(detail: error.description)) }
            var ops: [SliceOp] = []
            for piece in pieces.dropFirst() {
                do { ops.append(try parseOp(piece.trimmingCharacters(in: " "))) } catch let e as RuleError { throw fail(e.reason) }
            }
            try check(source: source, target: target, ops: ops, fail: fail)
            rules.append(SliceRule(action: .map, source: source, target: target, ops: ops, file: file, line: lineNumber))
        }
        return rules
    }

    /// Replaces every `${NAME}` by its value.
    static func substitute(_ line: String, _ values: [String: String], _ fail: (RuleError.Reason) -> RuleError) throws -> String {
        guard line.contains("${") else { return line }
        var out = ""
        var chars = Array(line)[...]
        while let dollar = chars.firstIndex(of: "$") {
            out += String(chars[..<dollar])
            guard chars.index(after: dollar) < chars.endIndex, chars[chars.index(after: dollar)] == "{" else {
                out.append("$")
                chars = chars[chars.index(after: dollar)...]
                continue
            }
            let nameStart = dollar + 2
            guard let close = chars[nameStart...].firstIndex(of: "}") else { throw fail(.undefinedName(name: String(chars[nameStart...]))) }
            let name = String(chars[nameStart..<close])
            guard let value = values[name] else { throw fail(.undefinedName(name: name)) }
            out += value
            chars = chars[(close + 1)...]
        }
        return out + String(chars)
    }

    /// What can be told from the rule alone: every target capture must come from the source
    /// or be an axis of the last rearrange; stacked captures must be axes of the first one.
    static func check(source: RulePattern, target: RulePattern, ops: [SliceOp], fail: (RuleError.Reason) -> RuleError) throws {
        let sourceNames = Set(source.captureNames)
        let rearranges = ops.compactMap { if case .rearrange(let r) = $0 { return r } else { return nil } }
        for name in target.captureNames where !sourceNames.contains(name) {
            guard let last = rearranges.last, last.right.contains(.axis(name)) else {
                throw fail(.targetCaptureUnbound(capture: name))
            }
        }
        let stacked = source.captureNames.filter { !target.captureNames.contains($0) }
        if !stacked.isEmpty, let first = rearranges.first, ops.first.map({ if case .rearrange = $0 { return true } else { return false } }) == true {
            let lead = first.left.prefix(stacked.count).map { $0 }
            guard lead == stacked.map({ Rearrange.Item.axis($0) }) else {
                throw fail(.stackedAxesNotLeading(captures: stacked))
            }
        }
    }

    static func parseOp(_ text: String) throws -> SliceOp {
        let parts = text.split(separator: " ", maxSplits: 1).map(String.init)
        let arg = parts.count > 1 ? parts[1].trimmingCharacters(in: " ") : ""
        switch parts.first ?? "" {
        case "rearrange":
            guard let open = arg.firstIndex(of: "\""), let close = arg[arg.index(after: open)...].firstIndex(of: "\"") else {
                throw RuleError(.rearrangeNotQuoted)
            }
            let expression = String(arg[arg.index(after: open)..<close])
            var sizes: [String: Int] = [:]
            for kv in arg[arg.index(after: close)...].split(separator: " ") {
                let p = kv.split(separator: "=").map(String.init)
                guard p.count == 2, let n = Int(p[1]), n > 0 else { throw RuleError(.rearrangeSizeMalformed(item: String(kv))) }
                sizes[p[0]] = n
            }
            do { return .rearrange(try Rearrange(expression, sizes: sizes)) } catch { throw RuleError(.invalidRearrange(detail: error.description)) }
        case "index", "select":
            let body = arg.trimmingCharacters(in: " ")
            guard body.hasPrefix("["), body.hasSuffix("]") else { throw RuleError(.indexNotBracketed(operation: parts[0])) }
            let items = try body.dropFirst().dropLast().split(separator: ",", omittingEmptySubsequences: false).map { raw -> SliceOp.IndexItem in
                let s = raw.trimmingCharacters(in: " ")
                if s == ":" { return .all }
                if let i = Int(s) { return .at(i) }
                let ab = s.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
                guard ab.count == 2, ab[0].isEmpty || Int(ab[0]) != nil, ab[1].isEmpty || Int(ab[1]) != nil else {
                    throw RuleError(.indexItemMalformed(item: s))
                }
                return .range(Int(ab[0]), Int(ab[1]))
            }
            return .index(items)
        case "cast", "cast?":
            guard let d = DType(userName: arg), SliceCast.supported(to: d) else {
                throw RuleError(.castTargetUnsupported(argument: arg))
            }
            return parts[0] == "cast" ? .cast(d) : .castFloats(d)
        case "scale", "add":
            guard let x = Double(arg), x.isFinite else { throw RuleError(.numberExpected(operation: parts[0], argument: arg)) }
            return parts[0] == "scale" ? .scale(x) : .add(x)
        case "mul", "mul?":
            do { return .mul(try RulePattern(arg), optional: parts[0] == "mul?") } catch { throw RuleError(.invalidPattern(detail: error.description)) }
        case "insert-zeros":
            let numbers = arg.split(separator: " ").map { Int($0) }
            guard numbers.count == 2, let axis = numbers[0], let index = numbers[1], axis >= 0, index >= 0 else {
                throw RuleError(.numberExpected(operation: "insert-zeros", argument: arg))
            }
            return .insertZeros(axis: axis, index: index)
        case "where":
            var rank: Int?, dtype: DType?
            for cond in arg.split(separator: " ") {
                let kv = cond.split(separator: "=").map(String.init)
                switch (kv.first, kv.count) {
                case ("rank", 2): rank = Int(kv[1])
                    if rank == nil { throw RuleError(.whereRankNotInteger) }
                case ("dtype", 2): dtype = DType(userName: kv[1])
                    if dtype == nil { throw RuleError(.whereDTypeUnknown) }
                default: throw RuleError(.whereConditionUnknown(condition: String(cond)))
                }
            }
            guard rank != nil || dtype != nil else { throw RuleError(.whereEmpty) }
            return .where(rank: rank, dtype: dtype)
        default:
            throw RuleError(.unknownOperation(name: parts.first ?? ""))
        }
    }

    static func stripComment(_ line: String) -> String {
        var inQuotes = false
        for (i, c) in line.enumerated() {
            if c == "\"" { inQuotes.toggle() }
            if c == "#" && !inQuotes { return String(line.prefix(i)) }
        }
        return line
    }

    static func splitOutsideQuotes(_ line: String, on separator: Character) -> [String] {
        var out: [String] = [], current = "", inQuotes = false
        for c in line {
            if c == "\"" { inQuotes.toggle() }
            if c == separator && !inQuotes {
                out.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        out.append(current)
        return out
    }
}

extension String {
    func replacingTabs() -> String { String(map { $0 == "\t" ? " " : $0 }) }
}
