/// Constants of the ckpt stream, version 1. The byte layout is specified in
/// `docs/stream-format.md`; this file and that document must change together.
///
///     stream  := preamble frame* END-frame EOF
///     preamble: 89 'C' 'K' 'P' 'T' 0D 0A 1A | u16 major=1 | u16 minor=0 | u32 flags=0 | 48 zero bytes
///     frame   := u32 FFFFFFFF | u8 kind | u8 flags=0 | u16 reserved=0 | u64 body length | body | zero pad to 64
///
/// All integers are little-endian. Every frame starts at a multiple of 64 bytes from the
/// start of the stream, and a chunk frame's data at frame start + 64, so a saved stream
/// can be memory-mapped and its tensor bytes used in place.
public enum StreamFormat {
    public static let magic: [UInt8] = [0x89, 0x43, 0x4B, 0x50, 0x54, 0x0D, 0x0A, 0x1A]
    public static let majorVersion: UInt16 = 1
    public static let minorVersion: UInt16 = 0
    public static let preambleSize = 64
    public static let alignment = 64
    public static let frameHeaderSize = 16
    public static let marker: UInt32 = 0xFFFF_FFFF
    /// Bytes of a chunk frame's body before its data: keeps the data 64-aligned.
    public static let chunkHeaderSize = 48
    /// The chunk size writers use; readers accept any size up to `maxChunkSize`.
    public static let defaultChunkSize = 4 << 20
    /// Readers refuse larger chunks, so a forged length cannot force a huge allocation.
    public static let maxChunkSize = 256 << 20
    /// Readers refuse larger header, manifest or tensor frames for the same reason.
    public static let maxMetadataFrameSize = 1 << 30

    public enum Kind: UInt8, Sendable, CustomStringConvertible {
        case header = 0x01
        case manifest = 0x02
        case tensor = 0x03
        case chunk = 0x04
        case tensorEnd = 0x05
        case end = 0x7F

        /// Kinds 0x80–0xFF are ancillary: readers skip ones they do not know. Unknown
        /// kinds below 0x80 are critical and must be refused.
        public static func isAncillary(_ raw: UInt8) -> Bool { raw >= 0x80 }

        public var description: String {
            switch self {
            case .header: return "header"
            case .manifest: return "manifest"
            case .tensor: return "tensor"
            case .chunk: return "chunk"
            case .tensorEnd: return "tensor-end"
            case .end: return "end"
            }
        }
    }

    public enum Codec: UInt32, Sendable {
        case none = 0
        /// RFC 1950 zlib stream (deflate with header and Adler-32) of the chunk's raw bytes.
        case zlib = 1
        /// zlib stream of the raw bytes after `ByteShuffle` with the width in the chunk header.
        case zlibShuffled = 2
        /// One zstd frame (RFC 8878) of the chunk's raw bytes.
        case zstd = 3
        /// One zstd frame of the raw bytes after `ByteShuffle` with the width in the chunk header.
        case zstdShuffled = 4

        public var isShuffled: Bool { self == .zlibShuffled || self == .zstdShuffled }
    }

    /// Largest byte-shuffle width a chunk header may declare.
    public static let maxShuffleWidth = 16

    /// Padding that brings `length` up to the next multiple of the alignment.
    @inline(__always)
    public static func padding(after length: Int) -> Int { (alignment - length % alignment) % alignment }
}
