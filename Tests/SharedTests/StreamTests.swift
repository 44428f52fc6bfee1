import Testing
@testable import Shared

@Suite struct StreamRoundTripTests {
    func randomTensors(seed: UInt64) -> [(TensorHeader, [UInt8])] {
        var rng = SplitMix64(seed: seed)
        var out: [(TensorHeader, [UInt8])] = []
        for (i, shape) in [[0], [1], [7, 13], [1000, 3], [64, 64, 5], []].enumerated() {
            let d = DType.allCases[i * 3 % DType.allCases.count]
            let n = shape.reduce(1, *) * d.size
            // Half random (incompressible), half repetitive (compressible).
            let bytes = (0..<n).map { j in j % 2 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : UInt8(j % 7) }
            out.append(tensor("layer.\(i).w", d, shape, bytes, attributes: i == 2 ? JSONObject([("k", .string("v"))]) : JSONObject()))
        }
        return out
    }

    @Test(arguments: [ChunkCompression.none, .zlib(level: 1), .zlib(level: 9), .zstd(level: 1), .zstd(level: -5)], [3, 100, 4 << 20])
    func roundTrip(compression: ChunkCompression, chunkSize: Int) throws {
        let tensors = randomTensors(seed: 1)
        let bytes = try streamBytes(MemorySource(tensors, chunk: 1000), compression: compression, chunkSize: chunkSize)
        #expect(bytes.count % 64 == 0)
        let sink = try readStream(bytes)
        #expect(sink.finished)
        #expect(sink.tensors.map(\.0) == tensors.map(\.0))
        #expect(sink.tensors.map(\.1) == tensors.map(\.1))
        #expect(sink.manifest == tensors.map(\.0.descriptor))
    }

    @Test func compressionShrinksRepetitiveData() throws {
        let t = [tensor("zeros", .f32, [1 << 16], [UInt8](repeating: 0, count: 1 << 18))]
        let plain = try streamBytes(MemorySource(t))
        for c in [ChunkCompression.zlib(level: 1), .zstd(level: 1)] {
            let packed = try streamBytes(MemorySource(t), compression: c)
            #expect(packed.count < plain.count / 20, "\(c)")
        }
    }

    @Test func zstdChunksNameTheirCodecAndShuffle() throws {
        // f32 data: codec 4 (zstd, shuffled by 4); u8 data: codec 3 (nothing to shuffle).
        let t = [tensor("f", .f32, [256], (0..<1024).map { UInt8($0 % 7) }), tensor("b", .u8, [512], (0..<512).map { UInt8($0 % 5) })]
        let bytes = try streamBytes(MemorySource(t), compression: .zstd(level: 3))
        var codecs: [(UInt32, UInt8)] = []
        var at = 64
        while at + 16 <= bytes.count {
            let kind = bytes[at + 4]
            let length = (0..<8).reduce(0) { $0 | Int(bytes[at + 8 + $1]) << (8 * $1) }
            if kind == 0x04 {
                codecs.append(((0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[at + 32 + $1]) << (8 * $1) }, bytes[at + 40]))
            }
            at += 16 + length + StreamFormat.padding(after: 16 + length)
        }
        #expect(codecs.map(\.0) == [4, 3] && codecs.map(\.1) == [4, 0])
        #expect(try readStream(bytes).tensors.map(\.1) == t.map(\.1))
    }

    @Test func compressionArgumentParsing() {
        #expect(ChunkCompression(argument: "none") == ChunkCompression.none)
        #expect(ChunkCompression(argument: "zlib") == .zlib(level: 1))
        #expect(ChunkCompression(argument: "zlib:9") == .zlib(level: 9))
        #expect(ChunkCompression(argument: "zlib:10") == nil)
        #expect(ChunkCompression(argument: "zstd") == .zstd(level: 1))
        #expect(ChunkCompression(argument: "zstd:-7") == .zstd(level: -7))
        #expect(ChunkCompression(argument: "zstd:0") == nil)
        #expect(ChunkCompression(argument: "zstd:20") == nil)
        #expect(ChunkCompression(argument: "lz4") == nil)
        #expect(ChunkCompression(argument: "zlib:") == nil)
    }

    @Test func unknownHeaderKeysAndAttributesTravelOn() throws {
        // A later minor version's header key and a tensor attribute nobody here knows: a stage
        // replaces the producer and passes both on.
        let header = StreamHeader(producer: "upstream", sourceFormat: "t", metadata: JSONObject([("m", .string("v"))]),
                                  extensions: JSONObject([("x_future", .array([.number("1")]))]))
        let tensor = TensorHeader(try TensorDescriptor(name: "a", dtype: .u8, shape: [1]), attributes: JSONObject([("x_note", .string("n"))]))
        let first = FrameEncoder.preamble() + FrameEncoder.header(header) + FrameEncoder.tensor(tensor)
            + FrameEncoder.chunkPrefix(offset: 0, rawLength: 1, codec: .none, crc: CRC32.checksum([7]), storedLength: 1) + [7]
            + [UInt8](repeating: 0, count: 63) + FrameEncoder.tensorEnd(byteLength: 1, crc: CRC32.checksum([7]))
            + FrameEncoder.end(tensorCount: 1, totalBytes: 1)
        let dir = temporaryDirectory()
        writeFile(dir + "/in.ckpts", first)
        let out = try AtomicOutput(path: dir + "/out.ckpts", overwrite: false)
        try pump(from: try StreamReader(try FileDescriptor.openForReading(dir + "/in.ckpts")),
                 to: StreamWriter(output: out.descriptor, atomic: out, producer: "stage"))
        let again = try readStream(readFile(dir + "/out.ckpts"))
        #expect(again.header == StreamHeader(producer: "stage", sourceFormat: "t", metadata: header.metadata, extensions: header.extensions))
        #expect(again.tensors.first?.0 == tensor)
    }

    @Test func writerRefusesDataBeyondTheDeclaredLength() throws {
        let dir = temporaryDirectory()
        let out = try AtomicOutput(path: dir + "/x.ckpts", overwrite: false)
        let w = StreamWriter(output: out.descriptor, atomic: out, producer: "t")
        try w.begin(StreamHeader(producer: "t", sourceFormat: "t"), manifest: nil)
        try w.beginTensor(TensorHeader(try TensorDescriptor(name: "a", dtype: .f32, shape: [1])))
        let data: [UInt8] = [1, 2, 3, 4, 5]
        #expect(throws: StreamError.self) { try data.withUnsafeBytes { try w.write($0) } }
        w.abort()
        #expect(!fileExists(dir + "/x.ckpts"))
    }

    @Test func writerRefusesToContradictItsManifest() throws {
        let source = MemorySource([tensor("a", .u8, [1], [1])])
        let dir = temporaryDirectory()
        let out = try AtomicOutput(path: dir + "/x.ckpts", overwrite: false)
        let w = StreamWriter(output: out.descriptor, atomic: out, producer: "t")
        try w.begin(source.header, manifest: [try TensorDescriptor(name: "b", dtype: .u8, shape: [1])])
        #expect(throws: StreamError.self) { try w.beginTensor(TensorHeader(try TensorDescriptor(name: "a", dtype: .u8, shape: [1]))) }
    }
}

/// Bad streams: each must fail with its own StreamError, never crash or succeed.
@Suite struct StreamBadInputTests {
    func reason(_ bytes: [UInt8]) -> StreamError.Reason? {
        do {
            _ = try readStream(bytes)
            return nil
        } catch let e as StreamError {
            return e.reason
        } catch {
            Issue.record("unexpected error type: \(error)")
            return nil
        }
    }

    @Test func everyTruncationIsAnError() {
        let full = golden("chunked-zlib.ckpts")
        for n in 0..<full.count {
            let r = reason(Array(full[0..<n]))
            #expect(r != nil, "prefix of \(n) bytes was accepted")
        }
        #expect(reason(full) == nil)
    }

    @Test func missingEndFrameSaysTruncated() {
        let tiny = golden("tiny.ckpts")
        guard case .truncated = reason(Array(tiny.dropLast(64))) else {
            Issue.record("expected truncated")
            return
        }
    }

    @Test func flippedDataBitIsACRCError() {
        var tiny = golden("tiny.ckpts")
        tiny[0x182] ^= 0x10
        #expect(reason(tiny) == .chunkCRCMismatch(chunkOffset: 0, expected: 0x2E3F_A576, actual: CRC32.checksum([0, 0, 0x90, 0x3F, 0, 0, 0, 0x40])))
    }

    @Test func flippedBitInCompressedDataIsAnError() {
        var z = golden("chunked-zlib.ckpts")
        // The first chunk frame (kind 4 after an FFFFFFFF marker); its stored bytes start 64 bytes in.
        let firstChunk = stride(from: 0, to: z.count, by: 64).first { z[$0] == 0xFF && z[$0 + 4] == 0x04 }!
        z[firstChunk + 66] ^= 0x01
        let r = reason(z)
        switch r {
        case .decompressionFailed, .chunkCRCMismatch: break
        default: Issue.record("expected a decompression or CRC error, got \(String(describing: r))")
        }
    }

    @Test func flippedTensorEndCRCIsDetected() {
        var tiny = golden("tiny.ckpts")
        tiny[0x1D8] ^= 0x01
        #expect(reason(tiny) == .tensorCRCMismatch(expected: 0x2E3F_A577, actual: 0x2E3F_A576))
    }

    @Test func badMagic() {
        var tiny = golden("tiny.ckpts")
        tiny[1] = UInt8(ascii: "X")
        #expect(reason(tiny) == .badMagic)
        #expect(reason(Array("PK\u{3}\u{4} not a stream at all, but long enough to fill a preamble of 64 bytes...".utf8)) == .badMagic)
        #expect(reason([]) == .empty)
    }

    @Test func unsupportedMajorVersion() {
        var tiny = golden("tiny.ckpts")
        tiny[8] = 2
        #expect(reason(tiny) == .unsupportedVersion(major: 2, minor: 0))
    }

    @Test func nonZeroPaddingIsRefused() {
        var tiny = golden("tiny.ckpts")
        tiny[0x1F0] = 1
        #expect(reason(tiny) == .badPadding(kind: "tensor-end"))
    }

    @Test func trailingDataAfterEnd() {
        #expect(reason(golden("tiny.ckpts") + [0]) == .trailingData)
    }

    /// Builds streams frame by frame to break one rule at a time.
    func stream(_ frames: [[UInt8]]) -> [UInt8] { FrameEncoder.preamble() + frames.flatMap { $0 } }
    let header = FrameEncoder.header(StreamHeader(producer: "t", sourceFormat: "t"))
    let a = TensorHeader(try! TensorDescriptor(name: "a", dtype: .u8, shape: [4]))
    func chunk(offset: Int, _ data: [UInt8], raw: Int? = nil) -> [UInt8] {
        var f = FrameEncoder.chunkPrefix(offset: offset, rawLength: raw ?? data.count, codec: .none, crc: CRC32.checksum(data), storedLength: data.count) + data
        f += [UInt8](repeating: 0, count: StreamFormat.padding(after: f.count))
        return f
    }
    var end0: [UInt8] { FrameEncoder.end(tensorCount: 0, totalBytes: 0) }

    @Test func unknownCriticalFrameIsRefusedAncillaryIsSkipped() {
        #expect(reason(stream([header, FrameEncoder.frame(.init(rawValue: 0x01)!, body: []).replacing(at: 4, with: 0x10), end0]))
                == .unknownCriticalFrame(kind: 0x10))
        let ancillary = FrameEncoder.frame(.header, body: Array("anything".utf8)).replacing(at: 4, with: 0x90)
        #expect(reason(stream([header, ancillary, end0])) == nil)
    }

    @Test func messagesSayTheRule() {
        func text(_ r: StreamError.Reason) -> String { StreamError(r, source: "s", offset: 128).description }
        #expect(text(.unknownCriticalFrame(kind: 0x10)) == "s: byte 128: unknown critical frame kind 0x10")
        #expect(text(.badMarker(found: 0x1234)) == "s: byte 128: frame does not start with the FFFFFFFF marker (found 0x00001234)")
        #expect(text(.badPadding(kind: "header")).hasSuffix("(frames are padded with zeros to a multiple of 64 bytes)"))
        // A chunk header cut short names its size.
        let cut = Array(stream([header, FrameEncoder.tensor(a), chunk(offset: 0, [1, 2, 3, 4])]).prefix(64 + header.count + FrameEncoder.tensor(a).count + 16 + 20))
        #expect(reason(cut) == .truncated(inside: "the 48-byte chunk header of tensor a"))
    }

    @Test func headerMustComeFirst() {
        #expect(reason(stream([end0])) == .unexpectedFrame(got: "end", expected: "header"))
    }

    @Test func chunkOutsideATensor() {
        #expect(reason(stream([header, chunk(offset: 0, [1]), end0])) == .unexpectedFrame(got: "chunk", expected: "tensor or end"))
    }

    @Test func chunkGapIsDetected() {
        let s = stream([header, FrameEncoder.tensor(a), chunk(offset: 1, [1, 2, 3])])
        #expect(reason(s) == .chunkOutOfOrder(expectedOffset: 0, got: 1))
    }

    @Test func chunkBeyondTheTensor() {
        let s = stream([header, FrameEncoder.tensor(a), chunk(offset: 0, [1, 2, 3, 4, 5])])
        #expect(reason(s) == .chunkBeyondTensor(offset: 0, length: 5, tensorLength: 4))
    }

    @Test func hugeDeclaredChunkIsRefusedBeforeAllocating() {
        let s = stream([header, FrameEncoder.tensor(TensorHeader(try! TensorDescriptor(name: "big", dtype: .u8, shape: [1 << 40]))),
                        chunk(offset: 0, [1], raw: 1 << 40)])
        #expect(reason(s) == .frameTooLarge(kind: "chunk", length: 1 << 40, limit: StreamFormat.maxChunkSize))
    }

    @Test func shortTensor() {
        let s = stream([header, FrameEncoder.tensor(a), chunk(offset: 0, [1, 2]), FrameEncoder.tensorEnd(byteLength: 4, crc: 0), end0])
        #expect(reason(s) == .tensorLengthMismatch(declared: 4, received: 2))
    }

    @Test func endFrameTotalsMustMatch() {
        let s = stream([header, FrameEncoder.tensor(a), chunk(offset: 0, [1, 2, 3, 4]),
                        FrameEncoder.tensorEnd(byteLength: 4, crc: CRC32.checksum([1, 2, 3, 4])), end0])
        #expect(reason(s) == .endMismatch(detail: "says 0 tensors / 0 bytes, stream carried 1 / 4"))
    }

    @Test func manifestContradiction() {
        let m = FrameEncoder.manifest([try! TensorDescriptor(name: "a", dtype: .u8, shape: [2, 2])])
        let s = stream([header, m, FrameEncoder.tensor(a), chunk(offset: 0, [1, 2, 3, 4]),
                        FrameEncoder.tensorEnd(byteLength: 4, crc: CRC32.checksum([1, 2, 3, 4])), FrameEncoder.end(tensorCount: 1, totalBytes: 4)])
        guard case .manifestMismatch = reason(s) else {
            Issue.record("expected a manifest mismatch")
            return
        }
    }

    @Test func manifestWithTooFewTensorsInTheStream() {
        let m = FrameEncoder.manifest([a.descriptor])
        #expect(reason(stream([header, m, end0])) == .manifestMismatch(detail: "manifest lists 1 tensors, stream carried 0"))
    }

    @Test func unknownDType() {
        var t = FrameEncoder.tensor(a)
        // "U8" → "U9" in the descriptor (name length 4 + "a" + dtype length 1 → offset 16 + 6).
        t[16 + 7] = UInt8(ascii: "9")
        #expect(reason(stream([header, t])) == .unknownDType(name: "U9"))
    }

    @Test func tensorLengthMustMatchShape() {
        var t = FrameEncoder.tensor(a)
        t[16 + 17] = 5  // the u64 byte length after the descriptor
        guard case .malformedFrame = reason(stream([header, t])) else {
            Issue.record("expected malformed frame")
            return
        }
    }

    @Test func shapeOverflowIsRefused() {
        var w = ByteWriter()
        w.string32("x"); w.string8("F64"); w.u8(2); w.u64(1 << 40); w.u64(1 << 40); w.u64(0); w.u32(0)
        guard case .badShape = reason(stream([header, FrameEncoder.frame(.tensor, body: w.bytes)])) else {
            Issue.record("expected a shape error")
            return
        }
    }

    @Test func headerMustBeJSON() {
        guard case .badJSON = reason(stream([FrameEncoder.frame(.header, body: Array("{nope".utf8))])) else {
            Issue.record("expected a JSON error")
            return
        }
    }
}

extension Array where Element == UInt8 {
    func replacing(at i: Int, with v: UInt8) -> [UInt8] {
        var c = self
        c[i] = v
        return c
    }
}
