import CFastCRC
import Testing
@testable import Shared

@Suite struct CRC32Tests {
    @Test func knownValues() {
        // The standard check value of CRC-32/ISO-HDLC.
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        #expect(CRC32.checksum([UInt8]()) == 0)
        #expect(CRC32.checksum([UInt8](repeating: 0, count: 4096)) == 0xC71C_0011)
    }

    @Test func fastPathMatchesZlibForEveryLengthAndAlignment() {
        var rng = SplitMix64(seed: 42)
        let data = (0..<20_000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        data.withUnsafeBytes { all in
            // 64...255 bytes take the 128-bit fold; from 256 the 512-bit one where the CPU has
            // VPCLMULQDQ (its 256-byte steps, 64-byte steps and 16-byte tail all reached here).
            for length in Array(0...300) + [319, 320, 335, 511, 512, 513, 767, 768, 1023, 1040, 4095, 4096, 4097, 10_000, 19_000] {
                for start in [0, 1, 3, 8, 15] where start + length <= all.count {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<start + length])
                    let seed = UInt32(truncatingIfNeeded: rng.next())
                    let expected = CRC32.zlibReference(seed, slice)
                    #expect(CRC32.update(seed, slice) == expected, "length \(length) start \(start)")
                    #expect(ckpt_crc32_narrow(seed, slice.baseAddress, slice.count) == expected, "128-bit fold, length \(length)")
                }
            }
        }
    }

    @Test func combineEqualsCRCOfConcatenation() {
        var rng = SplitMix64(seed: 7)
        let a = (0..<1000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let b = (0..<777).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        #expect(CRC32.combine(CRC32.checksum(a), CRC32.checksum(b), lengthOfB: b.count) == CRC32.checksum(a + b))
    }
}

/// A small deterministic generator so tests do not depend on the system's randomness.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
