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
/// What rounding the merged weight to its output type changed, against the float32 merge.
public struct MergeDrift: Sendable {
    public var maxAbs: Double
    public var sumAbs: Double
    public var count: Int
    public init(maxAbs: Double = 0, sumAbs: Double = 0, count: Int = 0) {
        self.maxAbs = maxAbs
        self.sumAbs = sumAbs
        self.count = count
    }
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
        func fail(_ r: LoRAError.Reason) -> LoRAError { LoRAError(r, tensors: names) }
        guard layout.weight.count == weight.count, layout.a.count == a.count, layout.b.count == b.count else {
            throw fail(.layoutRanksMismatch(weight: weight, a: a, b: b))
        }
        var sizes: [Character: Int] = [:]
        func bind(_ labels: [Character], _ shape: [Int], _ what: String) throws(LoRAError) {
            for (l, n) in zip(labels, shape) {
                if let m = sizes[l], m != n {
                    let axis = l == LowRankLayout.rank ? "rank" : "axis \(l)"
                    throw fail(.axisSizeMismatch(factor: what, axis: axis, size: n, expected: m, weight: weight, a: a, b: b))
                }
                sizes[l] = n
            }
        }
        try bind(layout.weight, weight, "weight")
        try bind(layout.a, a, "lora A")
        try bind(layout.b, b, "lora B")
        guard let r = sizes[LowRankLayout.rank], r > 0 else { throw fail(.zeroRank) }
        let inA = Set(layout.a), inB = Set(layout.b).subtracting(layout.summedInB)
        guard !layout.weight.contains(LowRankLayout.rank) else { throw fail(.rankIsWeightAxis) }
        var batchLabels: [Character] = [], fromA: [Character] = [], fromB: [Character] = []
        for l in layout.weight {
            switch (inA.contains(l), inB.contains(l)) {
            case (true, true): batchLabels.append(l)
            case (true, false): fromA.append(l)
            case (false, true): fromB.append(l)
            case (false, false): throw fail(.weightAxisFromNeither(axis: String(l)))
            }
        }
        for l in inA.union(inB) where l != LowRankLayout.rank && !layout.weight.contains(l) {
            throw fail(.adapterAxisNotInWeight(axis: String(l)))
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
        var cursor = StridedCursor(shape: shape, step: step)
        let rank = labels.count
        source.withUnsafeBufferPointer { src in
            acc.withUnsafeMutableBufferPointer { dst in
                let inner = shape[rank - 1], innerStep = step[rank - 1]
                var i = 0
                while i < src.count {
                    var o = cursor.offset
                    for k in 0..<inner {
                        dst[o] += Double(src[i + k])
                        o += innerStep
                    }
                    i += inner
                    cursor.advance(axes: rank - 1)
                }
            }
        }
        return acc.map { Float($0 * scale) }
    }

    /// Merges into `output` (`outputType`, W's shape): W (`base`, `baseType`) + left·right,
    /// computed in float32, checked finite, rounded once. With `magnitude` (DoRA), each
    /// output row along `magnitudeAxis` of the merged weight is scaled to m / ‖row‖.
    /// Returns the rounding drift when the output type is narrower than float32.
    ///
    /// The whole merged weight is held in float32 first: this serves DoRA (its norms need whole
    /// rows or columns) and layouts not in batch-rows-columns order. Weights in that order
    /// stream through `StreamingMerge` instead.
    public func apply(base: UnsafeRawPointer, baseType: DType, left: [Float], right: [Float],
                      output: UnsafeMutableRawPointer, outputType: DType,
                      magnitude: (values: [Float], axis: Int)? = nil, name: String) throws(LoRAError) -> MergeDrift {
        let total = batch * rows * cols
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
            var cursor = StridedCursor(shape: layout.weight.map { sizes[$0]! }, step: layout.weight.map { stride[$0]! })
            for i in 0..<total {
                merged[i] += delta[cursor.offset]
                cursor.advance(axes: layout.weight.count)
            }
        }
        if let (m, axis) = magnitude {
            try LowRankMerge.scaleToMagnitude(&merged, shape: weightShape, magnitude: m, axis: axis, name: name)
        }
        return try merged.withUnsafeBufferPointer { m throws(LoRAError) in
            try LowRankMerge.finish(m.baseAddress!, count: total, into: output, outputType: outputType, name: name)
        }
    }

    /// Checks that every merged value is finite, rounds it to `outputType`, and measures
    /// what rounding changed (one pass, in C, for the usual float32 and bfloat16 outputs).
    static func finish(_ merged: UnsafePointer<Float>, count: Int, into output: UnsafeMutableRawPointer,
                       outputType: DType, name: String) throws(LoRAError) -> MergeDrift {
        var stats = ckpt_round_stats()
        var drift = MergeDrift()
        switch outputType {
        case .bf16:
            ckpt_f32_to_bf16(merged, output.assumingMemoryBound(to: UInt16.self), count, &stats)
            drift = MergeDrift(maxAbs: stats.max_abs, sumAbs: stats.sum_abs, count: count)
        case .f16:
            ckpt_count_non_finite(merged, count, &stats)
            FloatConversion.narrow(merged, count: count, to: outputType, into: output)
            let out = output.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count {
                let d = Double(abs(Float(Float16(bitPattern: out[i])) - merged[i]))
                if d > drift.maxAbs { drift.maxAbs = d }
                drift.sumAbs += d
            }
            drift.count = count
        default:  // float32, float64: exact
            ckpt_count_non_finite(merged, count, &stats)
            FloatConversion.narrow(merged, count: count, to: outputType, into: output)
        }
        guard stats.non_finite == 0 else {
            throw LoRAError(.mergedNonFinite(count: Int(stats.non_finite)), tensors: [name])
        }
        return drift
    }

    /// DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output channel (`axis` of a
    /// 2-D weight is the output axis) over the other axis, in float64.
    static func scaleToMagnitude(_ merged: inout [Float], shape: [Int], magnitude: [Float], axis: Int, name: String) throws(LoRAError) {
        guard shape.count == 2, magnitude.count == shape[axis] else {
            throw LoRAError(.doraMagnitudeSize(values: magnitude.count, weight: shape), tensors: [name])
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

/// A merge applied to the base as it streams in: whole rows of W are merged and rounded as
/// soon as they arrive, so the base is never held (W must be in [batch][rows][cols] order).
/// Memory: one chunk of input, its merged rows, and a float32 scratch per core.
public final class StreamingMerge {
    public let merge: LowRankMerge
    private let left: [Float], right: [Float]
    private let baseType: DType, outputType: DType
    private let name: String
    private let rowIn: Int, rowOut: Int
    private var staging: AlignedBuffer
    private var staged = 0
    /// Two, used in turn: the caller may still be writing the previous result.
    private var outputs: [AlignedBuffer]
    private var flip = 0
    private var row = 0
    private let workers: Int
    private var scratch: [UnsafeMutablePointer<Float>] = []
    private var scratchRows = 0
    public private(set) var drift = MergeDrift()
    public private(set) var seconds: Double = 0

    public init(_ merge: LowRankMerge, left: [Float], right: [Float], baseType: DType, outputType: DType, name: String) throws {
        precondition(merge.inOrder, "streaming needs W in [batch][rows][cols] order")
        self.merge = merge
        self.left = left
        self.right = right
        self.baseType = baseType
        self.outputType = outputType
        self.name = name
        rowIn = merge.cols * baseType.size
        rowOut = merge.cols * outputType.size
        staging = try AlignedBuffer(capacity: max(1, StreamFormat.defaultChunkSize + rowIn))
        let outBytes = max(1, (StreamFormat.defaultChunkSize / max(rowIn, 1) + 1) * rowOut)
        outputs = [try AlignedBuffer(capacity: outBytes), try AlignedBuffer(capacity: outBytes)]
        workers = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    deinit { scratch.forEach { $0.deallocate() } }

    /// Takes the next chunk of the base; returns the merged rows it completed (possibly none),
    /// valid until the call after the next.
    public func take(_ chunk: UnsafeRawBufferPointer) throws -> UnsafeRawBufferPointer {
        let room = try stagingRoom(chunk.count)
        room.baseAddress!.copyMemory(from: chunk.baseAddress!, byteCount: chunk.count)
        return try takeStaged(chunk.count)
    }

    /// Room for the next `count` bytes of the base after those staged: a reader can put a chunk
    /// there itself (then `takeStaged`) instead of handing it to `take` to copy.
    func stagingRoom(_ count: Int) throws -> UnsafeMutableRawBufferPointer {
        if staged + count > staging.capacity {
            let bigger = try AlignedBuffer(capacity: staged + count)
            bigger.pointer.copyMemory(from: staging.pointer, byteCount: staged)
            staging = bigger
        }
        return UnsafeMutableRawBufferPointer(start: staging.pointer + staged, count: count)
    }

    /// `count` bytes were put in the `stagingRoom`: as `take`.
    func takeStaged(_ count: Int) throws -> UnsafeRawBufferPointer {
        staged += count
        let rows = rowIn == 0 ? 0 : staged / rowIn
        guard rows > 0 else { return UnsafeRawBufferPointer(start: outputs[flip].pointer, count: 0) }
        flip ^= 1
        if rows * rowOut > outputs[flip].capacity { outputs[flip] = try AlignedBuffer(capacity: rows * rowOut) }
        let output = outputs[flip]
        let started = DispatchTime.now()
        try mergeRows(rows, into: output)
        seconds += Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        let used = rows * rowIn
        if staged > used { staging.pointer.copyMemory(from: staging.pointer + used, byteCount: staged - used) }
        staged -= used
        row += rows
        return UnsafeRawBufferPointer(start: output.pointer, count: rows * rowOut)
    }

    /// The base ended: every byte must have made whole rows.
    public func finish() throws(LoRAError) {
        guard staged == 0, row == merge.batch * merge.rows else {
            throw LoRAError(.baseEndedInsideRow, tensors: [name])
        }
    }

    private func mergeRows(_ count: Int, into output: AlignedBuffer) throws(LoRAError) {
        let cols = merge.cols, rank = merge.rank, rowsPerBatch = merge.rows
        let parts = min(workers, max(1, count / 8))
        let per = (count + parts - 1) / parts
        if scratchRows < per {
            scratch.forEach { $0.deallocate() }
            scratch = (0..<parts).map { _ in UnsafeMutablePointer<Float>.allocate(capacity: max(1, per * cols)) }
            scratchRows = per
        } else if scratch.count < parts {
            scratch += (scratch.count..<parts).map { _ in UnsafeMutablePointer<Float>.allocate(capacity: max(1, scratchRows * cols)) }
        }
        final class Results: @unchecked Sendable {
            let lock = Mutex()
            var drift = MergeDrift()
            var error: LoRAError?
        }
        let results = Results()
        let (first, baseType, outputType, name, baseSize, outSize) = (row, self.baseType, self.outputType, self.name, baseType.size, outputType.size)
        nonisolated(unsafe) let (input, out, scratch) = (UnsafeRawPointer(staging.pointer), output.pointer, self.scratch)
        left.withUnsafeBufferPointer { l in
            right.withUnsafeBufferPointer { r in
                nonisolated(unsafe) let (lp, rp) = (l.baseAddress!, r.baseAddress!)
                DispatchQueue.concurrentPerform(iterations: parts) { w in
                    var local = w * per
                    let end = min(count, local + per)
                    var drift = MergeDrift()
                    while local < end {
                        // A run of rows inside one batch entry (the factors change between them).
                        let g = first + local
                        let bi = g / rowsPerBatch
                        let n = min(end - local, (bi + 1) * rowsPerBatch - g)
                        FloatConversion.widen(input + local * cols * baseSize, baseType, count: n * cols, into: scratch[w])
                        ckpt_low_rank_update(scratch[w], cols, lp + g * rank, rp + bi * rank * cols, n, cols, rank)
                        do throws(LoRAError) {
                            drift.add(try LowRankMerge.finish(scratch[w], count: n * cols, into: out + local * cols * outSize,
                                                              outputType: outputType, name: name))
                        } catch {
                            results.lock.withLock { if results.error == nil { results.error = error } }
                            return
                        }
                        local += n
                    }
                    results.lock.withLock { results.drift.add(drift) }
                }
            }
        }
        if let e = results.error { throw e }
        drift.add(results.drift)
    }
}

/// Runs a `StreamingMerge` one chunk ahead on another thread: while the caller writes the
/// merged rows of one chunk, the next chunk is read from `upstream` and merged. Only the
/// helper thread touches `upstream` until the tensor ends (the caller waits for it).
final class AheadStreamingMerge: @unchecked Sendable {
    let merge: StreamingMerge
    private let upstream: TensorSource
    /// Left once the worker has finished and let go of its closure (see `Job`).
    private let ready = DispatchGroup()
    private var result: Result<UnsafeRawBufferPointer?, any Error>?
    private var running = false

    init(_ merge: StreamingMerge, upstream: TensorSource) {
        self.merge = merge
        self.upstream = upstream
    }

    private func start() {
        running = true
        DispatchQueue.global(qos: .userInitiated).async(group: ready) { [self] in
            result = Result {
                let reader = upstream as? StreamReader
                while true {
                    let merged: UnsafeRawBufferPointer
                    if let reader, let n = try reader.nextChunkLength() {
                        // Straight from the input into the staging rows: one copy fewer.
                        merged = try merge.takeStaged(try reader.nextChunk(copyingInto: try merge.stagingRoom(n)) ?? 0)
                    } else if let chunk = try upstream.nextChunk() {
                        merged = try merge.take(chunk)
                    } else {
                        break
                    }
                    if merged.count > 0 { return merged }
                }
                try merge.finish()
                return nil
            }
        }
    }

    /// The next merged rows (nil at the end of the tensor); starts on the chunk after.
    func next() throws -> UnsafeRawBufferPointer? {
        if !running { start() }
        ready.wait()
        running = false
        let r = try result!.get()
        if r != nil { start() }
        return r
    }

    /// Waits for a chunk still being merged (when the stream is abandoned half-way).
    func settle() {
        if running {
            ready.wait()
            running = false
        }
    }
}
