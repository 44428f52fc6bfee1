/// Where a planned tensor's bytes come from.
public enum TensorData {
    /// Already in place, little-endian and row-major, in a mapped file: emitted as slices of
    /// the mapping (no copy; a stream writer can splice them onward).
    case mapped(MappedFile, offset: Int)
    /// In place in a mapped file as several pieces, in order (flax's chunked arrays).
    case segments(MappedFile, [(offset: Int, count: Int)])
    /// Produced whole when the tensor's turn comes: a strided view made contiguous, an
    /// inflated member, byte-swapped data. Holds one tensor at a time.
    case materialized(() throws -> AlignedBuffer)
}

/// A tensor source for file formats whose tensors are all known before any data is read
/// (safetensors, torch, NumPy): emits its manifest, then each tensor in plan order.
public final class PlannedSource: FileBackedSource {
    public let header: StreamHeader
    public let manifest: [TensorDescriptor]?
    public let plan: [(TensorHeader, TensorData)]
    private let chunkSize: Int
    private var next = 0
    private var currentLength = 0
    private var position = 0
    /// The current tensor's bytes: built whole, or pieces of a mapped file (one for `.mapped`).
    private var materialized: AlignedBuffer?
    private var file: MappedFile?
    private var pieces: [(offset: Int, count: Int)] = []
    private var piece = 0
    private var piecePosition = 0
    public private(set) var lastChunkOrigin: (descriptor: FileDescriptor, offset: Int)?

    public init(header: StreamHeader, plan: [(TensorHeader, TensorData)], chunkSize: Int = StreamFormat.defaultChunkSize) {
        self.header = header
        self.plan = plan
        self.chunkSize = chunkSize
        manifest = plan.map(\.0.descriptor)
    }

    public func nextTensor() throws -> TensorHeader? {
        materialized = nil
        file = nil
        guard next < plan.count else { return nil }
        let (t, data) = plan[next]
        next += 1
        currentLength = t.descriptor.byteCount
        position = 0
        piece = 0
        piecePosition = 0
        switch data {
        case .mapped(let f, let offset):
            file = f
            pieces = [(offset, currentLength)]
        case .segments(let f, let p):
            file = f
            pieces = p
        case .materialized(let make):
            let buffer = try make()
            guard buffer.count == currentLength else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(currentLength), received: UInt64(buffer.count)),
                                  source: header.sourceFormat, tensor: t.descriptor.name)
            }
            materialized = buffer
        }
        return t
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        guard position < currentLength else {
            materialized = nil
            file = nil
            lastChunkOrigin = nil
            return nil
        }
        if let materialized {
            let n = min(chunkSize, currentLength - position)
            defer { position += n }
            lastChunkOrigin = nil
            return UnsafeRawBufferPointer(start: materialized.pointer + position, count: n)
        }
        while piecePosition == pieces[piece].count {
            piece += 1
            piecePosition = 0
        }
        let (offset, count) = pieces[piece]
        let n = min(chunkSize, count - piecePosition)
        let at = offset + piecePosition
        // The previous chunk has been consumed (the caller's pointer is valid only until now).
        file!.release(before: at)
        file!.willNeed(at: at + n, count: chunkSize)
        piecePosition += n
        position += n
        lastChunkOrigin = (file!.descriptor, at)
        return file!.bytes(at: at, count: n)
    }
}

/// Copies a strided view (torch's storage offset, sizes and strides, in elements) into
/// contiguous row-major order. Runs along the last axis are copied whole when it is dense.
public enum StridedCopy {
    public static func gather(from base: UnsafeRawPointer, elementSize: Int, offset: Int, shape: [Int], stride: [Int],
                              into out: UnsafeMutableRawPointer) {
        let count = shape.reduce(1, *)
        guard count > 0 else { return }
        if shape.isEmpty {
            out.copyMemory(from: base + offset * elementSize, byteCount: elementSize)
            return
        }
        let rank = shape.count
        let inner = shape[rank - 1], innerStride = stride[rank - 1]
        var dst = out
        forEachRow(shape) { index in
            var src = offset
            for d in 0..<(rank - 1) { src += index[d] * stride[d] }
            if innerStride == 1 {
                dst.copyMemory(from: base + src * elementSize, byteCount: inner * elementSize)
                dst += inner * elementSize
            } else {
                for i in 0..<inner {
                    dst.copyMemory(from: base + (src + i * innerStride) * elementSize, byteCount: elementSize)
                    dst += elementSize
                }
            }
        }
    }

    /// Calls `body` with the index of every row (all axes but the last) of `extent`, in
    /// row-major order, like an odometer. Nothing is called if an axis is empty.
    public static func forEachRow(_ extent: [Int], _ body: ([Int]) -> Void) {
        guard !extent.isEmpty, !extent.contains(0) else { return }
        let rank = extent.count
        var index = [Int](repeating: 0, count: rank - 1)
        while true {
            body(index)
            var d = rank - 2
            while d >= 0 {
                index[d] += 1
                if index[d] < extent[d] { break }
                index[d] = 0
                d -= 1
            }
            if d < 0 { return }
        }
    }

    /// True when the view is the plain row-major layout of its shape (size-1 axes ignored).
    public static func isContiguous(shape: [Int], stride: [Int]) -> Bool {
        var expected = 1
        for (n, s) in zip(shape, stride).reversed() where n != 1 {
            if s != expected { return false }
            expected *= n
        }
        return true
    }

    /// Reverses the bytes of each element in place (big-endian sources).
    public static func swapBytes(_ p: UnsafeMutableRawPointer, count: Int, elementSize: Int) {
        guard elementSize > 1 else { return }
        let b = p.assumingMemoryBound(to: UInt8.self)
        var e = 0
        while e + elementSize <= count {
            var i = e, j = e + elementSize - 1
            while i < j {
                let t = b[i]; b[i] = b[j]; b[j] = t
                i += 1; j -= 1
            }
            e += elementSize
        }
    }
}
