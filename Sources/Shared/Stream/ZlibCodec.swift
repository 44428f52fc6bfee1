import CZlib

/// One-shot zlib (RFC 1950) compression of a chunk into a caller-owned buffer, and
/// decompression into a buffer of the exact declared size.
public enum ZlibCodec {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The largest output `compress` can produce for `length` input bytes.
    public static func bound(_ length: Int) -> Int { Int(compressBound(uLong(length))) }

    /// Deflate strategies (zlib.h): `rle` looks only for runs, which on float weights is
    /// several times faster than the default match search and compresses as well or better.
    public enum Strategy: Int32, Sendable {
        case `default` = 0
        case rle = 3
    }

    /// Compresses `input` into `output` (at least `bound(input.count)` bytes) and returns
    /// the compressed length.
    public static func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                                level: Int32, strategy: Strategy = .default) throws(Failure) -> Int {
        var strm = z_stream()
        var rc = deflateInit2_(&strm, level, Z_DEFLATED, 15, 9, strategy.rawValue, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
        guard rc == Z_OK else { throw Failure(description: "deflateInit2 returned \(rc)") }
        defer { deflateEnd(&strm) }
        strm.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        strm.avail_in = uInt(input.count)
        strm.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        strm.avail_out = uInt(output.count)
        rc = deflate(&strm, Z_FINISH)
        guard rc == Z_STREAM_END else { throw Failure(description: "deflate returned \(rc) (output buffer too small?)") }
        return output.count - Int(strm.avail_out)
    }

    /// Decompresses a zlib (RFC 1950) stream, which must inflate to exactly `output.count` bytes.
    public static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(Failure) {
        try inflate(input, into: output, windowBits: 15)
    }

    /// Decompresses raw deflate (RFC 1951, as in zip members) to exactly `output.count` bytes.
    public static func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(Failure) {
        try inflate(input, into: output, windowBits: -15)
    }

    /// The first `limit` bytes that raw deflate `input` inflates to (fewer if it is shorter):
    /// enough to read a member's header without inflating the whole member.
    public static func inflateRawPrefix(_ input: UnsafeRawBufferPointer, upTo limit: Int) throws(Failure) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: limit)
        var strm = z_stream()
        guard inflateInit2_(&strm, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw Failure(description: "inflateInit failed")
        }
        defer { inflateEnd(&strm) }
        let produced = out.withUnsafeMutableBytes { o -> Int32 in
            strm.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
            strm.avail_in = uInt(input.count)
            strm.next_out = o.baseAddress?.assumingMemoryBound(to: Bytef.self)
            strm.avail_out = uInt(limit)
            return CZlib.inflate(&strm, Z_SYNC_FLUSH)
        }
        guard produced == Z_OK || produced == Z_STREAM_END || (produced == Z_BUF_ERROR && strm.avail_out == 0) else {
            throw Failure(description: strm.msg.map { String(cString: $0) } ?? "error \(produced)")
        }
        out.removeLast(Int(strm.avail_out))
        return out
    }

    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, windowBits: Int32) throws(Failure) {
        var strm = z_stream()
        var rc = inflateInit2_(&strm, windowBits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
        guard rc == Z_OK else { throw Failure(description: "inflateInit returned \(rc)") }
        defer { inflateEnd(&strm) }
        strm.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        strm.avail_in = uInt(input.count)
        strm.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        strm.avail_out = uInt(output.count)
        rc = CZlib.inflate(&strm, Z_FINISH)
        switch rc {
        case Z_STREAM_END:
            guard strm.avail_out == 0 else {
                throw Failure(description: "inflated to \(output.count - Int(strm.avail_out)) bytes, declared \(output.count)")
            }
            guard strm.avail_in == 0 else { throw Failure(description: "\(strm.avail_in) bytes after the end of the zlib stream") }
        case Z_BUF_ERROR where strm.avail_out == 0:
            throw Failure(description: "inflates to more than the declared \(output.count) bytes")
        case Z_BUF_ERROR:
            throw Failure(description: "zlib stream is truncated")
        default:
            let msg = strm.msg.map { String(cString: $0) } ?? "error \(rc)"
            throw Failure(description: msg)
        }
    }
}
