/// How a stream writer stores chunk data: `none`, `zlib[:LEVEL]` or `zstd[:LEVEL]`. Chunks of
/// multi-byte dtypes are byte-shuffled first either way (docs/stream-format.md).
public enum ChunkCompression: Equatable, Sendable, CustomStringConvertible {
    case none
    case zlib(level: Int32)
    case zstd(level: Int32)

    /// Level 1 by default: on float weights higher levels gain a few percent of size
    /// for several times the CPU (see docs/performance.md).
    public static let defaultZlibLevel: Int32 = 1
    public static let defaultZstdLevel: Int32 = 1
    /// zstd's levels: negative ones trade size for speed ("--fast"), 19 is the slowest here.
    public static let zstdLevels: ClosedRange<Int32> = -7...19

    public init?(argument: String) {
        if argument == "none" { self = .none; return }
        let parts = argument.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count <= 2 else { return nil }
        let level: Int32?
        if parts.count == 2 {
            guard let l = Int32(parts[1]) else { return nil }
            level = l
        } else {
            level = nil
        }
        switch parts[0] {
        case "zlib":
            let l = level ?? ChunkCompression.defaultZlibLevel
            guard (0...9).contains(l) else { return nil }
            self = .zlib(level: l)
        case "zstd":
            let l = level ?? ChunkCompression.defaultZstdLevel
            guard ChunkCompression.zstdLevels.contains(l), l != 0 else { return nil }
            self = .zstd(level: l)
        default:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .zlib(let l): return "zlib:\(l)"
        case .zstd(let l): return "zstd:\(l)"
        }
    }
}
