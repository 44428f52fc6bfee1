/// How a stream writer stores chunk data: `none`, or `zlib[:LEVEL]`.
public enum ChunkCompression: Equatable, Sendable, CustomStringConvertible {
    case none
    case zlib(level: Int32)

    /// Level 1 by default: on float weights higher levels gain a few percent of size
    /// for several times the CPU (see docs/performance.md).
    public static let defaultZlibLevel: Int32 = 1

    public init?(argument: String) {
        if argument == "none" { self = .none; return }
        let parts = argument.split(separator: ":", omittingEmptySubsequences: false)
        guard parts[0] == "zlib", parts.count <= 2 else { return nil }
        if parts.count == 2 {
            guard let level = Int32(parts[1]), (0...9).contains(level) else { return nil }
            self = .zlib(level: level)
        } else {
            self = .zlib(level: ChunkCompression.defaultZlibLevel)
        }
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .zlib(let l): return "zlib:\(l)"
        }
    }
}
