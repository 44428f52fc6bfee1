import CLinux
import Glibc

/// Writes a ckpt stream (see `StreamFormat`) to a file descriptor: the sink behind every
/// stage's standard output.
///
/// Data is cut into chunks of at most `chunkSize` bytes. With zlib compression the chunks
/// are compressed on all cores, `window` at a time, and written in order.
public final class StreamWriter: SpliceAwareSink {
    private let output: FileDescriptor
    private let atomic: AtomicOutput?
    private let compression: ChunkCompression
    private let chunkSize: Int
    private let producer: String
    private let outputIsPipe: Bool
    /// Header keys this stage adds or replaces (`ckpt-read --part` sets `part`); the others
    /// of the upstream header are kept.
    public var headerExtensions = JSONObject()

    private var manifest: [TensorDescriptor]?
    private var current: TensorDescriptor?
    private var tensorOffset = 0
    private var tensorCRC: UInt32 = 0
    private var tensorCount = 0
    private var totalBytes = 0

    private let rawPool: BufferPool
    private let packedPool: BufferPool
    private let work: OrderedWork<CompressJob>

    /// - Parameters:
    ///   - producer: replaces the header's producer (e.g. `lora-merge 0.1.0`), keeping its source format.
    ///   - atomic: when writing a file, committed by `finish()` and removed by `abort()`.
    public init(output: FileDescriptor, atomic: AtomicOutput? = nil, compression: ChunkCompression = .none,
                chunkSize: Int = StreamFormat.defaultChunkSize, producer: String) {
        precondition(chunkSize > 0 && chunkSize <= StreamFormat.maxChunkSize)
        self.output = output
        self.atomic = atomic
        self.compression = compression
        self.chunkSize = chunkSize
        self.producer = producer
        // Compression keeps `window` chunks in flight, each with a (shuffled) copy and a
        // compressed buffer: 2 × 4 MiB × (cores + 1) at most.
        let window = OrderedWork<CompressJob>.cores + 1
        rawPool = BufferPool(bufferSize: chunkSize, retain: window)
        packedPool = BufferPool(bufferSize: max(ZlibCodec.bound(chunkSize), ZstdCodec.bound(chunkSize)) + 4096, retain: window)
        work = OrderedWork(window: window)
        output.enlargePipeBuffer()
        outputIsPipe = output.isPipe
    }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        var h = header
        h.producer = producer
        for (k, v) in headerExtensions { h.extensions[k] = v }
        var bytes = FrameEncoder.preamble()
        bytes += FrameEncoder.header(h)
        if let manifest { bytes += FrameEncoder.manifest(manifest) }
        self.manifest = manifest
        try write(bytes)
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        precondition(current == nil, "beginTensor inside a tensor")
        let d = tensor.descriptor
        if let manifest {
            // Never emit a stream that contradicts its own manifest.
            guard tensorCount < manifest.count else {
                throw StreamError(.manifestMismatch(detail: "more tensors than the manifest lists"), source: output.path, tensor: d.name)
            }
            let expected = manifest[tensorCount]
            guard expected == d else {
                throw StreamError(.manifestMismatch(detail: "manifest entry \(tensorCount) is \(expected), tensor is \(d)"),
                                  source: output.path, tensor: d.name)
            }
        }
        current = d
        tensorOffset = 0
        tensorCRC = 0
        try write(FrameEncoder.tensor(tensor))
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        guard let d = current else { preconditionFailure("write outside a tensor") }
        guard tensorOffset + chunk.count <= d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(d.byteCount), received: UInt64(tensorOffset + chunk.count)),
                              source: output.path, tensor: d.name)
        }
        var start = 0
        while start < chunk.count {
            let n = min(chunkSize, chunk.count - start)
            let piece = UnsafeRawBufferPointer(rebasing: chunk[start..<start + n])
            switch compression {
            case .none:
                let crc = CRC32.checksum(piece)
                let prefix = FrameEncoder.chunkPrefix(offset: tensorOffset, rawLength: n, codec: .none, crc: crc, storedLength: n)
                try writeFrame(prefix: prefix, data: piece)
                tensorCRC = CRC32.combine(tensorCRC, crc, lengthOfB: n)
            case .zlib, .zstd:
                // Retire the oldest job before taking buffers: at most `window` jobs hold any.
                if work.isFull { try emitOldest() }
                // The chunk must be copied anyway (its memory is the source's); shuffling while
                // copying saves a buffer per job. The CRC is of the bytes as they are.
                let crc = CRC32.checksum(piece)
                let width = ByteShuffle.width(for: d.dtype)
                let raw = try rawPool.take()
                if width > 1 {
                    ByteShuffle.shuffle(piece, into: raw.whole, width: width)
                } else {
                    raw.pointer.copyMemory(from: piece.baseAddress!, byteCount: n)
                }
                raw.count = n
                work.submit(CompressJob(offset: tensorOffset, raw: raw, packed: try packedPool.take(), compression: compression,
                                        shuffleWidth: width > 1 ? width : 0, crc: crc))
            }
            tensorOffset += n
            start += n
        }
    }

    /// Uncompressed output to a pipe moves the bytes from the source file with splice(2):
    /// the page cache pages go into the pipe without a copy. The CRC is still computed
    /// from `chunk`, the same bytes seen through the reader's mapping.
    public func write(_ chunk: UnsafeRawBufferPointer, origin: (descriptor: FileDescriptor, offset: Int)) throws {
        guard compression == .none, outputIsPipe, let d = current, chunk.count <= chunkSize,
              tensorOffset + chunk.count <= d.byteCount else {
            return try write(chunk)
        }
        let n = chunk.count
        let crc = CRC32.checksum(chunk)
        let prefix = FrameEncoder.chunkPrefix(offset: tensorOffset, rawLength: n, codec: .none, crc: crc, storedLength: n)
        try write(prefix)
        var from = Int64(origin.offset)
        var done = 0
        while done < n {
            let moved = ckpt_splice(origin.descriptor.rawValue, &from, output.rawValue, nil, n - done, 1)
            if moved < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                if done == 0 && errno == EINVAL {
                    // This pair of files cannot splice: copy the bytes instead.
                    try output.writeAll(chunk)
                    break
                }
                throw IOError(.write, path: output.path, errno: errno, detail: "splice from \(origin.descriptor.path)")
            }
            if moved == 0 { throw IOError(.read, path: origin.descriptor.path, errno: EIO, detail: "file shorter than expected") }
            done += moved
        }
        let pad = StreamFormat.padding(after: n)
        if pad > 0 { try write(Array(StreamWriter.zeros[0..<pad])) }
        tensorCRC = CRC32.combine(tensorCRC, crc, lengthOfB: n)
        tensorOffset += n
    }

    public func endTensor() throws {
        guard let d = current else { preconditionFailure("endTensor outside a tensor") }
        while work.count > 0 { try emitOldest() }
        guard tensorOffset == d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(d.byteCount), received: UInt64(tensorOffset)),
                              source: output.path, tensor: d.name)
        }
        try write(FrameEncoder.tensorEnd(byteLength: d.byteCount, crc: tensorCRC))
        tensorCount += 1
        totalBytes += d.byteCount
        current = nil
    }

    public func finish() throws {
        precondition(current == nil, "finish inside a tensor")
        if let manifest, manifest.count != tensorCount {
            throw StreamError(.manifestMismatch(detail: "manifest lists \(manifest.count) tensors, \(tensorCount) were written"),
                              source: output.path)
        }
        try write(FrameEncoder.end(tensorCount: tensorCount, totalBytes: totalBytes))
        try atomic?.commit()
    }

    public func abort() {
        work.drain()
        atomic?.abort()
    }

    // MARK: - Output

    private func emitOldest() throws {
        guard let job = try work.next() else { return }
        defer {
            rawPool.give(job.raw)
            packedPool.give(job.packed)
        }
        let prefix = FrameEncoder.chunkPrefix(offset: job.offset, rawLength: job.raw.count, codec: job.codec,
                                              crc: job.crc, storedLength: job.packed.count, shuffleWidth: job.shuffleWidth)
        try writeFrame(prefix: prefix, data: job.packed.bytes)
        tensorCRC = CRC32.combine(tensorCRC, job.crc, lengthOfB: job.raw.count)
    }

    private static let zeros = [UInt8](repeating: 0, count: StreamFormat.alignment)

    private func writeFrame(prefix: [UInt8], data: UnsafeRawBufferPointer) throws {
        let pad = StreamFormat.padding(after: data.count)
        try prefix.withUnsafeBytes { p in
            try StreamWriter.zeros.withUnsafeBytes { z in
                try output.writeAll([p, data, UnsafeRawBufferPointer(rebasing: z[0..<pad])])
            }
        }
    }

    private func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try output.writeAll($0) }
    }
}

/// Deflates one (already shuffled) chunk with the run-length strategy on a worker thread.
/// See docs/performance.md for why shuffle + RLE.
final class CompressJob: Job, @unchecked Sendable {
    let offset: Int
    /// The chunk's bytes, shuffled by `shuffleWidth` when it is not 0.
    let raw: AlignedBuffer
    let packed: AlignedBuffer
    let compression: ChunkCompression
    let shuffleWidth: Int
    /// CRC-32 of the unshuffled bytes.
    let crc: UInt32

    init(offset: Int, raw: AlignedBuffer, packed: AlignedBuffer, compression: ChunkCompression, shuffleWidth: Int, crc: UInt32) {
        self.offset = offset
        self.raw = raw
        self.packed = packed
        self.compression = compression
        self.shuffleWidth = shuffleWidth
        self.crc = crc
    }

    /// The codec the chunk header names.
    var codec: StreamFormat.Codec {
        switch compression {
        case .zstd: return shuffleWidth > 0 ? .zstdShuffled : .zstd
        default: return shuffleWidth > 0 ? .zlibShuffled : .zlib
        }
    }

    override func run() throws {
        switch compression {
        case .zlib(let level): packed.count = try ZlibCodec.compress(raw.bytes, into: packed.whole, level: level, strategy: .rle)
        case .zstd(let level):
            let hashLog = shuffleWidth > 0 && level == 1 ? ZstdCodec.shuffledHashLog : nil
            packed.count = try ZstdCodec.compress(raw.bytes, into: packed.whole, level: level, hashLog: hashLog)
        case .none: preconditionFailure("a compress job for an uncompressed stream")
        }
    }
}
