import CFastCRC
import CZstd

/// zstd frames (RFC 8878) through the system libzstd: every declared size is checked before
/// anything is allocated for it.
public enum ZstdCodec {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The content size a frame declares, if it declares one.
    public static func declaredSize(_ input: UnsafeRawBufferPointer) -> Int? {
        let n = ZSTD_getFrameContentSize(input.baseAddress, input.count)
        if n == ZSTD_CONTENTSIZE_UNKNOWN || n == ZSTD_CONTENTSIZE_ERROR || n > UInt64(Int.max) { return nil }
        return Int(n)
    }

    /// Decompresses one or more frames into exactly `output.count` bytes.
    public static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(Failure) {
        let n = ZSTD_decompress(output.baseAddress, output.count, input.baseAddress, input.count)
        if ZSTD_isError(n) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(n))) }
        guard n == output.count else { throw Failure(description: "decompressed to \(n) bytes, expected \(output.count)") }
    }

    /// Decompresses frames stored in a mapped file into exactly `output.count` bytes, feeding
    /// the input 4 MiB at a time and dropping consumed pages, so only the output stays resident.
    public static func decompress(_ file: MappedFile, offset: Int, count: Int, into output: UnsafeMutableRawBufferPointer) throws(Failure) {
        guard let dctx = ZSTD_createDCtx() else { throw Failure(description: "cannot create a zstd context") }
        defer { ZSTD_freeDCtx(dctx) }
        var out = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        var done = 0
        var last = 0
        while done < count {
            let n = min(4 << 20, count - done)
            let piece = file.bytes(at: offset + done, count: n)
            var input = ZSTD_inBuffer(src: piece.baseAddress, size: n, pos: 0)
            while input.pos < input.size {
                let before = (input.pos, out.pos)
                last = ZSTD_decompressStream(dctx, &out, &input)
                if ZSTD_isError(last) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(last))) }
                if (input.pos, out.pos) == before { throw Failure(description: "decompresses to more than the expected \(output.count) bytes") }
            }
            file.drop(offset: offset + done, count: n)
            done += n
        }
        guard last == 0 else { throw Failure(description: "zstd stream is truncated") }
        guard out.pos == output.count else { throw Failure(description: "decompressed to \(out.pos) bytes, expected \(output.count)") }
    }

    /// Decompresses frames into at most `limit` bytes. A declared size is checked against the
    /// limit before allocating; frames that do not declare one (tensorstore writes some) are
    /// decoded in steps into a growing array, stopping at the limit, so a forged header cannot
    /// force a huge allocation either way.
    public static func decompress(_ input: UnsafeRawBufferPointer, limit: Int) throws -> [UInt8] {
        if let size = declaredSize(input) {
            guard size <= limit else { throw Failure(description: "zstd frame declares \(size) bytes, more than the \(limit) expected") }
            var out = [UInt8](repeating: 0, count: size)
            try out.withUnsafeMutableBytes { try decompress(input, into: $0) }
            return out
        }
        guard let dctx = ZSTD_createDCtx() else { throw Failure(description: "cannot create a zstd context") }
        defer { ZSTD_freeDCtx(dctx) }
        var out: [UInt8] = []
        var step = [UInt8](repeating: 0, count: 1 << 20)
        var src = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var last = 1
        while true {
            let produced = step.withUnsafeMutableBytes { s -> Int in
                var dst = ZSTD_outBuffer(dst: s.baseAddress, size: s.count, pos: 0)
                last = ZSTD_decompressStream(dctx, &dst, &src)
                return dst.pos
            }
            if ZSTD_isError(last) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(last))) }
            guard out.count + produced <= limit else { throw Failure(description: "zstd data decompresses to more than \(limit) bytes") }
            out.append(contentsOf: step[0..<produced])
            if last == 0 && src.pos == src.size { return out }
            if produced == 0 && src.pos == src.size { throw Failure(description: "zstd stream is truncated") }
        }
    }
}

/// CRC-32C (Castagnoli), as OCDBT and zarr v3's crc32c codec use it.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        return ckpt_crc32c(0, base, bytes.count)
    }
}
