/// What `ckpt-slice` will do with every input tensor, decided from descriptors alone (the
/// stream manifest), so `--plan` can print it and every problem is found before any data.
public struct SlicePlan {
    /// A tensor's shape with a name for the axes that have one (rearrange axes, stacked captures).
    struct NamedShape {
        var shape: [Int]
        var names: [String?]
        var dtype: DType
    }

    /// One rule application: its inputs (stacked in order), what the ops make, and the outputs.
    public struct Group {
        public let rule: SliceRule
        /// The rule's ops, plus the final cast of `--cast`.
        public var ops: [SliceOp] = []
        /// Inputs in stacking order.
        public var inputs: [TensorDescriptor]
        /// Sizes of the stacked axes (empty: one input).
        public var stack: [Int] = []
        /// `mul` operands, by op position.
        public var operands: [Int: TensorDescriptor] = [:]
        public var outputs: [TensorDescriptor] = []
        /// Positions of the unstacked axes in the final shape, and the final shape.
        var unstackAxes: [Int] = []
        var finalShape: [Int] = []
        /// The source tensor streams through chunk by chunk (renames and element-wise ops).
        public var streams = false
        /// The source is unstacked along its leading axis, which the expression keeps leading:
        /// each output is made from one slice of it as it arrives (`perSlice` on the slice).
        public var perSlice: Rearrange?
        /// Index of the input whose arrival completes the group.
        var trigger = 0

        /// Bytes held while the group is built (inputs, one intermediate, outputs).
        public var memory: Int {
            guard !streams else { return 0 }
            if perSlice != nil, let leading = inputs[0].shape.first, leading > 0 {
                // The slice being built (its input, rearranged copy and the outputs cut from it)
                // and the outputs of the one being written meanwhile.
                let outBytes = outputs.reduce(0) { $0 + $1.byteCount } / leading
                return inputs[0].byteCount / leading + 3 * outBytes
            }
            let inBytes = inputs.reduce(0) { $0 + $1.byteCount } + operands.values.reduce(0) { $0 + $1.byteCount }
            let outBytes = outputs.reduce(0) { $0 + $1.byteCount }
            return inBytes + max(inBytes, outBytes) + outBytes
        }
    }

    public enum Assignment {
        case group(Int)
        case drop(SliceRule)
        case pass(name: String, rule: SliceRule?)
        case operand(Int)
    }

    public private(set) var groups: [Group] = []
    /// Per input name.
    public private(set) var assignments: [String: Assignment] = [:]
    /// The output manifest, in stream order.
    public private(set) var outputs: [TensorDescriptor] = []

    /// Plans `inputs` (in stream order) against `rules`; every problem is collected and thrown
    /// together.
    /// `cast`: a final `cast?` of every output (`ckpt-slice --cast`), passed tensors included.
    public init(rules: [SliceRule], inputs: [TensorDescriptor], keepUnmatched: Bool, cast: DType? = nil) throws {
        var problems: [RuleError] = []
        var unmatched: [String] = []
        // mul operands first: they belong to the rule that names them.
        var operandOf: [String: (consumer: String, op: Int, optional: Bool)] = [:]
        let byName = Dictionary(inputs.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for d in inputs {
            guard let (rule, captures) = SlicePlan.firstMatch(rules, d) else { continue }
            for (k, op) in rule.ops.enumerated() {
                guard case .mul(let p, let optional) = op else { continue }
                guard let name = p.substitute(captures) else {
                    problems.append(RuleError(.mulCaptureMissing(pattern: "\(p)"), file: rule.file, line: rule.line)); continue
                }
                if optional && byName[name] == nil { continue }
                operandOf[name] = (d.name, k, optional)
            }
        }
        let position = Dictionary(inputs.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        var groupIndex: [String: Int] = [:]
        var groupCaptures: [[(values: [String: String], input: TensorDescriptor)]] = []
        for d in inputs {
            if operandOf[d.name] != nil { continue }
            guard let (rule, captures) = SlicePlan.firstMatch(rules, d) else {
                if keepUnmatched { assignments[d.name] = .pass(name: d.name, rule: nil) } else { unmatched.append(d.name) }
                continue
            }
            switch rule.action {
            case .drop: assignments[d.name] = .drop(rule)
            case .keep: assignments[d.name] = .pass(name: d.name, rule: rule)
            case .map:
                let targetNames = Set(rule.target!.captureNames)
                let bound = captures.filter { targetNames.contains($0.key) }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
                let key = rule.location + "|" + bound.joined(separator: "|")
                if let g = groupIndex[key] {
                    groups[g].inputs.append(d)
                    groupCaptures[g].append((captures, d))
                    assignments[d.name] = .group(g)
                } else {
                    groupIndex[key] = groups.count
                    assignments[d.name] = .group(groups.count)
                    groups.append(Group(rule: rule, inputs: [d]))
                    groupCaptures.append([(captures, d)])
                }
            }
        }
        for (name, (consumer, op, _)) in operandOf {
            guard let d = byName[name] else {
                problems.append(RuleError(.mulOperandNotInInput(operand: name), tensor: consumer)); continue
            }
            guard case .group(let g)? = assignments[consumer] else { continue }
            groups[g].operands[op] = d
            assignments[name] = .operand(g)
        }
        if !unmatched.isEmpty {
            problems.append(RuleError(.unmatched(tensors: unmatched)))
        }
        for g in groups.indices {
            groups[g].ops = groups[g].rule.ops + (cast.map { [.castFloats($0)] } ?? [])
            do { try SlicePlan.shape(&groups[g], captures: groupCaptures[g]) } catch let e as RuleError {
                problems.append(e)
            }
            groups[g].trigger = (groups[g].inputs + groups[g].operands.values).map { position[$0.name]! }.max()!
        }
        // Output names must be unique.
        var producer: [String: String] = [:]
        for d in inputs {
            switch assignments[d.name] {
            case .pass(let name, let rule)?:
                let from = rule?.location ?? "--keep-unmatched"
                if let other = producer[name] { problems.append(RuleError(.twoRulesWrite(output: name, first: other, second: from))) }
                producer[name] = from
            default: break
            }
        }
        for g in groups {
            for o in g.outputs {
                if let other = producer[o.name] { problems.append(RuleError(.twoRulesWrite(output: o.name, first: other, second: g.rule.location))) }
                producer[o.name] = g.rule.location
            }
        }
        guard problems.isEmpty else { throw problems.count == 1 ? problems[0] : RuleError(.several(errors: problems)) }
        // The output order: passed tensors where they are; a group's outputs where it completes.
        let completing = Dictionary(grouping: groups.indices, by: { groups[$0].trigger })
        for (i, d) in inputs.enumerated() {
            if case .pass(let name, _)? = assignments[d.name] {
                var r = d
                r.name = name
                if let cast, SliceCast.supported(from: d.dtype) { r = try TensorDescriptor(name: name, dtype: cast, shape: d.shape) }
                outputs.append(r)
            }
            for g in completing[i] ?? [] { outputs += groups[g].outputs }
        }
    }

    static func firstMatch(_ rules: [SliceRule], _ d: TensorDescriptor) -> (SliceRule, [String: String])? {
        for r in rules {
            if let c = r.matches(d) { return (r, c) }
        }
        return nil
    }

    /// Orders a group's inputs for stacking, runs its ops on shapes, and names its outputs.
    static func shape(_ g: inout Group, captures: [(values: [String: String], input: TensorDescriptor)]) throws {
        let rule = g.rule
        func fail(_ r: RuleError.Reason) -> RuleError { RuleError(r, file: rule.file, line: rule.line) }
        let target = rule.target!
        let stacked = rule.source.captureNames.filter { !target.captureNames.contains($0) }
        var current: NamedShape
        let first = captures[0].input
        if stacked.isEmpty {
            guard captures.count == 1 else { throw fail(.severalInputsWithoutStacking) }
            current = NamedShape(shape: first.shape, names: first.shape.map { _ in nil }, dtype: first.dtype)
        } else {
            // Each stacked capture is an axis: integers 0..<n or the words of a set, in order.
            var axes: [[String]] = []
            for c in stacked {
                let values = Set(captures.map { $0.values[c]! })
                switch rule.source.kind(of: c)! {
                case .integer:
                    let ints = values.compactMap { Int($0) }.sorted()
                    guard ints == Array(0..<ints.count) else {
                        throw fail(.stackIndicesNotConsecutive(capture: c, indices: ints))
                    }
                    axes.append(ints.map(String.init))
                case .oneOf(let words):
                    let missing = words.filter { !values.contains($0) }
                    guard missing.isEmpty else { throw fail(.stackWordsMissing(capture: c, missing: missing)) }
                    axes.append(words)
                default:
                    throw fail(.stackWithoutOrder(capture: c))
                }
            }
            let count = axes.reduce(1) { $0 * $1.count }
            guard captures.count == count else {
                throw fail(.stackCountMismatch(captures: stacked, inputs: captures.count, places: count))
            }
            func order(_ v: [String: String]) -> Int {
                zip(stacked, axes).reduce(0) { acc, p in acc * p.1.count + p.1.firstIndex(of: v[p.0]!)! }
            }
            let sorted = captures.sorted { order($0.values) < order($1.values) }
            for c in sorted where c.input.shape != first.shape || c.input.dtype != first.dtype {
                throw fail(.stackPartsDiffer(tensor: c.input.name, dtype: c.input.dtype.rawValue, shape: c.input.shape,
                                             first: first.name, firstDType: first.dtype.rawValue, firstShape: first.shape))
            }
            g.inputs = sorted.map(\.input)
            g.stack = axes.map(\.count)
            current = NamedShape(shape: g.stack + first.shape, names: stacked.map { Optional($0) } + first.shape.map { _ in nil }, dtype: first.dtype)
        }
        var elementwiseOnly = stacked.isEmpty
        for (k, op) in g.ops.enumerated() {
            switch op {
            case .rearrange(let r):
                elementwiseOnly = false
                let b: Rearrange.Bound
                do { b = try r.bind(current.shape) } catch { throw fail(.rearrangeDoesNotFit(detail: error.description)) }
                current.shape = b.outputShape
                current.names = r.right.map { if case .axis(let n) = $0 { return n } else { return nil } }
            case .index(let items):
                elementwiseOnly = false
                let v = try IndexView(items, shape: current.shape)
                current.names = v.kept.map { current.names[$0] }
                current.shape = v.shape
            case .insertZeros(let axis, let index):
                elementwiseOnly = false
                guard axis < current.shape.count, index <= current.shape[axis] else {
                    throw fail(.indexOutOfRange(index: index, axis: axis, size: axis < current.shape.count ? current.shape[axis] : 0, shape: current.shape))
                }
                current.shape[axis] += 1
            case .cast(let d):
                guard SliceCast.supported(from: current.dtype) else { throw fail(.castNotFloat(dtype: current.dtype.rawValue)) }
                current.dtype = d
            case .castFloats(let d):
                if SliceCast.supported(from: current.dtype) { current.dtype = d }
            case .scale, .add:
                guard SliceCast.supported(from: current.dtype) else { throw fail(.operationNotFloat(operation: "\(op)", dtype: current.dtype.rawValue)) }
            case .where: break
            case .mul(_, let optional):
                guard let operand = g.operands[k] else {
                    if optional { continue }
                    throw fail(.mulOperandMissing)
                }
                elementwiseOnly = false
                guard operand.shape.reduce(1, *) == current.shape.reduce(1, *), SliceCast.supported(from: operand.dtype),
                      SliceCast.supported(from: current.dtype) else {
                    throw fail(.mulOperandMismatch(operand: operand.name, operandDType: operand.dtype.rawValue, operandShape: operand.shape,
                                                  dtype: current.dtype.rawValue, shape: current.shape))
                }
            }
        }
        // Unstacking: target captures the source does not bind are axes of the final shape.
        let bound = captures[0].values
        var unstack: [(name: String, position: Int, values: [String])] = []
        for name in target.captureNames where bound[name] == nil || stacked.contains(name) {
            guard let p = current.names.firstIndex(of: name) else {
                throw fail(.unstackAxisMissing(capture: name, axes: current.names.map { $0 ?? "_" }))
            }
            let n = current.shape[p]
            let values: [String]
            if case .oneOf(let words) = target.kind(of: name)! {
                guard words.count == n else { throw fail(.unstackNamesMismatch(capture: name, names: words.count, size: n)) }
                values = words
            } else {
                values = (0..<n).map(String.init)
            }
            unstack.append((name, p, values))
        }
        unstack.sort { $0.position < $1.position }
        g.unstackAxes = unstack.map(\.position)
        g.finalShape = current.shape
        let outShape = current.shape.enumerated().filter { !g.unstackAxes.contains($0.offset) }.map(\.element)
        var combos: [[String: String]] = [[:]]
        for u in unstack { combos = combos.flatMap { c in u.values.map { c.merging([u.name: $0]) { $1 } } } }
        g.outputs = try combos.map { c in
            let rest = Set(rule.source.captureNames.filter { rule.source.kind(of: $0) == .rest })
            guard let name = target.substitute(bound.merging(c) { $1 }, rejoin: rest) else { throw fail(.targetUnbound(target: "\(target)")) }
            do { return try TensorDescriptor(name: name, dtype: current.dtype, shape: outShape) } catch {
                throw fail(.invalidOutput(name: name, detail: "\(error)"))
            }
        }
        g.streams = elementwiseOnly && unstack.isEmpty && g.operands.isEmpty
        // Leading-axis unstacking streams slice by slice: one rearrange first that keeps its first
        // axis first, then only element-wise ops; other unstacked axes are cut within each slice.
        if stacked.isEmpty, g.operands.isEmpty, unstack.first?.position == 0,
           case .rearrange(let r)? = g.ops.first(where: { if case .where = $0 { return false } else { return true } }),
           r.left.first == .axis(unstack[0].name),
           g.ops.filter({
               switch $0 {
               case .rearrange, .index, .mul, .insertZeros: return true
               default: return false
               }
           }).count == 1,
           let per = r.droppingLeadingAxis() {
            g.perSlice = per
        }
    }
}

/// numpy basic indexing of a row-major shape: the offset and strides of the view.
struct IndexView {
    var offset = 0
    var shape: [Int] = []
    var strides: [Int] = []
    /// Input axes that remain, in order.
    var kept: [Int] = []

    init(_ items: [SliceOp.IndexItem], shape input: [Int]) throws {
        guard items.count <= input.count else { throw RuleError(.indexTooManyItems(items: items.count, shape: input)) }
        var stride = [Int](repeating: 1, count: input.count)
        for d in stride.indices.reversed().dropFirst() { stride[d] = stride[d + 1] * input[d + 1] }
        for d in input.indices {
            let item = d < items.count ? items[d] : .all
            let n = input[d]
            switch item {
            case .all:
                shape.append(n); strides.append(stride[d]); kept.append(d)
            case .at(let i):
                let j = i < 0 ? n + i : i
                guard j >= 0 && j < n else { throw RuleError(.indexOutOfRange(index: i, axis: d, size: n, shape: input)) }
                offset += j * stride[d]
            case .range(let a, let b):
                func clamp(_ x: Int?, _ dflt: Int) -> Int {
                    guard let x else { return dflt }
                    return min(max(x < 0 ? n + x : x, 0), n)
                }
                let lo = clamp(a, 0), hi = max(clamp(b, n), clamp(a, 0))
                offset += lo * stride[d]
                shape.append(hi - lo); strides.append(stride[d]); kept.append(d)
            }
        }
    }
}
