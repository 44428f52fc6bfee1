import Glibc

/// A failed system call, with the file it was about and the errno it returned.
public struct IOError: CkptError, Equatable {
    public enum Operation: String, Sendable {
        case open, read, write, seek, stat, rename, unlink, create, mkdir, sync, close, mmap
    }
    public var operation: Operation
    public var path: String
    public var errno: Int32
    public var detail: String?

    public init(_ operation: Operation, path: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.path = path
        self.errno = errno
        self.detail = detail
    }

    public var exitStatus: SysExit {
        switch (operation, errno) {
        case (.open, ENOENT), (.open, EACCES), (.stat, ENOENT): return .noInput
        case (.create, _), (.mkdir, _), (.rename, _): return .cantCreate
        default: return .ioError
        }
    }

    public var description: String {
        var reason = String(cString: strerror(errno))
        if errno == EFBIG { reason += " (past a file-size limit such as ulimit -f, or the file system's largest file)" }
        if let detail { return "\(path): \(operation.rawValue) failed: \(reason) (\(detail))" }
        return "\(path): \(operation.rawValue) failed: \(reason)"
    }
}

/// An output that already exists and was not allowed to be replaced.
public struct OutputExistsError: CkptError {
    public var path: String
    public var exitStatus: SysExit { .cantCreate }
    public var description: String { "\(path): already exists (use --force to replace it)" }
}

/// The folder an output would go in does not exist. Writers do not create it: a mistyped
/// path should not leave a tree of empty folders behind.
public struct MissingOutputFolderError: CkptError {
    public var folder: String
    public var exitStatus: SysExit { .cantCreate }
    public var description: String { "\(folder): no such folder for the output (create it first: mkdir -p \(folder))" }

    /// Throws unless the folder that will hold `path` exists.
    public static func check(output path: String) throws(MissingOutputFolderError) {
        var trimmed = Substring(path)
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        guard let slash = trimmed.lastIndex(of: "/") else { return }
        let folder = slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
        guard isDirectory(folder) else { throw MissingOutputFolderError(folder: folder) }
    }
}
