import Foundation
import Testing
@testable import Shared

@Suite struct OCDBTTests {
    static var fixtures: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().path + "/fixtures/orbax"
    }

    @Test func crc32cCheckValue() {
        #expect(Array("123456789".utf8).withUnsafeBytes { CRC32C.checksum($0) } == 0xE306_9283)
    }

    /// A height-3 B+tree with version nodes, written by tensorstore with small inline limits:
    /// every key and value must match the listing tensorstore gave.
    @Test func deepBTreeMatchesTensorstoresListing() throws {
        let store = try OCDBTStore(directory: Self.fixtures + "/g_deep_btree")
        let expected = try JSONParser.parse(readFile(Self.fixtures + "/g_deep_btree.expected.json")).objectValue!
        #expect(store.values.count == expected.count)
        #expect(store.values.count == 400)
        for (key, value) in store.values {
            let hex = value.withBytes { $0.map { String(format2: $0) }.joined() }
            #expect(expected[key]?.stringValue == hex, "\(key)")
        }
        // Keys come out in bytewise order, as the B+tree stores them.
        let keys = store.values.map { Array($0.key.utf8) }
        #expect(zip(keys, keys.dropFirst()).allSatisfy { $0.lexicographicallyPrecedes($1) })
    }

    @Test func envelopeChecks() throws {
        let raw = readFile(Self.fixtures + "/hand/ocdbt_raw/manifest.ocdbt")
        #expect(try OCDBTStore.envelope(raw, magic: OCDBTStore.manifestMagic, file: "m", base: 0).count > 16)
        var bad = raw
        bad[0] ^= 1
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(bad, magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
        bad = raw
        bad[20] ^= 1  // any bit: the crc32c catches it
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(bad, magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(Array(raw.dropLast()), magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
    }
}

import CZstd

@Suite struct ZstdTests {
    /// A frame written in two streaming calls, so zstd cannot put its size in the header
    /// (tensorstore writes some OCDBT nodes this way).
    static func frameWithoutSize(_ data: [UInt8]) -> [UInt8] {
        let cctx = ZSTD_createCCtx()!
        defer { ZSTD_freeCCtx(cctx) }
        var out = [UInt8](repeating: 0, count: ZSTD_compressBound(data.count) + 64)
        var written = 0
        data.withUnsafeBytes { d in
            out.withUnsafeMutableBytes { o in
                var input = ZSTD_inBuffer(src: d.baseAddress, size: d.count, pos: 0)
                var output = ZSTD_outBuffer(dst: o.baseAddress, size: o.count, pos: 0)
                _ = ZSTD_compressStream2(cctx, &output, &input, ZSTD_e_continue)
                var empty = ZSTD_inBuffer(src: nil, size: 0, pos: 0)
                while ZSTD_compressStream2(cctx, &output, &empty, ZSTD_e_end) != 0 {}
                written = output.pos
            }
        }
        return Array(out[0..<written])
    }

    @Test func framesWithAndWithoutADeclaredSize() throws {
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 * 7 / 3) }
        let frame = Self.frameWithoutSize(data)
        #expect(frame.withUnsafeBytes { ZstdCodec.declaredSize($0) } == nil)
        #expect(try frame.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 20) } == data)
        #expect(throws: (any Error).self) { try frame.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 100_000) } }
        #expect(throws: (any Error).self) { try Array(frame.dropLast(3)).withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 20) } }
    }
}

@Suite struct ZstdFileDecoderTests {
    private func compressed(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: ZSTD_compressBound(data.count))
        let n = out.withUnsafeMutableBytes { o in data.withUnsafeBytes { ZSTD_compress(o.baseAddress, o.count, $0.baseAddress, $0.count, 3) } }
        return Array(out[0..<n])
    }

    private func mapped(_ bytes: [UInt8]) throws -> MappedFile {
        let path = temporaryDirectory() + "/frames.zst"
        writeFile(path, bytes)
        let fd = try FileDescriptor.openForReading(path)
        return try MappedFile(fd, size: bytes.count)
    }

    /// Decodes `stored` in pieces of `piece` bytes, expecting `expected` bytes.
    private func decode(_ stored: [UInt8], expected: Int, piece: Int) throws -> [UInt8] {
        let file = try mapped(stored)
        let decoder = try ZstdCodec.FileDecoder(file, offset: 0, count: stored.count, expected: expected)
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: piece)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try decoder.read(into: $0) }
            out += buffer[0..<n]
            if n < piece { break }
        }
        try decoder.finish()
        return out
    }

    private let data = (0..<1_000_003).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 11 & 0x3f) }

    @Test func decodesPieceByPieceAcrossFrames() throws {
        #expect(try decode(compressed(data), expected: data.count, piece: 65_537) == data)
        // Two frames back to back decode as one stream (tensorstore may write several).
        let two = compressed(Array(data[0..<400_000])) + ZstdTests.frameWithoutSize(Array(data[400_000...]))
        #expect(try decode(two, expected: data.count, piece: 1 << 20) == data)
    }

    @Test func refusesTruncatedShortAndLongData() throws {
        let frame = compressed(data)
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(Array(frame.dropLast(9)), expected: data.count, piece: 1 << 16) }
        // More bytes than the array holds, and fewer.
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(frame, expected: data.count - 1, piece: 1 << 16) }
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(frame, expected: data.count + 1, piece: 1 << 16) }
        // (zstd frames carry no checksum unless asked to, so only damage the decoder can see.)
        var corrupt = frame
        corrupt[0] ^= 0xff
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(corrupt, expected: data.count, piece: 1 << 16) }
    }
}
