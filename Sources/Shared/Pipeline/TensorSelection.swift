import Glibc

/// `--only GLOB` / `--exclude GLOB`: which tensors a reader emits. Globs are fnmatch(3)
/// patterns over the whole name (`*` also matches `.` and `/`). With no `--only`,
/// everything is included; `--exclude` wins over `--only`.
public struct TensorSelection: Sendable {
    public var only: [String]
    public var exclude: [String]

    public init(only: [String] = [], exclude: [String] = []) {
        self.only = only
        self.exclude = exclude
    }

    public static let all = TensorSelection()

    public func includes(_ name: String) -> Bool {
        if !only.isEmpty && !only.contains(where: { globMatches($0, name) }) { return false }
        return !exclude.contains(where: { globMatches($0, name) })
    }
}

public func globMatches(_ pattern: String, _ name: String) -> Bool {
    fnmatch(pattern, name, 0) == 0
}
