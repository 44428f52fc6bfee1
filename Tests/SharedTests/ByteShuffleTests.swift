import Testing
@testable import Shared

@Suite struct ByteShuffleTests {
    @Test func knownVector() {
        let src: [UInt8] = [0xA0, 0xA1, 0xB0, 0xB1, 0xC0, 0xC1, 0x77]
        var dst = [UInt8](repeating: 0, count: 7)
        src.withUnsafeBytes { s in dst.withUnsafeMutableBytes { ByteShuffle.shuffle(s, into: $0, width: 2) } }
        #expect(dst == [0xA0, 0xB0, 0xC0, 0xA1, 0xB1, 0xC1, 0x77])
    }

    @Test func unshuffleInvertsShuffleForEveryWidthAndTail() {
        var rng = SplitMix64(seed: 3)
        for width in 1...16 {
            for n in [0, 1, width - 1, width, 3 * width + 1, 1000] where n >= 0 {
                let src = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                var mid = [UInt8](repeating: 0, count: n), back = [UInt8](repeating: 0, count: n)
                src.withUnsafeBytes { s in mid.withUnsafeMutableBytes { ByteShuffle.shuffle(s, into: $0, width: width) } }
                mid.withUnsafeBytes { m in back.withUnsafeMutableBytes { ByteShuffle.unshuffle(m, into: $0, width: width) } }
                #expect(back == src, "width \(width) n \(n)")
            }
        }
    }

    /// The SIMD kernels (widths 2 and 4, 16 elements a step) against the definition, byte by
    /// byte, for lengths around their steps and tails.
    @Test func shuffleMatchesItsDefinition() {
        var rng = SplitMix64(seed: 11)
        for width in 1...9 {
            for n in [15, 16, 17, 33, 255, 256, 1000, 4099].map({ $0 * width + (width > 1 ? 1 : 0) }) {
                let src = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                let m = n / width
                var expected = src
                for i in 0..<m { for b in 0..<width { expected[b * m + i] = src[i * width + b] } }
                var got = [UInt8](repeating: 0, count: n)
                src.withUnsafeBytes { s in got.withUnsafeMutableBytes { ByteShuffle.shuffle(s, into: $0, width: width) } }
                #expect(got == expected, "shuffle width \(width) n \(n)")
                var back = [UInt8](repeating: 0, count: n)
                expected.withUnsafeBytes { s in back.withUnsafeMutableBytes { ByteShuffle.unshuffle(s, into: $0, width: width) } }
                #expect(back == src, "unshuffle width \(width) n \(n)")
            }
        }
    }

    @Test func writerShufflesMultiByteTypesOnly() throws {
        let t = [tensor("f", .f32, [256], pattern(1024, seed: 1)), tensor("u", .u8, [256], pattern(256, seed: 2))]
        let bytes = try streamBytes(MemorySource(t), compression: .zlib(level: 1))
        var codecs: [(UInt32, UInt8)] = []
        for at in stride(from: 64, to: bytes.count, by: 64) where bytes[at..<at + 5] == [0xFF, 0xFF, 0xFF, 0xFF, 0x04] {
            let r = ByteCursor(bytes)
            codecs.append((try r.getInteger(at: at + 32, endianness: .little, as: UInt32.self), try r.getInteger(at: at + 40, endianness: .little, as: UInt8.self)))
        }
        #expect(codecs.map(\.0) == [2, 1])
        #expect(codecs.map(\.1) == [4, 0])
        #expect(try readStream(bytes).tensors.map(\.1) == t.map(\.1))
    }

    @Test func chunkHeaderWidthRules() throws {
        let d = FrameDecoder(source: "s")
        func header(codec: UInt32, width: UInt8) -> [UInt8] {
            var w = ByteWriter()
            w.u64(0); w.u64(4); w.u32(codec); w.u32(0); w.u8(width); w.zeros(23)
            return w.bytes
        }
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 2, width: 1), bodyLength: 60, at: 0, tensor: "t") }
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 2, width: 17), bodyLength: 60, at: 0, tensor: "t") }
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 1, width: 4), bodyLength: 60, at: 0, tensor: "t") }
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 5, width: 0), bodyLength: 60, at: 0, tensor: "t") }
        // zstd (3) takes no width, zstd shuffled (4) one in 2...16, as zlib's two codecs.
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 3, width: 2), bodyLength: 60, at: 0, tensor: "t") }
        #expect(throws: StreamError.self) { try d.chunkHeader(header(codec: 4, width: 1), bodyLength: 60, at: 0, tensor: "t") }
        #expect(try d.chunkHeader(header(codec: 2, width: 4), bodyLength: 60, at: 0, tensor: "t").shuffleWidth == 4)
        #expect(try d.chunkHeader(header(codec: 4, width: 2), bodyLength: 60, at: 0, tensor: "t").codec == .zstdShuffled)
        #expect(try d.chunkHeader(header(codec: 3, width: 0), bodyLength: 60, at: 0, tensor: "t").codec == .zstd)
    }
}
