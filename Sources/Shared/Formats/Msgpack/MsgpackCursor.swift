// MessagePack (https://github.com/msgpack/msgpack/blob/master/spec.md) decoding, one token at
// a time over bytes in place: `bin` and `ext` payloads are returned as offsets, never
// copied, so array data can be read straight from a mapped file. Big-endian lengths, each
// checked against the bytes that remain before anything uses it.

public struct MsgpackError: CkptError, Equatable {
    public var message: String
    public var file: String
    public var offset: Int
    public var path: String?
    public var exitStatus: SysExit { .dataError }
    public var description: String {
        "\(file): byte \(offset)" + (path.map { ": \($0)" } ?? "") + ": \(message)"
    }
}

public struct MsgpackCursor {
    public enum Token: Equatable {
        case nil_
        case bool(Bool)
        case int(Int64)
        case uint(UInt64)
        case double(Double)
        case string(String)
        case bin(offset: Int, count: Int)
        case array(Int)
        case map(Int)
        case ext(type: Int8, offset: Int, count: Int)
    }

    public let bytes: UnsafeRawBufferPointer
    public let file: String
    public private(set) var position: Int

    public init(_ bytes: UnsafeRawBufferPointer, file: String, at position: Int = 0) {
        self.bytes = bytes
        self.file = file
        self.position = position
    }

    func fail(_ m: String, at: Int? = nil) -> MsgpackError { MsgpackError(message: m, file: file, offset: at ?? position) }

    private mutating func take(_ n: Int) throws -> Int {
        guard n >= 0, n <= bytes.count - position else { throw fail("truncated: needs \(n) more bytes") }
        defer { position += n }
        return position
    }

    private mutating func be(_ n: Int) throws -> UInt64 {
        let at = try take(n)
        var v: UInt64 = 0
        for i in 0..<n { v = v << 8 | UInt64(bytes[at + i]) }
        return v
    }

    /// A count of items that each take at least one byte: refuse counts the input cannot hold.
    private func count(_ v: UInt64) throws -> Int {
        guard v <= UInt64(bytes.count - position) else { throw fail("declares \(v) items, more than the bytes left") }
        return Int(v)
    }

    private mutating func string(_ n: Int) throws -> Token {
        let at = try take(n)
        guard let s = String(validating: UnsafeRawBufferPointer(rebasing: bytes[at..<at + n]), as: UTF8.self) else {
            throw fail("string is not valid UTF-8", at: at)
        }
        return .string(s)
    }

    public mutating func next() throws -> Token {
        let start = position
        let b = bytes[try take(1)]
        switch b {
        case 0x00...0x7F: return .uint(UInt64(b))
        case 0x80...0x8F: return .map(try count(UInt64(b & 0x0F)))
        case 0x90...0x9F: return .array(try count(UInt64(b & 0x0F)))
        case 0xA0...0xBF: return try string(Int(b & 0x1F))
        case 0xC0: return .nil_
        case 0xC2: return .bool(false)
        case 0xC3: return .bool(true)
        case 0xC4, 0xC5, 0xC6:
            let n = Int(try be(b == 0xC4 ? 1 : b == 0xC5 ? 2 : 4))
            return .bin(offset: try take(n), count: n)
        case 0xC7, 0xC8, 0xC9:
            let n = Int(try be(b == 0xC7 ? 1 : b == 0xC8 ? 2 : 4))
            let type = Int8(bitPattern: bytes[try take(1)])
            return .ext(type: type, offset: try take(n), count: n)
        case 0xCA: return .double(Double(Float(bitPattern: UInt32(try be(4)))))
        case 0xCB: return .double(Double(bitPattern: try be(8)))
        case 0xCC: return .uint(try be(1))
        case 0xCD: return .uint(try be(2))
        case 0xCE: return .uint(try be(4))
        case 0xCF: return .uint(try be(8))
        case 0xD0: return .int(Int64(Int8(truncatingIfNeeded: try be(1))))
        case 0xD1: return .int(Int64(Int16(truncatingIfNeeded: try be(2))))
        case 0xD2: return .int(Int64(Int32(truncatingIfNeeded: try be(4))))
        case 0xD3: return .int(Int64(bitPattern: try be(8)))
        case 0xD4...0xD8:
            let n = 1 << Int(b - 0xD4)
            let type = Int8(bitPattern: bytes[try take(1)])
            return .ext(type: type, offset: try take(n), count: n)
        case 0xD9: return try string(Int(try be(1)))
        case 0xDA: return try string(Int(try be(2)))
        case 0xDB: return try string(Int(try be(4)))
        case 0xDC: return .array(try count(try be(2)))
        case 0xDD: return .array(try count(try be(4)))
        case 0xDE: return .map(try count(try be(2)))
        case 0xDF: return .map(try count(try be(4)))
        case 0xE0...0xFF: return .int(Int64(Int8(bitPattern: b)))
        default: throw fail("byte 0x\(String(b, radix: 16)) is not a msgpack type", at: start)
        }
    }

    /// Skips one whole value (with its nested values).
    public mutating func skip(depth: Int = 0) throws {
        guard depth < 512 else { throw fail("nesting deeper than 512") }
        switch try next() {
        case .array(let n): for _ in 0..<n { try skip(depth: depth + 1) }
        case .map(let n): for _ in 0..<(2 * n) { try skip(depth: depth + 1) }
        default: break
        }
    }
}

/// MessagePack encoding of the few value kinds flax writes, byte-compatible with the
/// Python msgpack packer (smallest integer form, fixext where the payload size allows).
public enum MsgpackEncoder {
    public static func map(_ n: Int, into w: inout [UInt8]) {
        if n < 16 { w.append(0x80 | UInt8(n)) } else if n < 65536 { w.append(0xDE); be(n, 2, &w) } else { w.append(0xDF); be(n, 4, &w) }
    }

    public static func array(_ n: Int, into w: inout [UInt8]) {
        if n < 16 { w.append(0x90 | UInt8(n)) } else if n < 65536 { w.append(0xDC); be(n, 2, &w) } else { w.append(0xDD); be(n, 4, &w) }
    }

    public static func string(_ s: String, into w: inout [UInt8]) {
        let u = Array(s.utf8)
        if u.count < 32 { w.append(0xA0 | UInt8(u.count)) } else if u.count < 256 { w += [0xD9, UInt8(u.count)] }
        else if u.count < 65536 { w.append(0xDA); be(u.count, 2, &w) } else { w.append(0xDB); be(u.count, 4, &w) }
        w += u
    }

    public static func uint(_ v: Int, into w: inout [UInt8]) {
        precondition(v >= 0)
        if v < 128 { w.append(UInt8(v)) } else if v < 256 { w += [0xCC, UInt8(v)] } else if v < 65536 { w.append(0xCD); be(v, 2, &w) }
        else if v < 1 << 32 { w.append(0xCE); be(v, 4, &w) } else { w.append(0xCF); be(v, 8, &w) }
    }

    /// The header of a `bin` of `n` bytes.
    public static func binHeader(_ n: Int, into w: inout [UInt8]) {
        if n < 256 { w += [0xC4, UInt8(n)] } else if n < 65536 { w.append(0xC5); be(n, 2, &w) } else { w.append(0xC6); be(n, 4, &w) }
    }

    /// The header of an `ext` of type `type` with an `n`-byte payload.
    public static func extHeader(type: Int8, _ n: Int, into w: inout [UInt8]) {
        let t = UInt8(bitPattern: type)
        switch n {
        case 1: w += [0xD4, t]
        case 2: w += [0xD5, t]
        case 4: w += [0xD6, t]
        case 8: w += [0xD7, t]
        case 16: w += [0xD8, t]
        default:
            if n < 256 { w += [0xC7, UInt8(n), t] } else if n < 65536 { w.append(0xC8); be(n, 2, &w); w.append(t) }
            else { w.append(0xC9); be(n, 4, &w); w.append(t) }
        }
    }

    static func be(_ v: Int, _ n: Int, _ w: inout [UInt8]) {
        for i in (0..<n).reversed() { w.append(UInt8(truncatingIfNeeded: v >> (8 * i))) }
    }
}
