import Glibc

/// A whole regular file mapped read-only, so readers hand out pointers into the page cache
/// instead of copying (and can splice the same bytes onward by offset).
///
/// If another process truncates the file while it is mapped, touching the lost pages
/// raises SIGBUS; checkpoints are not expected to change while they are being read.
///
/// A remote file (`init(remote:)`) is the same API over memory filled on demand by HTTP range
/// requests (`RemotePages`): `bytes` fetches what it returns, and can therefore fail.
public final class MappedFile: @unchecked Sendable {
    /// The open file, for splicing by offset; nil for a remote file.
    public let descriptor: FileDescriptor?
    /// The file's path or URL, for messages.
    public let path: String
    public let size: Int
    private let base: UnsafeMutableRawPointer?
    private let remote: RemotePages?
    private var releasedUpTo = 0
    /// A run of consumed bytes behind `releasedUpTo` (tensors read out of file order).
    private var behind = 0..<0
    /// The system's page: the unit of every mapping here (`MappingCache` cuts in it too).
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Maps `descriptor`, which the mapping then owns (closed when it goes); on failure the
    /// caller still owns it.
    public init(_ descriptor: FileDescriptor, size: Int) throws {
        self.descriptor = descriptor
        path = descriptor.path
        self.size = size
        remote = nil
        if size == 0 {
            base = nil
            return
        }
        guard let p = mmap(nil, size, PROT_READ, MAP_SHARED, descriptor.rawValue, 0), p != MAP_FAILED else {
            throw IOError(.mmap, path: descriptor.path, errno: errno)
        }
        _ = madvise(p, size, MADV_SEQUENTIAL)
        base = p
    }

    /// Opens and maps `path`; nil when it is not a regular file. The descriptor belongs to the
    /// mapping from then on, and is closed on every failure. A URL (`RemoteLocation`) opens
    /// the remote file.
    public static func open(_ path: String) throws -> MappedFile? {
        if RemoteLocation.isRemote(path) { return try MappedFile(remote: RemoteObject.open(RemoteLocation(path))) }
        let fd = try FileDescriptor.openForReading(path)
        do {
            guard let size = try fd.regularFileSize() else {
                fd.close()
                return nil
            }
            return try MappedFile(fd, size: size)
        } catch {
            fd.close()
            throw error
        }
    }

    /// A remote file, fetched as it is read.
    public init(remote object: RemoteObject) throws {
        descriptor = nil
        path = object.location.display
        size = object.size
        let pages = try RemotePages(object)
        remote = pages
        base = pages.base
    }

    /// Whether the bytes come over the network (no descriptor to splice from).
    public var isRemote: Bool { remote != nil }

    /// The unit pages are given back in: the system's page, or a remote file's (64 KiB or more).
    private var pageGranularity: Int { remote?.pageSize ?? MappedFile.pageSize }

    /// How far ahead a sequential reader should ask for (`willNeed`): a remote file needs
    /// several requests in flight to fill the link.
    public var readAheadWindow: Int { remote != nil ? RemotePages.window : 0 }

    /// The mapping owns its descriptor (kept open for splicing by offset): both go together.
    deinit {
        if remote == nil, let base { munmap(base, size) }
        descriptor?.close()
    }

    /// Bytes `[offset, offset + count)`; the caller has checked the range against `size`.
    /// Only a remote file throws (the fetch failed).
    public func bytes(at offset: Int, count: Int) throws(RemoteError) -> UnsafeRawBufferPointer {
        precondition(offset >= 0 && count >= 0 && offset + count <= size, "mapped range out of bounds")
        try remote?.ensure(offset: offset, count: count)
        return UnsafeRawBufferPointer(start: base.map { $0 + offset }, count: count)
    }

    /// The whole mapping without fetching anything: for a cursor that fetches its own range first.
    var unfetchedBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    /// The reader is done with `[offset, offset + count)`, read in file order: the pages up to
    /// its end are unmapped from this process (a local file's stay in the page cache; a remote
    /// file's are given back and would be fetched again). Touched pages of a mapping count as
    /// resident memory: without this, reading a 100 GB file would show a 100 GB RSS and could
    /// push other memory out. A range behind what was released already (tensors read out of
    /// file order, `--first`) is unmapped on its own.
    public func consumed(offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        guard offset >= releasedUpTo else {
            // Behind: a run continued gives back the page the last piece left partly read.
            let from = offset == behind.upperBound ? max(behind.lowerBound, offset - pageGranularity) : offset
            behind = (offset == behind.upperBound ? behind.lowerBound : offset)..<(offset + count)
            return drop(offset: from, count: offset + count - from)
        }
        let end = (offset + count) / pageGranularity * pageGranularity
        guard end > releasedUpTo else { return }
        if let remote {
            remote.forget(offset: releasedUpTo, count: end - releasedUpTo)
        } else {
            _ = madvise(base + releasedUpTo, end - releasedUpTo, MADV_DONTNEED)
        }
        releasedUpTo = end
    }

    /// Unmaps the pages wholly inside `[offset, offset + count)` from this process (random
    /// access: chunks read in any order). The data stays in the page cache.
    public func drop(offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        if let remote { return remote.forget(offset: offset, count: count) }
        let page = MappedFile.pageSize
        let start = (offset + page - 1) / page * page
        let end = (offset + count) / page * page
        if end > start { _ = madvise(base + start, end - start, MADV_DONTNEED) }
    }

    /// A value whose bytes start at `valueStart` was read in order, up to `end`, and dropped
    /// before up to `done`: drops what is now whole pages, reaching back over the page the last
    /// drop left partly read (it is this value's), so a value read in small pieces leaves no
    /// page behind but its two ends.
    public func dropConsumed(valueStart: Int, done: Int, upTo end: Int) {
        let from = max(valueStart, done - pageGranularity)
        drop(offset: from, count: end - from)
    }

    /// Tells the kernel the range will be read soon (reads ahead in the background).
    public func willNeed(at offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        if let remote { return remote.prefetch(offset: offset, count: count) }
        let start = offset - offset % MappedFile.pageSize
        _ = madvise(base + start, min(size - start, count + offset - start), MADV_WILLNEED)
    }
}
