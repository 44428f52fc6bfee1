import CZlib

/// CRC-32 (ISO-HDLC, the zlib/PNG/zip polynomial) via the system zlib.
public enum CRC32 {
    @inline(__always)
    public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = UInt(crc)
        var p = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self)
        var left = bytes.count
        // zlib's length argument is 32-bit on some builds: feed at most 1 GiB at a time.
        while left > 0 {
            let n = min(left, 1 << 30)
            c = CZlib.crc32(c, p, uInt(n))
            p = p! + n
            left -= n
        }
        return UInt32(truncatingIfNeeded: c)
    }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 { update(0, bytes) }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }

    /// The CRC of A followed by B, from the CRCs of A and B and B's length.
    public static func combine(_ a: UInt32, _ b: UInt32, lengthOfB: Int) -> UInt32 {
        UInt32(truncatingIfNeeded: crc32_combine(uLong(a), uLong(b), off_t(lengthOfB)))
    }
}
