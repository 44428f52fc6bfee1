import Glibc

/// The files of a checkpoint folder, local or remote, as the folder readers (Orbax) need them.
/// Object stores and the Hub cannot be listed or counted: there `list` and `countFiles` answer
/// nil, and readers ask only for the files a format names.
public protocol FolderStorage: Sendable {
    /// The folder's path or URL, for messages (and joined with `/relative`).
    var root: String { get }
    /// Whether its files come over the network (fetched as read, their pages given back).
    var isRemote: Bool { get }
    /// The same storage one folder down.
    func sub(_ relative: String) -> FolderStorage
    /// Whether `relative` is a file there.
    func exists(_ relative: String) throws -> Bool
    /// A small file's bytes; refuses one over `limit`.
    func readWhole(_ relative: String, limit: Int) throws -> [UInt8]
    /// The file, mapped (or fetched as read); nil when it is not there.
    func open(_ relative: String) throws -> MappedFile?
    /// The names in the sub-folder `relative` ("" for the root); nil where folders cannot be listed.
    func list(_ relative: String) -> [String]?
    /// How many files under `relative` satisfy `matching` (stopping at `limit`); nil where that
    /// cannot be known.
    func countFiles(_ relative: String, atMost limit: Int, maxDepth: Int, matching: (String) -> Bool) -> Int?
}

extension FolderStorage {
    /// `relative` below this folder, for messages.
    public func path(_ relative: String) -> String { relative.isEmpty ? root : root + "/" + relative }
}

/// A folder on the local file system.
public struct LocalFolder: FolderStorage {
    public let root: String
    public init(_ root: String) { self.root = root }

    public var isRemote: Bool { false }

    public func sub(_ relative: String) -> FolderStorage { LocalFolder(path(relative)) }

    public func exists(_ relative: String) throws -> Bool {
        var st = stat()
        return stat(path(relative), &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }

    public func readWhole(_ relative: String, limit: Int) throws -> [UInt8] { try readWholeFile(path(relative), limit: limit) }

    public func open(_ relative: String) throws -> MappedFile? {
        var st = stat()
        guard stat(path(relative), &st) == 0 else { return nil }
        let fd = try FileDescriptor.openForReading(path(relative))
        do { return try MappedFile(fd, size: try fd.regularFileSize() ?? 0) } catch {
            fd.close()
            throw error
        }
    }

    public func list(_ relative: String) -> [String]? { try? listDirectory(path(relative)) }

    public func countFiles(_ relative: String, atMost limit: Int, maxDepth: Int, matching: (String) -> Bool) -> Int? {
        Shared.countFiles(path(relative), atMost: limit, maxDepth: maxDepth, matching: matching)
    }
}
