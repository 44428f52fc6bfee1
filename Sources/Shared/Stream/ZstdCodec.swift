import CFastCRC
import CZstd

/// zstd frames (RFC 8878) through the system libzstd: every declared size is checked before
/// anything is allocated for it.
public enum ZstdCodec {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The largest frame `compress` can produce for `length` input bytes.
    public static func bound(_ length: Int) -> Int { ZSTD_compressBound(length) }

    /// Compresses `input` into one frame in `output` (at least `bound(input.count)` bytes) and
    /// returns its length. The frame records its content size, so a reader can check it.
    /// `hashLog` overrides the level's match-finder table size (log2 of its entries).
    public static func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                                level: Int32, hashLog: Int32? = nil) throws(Failure) -> Int {
        guard let cctx = ZSTD_createCCtx() else { throw Failure(description: "cannot create a zstd context") }
        defer { ZSTD_freeCCtx(cctx) }
        var n = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)
        if ZSTD_isError(n) == 0, let hashLog { n = ZSTD_CCtx_setParameter(cctx, ZSTD_c_hashLog, hashLog) }
        if ZSTD_isError(n) == 0 { n = ZSTD_compress2(cctx, output.baseAddress, output.count, input.baseAddress, input.count) }
        if ZSTD_isError(n) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(n))) }
        return n
    }

    /// The match-finder table the stream writer gives zstd level 1 (the default) on
    /// byte-shuffled chunks: 64 entries (zstd's least). What compresses in float weights is
    /// the skew of the sign/exponent bytes, which the literals' Huffman coding takes; matches
    /// are short and rare, and a table that stays in L1 finds the useful ones at ~2x the speed
    /// of the level's own (2^13) table, and a slightly smaller output (docs/performance.md).
    public static let shuffledHashLog: Int32 = 6

    /// The longest a frame header can be (RFC 8878 3.1.1.1: magic 4, descriptor 1, window 1,
    /// dictionary id 4, content size 8): its declared size is read from this many bytes.
    public static let frameHeaderMax = 18

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

    /// Decompresses frames stored in a mapped file into exactly `output.count` bytes.
    /// Throws `Failure`, or the `RemoteError` of a remote file whose bytes could not be fetched.
    public static func decompress(_ file: MappedFile, offset: Int, count: Int, into output: UnsafeMutableRawBufferPointer) throws {
        let decoder = try FileDecoder(file, offset: offset, count: count, expected: output.count)
        _ = try decoder.read(into: output)
        try decoder.finish()
    }

    /// Frames stored in a mapped file, decoded piece by piece into the caller's buffers: input
    /// is fed 4 MiB at a time and its pages dropped once consumed, so nothing the size of the
    /// data is ever resident (a 1 GB array streams through a 4 MiB chunk).
    public final class FileDecoder {
        private let dctx: OpaquePointer
        private let file: MappedFile
        private let offset: Int
        private let count: Int
        /// The bytes the frames must decode to, exactly.
        public let expected: Int
        public private(set) var produced = 0
        private var input = ZSTD_inBuffer(src: nil, size: 0, pos: 0)
        private var pieceStart = 0
        private var pieceCount = 0
        /// decompressStream's last return: 0 when a frame has just ended.
        private var last = 0

        public init(_ file: MappedFile, offset: Int, count: Int, expected: Int) throws(Failure) {
            guard let dctx = ZSTD_createDCtx() else { throw Failure(description: "cannot create a zstd context") }
            self.dctx = dctx
            self.file = file
            self.offset = offset
            self.count = count
            self.expected = expected
        }

        deinit { ZSTD_freeDCtx(dctx) }

        /// Moves `input` to the next piece of the stored bytes; false when there is none.
        private func nextPiece() throws(RemoteError) -> Bool {
            if pieceCount > 0 { file.dropConsumed(valueStart: offset, done: offset + pieceStart, upTo: offset + pieceStart + pieceCount) }
            pieceStart += pieceCount
            pieceCount = min(4 << 20, count - pieceStart)
            guard pieceCount > 0 else { return false }
            // A remote file fetches the rest of the frames ahead, several requests at a time.
            let next = pieceStart + pieceCount
            if file.isRemote && next < count { file.willNeed(at: offset + next, count: min(file.readAheadWindow, count - next)) }
            input = ZSTD_inBuffer(src: try file.bytes(at: offset + pieceStart, count: pieceCount).baseAddress, size: pieceCount, pos: 0)
            return true
        }

        /// Fills `output` with the next bytes (all of it unless fewer than that remain of
        /// `expected`); returns how many.
        public func read(into output: UnsafeMutableRawBufferPointer) throws -> Int {
            var out = ZSTD_outBuffer(dst: output.baseAddress, size: min(output.count, expected - produced), pos: 0)
            while out.pos < out.size {
                let inputLeft = try input.pos < input.size || nextPiece()
                // With no input left zstd may still hold output: it must be asked again as long as
                // it fills the buffer (zstd.h); it is done when a call moves nothing.
                let before = (input.pos, out.pos)
                last = ZSTD_decompressStream(dctx, &out, &input)
                if ZSTD_isError(last) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(last))) }
                if (input.pos, out.pos) == before {
                    if !inputLeft { break }
                    throw Failure(description: "zstd decoder made no progress")
                }
            }
            produced += out.pos
            return out.pos
        }

        /// Checks, once `expected` bytes were read, that the frames end exactly there.
        public func finish() throws {
            guard produced == expected else { throw Failure(description: "decompressed to \(produced) bytes, expected \(expected)") }
            var scratch: UInt64 = 0
            while try input.pos < input.size || nextPiece() {
                let before = input.pos
                let extra = withUnsafeMutableBytes(of: &scratch) { s -> Int in
                    var out = ZSTD_outBuffer(dst: s.baseAddress, size: s.count, pos: 0)
                    last = ZSTD_decompressStream(dctx, &out, &input)
                    return out.pos
                }
                if ZSTD_isError(last) != 0 { throw Failure(description: String(cString: ZSTD_getErrorName(last))) }
                if extra > 0 { throw Failure(description: "decompresses to more than the expected \(expected) bytes") }
                if input.pos == before { throw Failure(description: "zstd decoder made no progress") }
            }
            guard last == 0 else { throw Failure(description: "zstd stream is truncated") }
        }
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
