import CLowRank
import Dispatch

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
    /// Produced in order, a chunk at a time, by a decoder with its own state (a zstd stream):
    /// nothing the size of the tensor is held. The next chunk is decoded on another core while
    /// the current one is emitted.
    case streamed(() throws -> ChunkProducer)
}

/// Produces a tensor's bytes in order, piece by piece (see `TensorData.streamed`).
public protocol ChunkProducer: AnyObject {
    /// Fills `buffer` from its start with the next bytes; fewer than `buffer.count` only when
    /// the data ends.
    func produce(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Called after the tensor's last byte: checks that the data ends exactly there.
    func finish() throws
}

/// How far a `PlannedSource` may materialize tensors ahead of the one being emitted, so
/// that decoding (zstd, inflate) of the next tensors runs on other cores meanwhile.
public struct ReadAhead: Sendable {
    /// Tensor bytes held at once (the tensor being emitted plus those being made ahead).
    /// A tensor larger than this is still made, alone.
    public var budget: Int
    /// Tensors being made ahead at once.
    public var depth: Int
    public init(budget: Int, depth: Int = 1) {
        self.budget = budget
        self.depth = depth
    }
    public static let off = ReadAhead(budget: 0, depth: 0)
}

/// A tensor source for file formats whose tensors are all known before any data is read
/// (safetensors, torch, NumPy, Orbax): emits its manifest, then each tensor in plan order.
///
/// With a `ReadAhead`, `.materialized` closures run on a background queue up to `depth`
/// tensors ahead while staying inside the budget; they must then be safe to run concurrently.
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
    /// The chunk last handed out of a mapped file: consumed once the caller asks for more.
    private var handedOut: (file: MappedFile, offset: Int, count: Int)?
    private var piece = 0
    private var piecePosition = 0
    /// The current tensor's decoder, when it is streamed.
    private var streamed: StreamedTensor?
    private let chunkPool: BufferPool
    public private(set) var lastChunkOrigin: (descriptor: FileDescriptor, offset: Int)?
    private let readAhead: ReadAhead
    /// Tensors being made ahead, by plan index.
    private var ahead: [Int: (job: ResultJob<AlignedBuffer>, bytes: Int)] = [:]
    /// Plan indices below this have been considered for making ahead.
    private var considered = 0

    public init(header: StreamHeader, plan: [(TensorHeader, TensorData)], chunkSize: Int = StreamFormat.defaultChunkSize,
                readAhead: ReadAhead = .off) {
        self.header = header
        self.plan = plan
        self.chunkSize = chunkSize
        self.readAhead = readAhead
        chunkPool = BufferPool(bufferSize: chunkSize, retain: 2)
        manifest = plan.map(\.0.descriptor)
    }

    /// The same tensors with those whose name matches any of `patterns` (fnmatch globs, as
    /// `--only`) first, each group in its own order: `ckpt-read --first` puts LoRA adapters
    /// before their bases, so `lora-merge` merges each base as it streams instead of holding it.
    /// Reading order costs nothing here: every tensor's place in the file is already known.
    public func reordered(first patterns: [String]) -> PlannedSource {
        let isFirst = plan.map { t in patterns.contains { globMatches($0, t.0.descriptor.name) } }
        let order = plan.indices.filter { isFirst[$0] } + plan.indices.filter { !isFirst[$0] }
        return PlannedSource(header: header, plan: order.map { plan[$0] }, chunkSize: chunkSize, readAhead: readAhead)
    }

    deinit {
        // No read-ahead job outlives its source (say, after an error): each holds the files it
        // reads from and the memory it fills.
        for a in ahead.values { try? a.job.wait() }
    }

    /// Starts making the next materialized tensors after `index` while the tensor at `index`
    /// (`holding` bytes) is emitted, as far as the budget and depth allow.
    private func scheduleAhead(after index: Int, holding: Int) {
        considered = max(considered, index + 1)
        var held = holding + ahead.values.reduce(0) { $0 + $1.bytes }
        while considered < plan.count, ahead.count < readAhead.depth {
            let (t, data) = plan[considered]
            guard case .materialized(let make) = data else {
                considered += 1
                continue
            }
            let bytes = t.descriptor.byteCount
            guard held + bytes <= readAhead.budget else { return }
            let job = ResultJob(make)
            ahead[considered] = (job, bytes)
            held += bytes
            considered += 1
            job.start()
        }
    }

    /// The caller is done with the chunk it was given (its pointer is valid only until now).
    private func releaseHandedOut() {
        if let h = handedOut { h.file.consumed(offset: h.offset, count: h.count) }
        handedOut = nil
    }

    public func nextTensor() throws -> TensorHeader? {
        releaseHandedOut()
        materialized = nil
        file = nil
        streamed = nil
        guard next < plan.count else { return nil }
        let index = next
        let (t, data) = plan[index]
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
            // Start the next ones first, so they are made while this one is.
            let made = ahead.removeValue(forKey: index)
            scheduleAhead(after: index, holding: currentLength)
            let buffer: AlignedBuffer
            // Made ahead or here; an error making it is reported now, when its turn comes.
            do { buffer = try made?.job.value() ?? make() } catch var e as AllocationError {
                e.tensor = t.descriptor.name  // which tensor asked for the memory
                throw e
            }
            guard buffer.count == currentLength else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(currentLength), received: UInt64(buffer.count)),
                                  source: header.sourceFormat, tensor: t.descriptor.name)
            }
            materialized = buffer
        case .streamed(let make):
            streamed = try StreamedTensor(producer: try make(), length: currentLength, chunkSize: chunkSize, pool: chunkPool,
                                          name: t.descriptor.name, source: header.sourceFormat)
            scheduleAhead(after: index, holding: 0)  // a tensor to be made whole after this one
        }
        return t
    }

    /// The bytes of plan entry `index`, read whole, out of order (for tools that look tensors
    /// up by name, such as ckpt-diff); does not disturb `nextTensor`/`nextChunk`.
    public func tensorBytes(at index: Int) throws -> AlignedBuffer {
        let (t, data) = plan[index]
        let n = t.descriptor.byteCount
        switch data {
        case .mapped(let f, let offset):
            let out = try AlignedBuffer(capacity: max(n, 1))
            out.pointer.copyMemory(from: try f.bytes(at: offset, count: n).baseAddress ?? UnsafeRawPointer(out.pointer), byteCount: n)
            f.drop(offset: offset, count: n)
            out.count = n
            return out
        case .segments(let f, let pieces):
            let out = try AlignedBuffer(capacity: max(n, 1))
            var at = 0
            for (offset, count) in pieces {
                if count > 0 { (out.pointer + at).copyMemory(from: try f.bytes(at: offset, count: count).baseAddress!, byteCount: count) }
                f.drop(offset: offset, count: count)
                at += count
            }
            out.count = at
            return out
        case .streamed(let make):
            let out = try AlignedBuffer(capacity: max(n, 1))
            let producer = try make()
            out.count = try producer.produce(into: UnsafeMutableRawBufferPointer(start: out.pointer, count: n))
            guard out.count == n else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(n), received: UInt64(out.count)), source: header.sourceFormat, tensor: t.descriptor.name)
            }
            try producer.finish()
            return out
        case .materialized(let make):
            let out = try make()
            guard out.count == n else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(n), received: UInt64(out.count)), source: header.sourceFormat, tensor: t.descriptor.name)
            }
            return out
        }
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        releaseHandedOut()
        guard position < currentLength else {
            materialized = nil
            file = nil
            streamed = nil
            lastChunkOrigin = nil
            return nil
        }
        if let streamed {
            let chunk = try streamed.next()
            position += chunk.count
            lastChunkOrigin = nil
            return chunk
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
        // This chunk first (a remote file fetches it now), then what comes next.
        let bytes = try file!.bytes(at: at, count: n)
        readAhead(file!, at: at + n, inPiece: count - piecePosition - n)
        handedOut = (file!, at, n)
        piecePosition += n
        position += n
        lastChunkOrigin = file!.descriptor.map { ($0, at) }  // a remote file has none to splice from
        return bytes
    }
}

extension PlannedSource {
    /// Asks for what will be read next: the rest of this piece, then the next tensors of the
    /// plan that lie in mapped files, up to a chunk (a local file: the kernel reads ahead) or
    /// a remote file's window (several requests in flight). Only what the plan will read: a
    /// remote file fetched past it would hold pages no read gives back.
    fileprivate func readAhead(_ file: MappedFile, at: Int, inPiece: Int) {
        var budget = max(chunkSize, file.readAheadWindow)
        let here = min(budget, inPiece)
        if here > 0 { file.willNeed(at: at, count: here) }
        budget -= here
        var i = next
        while budget > 0, i < plan.count, case .mapped(let f, let offset) = plan[i].1 {
            let n = min(budget, plan[i].0.descriptor.byteCount)
            if n > 0 { f.willNeed(at: offset, count: n) }
            budget -= max(n, 1)
            i += 1
        }
    }
}

/// A streamed tensor's chunks, each decoded on a background thread while the one before it is
/// emitted (two chunk buffers, used in turn). The decoder is stateful: one job is in flight at
/// a time (the next starts only once the last has been waited for), so they run in order without
/// a queue of their own (a queue per tensor was freed on a worker thread after the tensor ended).
private final class StreamedTensor {
    private let producer: ChunkProducer
    private let length: Int
    private let chunkSize: Int
    private let pool: BufferPool
    private let name: String
    private let source: String
    private var requested = 0
    private var pending: ProduceJob?
    /// The chunk last handed out: valid until the next call.
    private var handedOut: AlignedBuffer?

    init(producer: ChunkProducer, length: Int, chunkSize: Int, pool: BufferPool, name: String, source: String) throws {
        self.producer = producer
        self.length = length
        self.chunkSize = chunkSize
        self.pool = pool
        self.name = name
        self.source = source
        if length == 0 { try producer.finish() }  // no chunk will ask: the data must be empty
        try start()
    }

    deinit {
        if let pending { try? pending.wait(); pool.give(pending.buffer) }
        if let handedOut { pool.give(handedOut) }
    }

    private func start() throws {
        guard requested < length else { return }
        let n = min(chunkSize, length - requested)
        let job = ProduceJob(producer: producer, buffer: try pool.take(minimum: n), count: n, last: requested + n == length)
        requested += n
        pending = job
        job.start()
    }

    func next() throws -> UnsafeRawBufferPointer {
        if let handedOut { pool.give(handedOut) }
        handedOut = nil
        guard let job = pending else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        pending = nil
        try job.wait()
        guard job.produced == job.count else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(length), received: UInt64(requested - job.count + job.produced)),
                              source: source, tensor: name)
        }
        handedOut = job.buffer
        try start()
        return UnsafeRawBufferPointer(start: job.buffer.pointer, count: job.count)
    }
}

private final class ProduceJob: Job, @unchecked Sendable {
    let producer: ChunkProducer
    let buffer: AlignedBuffer
    let count: Int
    let last: Bool
    var produced = 0

    init(producer: ChunkProducer, buffer: AlignedBuffer, count: Int, last: Bool) {
        self.producer = producer
        self.buffer = buffer
        self.count = count
        self.last = last
    }

    override func run() throws {
        produced = try producer.produce(into: UnsafeMutableRawBufferPointer(start: buffer.pointer, count: count))
        if last && produced == count { try producer.finish() }
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
        if innerStride != 1, [1, 2, 4, 8].contains(elementSize),
           let a = (0..<(rank - 1)).last(where: { stride[$0] == 1 && shape[$0] > 1 }) {
            // A transpose: axis `a` is contiguous in the source, the last axis in the output.
            // Copy the (a, last) planes as 2-D transposes in cache-sized tiles.
            var outStride = [Int](repeating: 1, count: rank)
            for d in stride.indices.reversed().dropFirst() { outStride[d] = outStride[d + 1] * shape[d + 1] }
            var outer = shape
            outer[a] = 1
            forEachRow(outer) { index in
                var src = offset, dst = 0
                for d in 0..<(rank - 1) {
                    src += index[d] * stride[d]
                    dst += index[d] * outStride[d]
                }
                ckpt_transpose(base + src * elementSize, innerStride, out + dst * elementSize, outStride[a], shape[a], inner, elementSize)
            }
            return
        }
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
        forEachIndex(Array(extent.dropLast()), body)
    }

    /// Calls `body` with every index of `extent` in row-major order (once, with `[]`, for no
    /// axes); nothing is called if an axis is empty. Indices are made one at a time, so the
    /// cost is the count, never a list of them.
    public static func forEachIndex(_ extent: [Int], _ body: ([Int]) throws -> Void) rethrows {
        guard !extent.contains(0) else { return }
        var index = [Int](repeating: 0, count: extent.count)
        while true {
            try body(index)
            var d = extent.count - 1
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
