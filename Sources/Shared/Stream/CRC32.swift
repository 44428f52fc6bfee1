import CFastCRC
import CZlib

/// CRC-32 (ISO-HDLC, the zlib/PNG/zip polynomial): the same values as zlib's and
/// Python's `zlib.crc32`, computed with carry-less multiplication where the CPU has it.
public enum CRC32 {
    @inline(__always)
    public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return ckpt_crc32(crc, base, bytes.count)
    }

    /// zlib's own table-driven CRC, kept as the reference the fast path is tested against.
    public static func zlibReference(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        UInt32(truncatingIfNeeded: CZlib.crc32(uLong(crc), bytes.baseAddress?.assumingMemoryBound(to: UInt8.self), uInt(bytes.count)))
    }

    public static var isAccelerated: Bool { ckpt_crc32_is_accelerated() != 0 }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 { update(0, bytes) }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }

    /// The CRC of A followed by B, from the CRCs of A and B and B's length.
    public static func combine(_ a: UInt32, _ b: UInt32, lengthOfB: Int) -> UInt32 {
        UInt32(truncatingIfNeeded: crc32_combine(uLong(a), uLong(b), off_t(lengthOfB)))
    }
}
