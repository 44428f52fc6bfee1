import Glibc

/// `--only GLOB` / `--exclude GLOB`: which tensors a reader emits. Globs are fnmatch(3)
/// patterns over the whole name (`*` also matches `.` and `/`). With no `--only`,
/// everything is included; `--exclude` wins over `--only`.
public struct TensorSelection: Sendable {
    public var only: [String]
    public var exclude: [String]
    /// Exact names, when set: only these (`ckpt-read --part`: this part's tensors). Readers
    /// skip the others without reading their data, as they do for globs.
    public var names: Set<String>?

    public init(only: [String] = [], exclude: [String] = [], names: Set<String>? = nil) {
        self.only = only
        self.exclude = exclude
        self.names = names
    }

    public static let all = TensorSelection()

    /// A selection that keeps nothing is almost always a mistyped pattern: say so rather than
    /// write an empty checkpoint (which orbax, for one, cannot even restore) or compare nothing.
    public func requireSomeTensor(in source: TensorSource, of input: String) throws {
        guard !(only.isEmpty && exclude.isEmpty), let kept = source.manifest, kept.isEmpty else { return }
        let patterns = (only.map { "--only '\($0)'" } + exclude.map { "--exclude '\($0)'" }).joined(separator: " ")
        throw UsageError("\(patterns) selects no tensor of \(input)")
    }

    public func includes(_ name: String) -> Bool {
        if let names, !names.contains(name) { return false }
        if !only.isEmpty && !only.contains(where: { globMatches($0, name) }) { return false }
        return !exclude.contains(where: { globMatches($0, name) })
    }
}

public func globMatches(_ pattern: String, _ name: String) -> Bool {
    fnmatch(pattern, name, 0) == 0
}
