import Glibc

/// Reads a ckpt stream and checks everything the spec promises: the grammar
/// (`preamble header manifest? (tensor chunk* tensor-end)* end EOF`), each chunk's
/// offset and CRC, each tensor's length and CRC, the manifest, and the end frame's
/// totals. The source behind every stage's standard input.
///
/// Chunks are read a few frames ahead and inflated/checksummed on worker threads, so a
/// compressed stream decodes on all cores; plain and compressed chunks may be mixed.
public final class StreamReader: DirectChunkSource {
    public let header: StreamHeader
    public private(set) var manifest: [TensorDescriptor]? = nil
    public let source: String

    private let input: BufferedInput
    private let decoder: FrameDecoder

    // Read side (ahead of the consumer): where the parser is in the grammar.
    private enum Event {
        case tensor(TensorHeader)
        case chunk(ChunkJob)
        /// An uncompressed chunk whose data has not been read yet: read (or spliced) by the consumer.
        case rawChunk(FrameDecoder.ChunkHeader, bodyLength: UInt64, offset: Int)
        /// The tensor's CRC (its length was checked when the frame was read).
        case tensorEnd(crc: UInt32, offset: Int)
        case end
    }
    private var events: [Event] = []
    private var eventHead = 0
    private var chunksAhead = 0
    private var readingTensor: TensorDescriptor?
    private var readingOffset: UInt64 = 0
    private var sawEnd = false
    /// A raw chunk's data is next in the input: nothing more can be read ahead.
    private var rawChunkPending = false
    private var tensorsRead = 0
    private var bytesRead = 0

    // Consumer side.
    private var currentTensor: TensorDescriptor?
    private var currentCRC: UInt32 = 0
    private var heldChunk: ChunkJob?
    private var heldRaw: AlignedBuffer?

    private let work: OrderedWork<ChunkJob>
    // Read-ahead keeps `lookahead` compressed chunks in flight, each with a compressed and
    // an output buffer, plus the chunk the consumer holds.
    private let rawPool = BufferPool(bufferSize: StreamFormat.defaultChunkSize, retain: OrderedWork<ChunkJob>.cores + 2)
    private let packedPool = BufferPool(bufferSize: ZlibCodec.bound(StreamFormat.defaultChunkSize) + 4096,
                                        retain: OrderedWork<ChunkJob>.cores + 2)
    private let lookahead: Int
    /// Splice needs a pipe on one side; cleared if the sink's file system refuses splice.
    private var canSplice: Bool
    /// CRC checks of spliced chunks, run on another core while the next chunk moves.
    private let verifications = OrderedWork<RegionCRCJob>(window: 2)

    public init(_ descriptor: FileDescriptor) throws {
        input = try BufferedInput(descriptor)
        source = descriptor.path
        decoder = FrameDecoder(source: descriptor.path)
        lookahead = OrderedWork<ChunkJob>.cores + 1
        canSplice = descriptor.isPipe
        work = OrderedWork(window: lookahead + 1)

        let pre = try input.read(StreamFormat.preambleSize)
        if pre.count < StreamFormat.preambleSize {
            if pre.isEmpty { throw StreamError(.empty, source: source, offset: 0) }
            if pre.count >= 8 && Array(pre[0..<8]) == StreamFormat.magic {
                throw StreamError(.truncated(inside: "the preamble"), source: source, offset: pre.count)
            }
            throw StreamError(.badMagic, source: source, offset: 0)
        }
        try decoder.preamble(pre)

        let at = input.offset
        guard let (kind, body) = try StreamReader.readSmallFrame(input, decoder) else {
            throw StreamError(.truncated(inside: "the stream before its header frame"), source: source, offset: at)
        }
        guard kind == .header else {
            throw StreamError(.unexpectedFrame(got: kind.description, expected: "header"), source: source, offset: at)
        }
        header = try decoder.header(body, at: at)

        // The manifest, if any, comes right after the header.
        if let first = try readEvent(allowManifest: true) {
            if case .manifestFrame(let m) = first { manifest = m } else { pushEvent(first) }
        }
    }

    deinit {
        work.drain()
        verifications.drain()
    }

    // MARK: - TensorSource

    public func nextTensor() throws -> TensorHeader? {
        if currentTensor != nil {
            // Skip the rest of an unfinished tensor.
            while try nextChunk() != nil {}
        }
        switch try nextEvent() {
        case .tensor(let t):
            currentTensor = t.descriptor
            currentCRC = 0
            return t
        case .end:
            return nil
        default:
            preconditionFailure("parser let a chunk frame through outside a tensor")
        }
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        releaseHeld()
        guard let tensor = currentTensor else { return nil }
        switch try nextEvent() {
        case .chunk(let job):
            _ = try work.next()  // the oldest job is this one: events and jobs share one order
            if job.crc != job.storedCRC {
                throw StreamError(.chunkCRCMismatch(chunkOffset: job.tensorOffset, expected: job.storedCRC, actual: job.crc),
                                  source: source, offset: job.frameOffset, tensor: tensor.name)
            }
            currentCRC = CRC32.combine(currentCRC, job.crc, lengthOfB: job.rawLength)
            heldChunk = job
            return job.result.bytes
        case .rawChunk(let ch, let bodyLength, let at):
            let buffer = try rawPool.take(minimum: Int(ch.rawLength))
            try readRawData(ch, bodyLength: bodyLength, at: at, tensor: tensor.name,
                            into: UnsafeMutableRawBufferPointer(start: buffer.pointer, count: Int(ch.rawLength)))
            buffer.count = Int(ch.rawLength)
            try accept(crc: CRC32.checksum(buffer.bytes), of: ch, at: at, tensor: tensor.name)
            heldRaw = buffer
            return buffer.bytes
        case .tensorEnd(let crc, let offset):
            while verifications.count > 0 { try settleOldestVerification() }
            if crc != currentCRC {
                throw StreamError(.tensorCRCMismatch(expected: crc, actual: currentCRC), source: source, offset: offset, tensor: tensor.name)
            }
            currentTensor = nil
            return nil
        default:
            preconditionFailure("parser let a non-chunk frame through inside a tensor")
        }
    }

    /// The length of the current tensor's next chunk, or nil when the tensor ends next; the
    /// chunk stays unread (a caller can pick where `nextChunk(copyingInto:)` puts it).
    public func nextChunkLength() throws -> Int? {
        guard currentTensor != nil else { return nil }
        switch try peekEvent() {
        case .chunk(let job): return job.rawLength
        case .rawChunk(let ch, _, _): return Int(ch.rawLength)
        default: return nil
        }
    }

    /// Copies the next chunk to `destination` (at least the chunk's length) and returns its
    /// length, or nil at the end of the tensor. An uncompressed chunk is read from the input
    /// straight into `destination`, without passing through this reader's buffers.
    public func nextChunk(copyingInto destination: UnsafeMutableRawBufferPointer) throws -> Int? {
        releaseHeld()
        guard let tensor = currentTensor else { return nil }
        if case .rawChunk(let ch, let bodyLength, let at) = try peekEvent() {
            let n = Int(ch.rawLength)
            guard n <= destination.count else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(destination.count), received: UInt64(n)), source: source, offset: at, tensor: tensor.name)
            }
            _ = try nextEvent()
            let into = UnsafeMutableRawBufferPointer(rebasing: destination[0..<n])
            try readRawData(ch, bodyLength: bodyLength, at: at, tensor: tensor.name, into: into)
            try accept(crc: CRC32.checksum(UnsafeRawBufferPointer(into)), of: ch, at: at, tensor: tensor.name)
            return n
        }
        guard let chunk = try nextChunk() else { return nil }
        guard chunk.count <= destination.count else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(destination.count), received: UInt64(chunk.count)), source: source, tensor: tensor.name)
        }
        destination.baseAddress!.copyMemory(from: chunk.baseAddress!, byteCount: chunk.count)
        return chunk.count
    }

    /// Delivers the next chunk to `sink`. An uncompressed chunk read from a pipe is spliced
    /// into its place in the sink's file and its CRC checked there (from the page cache), so
    /// the data never passes through this process's memory; anything else is written.
    public func nextChunk(into sink: FileRegionSink) throws -> Int? {
        releaseHeld()
        guard let tensor = currentTensor else { return nil }
        if canSplice, case .rawChunk(let ch, let bodyLength, let at) = try peekEvent(),
           let (fd, offset) = sink.nextFileRegion() {
            _ = try nextEvent()
            rawChunkPending = false
            let n = Int(ch.rawLength)
            let buffered = input.takeBuffered(max: n)
            if buffered.count > 0 { try fd.pwriteAll(buffered, at: offset) }
            var moved = 0
            do {
                moved = try input.descriptor.splice(count: n - buffered.count, to: fd, at: offset + buffered.count)
                input.consumedDirectly(moved)
            } catch let e as IOError where e.errno == EINVAL {
                // This file system does not take splice: copy through memory from now on.
                canSplice = false
                let rest = try rawPool.take(minimum: n)
                defer { rawPool.give(rest) }
                moved = try input.read(into: UnsafeMutableRawBufferPointer(start: rest.pointer, count: n - buffered.count))
                try fd.pwriteAll(UnsafeRawBufferPointer(start: rest.pointer, count: moved), at: offset + buffered.count)
            }
            guard buffered.count + moved == n else {
                throw StreamError(.truncated(inside: "chunk data of tensor \(tensor.name)"), source: source, offset: at, tensor: tensor.name)
            }
            try StreamReader.skipPadding(input, decoder, after: StreamFormat.frameHeaderSize + Int(bodyLength), at: at, kind: "chunk")
            if verifications.isFull { try settleOldestVerification() }
            verifications.submit(RegionCRCJob(file: fd, offset: offset, header: ch, frameOffset: at, tensor: tensor.name))
            try sink.didWriteRegion(count: n)
            return n
        }
        guard let chunk = try nextChunk() else { return nil }
        try sink.write(chunk)
        return chunk.count
    }

    /// Checks the oldest spliced chunk's CRC (read back from the sink's file) in stream order.
    private func settleOldestVerification() throws {
        guard let job = try verifications.next() else { return }
        try accept(crc: job.crc, of: job.header, at: job.frameOffset, tensor: job.tensor)
    }

    /// Checks a raw chunk's CRC and adds it to the tensor's.
    private func accept(crc: UInt32, of ch: FrameDecoder.ChunkHeader, at: Int, tensor: String) throws {
        if crc != ch.crc {
            throw StreamError(.chunkCRCMismatch(chunkOffset: ch.offset, expected: ch.crc, actual: crc),
                              source: source, offset: at, tensor: tensor)
        }
        currentCRC = CRC32.combine(currentCRC, crc, lengthOfB: Int(ch.rawLength))
    }

    /// Reads a pending raw chunk's data and padding.
    private func readRawData(_ ch: FrameDecoder.ChunkHeader, bodyLength: UInt64, at: Int, tensor: String,
                             into destination: UnsafeMutableRawBufferPointer) throws {
        rawChunkPending = false
        let got = try input.read(into: destination)
        guard got == destination.count else {
            throw StreamError(.truncated(inside: "chunk data of tensor \(tensor)"), source: source, offset: at, tensor: tensor)
        }
        try StreamReader.skipPadding(input, decoder, after: StreamFormat.frameHeaderSize + Int(bodyLength), at: at, kind: "chunk")
    }

    private func releaseHeld() {
        if let raw = heldRaw {
            heldRaw = nil
            rawPool.give(raw)
        }
        guard let job = heldChunk else { return }
        heldChunk = nil
        job.release(raw: rawPool, packed: packedPool)
    }

    // MARK: - Events, read ahead of the consumer

    private enum Parsed {
        case manifestFrame([TensorDescriptor])
        case event(Event)
    }

    private func pushEvent(_ p: Parsed) {
        if case .event(let e) = p {
            if case .chunk = e { chunksAhead += 1 }
            events.append(e)
        }
    }

    /// The next event, without consuming it.
    private func peekEvent() throws -> Event {
        // Keep `lookahead` chunks in flight: reading is sequential, inflating parallel.
        while !sawEnd && !rawChunkPending && (eventHead == events.count || (chunksAhead < lookahead && events.count - eventHead < 256)) {
            guard let p = try readEvent(allowManifest: false) else { break }
            pushEvent(p)
        }
        precondition(eventHead < events.count, "no event after the end frame")
        return events[eventHead]
    }

    private func nextEvent() throws -> Event {
        let e = try peekEvent()
        eventHead += 1
        if eventHead == events.count { events.removeAll(keepingCapacity: true); eventHead = 0 }
        if case .chunk = e { chunksAhead -= 1 }
        return e
    }

    static func readSmallFrame(_ input: BufferedInput, _ decoder: FrameDecoder) throws -> (StreamFormat.Kind, [UInt8])? {
        while true {
            let at = input.offset
            let h = try input.read(StreamFormat.frameHeaderSize)
            if h.isEmpty { return nil }
            guard h.count == StreamFormat.frameHeaderSize else {
                throw StreamError(.truncated(inside: "a frame header"), source: decoder.source, offset: at)
            }
            let fh = try decoder.frameHeader(h, at: at)
            guard let kind = StreamFormat.Kind(rawValue: fh.kind), kind != .chunk else {
                if StreamFormat.Kind(rawValue: fh.kind) == .chunk {
                    throw StreamError(.unexpectedFrame(got: "chunk", expected: "header"), source: decoder.source, offset: at)
                }
                try skipBody(input, decoder, length: fh.bodyLength, at: at, kind: "ancillary")
                continue
            }
            return (kind, try readBody(input, decoder, fh, kind: kind, at: at))
        }
    }

    /// A non-chunk frame's body, size-limited (no huge allocation from a forged length), and
    /// its padding.
    static func readBody(_ input: BufferedInput, _ decoder: FrameDecoder, _ fh: FrameDecoder.FrameHeader,
                         kind: StreamFormat.Kind, at: Int, tensor: String? = nil) throws -> [UInt8] {
        guard fh.bodyLength <= UInt64(StreamFormat.maxMetadataFrameSize) else {
            throw StreamError(.frameTooLarge(kind: kind.description, length: fh.bodyLength, limit: StreamFormat.maxMetadataFrameSize),
                              source: decoder.source, offset: at)
        }
        let body = try input.read(Int(fh.bodyLength))
        guard body.count == Int(fh.bodyLength) else {
            throw StreamError(.truncated(inside: "a \(kind) frame"), source: decoder.source, offset: at, tensor: tensor)
        }
        try skipPadding(input, decoder, after: StreamFormat.frameHeaderSize + body.count, at: at, kind: kind.description)
        return body
    }

    static func skipPadding(_ input: BufferedInput, _ decoder: FrameDecoder, after length: Int, at: Int, kind: String) throws {
        let pad = StreamFormat.padding(after: length)
        guard pad > 0 else { return }
        let bytes = try input.read(pad)
        guard bytes.count == pad else { throw StreamError(.truncated(inside: "the padding after a \(kind) frame (frames are padded to a multiple of 64 bytes)"), source: decoder.source, offset: at) }
        guard bytes.allSatisfy({ $0 == 0 }) else { throw StreamError(.badPadding(kind: kind), source: decoder.source, offset: at) }
    }

    static func skipBody(_ input: BufferedInput, _ decoder: FrameDecoder, length: UInt64, at: Int, kind: String) throws {
        var left = length
        while left > 0 {
            let n = Int(min(left, 1 << 16))
            let got = try input.read(n)
            guard got.count == n else { throw StreamError(.truncated(inside: "an \(kind) frame"), source: decoder.source, offset: at) }
            left -= UInt64(n)
        }
        let total = UInt64(StreamFormat.frameHeaderSize) + length
        try skipPadding(input, decoder, after: Int(total % UInt64(StreamFormat.alignment)), at: at, kind: kind)
    }

    /// Reads and checks the next frame against the grammar; nil only at a clean EOF
    /// after the end frame (which has been checked for trailing data).
    private func readEvent(allowManifest: Bool) throws -> Parsed? {
        if sawEnd { return nil }
        while true {
            let at = input.offset
            let h = try input.read(StreamFormat.frameHeaderSize)
            guard h.count == StreamFormat.frameHeaderSize else {
                let inside = readingTensor.map { "tensor \($0.name)" } ?? (h.isEmpty ? "the stream" : "a frame header")
                throw StreamError(.truncated(inside: inside), source: source, offset: at)
            }
            let fh = try decoder.frameHeader(h, at: at)
            guard let kind = StreamFormat.Kind(rawValue: fh.kind) else {
                try StreamReader.skipBody(input, decoder, length: fh.bodyLength, at: at, kind: "ancillary")
                continue
            }
            let expected = readingTensor == nil ? "tensor or end" : "chunk or tensor-end"
            if kind == .chunk {
                guard let tensor = readingTensor else {
                    throw StreamError(.unexpectedFrame(got: "chunk", expected: expected), source: source, offset: at)
                }
                return .event(try readChunk(fh, at: at, tensor: tensor))
            }
            let body = try StreamReader.readBody(input, decoder, fh, kind: kind, at: at, tensor: readingTensor?.name)

            switch (kind, readingTensor) {
            case (.manifest, nil) where allowManifest:
                return .manifestFrame(try decoder.manifest(body, at: at))
            case (.tensor, nil):
                let t = try decoder.tensor(body, at: at)
                if let manifest {
                    guard tensorsRead < manifest.count else {
                        throw StreamError(.manifestMismatch(detail: "more tensors than the manifest's \(manifest.count)"),
                                          source: source, offset: at, tensor: t.descriptor.name)
                    }
                    guard manifest[tensorsRead] == t.descriptor else {
                        throw StreamError(.manifestMismatch(detail: "manifest entry \(tensorsRead) is \(manifest[tensorsRead]), stream has \(t.descriptor)"),
                                          source: source, offset: at, tensor: t.descriptor.name)
                    }
                }
                readingTensor = t.descriptor
                readingOffset = 0
                return .event(.tensor(t))
            case (.tensorEnd, let tensor?):
                let (length, crc) = try decoder.tensorEnd(body, at: at)
                guard length == UInt64(tensor.byteCount), readingOffset == UInt64(tensor.byteCount) else {
                    throw StreamError(.tensorLengthMismatch(declared: UInt64(tensor.byteCount), received: readingOffset),
                                      source: source, offset: at, tensor: tensor.name)
                }
                readingTensor = nil
                tensorsRead += 1
                bytesRead += tensor.byteCount
                return .event(.tensorEnd(crc: crc, offset: at))
            case (.end, nil):
                let (count, bytes) = try decoder.end(body, at: at)
                guard count == UInt64(tensorsRead), bytes == UInt64(bytesRead) else {
                    throw StreamError(.endMismatch(detail: "says \(count) tensors / \(bytes) bytes, stream carried \(tensorsRead) / \(bytesRead)"),
                                      source: source, offset: at)
                }
                if let manifest, manifest.count != tensorsRead {
                    throw StreamError(.manifestMismatch(detail: "manifest lists \(manifest.count) tensors, stream carried \(tensorsRead)"),
                                      source: source, offset: at)
                }
                guard try input.atEnd() else { throw StreamError(.trailingData, source: source, offset: input.offset) }
                sawEnd = true
                return .event(.end)
            default:
                throw StreamError(.unexpectedFrame(got: kind.description, expected: expected),
                                  source: source, offset: at, tensor: readingTensor?.name)
            }
        }
    }

    private func readChunk(_ fh: FrameDecoder.FrameHeader, at: Int, tensor: TensorDescriptor) throws -> Event {
        let hb = try input.read(StreamFormat.chunkHeaderSize)
        guard hb.count == StreamFormat.chunkHeaderSize else {
            throw StreamError(.truncated(inside: "the \(StreamFormat.chunkHeaderSize)-byte chunk header of tensor \(tensor.name)"), source: source, offset: at)
        }
        let ch = try decoder.chunkHeader(hb, bodyLength: fh.bodyLength, at: at, tensor: tensor.name)
        guard ch.offset == readingOffset else {
            throw StreamError(.chunkOutOfOrder(expectedOffset: readingOffset, got: ch.offset), source: source, offset: at, tensor: tensor.name)
        }
        guard ch.offset + ch.rawLength <= UInt64(tensor.byteCount) else {
            throw StreamError(.chunkBeyondTensor(offset: ch.offset, length: ch.rawLength, tensorLength: UInt64(tensor.byteCount)),
                              source: source, offset: at, tensor: tensor.name)
        }
        readingOffset += ch.rawLength
        if ch.codec == .none {
            rawChunkPending = true
            return .rawChunk(ch, bodyLength: fh.bodyLength, offset: at)
        }
        let packed = try packedPool.take(minimum: ch.storedLength)
        let got = try input.read(into: UnsafeMutableRawBufferPointer(start: packed.pointer, count: ch.storedLength))
        guard got == ch.storedLength else {
            packedPool.give(packed)
            throw StreamError(.truncated(inside: "chunk data of tensor \(tensor.name)"), source: source, offset: at, tensor: tensor.name)
        }
        packed.count = got
        try StreamReader.skipPadding(input, decoder, after: StreamFormat.frameHeaderSize + Int(fh.bodyLength), at: at, kind: "chunk")
        let job = ChunkJob(codec: ch.codec, packed: packed, output: try rawPool.take(minimum: Int(ch.rawLength)), rawLength: Int(ch.rawLength),
                           storedCRC: ch.crc, tensorOffset: ch.offset, frameOffset: at, tensor: tensor.name, source: source,
                           shuffleWidth: ch.shuffleWidth)
        work.submit(job)
        return .chunk(job)
    }
}

/// Computes the CRC of a chunk spliced into a file, from the page cache, on a worker thread.
final class RegionCRCJob: Job, @unchecked Sendable {
    let file: FileDescriptor
    let offset: Int
    let header: FrameDecoder.ChunkHeader
    let frameOffset: Int
    let tensor: String
    var crc: UInt32 = 0

    init(file: FileDescriptor, offset: Int, header: FrameDecoder.ChunkHeader, frameOffset: Int, tensor: String) {
        self.file = file
        self.offset = offset
        self.header = header
        self.frameOffset = frameOffset
        self.tensor = tensor
    }

    override func run() throws {
        crc = try file.crc32(offset: offset, count: Int(header.rawLength))
    }
}

/// Inflates (if compressed) and checksums one chunk on a worker thread.
final class ChunkJob: Job, @unchecked Sendable {
    let codec: StreamFormat.Codec
    let packed: AlignedBuffer
    let output: AlignedBuffer
    let rawLength: Int
    let storedCRC: UInt32
    let tensorOffset: UInt64
    let frameOffset: Int
    let tensor: String
    let source: String
    let shuffleWidth: Int
    var crc: UInt32 = 0
    /// Where the chunk's bytes end up: `output`, or the buffer it was unshuffled into.
    private(set) var result: AlignedBuffer

    init(codec: StreamFormat.Codec, packed: AlignedBuffer, output: AlignedBuffer, rawLength: Int, storedCRC: UInt32,
         tensorOffset: UInt64, frameOffset: Int, tensor: String, source: String, shuffleWidth: Int) {
        self.shuffleWidth = shuffleWidth
        result = output
        self.codec = codec
        self.packed = packed
        self.output = output
        self.rawLength = rawLength
        self.storedCRC = storedCRC
        self.tensorOffset = tensorOffset
        self.frameOffset = frameOffset
        self.tensor = tensor
        self.source = source
    }

    override func run() throws {
        let into = UnsafeMutableRawBufferPointer(start: output.pointer, count: rawLength)
        let zstd = codec == .zstd || codec == .zstdShuffled
        do {
            if zstd { try ZstdCodec.decompress(packed.bytes, into: into) } else { try ZlibCodec.decompress(packed.bytes, into: into) }
        } catch {
            throw StreamError(.decompressionFailed(detail: "\(zstd ? "zstd" : "zlib"): \(error)"), source: source, offset: frameOffset, tensor: tensor)
        }
        output.count = rawLength
        if shuffleWidth > 1 {
            // The compressed bytes are no longer needed: unshuffle into their buffer when it is
            // large enough (it is for our own writers' chunks), so no third buffer is held.
            let target = packed.capacity >= rawLength ? packed : try AlignedBuffer(capacity: rawLength)
            ByteShuffle.unshuffle(output.bytes, into: target.whole, width: shuffleWidth)
            target.count = rawLength
            result = target
        }
        crc = CRC32.checksum(result.bytes)
    }

    /// Returns the job's buffers to their pools once the consumer is done with `result`.
    func release(raw: BufferPool, packed packedPool: BufferPool) {
        raw.give(output)
        packedPool.give(packed)
    }
}
