import CLowRank
import Dispatch
import Glibc

/// How a LoRA pair combines into a weight delta, as labelled axes: ΔW = scale · Σ_r A·B̃,
/// where B̃ is B summed over `summedInB` first (einsum LoRA contracts those axes of B on
/// its own: openpi's attn_vec sums its head axis in both einsums), and every other label
/// of W comes from A, from B̃, or from both (then it is a batch axis, element by element).
///
///     W  [N H D]   A [N H r]   B [N r D], summedInB {N}:  ΔW[n,h,d] = Σ_r A[n,h,r]·Σ_n' B[n',r,d]
///     W  [o i]     A [r i]     B [o r]  (PEFT Linear):    ΔW[o,i]   = Σ_r B[o,r]·A[r,i]
public struct LowRankLayout: Equatable, Sendable {
    public var weight: [Character]
    public var a: [Character]
    public var b: [Character]
    public var summedInB: Set<Character>
    /// The rank label (appears in A and B only).
    public static let rank: Character = "\u{2}"

    public init(weight: [Character], a: [Character], b: [Character], summedInB: Set<Character> = []) {
        self.weight = weight
        self.a = a
        self.b = b
        self.summedInB = summedInB
    }
}

/// A merge error: names the tensors and what does not fit.
public struct LoRAError: CkptError {
    public var message: String
    public var tensors: [String]
    public init(_ message: String, tensors: [String] = []) {
        self.message = message
        self.tensors = tensors
    }
    public var exitStatus: SysExit { .dataError }
    public var description: String {
        tensors.isEmpty ? message : "\(tensors.joined(separator: ", ")): \(message)"
    }
}

/// What rounding the merged weight to its output type changed, against the float32 merge.
public struct MergeDrift: Sendable {
    public var maxAbs: Double = 0
    public var sumAbs: Double = 0
    public var count = 0
    public var meanAbs: Double { count == 0 ? 0 : sumAbs / Double(count) }
    mutating func add(_ other: MergeDrift) {
        maxAbs = max(maxAbs, other.maxAbs)
        sumAbs += other.sumAbs
        count += other.count
    }
}

/// One merge, planned from the layout and the three shapes: W viewed as
/// [batch][rows][cols] where rows come from one factor and cols from the other.
public struct LowRankMerge: Sendable {
    public let layout: LowRankLayout
    public let weightShape: [Int]
    public let rank: Int
    let batchLabels: [Character]
    let rowLabels: [Character]
    let colLabels: [Character]
    /// Rows come from A (else from B̃).
    let rowsFromA: Bool
    let sizes: [Character: Int]
    public let batch: Int
    public let rows: Int
    public let cols: Int
    /// W's own axis order is batch, rows, cols: the merge runs in place, block by block.
    let inOrder: Bool

    /// Checks the shapes against the layout; `names` (W, A, B) label the error.
    public init(layout: LowRankLayout, weight: [Int], a: [Int], b: [Int], names: [String]) throws(LoRAError) {
        func fail(_ m: String) -> LoRAError { LoRAError(m, tensors: names) }
        guard layout.weight.count == weight.count, layout.a.count == a.count, layout.b.count == b.count else {
            throw fail("ranks do not fit the LoRA layout: weight \(weight), A \(a), B \(b)")
        }
        var sizes: [Character: Int] = [:]
        func bind(_ labels: [Character], _ shape: [Int], _ what: String) throws(LoRAError) {
            for (l, n) in zip(labels, shape) {
                if let m = sizes[l], m != n {
                    let axis = l == LowRankLayout.rank ? "rank" : "axis \(l)"
                    throw fail("\(what) has \(axis) of size \(n), expected \(m) (weight \(weight), A \(a), B \(b))")
                }
                sizes[l] = n
            }
        }
        try bind(layout.weight, weight, "weight")
        try bind(layout.a, a, "lora A")
        try bind(layout.b, b, "lora B")
        guard let r = sizes[LowRankLayout.rank], r > 0 else { throw fail("the adapter has rank 0") }
        let inA = Set(layout.a), inB = Set(layout.b).subtracting(layout.summedInB)
        guard !layout.weight.contains(LowRankLayout.rank) else { throw fail("the rank label is an axis of the weight") }
        var batchLabels: [Character] = [], fromA: [Character] = [], fromB: [Character] = []
        for l in layout.weight {
            switch (inA.contains(l), inB.contains(l)) {
            case (true, true): batchLabels.append(l)
            case (true, false): fromA.append(l)
            case (false, true): fromB.append(l)
            case (false, false): throw fail("weight axis \(l) comes from neither A nor B")
            }
        }
        for l in inA.union(inB) where l != LowRankLayout.rank && !layout.weight.contains(l) {
            throw fail("adapter axis \(l) is not an axis of the weight")
        }
        // Rows: whichever factor's labels come first in W after the batch axes.
        let firstOwn = layout.weight.first { !batchLabels.contains($0) }
        let rowsFromA = firstOwn.map { fromA.contains($0) } ?? true
        self.layout = layout
        self.weightShape = weight
        self.rank = r
        self.batchLabels = batchLabels
        self.rowLabels = rowsFromA ? fromA : fromB
        self.colLabels = rowsFromA ? fromB : fromA
        self.rowsFromA = rowsFromA
        self.sizes = sizes
        let count = { (ls: [Character]) in ls.reduce(1) { $0 * sizes[$1]! } }
        batch = count(batchLabels)
        rows = count(rowLabels)
        cols = count(colLabels)
        inOrder = layout.weight == batchLabels + rowLabels + colLabels
    }

    /// Multiply-adds the merge performs (for throughput reports).
    public var flops: Double { 2 * Double(batch) * Double(rows) * Double(cols) * Double(rank) }

    /// The two factors as dense float32 matrices, per batch: left [rows × rank] (with the
    /// scale folded in) and right [rank × cols]. Sums over B's summed axes in float64.
    public func factors(a: [Float], b: [Float], scale: Double) -> (left: [Float], right: [Float]) {
        let r = LowRankLayout.rank
        let aLabels = layout.a, bLabels = layout.b
        let leftLabels = batchLabels + rowLabels + [r]
        let rightLabels = batchLabels + [r] + colLabels
        let (lSrc, lLabels) = rowsFromA ? (a, aLabels) : (b, bLabels)
        let (rSrc, rLabels) = rowsFromA ? (b, bLabels) : (a, aLabels)
        let left = LowRankMerge.gather(lSrc, labels: lLabels, into: leftLabels, sizes: sizes, scale: scale)
        let right = LowRankMerge.gather(rSrc, labels: rLabels, into: rightLabels, sizes: sizes, scale: 1)
        return (left, right)
    }

    /// Rearranges `source` (axes `labels`) into dense `target` order, summing in float64 over
    /// the labels `target` does not have, then scales.
    static func gather(_ source: [Float], labels: [Character], into target: [Character], sizes: [Character: Int], scale: Double) -> [Float] {
        let targetCount = target.reduce(1) { $0 * sizes[$1]! }
        var targetStride: [Character: Int] = [:]
        var s = 1
        for l in target.reversed() {
            targetStride[l] = s
            s *= sizes[l]!
        }
        let shape = labels.map { sizes[$0]! }
        let step = labels.map { targetStride[$0] ?? 0 }  // 0: summed over
        var acc = [Double](repeating: 0, count: targetCount)
        guard !source.isEmpty else { return [Float](repeating: 0, count: targetCount) }
        var index = [Int](repeating: 0, count: labels.count)
        var offset = 0
        let rank = labels.count
        source.withUnsafeBufferPointer { src in
            acc.withUnsafeMutableBufferPointer { dst in
                let inner = shape[rank - 1], innerStep = step[rank - 1]
                var i = 0
                while i < src.count {
                    var o = offset
                    for k in 0..<inner {
                        dst[o] += Double(src[i + k])
                        o += innerStep
                    }
                    i += inner
                    // Advance the odometer over all but the last axis.
                    var d = rank - 2
                    while d >= 0 {
                        index[d] += 1
                        offset += step[d]
                        if index[d] < shape[d] { break }
                        offset -= step[d] * shape[d]
                        index[d] = 0
                        d -= 1
                    }
                }
            }
        }
        return acc.map { Float($0 * scale) }
    }

    /// Merges into `output` (`outputType`, W's shape): W (`base`, `baseType`) + left·right,
    /// computed in float32, checked finite, rounded once. With `magnitude` (DoRA), each
    /// output row along `magnitudeAxis` of the merged weight is scaled to m / ‖row‖.
    /// Returns the rounding drift when the output type is narrower than float32.
    public func apply(base: UnsafeRawPointer, baseType: DType, left: [Float], right: [Float],
                      output: UnsafeMutableRawPointer, outputType: DType,
                      magnitude: (values: [Float], axis: Int)? = nil, name: String) throws(LoRAError) -> MergeDrift {
        let total = batch * rows * cols
        if inOrder && magnitude == nil {
            return try applyInBlocks(base: base, baseType: baseType, left: left, right: right, output: output, outputType: outputType, name: name)
        }
        // General layouts and DoRA: the whole merged weight in float32 first.
        var merged = [Float](repeating: 0, count: total)
        merged.withUnsafeMutableBufferPointer { m in
            FloatConversion.widen(base, baseType, count: total, into: m.baseAddress!)
        }
        if inOrder {
            merged.withUnsafeMutableBufferPointer { m in
                for bi in 0..<batch {
                    left.withUnsafeBufferPointer { l in
                        right.withUnsafeBufferPointer { r in
                            ckpt_low_rank_update(m.baseAddress! + bi * rows * cols, cols, l.baseAddress! + bi * rows * rank,
                                                 r.baseAddress! + bi * rank * cols, rows, cols, rank)
                        }
                    }
                }
            }
        } else {
            var delta = [Float](repeating: 0, count: total)
            delta.withUnsafeMutableBufferPointer { d in
                left.withUnsafeBufferPointer { l in
                    right.withUnsafeBufferPointer { r in
                        for bi in 0..<batch {
                            ckpt_low_rank_update(d.baseAddress! + bi * rows * cols, cols, l.baseAddress! + bi * rows * rank,
                                                 r.baseAddress! + bi * rank * cols, rows, cols, rank)
                        }
                    }
                }
            }
            // Add ΔW (in batch, rows, cols order) to W in W's own order.
            let canonical = batchLabels + rowLabels + colLabels
            var stride: [Character: Int] = [:]
            var s = 1
            for l in canonical.reversed() {
                stride[l] = s
                s *= sizes[l]!
            }
            let shape = layout.weight.map { sizes[$0]! }
            let step = layout.weight.map { stride[$0]! }
            var index = [Int](repeating: 0, count: shape.count)
            var offset = 0
            for i in 0..<total {
                merged[i] += delta[offset]
                var d = shape.count - 1
                while d >= 0 {
                    index[d] += 1
                    offset += step[d]
                    if index[d] < shape[d] { break }
                    offset -= step[d] * shape[d]
                    index[d] = 0
                    d -= 1
                }
            }
        }
        if let (m, axis) = magnitude {
            try LowRankMerge.scaleToMagnitude(&merged, shape: weightShape, magnitude: m, axis: axis, name: name)
        }
        return try merged.withUnsafeBufferPointer { m throws(LoRAError) in
            try LowRankMerge.finish(m.baseAddress!, count: total, into: output, outputType: outputType, name: name)
        }
    }

    /// The usual case: W is [batch][rows][cols] already. Blocks of rows are widened, merged
    /// and rounded by every core, each into its own part of `output`.
    private func applyInBlocks(base: UnsafeRawPointer, baseType: DType, left: [Float], right: [Float],
                               output: UnsafeMutableRawPointer, outputType: DType, name: String) throws(LoRAError) -> MergeDrift {
        let blockRows = max(4, min(rows, (1 << 18) / max(cols, 1)) / 4 * 4)
        let blocksPerBatch = (rows + blockRows - 1) / blockRows
        let blocks = batch * blocksPerBatch
        let workers = max(1, min(blocks, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        final class Results: @unchecked Sendable {
            let lock = Mutex()
            var drift = MergeDrift()
            var error: LoRAError?
        }
        let results = Results()
        let (rows, cols, rank, baseSize, outSize) = (self.rows, self.cols, self.rank, baseType.size, outputType.size)
        let basePointer = UnsafeRawPointer(base), outPointer = UnsafeMutableRawPointer(output)
        nonisolated(unsafe) let (bp, op) = (basePointer, outPointer)
        left.withUnsafeBufferPointer { l in
            right.withUnsafeBufferPointer { r in
                nonisolated(unsafe) let (lp, rp) = (l.baseAddress!, r.baseAddress!)
                DispatchQueue.concurrentPerform(iterations: workers) { w in
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: blockRows * cols)
                    defer { scratch.deallocate() }
                    var drift = MergeDrift()
                    var block = w
                    while block < blocks {
                        let bi = block / blocksPerBatch, r0 = (block % blocksPerBatch) * blockRows
                        let n = min(blockRows, rows - r0)
                        let first = (bi * rows + r0) * cols
                        FloatConversion.widen(bp + first * baseSize, baseType, count: n * cols, into: scratch)
                        ckpt_low_rank_update(scratch, cols, lp + (bi * rows + r0) * rank, rp + bi * rank * cols, n, cols, rank)
                        do throws(LoRAError) {
                            drift.add(try LowRankMerge.finish(scratch, count: n * cols, into: op + first * outSize, outputType: outputType, name: name))
                        } catch {
                            results.lock.withLock { if results.error == nil { results.error = error } }
                            return
                        }
                        block += workers
                    }
                    results.lock.withLock { results.drift.add(drift) }
                }
            }
        }
        if let e = results.error { throw e }
        return results.drift
    }

    /// Checks that every merged value is finite, rounds it to `outputType`, and measures
    /// what rounding changed.
    static func finish(_ merged: UnsafePointer<Float>, count: Int, into output: UnsafeMutableRawPointer,
                       outputType: DType, name: String) throws(LoRAError) -> MergeDrift {
        var finite = true
        for i in 0..<count where !merged[i].isFinite { finite = false; break }
        guard finite else {
            let bad = (0..<count).filter { !merged[$0].isFinite }
            throw LoRAError("the merged weight has \(bad.count) non-finite values (first at element \(bad[0])): the adapter or base is broken", tensors: [name])
        }
        FloatConversion.narrow(merged, count: count, to: outputType, into: output)
        var drift = MergeDrift()
        guard outputType != .f32 && outputType != .f64 else { return drift }
        var back = [Float](repeating: 0, count: min(count, 4096))
        var i = 0
        while i < count {
            let n = min(back.count, count - i)
            back.withUnsafeMutableBufferPointer { FloatConversion.widen(output + i * outputType.size, outputType, count: n, into: $0.baseAddress!) }
            for k in 0..<n {
                let d = Double(abs(back[k] - merged[i + k]))
                if d > drift.maxAbs { drift.maxAbs = d }
                drift.sumAbs += d
            }
            i += n
        }
        drift.count = count
        return drift
    }

    /// DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output channel (`axis` of a
    /// 2-D weight is the output axis) over the other axis, in float64.
    static func scaleToMagnitude(_ merged: inout [Float], shape: [Int], magnitude: [Float], axis: Int, name: String) throws(LoRAError) {
        guard shape.count == 2, magnitude.count == shape[axis] else {
            throw LoRAError("DoRA magnitude of \(magnitude.count) values does not fit weight \(shape) (only 2-D Linear DoRA is merged)", tensors: [name])
        }
        let (r, c) = (shape[0], shape[1])
        var norms = [Double](repeating: 0, count: shape[axis])
        for i in 0..<r {
            for j in 0..<c {
                let v = Double(merged[i * c + j])
                norms[axis == 0 ? i : j] += v * v
            }
        }
        let factor = (0..<norms.count).map { Float(Double(magnitude[$0]) / norms[$0].squareRoot()) }
        for i in 0..<r {
            for j in 0..<c { merged[i * c + j] *= factor[axis == 0 ? i : j] }
        }
    }
}
