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

/// Reads little-endian integers from a byte array, with a reader index and bounds checks
/// that throw instead of trapping (the bytes come from untrusted input).
///
///     [ already read | readable ........ ]
///     0          index               count
public struct ByteReader {
    public struct OutOfBounds: Error {
        public var offset: Int
        public var wanted: Int
    }

    public let bytes: [UInt8]
    public private(set) var index = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - index }

    private mutating func take(_ n: Int) throws(OutOfBounds) -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else { throw OutOfBounds(offset: index, wanted: n) }
        defer { index += n }
        return bytes[index..<index + n]
    }

    private mutating func integer<T: FixedWidthInteger>(_: T.Type) throws(OutOfBounds) -> T {
        let s = try take(MemoryLayout<T>.size)
        var v: T = 0
        for (i, b) in s.enumerated() { v |= T(b) << (8 * i) }
        return v
    }

    public mutating func u8() throws(OutOfBounds) -> UInt8 { try integer(UInt8.self) }
    public mutating func u16() throws(OutOfBounds) -> UInt16 { try integer(UInt16.self) }
    public mutating func u32() throws(OutOfBounds) -> UInt32 { try integer(UInt32.self) }
    public mutating func u64() throws(OutOfBounds) -> UInt64 { try integer(UInt64.self) }
    public mutating func bytes(_ n: Int) throws(OutOfBounds) -> [UInt8] { Array(try take(n)) }

    /// A u32-length-prefixed byte string.
    public mutating func bytes32() throws(OutOfBounds) -> [UInt8] { try bytes(Int(try u32())) }
    /// A u8-length-prefixed byte string.
    public mutating func bytes8() throws(OutOfBounds) -> [UInt8] { try bytes(Int(try u8())) }
}
