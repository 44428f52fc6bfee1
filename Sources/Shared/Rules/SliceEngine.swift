/// `ckpt-slice` as a tensor source over another: applies a `SlicePlan` as the tensors arrive.
/// Renames pass chunks through untouched; element-wise ops (cast, scale, add) convert chunk by
/// chunk; anything that moves axes, stacks, unstacks or multiplies holds its group's inputs
/// until the last one arrives, builds the result, and emits its outputs then.
public final class SliceSource: TensorSource {
    public let header: StreamHeader
    public let manifest: [TensorDescriptor]?
    /// The plan of the whole stream; without a manifest, of the tensor at hand.
    public private(set) var plan: SlicePlan
    private let rules: [SliceRule]
    private let keepUnmatched: Bool
    /// Without a manifest: outputs written so far, and inputs no rule matched.
    private var written: [String: String] = [:]
    private var unmatched: [String] = []
    private let upstream: TensorSource
    private var held: [String: AlignedBuffer] = [:]
    private var queue: [(TensorHeader, HeldBytes)] = []
    private enum Current {
        case none
        case upstream
        /// Element-wise conversion of upstream chunks: input type, ops, output type.
        case converting(from: DType, ops: [SliceOp], to: DType)
        case buffer(HeldBytes)
        /// Outputs made one leading-axis slice of the upstream tensor at a time.
        case slicing(SliceState)
    }

    /// Unstacking along the leading axis: which output, and the bytes of the next slice that
    /// came with the previous chunk.
    private final class SliceState {
        let group: SlicePlan.Group
        let per: Rearrange
        let sliceShape: [Int]
        let dtype: DType
        var k = 0
        /// The output being written, and the rest of the current slice's outputs.
        var built: HeldBytes?
        var rest: [HeldBytes] = []
        var leftover: [UInt8] = []
        /// Slices along the leading axis, and how many have been handed out.
        let slices: Int
        var taken = 0
        /// The next slice, being read and built on another core while this one is written.
        var ahead: ResultJob<[HeldBytes]>?
        init(group: SlicePlan.Group, per: Rearrange) {
            self.group = group
            self.per = per
            sliceShape = Array(group.inputs[0].shape.dropFirst())
            dtype = group.inputs[0].dtype
            slices = group.inputs[0].shape.first ?? 0
        }
        var sliceBytes: Int { sliceShape.reduce(1, *) * dtype.size }
    }
    private var current = Current.none
    private var position = 0
    /// Bytes of an element split across upstream chunks, and the converted chunk.
    private var carry: [UInt8] = []
    private var converted: AlignedBuffer?

    /// With `cast`, every float output is cast to it at the end (`ckpt-slice --cast`).
    private let cast: DType?

    public init(upstream: TensorSource, rules: [SliceRule], keepUnmatched: Bool, cast: DType? = nil) throws {
        self.upstream = upstream
        self.rules = rules
        self.keepUnmatched = keepUnmatched
        self.cast = cast
        header = upstream.header
        plan = try SlicePlan(rules: rules, inputs: upstream.manifest ?? [], keepUnmatched: keepUnmatched, cast: cast)
        manifest = upstream.manifest == nil ? nil : plan.outputs
    }

    /// Without a manifest each tensor is planned alone as it arrives: renames, casts,
    /// transposes and unstacking work; rules that stack or multiply need to see other tensors
    /// first and are refused. Unmatched tensors are listed together at the end.
    private func planAlone(_ d: TensorDescriptor) throws -> Bool {
        let single = try SlicePlan(rules: rules, inputs: [d], keepUnmatched: true, cast: cast)
        if case .pass(_, nil)? = single.assignments[d.name], !keepUnmatched {
            unmatched.append(d.name)
            return false
        }
        for g in single.groups {
            let stacks = g.rule.source.captureNames.contains { !g.rule.target!.captureNames.contains($0) }
            let muls = g.rule.ops.contains { if case .mul = $0 { return true } else { return false } }
            if stacks || muls {
                throw RuleError(.needsManifest(stacks: stacks), file: g.rule.file, line: g.rule.line, tensor: d.name)
            }
        }
        for o in single.outputs {
            if let other = written[o.name] { throw RuleError(.twoInputsWrite(output: o.name, first: other, second: d.name)) }
            written[o.name] = d.name
        }
        plan = single
        return true
    }

    public func nextTensor() throws -> TensorHeader? {
        if case .slicing(let st) = current {
            if st.k + 1 < st.group.outputs.count {
                st.k += 1
                st.built = nil
                position = 0
                return TensorHeader(st.group.outputs[st.k])
            }
            if let job = st.ahead {
                // Only when the consumer moved on without asking for the last slice's outputs:
                // the job reads upstream, so it ends (and reports what it met) first.
                st.ahead = nil
                try job.wait()
            }
        }
        current = .none
        position = 0
        carry = []
        if !queue.isEmpty { return emitQueued() }
        while let t = try upstream.nextTensor() {
            let d = t.descriptor
            if manifest == nil, try !planAlone(d) {
                while try upstream.nextChunk() != nil {}
                continue
            }
            switch plan.assignments[d.name] {
            case .drop?:
                while try upstream.nextChunk() != nil {}
            case .pass(let name, _)?:
                var h = t
                h.descriptor.name = name
                current = .upstream
                if let cast, SliceCast.supported(from: d.dtype), d.dtype != cast {
                    h.descriptor = try TensorDescriptor(name: name, dtype: cast, shape: d.shape)
                    current = .converting(from: d.dtype, ops: [.cast(cast)], to: cast)
                }
                return h
            case .group(let g)? where plan.groups[g].streams:
                let group = plan.groups[g]
                let out = group.outputs[0]
                let renameOnly = out.dtype == d.dtype && group.ops.allSatisfy {
                    switch $0 { case .where, .castFloats: return true; default: return false }
                }
                current = renameOnly ? .upstream : .converting(from: d.dtype, ops: group.ops, to: out.dtype)
                return TensorHeader(out, attributes: t.attributes)
            case .group(let g)? where plan.groups[g].perSlice != nil:
                if plan.groups[g].outputs.isEmpty {  // an empty axis to unstack: nothing to make
                    while try upstream.nextChunk() != nil {}
                    continue
                }
                let st = SliceState(group: plan.groups[g], per: plan.groups[g].perSlice!)
                current = .slicing(st)
                return TensorHeader(st.group.outputs[0])
            case .group(let g)?, .operand(let g)?:
                held[d.name] = try readWhole(d)
                let group = plan.groups[g]
                if (group.inputs + group.operands.values).allSatisfy({ held[$0.name] != nil }) {
                    try build(group)
                    if !queue.isEmpty { return emitQueued() }  // empty when it unstacks an empty axis
                }
            case nil:
                throw StreamError(.manifestMismatch(detail: "tensor \(d.name) is not in the manifest"), source: "ckpt-slice", tensor: d.name)
            }
        }
        if !unmatched.isEmpty {
            throw RuleError(.unmatched(tensors: unmatched))
        }
        return nil
    }

    private func emitQueued() -> TensorHeader {
        let (h, b) = queue.removeFirst()
        current = .buffer(b)
        return h
    }

    private func readWhole(_ d: TensorDescriptor) throws -> AlignedBuffer {
        let buffer = try AlignedBuffer.reusable(capacity: max(d.byteCount, 1))
        try upstream.readTensor(d, into: buffer, stage: "ckpt-slice")
        return buffer
    }

    /// Builds a group's outputs from its held inputs and queues them.
    private func build(_ g: SlicePlan.Group) throws {
        func fail(_ r: RuleError.Reason) -> RuleError { RuleError(r, file: g.rule.file, line: g.rule.line) }
        // The stacked input: the parts one after another, in stacking order.
        var dtype = g.inputs[0].dtype
        var shape = g.stack + g.inputs[0].shape
        var data: AlignedBuffer
        if g.inputs.count == 1 {
            data = held.removeValue(forKey: g.inputs[0].name)!
        } else {
            let part = g.inputs[0].byteCount
            data = try AlignedBuffer.reusable(capacity: max(part * g.inputs.count, 1))
            data.count = part * g.inputs.count
            for (i, d) in g.inputs.enumerated() {
                let b = held.removeValue(forKey: d.name)!
                (data.pointer + i * part).copyMemory(from: b.pointer, byteCount: part)
            }
        }
        for (k, op) in g.ops.enumerated() {
            let count = shape.reduce(1, *)
            switch op {
            case .rearrange(let r):
                let b: Rearrange.Bound
                do { b = try r.bind(shape) } catch { throw fail(.rearrangeDoesNotFit(detail: error.description)) }
                data = try SliceSource.gather(data, dtype.size, offset: 0, shape: b.axes.map(\.size), strides: b.axes.map(\.stride))
                shape = b.outputShape
            case .index(let items):
                let v = try IndexView(items, shape: shape)
                data = try SliceSource.gather(data, dtype.size, offset: v.offset, shape: v.shape, strides: v.strides)
                shape = v.shape
            case .insertZeros(let axis, let index):
                data = try SliceSource.insertZeros(data, dtype.size, shape: shape, axis: axis, index: index)
                shape[axis] += 1
            case .cast, .castFloats, .scale, .add:
                (data, dtype) = try SliceSource.elementwise(op, data, dtype, count: count)
            case .where: break
            case .mul:
                guard let operand = g.operands[k] else { continue }  // mul? without its operand
                let b = held.removeValue(forKey: operand.name)!
                let bad = SliceCast.multiply(data.pointer, dtype, by: b.pointer, operand.dtype, count: count)
                // An uninitialised mask (DINOv3's bias_mask is NaN until set) must not pass silently.
                if bad > 0 {
                    throw fail(.productsNotFinite(operand: operand.name, count: bad, input: g.inputs[0].name))
                }
            }
        }
        precondition(shape == g.finalShape, "plan and build disagree on \(g.rule.location)")
        if g.unstackAxes.isEmpty {
            queue.append((TensorHeader(g.outputs[0]), HeldBytes(data)))
            return
        }
        for (out, b) in zip(g.outputs, try SliceSource.unstack(data, dtype.size, shape: shape, axes: g.unstackAxes)) {
            queue.append((TensorHeader(out), b))
        }
    }

    /// `data` (row-major `shape`) with a slice of zeros inserted before `index` along `axis`.
    static func insertZeros(_ data: AlignedBuffer, _ elementSize: Int, shape: [Int], axis: Int, index: Int) throws -> AlignedBuffer {
        let outer = shape[..<axis].reduce(1, *)
        let slice = shape[(axis + 1)...].reduce(1, *) * elementSize
        let before = index * slice, after = (shape[axis] - index) * slice
        let out = try AlignedBuffer.reusable(capacity: max(outer * (before + slice + after), 1))
        out.count = outer * (before + slice + after)
        withExtendedLifetime(data) {
            var from = data.pointer, to = out.pointer
            for _ in 0..<outer {
                to.copyMemory(from: from, byteCount: before)
                (to + before).initializeMemory(as: UInt8.self, repeating: 0, count: slice)
                (to + before + slice).copyMemory(from: from + before, byteCount: after)
                from += before + after
                to += before + slice + after
            }
        }
        return out
    }

    /// One tensor per index of the `axes` (positions in `shape`), in row-major order over them.
    /// Along leading axes each is a contiguous part of `data`, handed out without a copy.
    static func unstack(_ data: AlignedBuffer, _ elementSize: Int, shape: [Int], axes: [Int]) throws -> [HeldBytes] {
        guard !axes.isEmpty else { return [HeldBytes(data)] }
        guard axes.allSatisfy({ shape[$0] > 0 }) else { return [] }
        if axes == Array(0..<axes.count) {
            let parts = shape[..<axes.count].reduce(1, *)
            let size = shape[axes.count...].reduce(1, *) * elementSize
            return (0..<parts).map { HeldBytes(data, start: $0 * size, count: size) }
        }
        var strides = [Int](repeating: 1, count: shape.count)
        for d in strides.indices.reversed().dropFirst() { strides[d] = strides[d + 1] * shape[d + 1] }
        let keptAxes = shape.indices.filter { !axes.contains($0) }
        var out: [HeldBytes] = []
        var cursor = StridedCursor(shape: axes.map { shape[$0] }, step: axes.map { strides[$0] })
        repeat {
            out.append(HeldBytes(try gather(data, elementSize, offset: cursor.offset, shape: keptAxes.map { shape[$0] }, strides: keptAxes.map { strides[$0] })))
        } while cursor.advance(axes: axes.count)
        return out
    }

    /// The next slice's outputs: built ahead if a job has it, else here. Then starts the job
    /// for the slice after, so reading and rearranging it overlaps writing this one (the
    /// consumer touches only the outputs handed out; the job alone touches upstream).
    private func takeSlice(_ st: SliceState) throws -> [HeldBytes] {
        let outputs: [HeldBytes]
        if let job = st.ahead {
            st.ahead = nil
            outputs = try job.value()
        } else {
            outputs = try buildSlice(st, index: st.taken)
        }
        st.taken += 1
        if st.taken < st.slices {
            let next = st.taken
            let job = ResultJob { try self.buildSlice(st, index: next) }  // holds self until it has run
            st.ahead = job
            job.start()
        }
        return outputs
    }

    /// Reads leading-axis slice `index` (the next one) of the upstream tensor and makes its
    /// outputs (one, or one per index of the other unstacked axes).
    private func buildSlice(_ st: SliceState, index: Int) throws -> [HeldBytes] {
        let g = st.group
        func fail(_ r: RuleError.Reason) -> RuleError { RuleError(r, file: g.rule.file, line: g.rule.line) }
        let need = st.sliceBytes
        let slice = try AlignedBuffer.reusable(capacity: max(need, 1))
        var have = min(st.leftover.count, need)
        st.leftover.withUnsafeBytes { if have > 0 { slice.pointer.copyMemory(from: $0.baseAddress!, byteCount: have) } }
        st.leftover.removeFirst(have)
        let reader = upstream as? StreamReader
        while have < need {
            if let reader, let n = try reader.nextChunkLength(), n <= need - have {
                // A chunk inside the slice: straight from the input into it, one copy fewer.
                have += try reader.nextChunk(copyingInto: UnsafeMutableRawBufferPointer(start: slice.pointer + have, count: need - have)) ?? 0
                continue
            }
            guard let chunk = try upstream.nextChunk() else { break }
            let take = min(chunk.count, need - have)
            (slice.pointer + have).copyMemory(from: chunk.baseAddress!, byteCount: take)
            have += take
            if take < chunk.count { st.leftover += chunk[take...] }
        }
        guard have == need else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(g.inputs[0].byteCount), received: UInt64(index * need + have)),
                              source: "ckpt-slice", tensor: g.inputs[0].name)
        }
        slice.count = need
        let b: Rearrange.Bound
        do { b = try st.per.bind(st.sliceShape) } catch { throw fail(.rearrangeDoesNotFit(detail: error.description)) }
        var data = try SliceSource.gather(slice, st.dtype.size, offset: 0, shape: b.axes.map(\.size), strides: b.axes.map(\.stride))
        var dtype = st.dtype
        let count = b.outputShape.reduce(1, *)
        for op in g.ops {
            (data, dtype) = try SliceSource.elementwise(op, data, dtype, count: count)  // the rearrange was done above
        }
        return try SliceSource.unstack(data, dtype.size, shape: b.outputShape, axes: g.unstackAxes.dropFirst().map { $0 - 1 })
    }

    /// Applies an element-wise op (cast, scale, add; others pass): the new data and type.
    static func elementwise(_ op: SliceOp, _ data: AlignedBuffer, _ dtype: DType, count: Int) throws -> (AlignedBuffer, DType) {
        switch op {
        case .castFloats(let to):
            guard SliceCast.supported(from: dtype), dtype != to else { break }
            return try elementwise(.cast(to), data, dtype, count: count)
        case .cast(let to):
            let out = try AlignedBuffer.reusable(capacity: max(count * to.size, 1))
            out.count = count * to.size
            SliceCast.convert(data.pointer, from: dtype, count: count, into: out.pointer, to: to)
            return (out, to)
        case .scale(let x): SliceCast.affine(data.pointer, dtype, count: count, scale: x, offset: 0)
        case .add(let x): SliceCast.affine(data.pointer, dtype, count: count, scale: 1, offset: x)
        default: break
        }
        return (data, dtype)
    }

    /// A strided view of `source` (element strides) made contiguous.
    static func gather(_ source: AlignedBuffer, _ elementSize: Int, offset: Int, shape: [Int], strides: [Int]) throws -> AlignedBuffer {
        let count = shape.reduce(1, *)
        let out = try AlignedBuffer.reusable(capacity: max(count * elementSize, 1))
        out.count = count * elementSize
        withExtendedLifetime(source) {
            StridedCopy.gather(from: UnsafeRawPointer(source.pointer), elementSize: elementSize, offset: offset, shape: shape, stride: strides, into: out.pointer)
        }
        return out
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        switch current {
        case .none: return nil
        case .upstream: return try upstream.nextChunk()
        case .buffer(let b):
            return b.chunk(from: &position)
        case .slicing(let st):
            if st.built == nil {
                if st.rest.isEmpty { st.rest = try takeSlice(st) }
                st.built = st.rest.removeFirst()
            }
            return st.built!.chunk(from: &position)
        case .converting(let from, let ops, let to):
            // Whole elements only: an element cut by a chunk boundary waits for the next chunk.
            while let chunk = try upstream.nextChunk() {
                let n = (carry.count + chunk.count) / from.size
                guard n > 0 else {
                    carry += chunk
                    continue
                }
                // The carried bytes, then the chunk up to the last whole element: one copy.
                var data = try AlignedBuffer.reusable(capacity: n * from.size)
                data.count = n * from.size
                carry.withUnsafeBytes { if !$0.isEmpty { data.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
                let used = n * from.size - carry.count
                (data.pointer + carry.count).copyMemory(from: chunk.baseAddress!, byteCount: used)
                carry = Array(chunk[used...])
                var dtype = from
                for op in ops { (data, dtype) = try SliceSource.elementwise(op, data, dtype, count: n) }
                precondition(dtype == to)
                converted = data  // kept until the next chunk is asked for
                return UnsafeRawBufferPointer(start: data.pointer, count: n * to.size)
            }
            guard carry.isEmpty else {
                throw StreamError(.tensorLengthMismatch(declared: 0, received: UInt64(carry.count)), source: "ckpt-slice")
            }
            return nil
        }
    }
}
