/// The first frame of every stream: who produced it, from what, and metadata that
/// writers may carry over (safetensors `__metadata__`, a torch checkpoint's non-tensor
/// leaves, a model config).
public struct StreamHeader: Equatable, Sendable {
    public var producer: String
    public var sourceFormat: String
    public var metadata: JSONObject
    /// Header keys this version does not define (a later minor version's): kept, and written
    /// again by every stage that passes the header on.
    public var extensions: JSONObject

    public init(producer: String, sourceFormat: String, metadata: JSONObject = JSONObject(), extensions: JSONObject = JSONObject()) {
        self.producer = producer
        self.sourceFormat = sourceFormat
        self.metadata = metadata
        self.extensions = extensions
    }
}

/// A tensor as it arrives: its descriptor and a small attribute map (JSON object).
public struct TensorHeader: Equatable, Sendable {
    public var descriptor: TensorDescriptor
    public var attributes: JSONObject

    public init(_ descriptor: TensorDescriptor, attributes: JSONObject = JSONObject()) {
        self.descriptor = descriptor
        self.attributes = attributes
    }
}

/// Anything that produces tensors in order: a format reader or a stream reader.
///
/// Usage: read `header` and `manifest`, then call `nextTensor()` until it returns nil;
/// after each tensor, call `nextChunk()` until it returns nil. A chunk's memory belongs
/// to the source and is valid only until the next call.
public protocol TensorSource: AnyObject {
    var header: StreamHeader { get }
    /// Every tensor's descriptor in the order they will arrive, when known up front.
    var manifest: [TensorDescriptor]? { get }
    func nextTensor() throws -> TensorHeader?
    func nextChunk() throws -> UnsafeRawBufferPointer?
}

/// Anything that consumes tensors in order: a format writer or a stream writer.
public protocol TensorSink: AnyObject {
    func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws
    func beginTensor(_ tensor: TensorHeader) throws
    func write(_ chunk: UnsafeRawBufferPointer) throws
    func endTensor() throws
    /// Completes the output (renames files into place). Called once, after the last tensor.
    func finish() throws
    /// Discards partial output after a failure. Must be safe to call at any point.
    func abort()
}

/// What `pump` moved, for summaries and progress.
public struct PumpTotals: Equatable, Sendable {
    public var tensors = 0
    public var bytes = 0
}

/// Moves every tensor from `source` to `sink`, checking that each tensor's chunks add up
/// to its declared length. On any error the sink is aborted, so no partial output stays.
@discardableResult
public func pump(from source: TensorSource, to sink: TensorSink, progress: Progress? = nil) throws -> PumpTotals {
    var totals = PumpTotals()
    do {
        try sink.begin(source.header, manifest: source.manifest)
        progress?.start(totalBytes: source.manifest.map { $0.reduce(0) { $0 + $1.byteCount } })
        while let tensor = try source.nextTensor() {
            try sink.beginTensor(tensor)
            var received = 0
            if let direct = source as? DirectChunkSource, let regionSink = sink as? FileRegionSink {
                while let n = try direct.nextChunk(into: regionSink) {
                    received += n
                    progress?.advance(bytes: n)
                }
            } else if let backed = source as? FileBackedSource, let spliceSink = sink as? SpliceAwareSink {
                while let chunk = try backed.nextChunk() {
                    received += chunk.count
                    if let origin = backed.lastChunkOrigin { try spliceSink.write(chunk, origin: origin) } else { try sink.write(chunk) }
                    progress?.advance(bytes: chunk.count)
                }
            } else {
                while let chunk = try source.nextChunk() {
                    received += chunk.count
                    try sink.write(chunk)
                    progress?.advance(bytes: chunk.count)
                }
            }
            guard received == tensor.descriptor.byteCount else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(tensor.descriptor.byteCount),
                                                        received: UInt64(received)),
                                  source: "pipeline", tensor: tensor.descriptor.name)
            }
            try sink.endTensor()
            totals.tensors += 1
            totals.bytes += received
            progress?.finishTensor()
        }
        try sink.finish()
        progress?.done()
    } catch {
        sink.abort()
        progress?.done()
        throw error
    }
    return totals
}

/// A sink that knows where in a file each byte goes, so a stream reader can move
/// uncompressed chunks straight from a pipe into place with splice(2).
public protocol FileRegionSink: TensorSink {
    /// The file and absolute offset for the current tensor's next bytes, or nil to decline.
    func nextFileRegion() -> (descriptor: FileDescriptor, offset: Int)?
    /// `count` bytes were placed at the region `nextFileRegion()` gave.
    func didWriteRegion(count: Int) throws
}

/// A source whose chunks are also bytes of a regular file, so a sink writing to a pipe can
/// move them with splice(2) instead of copying them out of memory.
public protocol FileBackedSource: TensorSource {
    /// The file and offset holding the chunk most recently returned by `nextChunk()`.
    var lastChunkOrigin: (descriptor: FileDescriptor, offset: Int)? { get }
}

/// A sink that can take a chunk's bytes from its place in a file rather than from memory.
public protocol SpliceAwareSink: TensorSink {
    /// Writes `chunk`, whose bytes are also at `origin` in a regular file.
    func write(_ chunk: UnsafeRawBufferPointer, origin: (descriptor: FileDescriptor, offset: Int)) throws
}

/// A source that can deliver its next chunk to a `FileRegionSink` itself (by splice when
/// it can, by `write` otherwise). Returns the bytes delivered, or nil at the tensor's end.
public protocol DirectChunkSource: TensorSource {
    func nextChunk(into sink: FileRegionSink) throws -> Int?
}

extension TensorSource {
    /// Reads all of the current tensor `d` into `buffer` (its capacity holds `d.byteCount`)
    /// and sets its count; a tensor longer or shorter than declared is an error naming `stage`.
    public func readTensor(_ d: TensorDescriptor, into buffer: AlignedBuffer, stage: String) throws {
        var n = 0
        if let reader = self as? StreamReader {
            // Straight from the input into the buffer: one copy fewer.
            while let got = try reader.nextChunk(copyingInto: UnsafeMutableRawBufferPointer(start: buffer.pointer + n, count: d.byteCount - n)) {
                n += got
            }
        }
        while let chunk = try nextChunk() {
            guard n + chunk.count <= d.byteCount else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(d.byteCount), received: UInt64(n + chunk.count)), source: stage, tensor: d.name)
            }
            (buffer.pointer + n).copyMemory(from: chunk.baseAddress!, byteCount: chunk.count)
            n += chunk.count
        }
        guard n == d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(d.byteCount), received: UInt64(n)), source: stage, tensor: d.name)
        }
        buffer.count = n
    }
}
