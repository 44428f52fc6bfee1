// MessagePack (https://github.com/msgpack/msgpack/blob/master/spec.md) decoding, one token at
// a time over bytes in place: `bin` and `ext` payloads are returned as offsets, never
// copied, so array data can be read straight from a mapped file. Big-endian lengths, each
// checked against the bytes that remain before anything uses it.

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

    /// The bytes; token offsets are in its coordinates (file offsets for a mapped file).
    public private(set) var bytes: ByteCursor
    public let file: String
    public var position: Int { bytes.readerIndex }

    public init(_ bytes: ByteCursor, file: String) {
        self.bytes = bytes
        self.file = file
    }

    func fail(_ r: MsgpackError.Reason, at: Int? = nil) -> MsgpackError { MsgpackError(r, file: file, offset: at ?? position) }

    /// The offset of the next `n` bytes, skipped.
    private mutating func take(_ n: Int) throws(ByteCursorError) -> Int {
        let at = bytes.readerIndex
        try bytes.skip(n)
        return at
    }

    private mutating func be<T: FixedWidthInteger>(_: T.Type) throws(ByteCursorError) -> T {
        try bytes.readInteger(endianness: .big, as: T.self)
    }

    /// A count of items that each take at least one byte: refuse counts the input cannot hold.
    /// (Read the count into a local first: `count(try be(...))` would see `self` before the read.)
    private func count<T: FixedWidthInteger>(_ v: T) throws(MsgpackError) -> Int {
        guard UInt64(v) <= UInt64(bytes.remaining) else { throw fail(.countExceedsInput(count: UInt64(v))) }
        return Int(v)
    }

    private mutating func string(_ n: Int) throws -> Token {
        let at = position
        guard let s = try bytes.readUTF8(n) else { throw fail(.stringNotUTF8, at: at) }
        return .string(s)
    }

    public mutating func next() throws(MsgpackError) -> Token {
        do {
            return try token()
        } catch let e as MsgpackError {
            throw e
        } catch let e as ByteCursorError {
            // Reads only move forward from a valid index, so a failed read is a short one.
            guard case .truncated(let needed, let available) = e.reason else { throw fail(.truncated(needed: 1, available: 0), at: e.offset) }
            throw fail(.truncated(needed: needed, available: available), at: e.offset)
        } catch {
            fatalError("unreachable: \(error)")
        }
    }

    private mutating func token() throws -> Token {
        let start = position
        let b = try bytes.readByte()
        switch b {
        case 0x00...0x7F: return .uint(UInt64(b))
        case 0x80...0x8F: return .map(try count(b & 0x0F))
        case 0x90...0x9F: return .array(try count(b & 0x0F))
        case 0xA0...0xBF: return try string(Int(b & 0x1F))
        case 0xC0: return .nil_
        case 0xC2: return .bool(false)
        case 0xC3: return .bool(true)
        case 0xC4, 0xC5, 0xC6:
            let n = b == 0xC4 ? Int(try be(UInt8.self)) : b == 0xC5 ? Int(try be(UInt16.self)) : Int(try be(UInt32.self))
            return .bin(offset: try take(n), count: n)
        case 0xC7, 0xC8, 0xC9:
            let n = b == 0xC7 ? Int(try be(UInt8.self)) : b == 0xC8 ? Int(try be(UInt16.self)) : Int(try be(UInt32.self))
            let type = try be(Int8.self)
            return .ext(type: type, offset: try take(n), count: n)
        case 0xCA: return .double(Double(Float(bitPattern: try be(UInt32.self))))
        case 0xCB: return .double(Double(bitPattern: try be(UInt64.self)))
        case 0xCC: return .uint(UInt64(try be(UInt8.self)))
        case 0xCD: return .uint(UInt64(try be(UInt16.self)))
        case 0xCE: return .uint(UInt64(try be(UInt32.self)))
        case 0xCF: return .uint(try be(UInt64.self))
        case 0xD0: return .int(Int64(try be(Int8.self)))
        case 0xD1: return .int(Int64(try be(Int16.self)))
        case 0xD2: return .int(Int64(try be(Int32.self)))
        case 0xD3: return .int(try be(Int64.self))
        case 0xD4...0xD8:
            let n = 1 << Int(b - 0xD4)
            let type = try be(Int8.self)
            return .ext(type: type, offset: try take(n), count: n)
        case 0xD9: return try string(Int(try be(UInt8.self)))
        case 0xDA: return try string(Int(try be(UInt16.self)))
        case 0xDB: return try string(Int(try be(UInt32.self)))
        case 0xDC: let n = try be(UInt16.self); return .array(try count(n))
        case 0xDD: let n = try be(UInt32.self); return .array(try count(n))
        case 0xDE: let n = try be(UInt16.self); return .map(try count(n))
        case 0xDF: let n = try be(UInt32.self); return .map(try count(n))
        case 0xE0...0xFF: return .int(Int64(Int8(bitPattern: b)))
        default: throw fail(.unknownType(byte: b), at: start)
        }
    }

    /// A cursor over a `bin`/`ext` payload this cursor returned (same coordinates).
    public func payload(offset: Int, count: Int) throws(MsgpackError) -> MsgpackCursor {
        do { return MsgpackCursor(try bytes.getSlice(at: offset, count: count), file: file) } catch {
            throw fail(.truncated(needed: count, available: max(0, bytes.endIndex - offset)), at: offset)
        }
    }

    /// Skips one whole value (with its nested values).
    public mutating func skip(depth: Int = 0) throws(MsgpackError) {
        guard depth < 512 else { throw fail(.nestingTooDeep(limit: 512)) }
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
