/// Appends little-endian integers and length-prefixed strings to a byte array.
///
///     var w = ByteWriter()
///     w.u32(7); w.string32("w")      // 07 00 00 00 | 01 00 00 00 77
public struct ByteWriter {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

    /// u32 byte length, then the UTF-8 bytes.
    public mutating func string32(_ s: String) {
        let u = Array(s.utf8)
        u32(UInt32(u.count))
        raw(u)
    }

    /// u8 byte length, then the bytes (short ASCII names such as dtypes).
    public mutating func string8(_ s: String) {
        let u = Array(s.utf8)
        precondition(u.count < 256)
        u8(UInt8(u.count))
        raw(u)
    }
}
