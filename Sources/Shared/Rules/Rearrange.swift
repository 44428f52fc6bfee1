/// An einops `rearrange` expression (einops.rearrange's pattern language): axes named on the
/// left are the input's, regrouped, reordered and merged on the right.
///
///     "L N D H -> L (N H) D"    transpose and merge
///     "(s o) i -> s o i"        split (a group's unknown size is inferred: s from a size or the set)
///     "1 n d -> n d"            drop a unit axis
///
/// Sizes can be given after the expression: `rearrange "(s o) i -> s o i" s=3`.
public struct Rearrange: Equatable, Sendable, CustomStringConvertible {
    /// One position of a side: an axis, a parenthesised group of axes, or a unit axis.
    public enum Item: Equatable, Sendable {
        case axis(String)
        case group([String])
        case unit
        var names: [String] {
            switch self {
            case .axis(let n): return [n]
            case .group(let g): return g
            case .unit: return []
            }
        }
    }

    public let left: [Item]
    public let right: [Item]
    public let sizes: [String: Int]
    public let text: String
    public var description: String { text }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public init(_ text: String, sizes: [String: Int] = [:]) throws(Failure) {
        self.text = text
        self.sizes = sizes
        let sides = text.split(separator: "->", omittingEmptySubsequences: false).map(String.init)
        guard sides.count == 2 else { throw Failure(description: "rearrange \"\(text)\": expected 'left -> right'") }
        left = try Rearrange.side(sides[0], text)
        right = try Rearrange.side(sides[1], text)
        let l = left.flatMap(\.names), r = right.flatMap(\.names)
        for (side, names) in [("left", l), ("right", r)] where Set(names).count != names.count {
            throw Failure(description: "rearrange \"\(text)\": an axis appears twice on the \(side)")
        }
        guard Set(l) == Set(r) else {
            let missing = Set(l).symmetricDifference(Set(r)).sorted()
            throw Failure(description: "rearrange \"\(text)\": axes \(missing.joined(separator: ", ")) must appear on both sides")
        }
    }

    /// The same expression without its first axis on both sides (applied to one slice along
    /// a leading axis that stays leading).
    public func droppingLeadingAxis() -> Rearrange? {
        guard case .axis(let a)? = left.first, right.first == .axis(a) else { return nil }
        return Rearrange(left: Array(left.dropFirst()), right: Array(right.dropFirst()), sizes: sizes, text: text + " (per \(a))")
    }

    private init(left: [Item], right: [Item], sizes: [String: Int], text: String) {
        self.left = left
        self.right = right
        self.sizes = sizes
        self.text = text
    }

    private static func side(_ s: String, _ text: String) throws(Failure) -> [Item] {
        var items: [Item] = []
        var group: [String]?
        var word = ""
        func flush() throws(Failure) {
            guard !word.isEmpty else { return }
            defer { word = "" }
            if word == "1" {
                guard group == nil else { throw Failure(description: "rearrange \"\(text)\": 1 inside a group") }
                items.append(.unit)
                return
            }
            guard word.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }), !word.first!.isNumber else {
                throw Failure(description: "rearrange \"\(text)\": '\(word)' is not an axis name")
            }
            if group != nil { group!.append(word) } else { items.append(.axis(word)) }
        }
        for c in s {
            switch c {
            case " ", "\t": try flush()
            case "(":
                try flush()
                guard group == nil else { throw Failure(description: "rearrange \"\(text)\": nested parentheses") }
                group = []
            case ")":
                try flush()
                guard let g = group else { throw Failure(description: "rearrange \"\(text)\": ')' without '('") }
                items.append(.group(g))
                group = nil
            default: word.append(c)
            }
        }
        try flush()
        if group != nil { throw Failure(description: "rearrange \"\(text)\": '(' without ')'") }
        return items
    }

    /// The expression bound to an input shape: every axis's size, and for the output (right
    /// side, axes in order) the input stride of each axis, in elements.
    public struct Bound: Equatable, Sendable {
        public var axisSizes: [String: Int]
        /// The right side's items' sizes: the output shape.
        public var outputShape: [Int]
        /// Elementary axes of the right side, in order, with their input strides.
        public var axes: [(name: String, size: Int, stride: Int)]
        public static func == (a: Bound, b: Bound) -> Bool {
            a.axisSizes == b.axisSizes && a.outputShape == b.outputShape && a.axes.map(\.name) == b.axes.map(\.name)
        }
    }

    /// Binds the left side to `shape`, checking rank and divisibility.
    public func bind(_ shape: [Int], extra: [String: Int] = [:]) throws(Failure) -> Bound {
        guard shape.count == left.count else {
            throw Failure(description: "rearrange \"\(text)\": the left side has \(left.count) axes, the tensor \(shape.count) (\(shape))")
        }
        var known = sizes.merging(extra) { a, _ in a }
        for (item, n) in zip(left, shape) {
            switch item {
            case .unit:
                guard n == 1 else { throw Failure(description: "rearrange \"\(text)\": axis 1 has size \(n) in \(shape)") }
            case .axis(let a):
                if let k = known[a], k != n { throw Failure(description: "rearrange \"\(text)\": \(a) is \(k), the tensor has \(n) in \(shape)") }
                known[a] = n
            case .group(let g):
                let unknown = g.filter { known[$0] == nil }
                let product = g.compactMap { known[$0] }.reduce(1, *)
                guard unknown.count <= 1 else {
                    throw Failure(description: "rearrange \"\(text)\": cannot split \(n) into (\(g.joined(separator: " "))) without the sizes of \(unknown.dropFirst().joined(separator: ", "))")
                }
                if let u = unknown.first {
                    guard product > 0, n % product == 0 else {
                        throw Failure(description: "rearrange \"\(text)\": \(n) is not divisible by \(product) in (\(g.joined(separator: " "))) of \(shape)")
                    }
                    known[u] = n / product
                } else if product != n {
                    throw Failure(description: "rearrange \"\(text)\": (\(g.joined(separator: " "))) is \(product), the tensor has \(n) in \(shape)")
                }
            }
        }
        // Input strides of every elementary axis (row-major over the left side's axes).
        var stride: [String: Int] = [:]
        var s = 1
        for item in left.reversed() {
            for a in item.names.reversed() {
                stride[a] = s
                s *= known[a]!
            }
        }
        let axes = right.flatMap(\.names).map { (name: $0, size: known[$0]!, stride: stride[$0]!) }
        let outputShape = right.map { item -> Int in item.names.reduce(1) { $0 * known[$1]! } }
        return Bound(axisSizes: known, outputShape: outputShape, axes: axes)
    }
}
