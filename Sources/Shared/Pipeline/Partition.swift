/// Partitioned conversion (`ckpt-read --part K/N`): the tensors of one input cut into N parts
/// that N pipelines convert independently (on other hosts, as a Slurm array job), each part
/// then written as its own shard (`ckpt-write --part`) and the shards tied together by
/// `ckpt-write --finalize`.
///
/// Every one of the N processes computes the same partition from the input's manifest alone
/// (no data is read), so they need not talk to each other: the partition is a pure function
/// of the manifest, the groups and N.

/// `--part K/N`: the K-th of N parts, K counted from 0 as Slurm's `$SLURM_ARRAY_TASK_ID` is
/// with `--array=0-(N-1)`.
public struct PartSpec: Equatable, Sendable, CustomStringConvertible {
    public var index: Int
    public var count: Int

    public init(index: Int, count: Int) {
        self.index = index
        self.count = count
    }

    /// Parses `K/N` with 0 ≤ K < N; nil otherwise.
    public init?(argument: String) {
        let f = argument.split(separator: "/", omittingEmptySubsequences: false)
        guard f.count == 2, f.allSatisfy({ !$0.isEmpty && $0.utf8.allSatisfy { $0 >= 48 && $0 <= 57 } }),
              let k = Int(f[0]), let n = Int(f[1]), n >= 1, k < n else { return nil }
        self.init(index: k, count: n)
    }

    /// Why `argument` is not a part, for the usage error.
    public static func problem(_ argument: String) -> String {
        let f = argument.split(separator: "/", omittingEmptySubsequences: false)
        if f.count == 2, let k = Int(f[0]), let n = Int(f[1]), n >= 1, k >= n {
            return "--part \(argument): parts are counted from 0, so K must be below N (0..\(n - 1))"
        }
        return "--part takes K/N with 0 <= K < N (e.g. 0/4, or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), not '\(argument)'"
    }

    public var description: String { "\(index)/\(count)" }
}

/// Tensors that must travel in one part, as a union-find over manifest positions.
public struct TensorGroups {
    private var parent: [Int]

    public init(count: Int) { parent = Array(0..<count) }

    public var count: Int { parent.count }

    public mutating func find(_ i: Int) -> Int {
        var root = i
        while parent[root] != root { root = parent[root] }
        var j = i
        while parent[j] != root { (parent[j], j) = (root, parent[j]) }
        return root
    }

    /// Puts `a` and `b` (and everything already with either) in one group.
    public mutating func union(_ a: Int, _ b: Int) {
        let ra = find(a), rb = find(b)
        guard ra != rb else { return }
        // The smaller position becomes the root: a group's root is its first tensor.
        if ra < rb { parent[rb] = ra } else { parent[ra] = rb }
    }

    public mutating func union(_ members: [Int]) {
        guard let first = members.first else { return }
        for m in members.dropFirst() { union(first, m) }
    }

    /// Every group's positions in ascending (input) order, groups ordered by their first tensor.
    public mutating func groups() -> [[Int]] {
        var byRoot: [Int: Int] = [:]
        var out: [[Int]] = []
        for i in parent.indices {
            let r = find(i)
            if let g = byRoot[r] { out[g].append(i) } else {
                byRoot[r] = out.count
                out.append([i])
            }
        }
        return out
    }
}

/// What must stay together, decided from the manifest.
public enum PartitionGrouping {
    /// A base tensor and its LoRA adapters (the pairing `lora-merge` uses). Returns each
    /// tensor's name as the merge will leave it (nil: an adapter, consumed), which is what the
    /// rules of a later `ckpt-slice` will see.
    @discardableResult
    public static func lora(_ manifest: [TensorDescriptor], into groups: inout TensorGroups) -> [String?] {
        let (modules, outputNames) = LoRAScheme.mergePairing(manifest.map(\.name))
        for m in modules { groups.union(m) }
        return outputNames
    }

    /// Every input of one rule application of a later `ckpt-slice` (the parts of a stack, a
    /// `mul` operand with the tensor it multiplies): planned with `SlicePlan` as ckpt-slice
    /// plans them. `names` are the tensors' names as the rules will see them (after
    /// lora-merge: `lora(_:into:)`'s result), nil for tensors gone before then. Tensors no rule
    /// matches are left alone here; ckpt-slice reports them.
    public static func rules(_ rules: [SliceRule], manifest: [TensorDescriptor], names: [String?]? = nil,
                             into groups: inout TensorGroups) throws {
        var view: [TensorDescriptor] = []
        var position: [String: Int] = [:]
        for (i, d) in manifest.enumerated() {
            let name = names.map { $0[i] } ?? d.name
            guard let name else { continue }
            var v = d
            v.name = name
            view.append(v)
            position[name] = i
        }
        let plan = try SlicePlan(rules: rules, inputs: view, keepUnmatched: true)
        for g in plan.groups {
            groups.union((g.inputs + g.operands.values).compactMap { position[$0.name] })
        }
    }
}

/// The assignment of a manifest's tensors to N parts: groups of tensors never split, bytes
/// balanced by the greedy "largest group first, to the least loaded part" (ties: the group
/// whose first tensor's name sorts first; the part with the lowest index).
public struct Partition {
    public let count: Int
    /// The part of each manifest entry.
    public let partOf: [Int]
    /// Bytes per part.
    public let bytes: [Int]
    /// Groups per part.
    public let groupCounts: [Int]

    public init(_ manifest: [TensorDescriptor], groups: TensorGroups, count: Int) {
        precondition(count >= 1 && groups.count == manifest.count)
        var g = groups
        struct Item { var members: [Int]; var bytes: Int; var first: String }
        var items = g.groups().map { m in Item(members: m, bytes: m.reduce(0) { $0 + manifest[$1].byteCount }, first: manifest[m[0]].name) }
        items.sort { $0.bytes != $1.bytes ? $0.bytes > $1.bytes : Array($0.first.utf8).lexicographicallyPrecedes(Array($1.first.utf8)) }
        var heap = PartHeap(count: count)
        var partOf = [Int](repeating: 0, count: manifest.count)
        var bytes = [Int](repeating: 0, count: count)
        var groupCounts = [Int](repeating: 0, count: count)
        for item in items {
            let p = heap.popLeast()
            for m in item.members { partOf[m] = p }
            bytes[p] += item.bytes
            groupCounts[p] += 1
            heap.push(load: bytes[p], part: p)
        }
        self.count = count
        self.partOf = partOf
        self.bytes = bytes
        self.groupCounts = groupCounts
    }

    /// Part `k`'s tensors, in the input's order.
    public func tensors(in k: Int, of manifest: [TensorDescriptor]) -> [TensorDescriptor] {
        manifest.indices.filter { partOf[$0] == k }.map { manifest[$0] }
    }

    /// SHA-256 of the assignment (N, then each tensor's part), so `--finalize` can tell parts
    /// cut by different plans (other grouping options) of the same input.
    public var digest: String {
        var w = ByteWriter(capacity: 8 + 4 * partOf.count)
        w.u64(UInt64(count))
        for p in partOf { w.u32(UInt32(p)) }
        var h = SHA256()
        h.update(w.bytes)
        return h.hexDigest()
    }

    /// SHA-256 of the manifest as the stream encodes it: the identity of the input (names,
    /// types, shapes, order) for the `part` header key.
    public static func manifestDigest(_ manifest: [TensorDescriptor]) -> String {
        var h = SHA256()
        h.update(FrameEncoder.manifest(manifest))
        return h.hexDigest()
    }
}

/// A min-heap of (load, part): the least loaded part, lowest index first among equals.
struct PartHeap {
    private var items: [(load: Int, part: Int)]

    init(count: Int) { items = (0..<count).map { (0, $0) } }  // sorted: already a heap

    private static func less(_ a: (load: Int, part: Int), _ b: (load: Int, part: Int)) -> Bool {
        a.load != b.load ? a.load < b.load : a.part < b.part
    }

    mutating func popLeast() -> Int {
        let top = items[0].part
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && PartHeap.less(items[l], items[m]) { m = l }
                if r < items.count && PartHeap.less(items[r], items[m]) { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return top
    }

    mutating func push(load: Int, part: Int) {
        items.append((load, part))
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            guard PartHeap.less(items[i], items[p]) else { break }
            items.swapAt(i, p)
            i = p
        }
    }
}

/// The stream header key `part` (docs/stream-format.md): which part of which input a stream
/// carries. Set by `ckpt-read --part`, forwarded by every stage, checked by `ckpt-write --part`
/// and, through the part records, by `--finalize`.
public struct PartHeader: Equatable, Sendable {
    public var index: Int
    public var count: Int
    /// SHA-256 (hex) of the whole input's manifest frame.
    public var input: String
    /// SHA-256 (hex) of the assignment of tensors to parts.
    public var plan: String?
    /// Tensors `ckpt-read` emitted in this part (later stages may merge or split them).
    public var tensors: Int

    public static let key = "part"

    public init(index: Int, count: Int, input: String, plan: String?, tensors: Int) {
        self.index = index
        self.count = count
        self.input = input
        self.plan = plan
        self.tensors = tensors
    }

    public var json: JSONValue {
        var o = JSONObject([("index", .int(index)), ("count", .int(count)), ("input", .string(input))])
        if let plan { o["plan"] = .string(plan) }
        o["tensors"] = .int(tensors)
        return .object(o)
    }

    /// Reads the key back; nil if it is not a well-formed part.
    public init?(json: JSONValue) {
        guard let o = json.objectValue, let k = o["index"]?.nonNegativeIntValue, let n = o["count"]?.nonNegativeIntValue, k < n,
              let input = o["input"]?.stringValue, let t = o["tensors"]?.nonNegativeIntValue else { return nil }
        let plan = o["plan"]?.stringValue
        if o["plan"] != nil && plan == nil { return nil }
        self.init(index: k, count: n, input: input, plan: plan, tensors: t)
    }
}
