import Glibc

/// A whole regular file mapped read-only, so readers hand out pointers into the page cache
/// instead of copying (and can splice the same bytes onward by offset).
///
/// If another process truncates the file while it is mapped, touching the lost pages
/// raises SIGBUS; checkpoints are not expected to change while they are being read.
public final class MappedFile: @unchecked Sendable {
    public let descriptor: FileDescriptor
    public let size: Int
    private let base: UnsafeMutableRawPointer?
    private var releasedUpTo = 0
    private static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Maps `descriptor`, which the mapping then owns (closed when it goes); on failure the
    /// caller still owns it.
    public init(_ descriptor: FileDescriptor, size: Int) throws {
        self.descriptor = descriptor
        self.size = size
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
    /// mapping from then on, and is closed on every failure.
    public static func open(_ path: String) throws -> MappedFile? {
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

    /// The mapping owns its descriptor (kept open for splicing by offset): both go together.
    deinit {
        if let base { munmap(base, size) }
        descriptor.close()
    }

    /// Bytes `[offset, offset + count)`; the caller has checked the range against `size`.
    public func bytes(at offset: Int, count: Int) -> UnsafeRawBufferPointer {
        precondition(offset >= 0 && count >= 0 && offset + count <= size, "mapped range out of bounds")
        return UnsafeRawBufferPointer(start: base.map { $0 + offset }, count: count)
    }

    /// Unmaps the pages wholly before `offset` from this process (the data stays in the page
    /// cache). Touched pages of a mapping count as resident memory: without this, reading a
    /// 100 GB file would show a 100 GB RSS and could push other memory out.
    public func release(before offset: Int) {
        guard let base else { return }
        let end = offset - offset % MappedFile.pageSize
        guard end > releasedUpTo else { return }
        _ = madvise(base + releasedUpTo, end - releasedUpTo, MADV_DONTNEED)
        releasedUpTo = end
    }

    /// Unmaps the pages wholly inside `[offset, offset + count)` from this process (random
    /// access: chunks read in any order). The data stays in the page cache.
    public func drop(offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        let page = MappedFile.pageSize
        let start = (offset + page - 1) / page * page
        let end = (offset + count) / page * page
        if end > start { _ = madvise(base + start, end - start, MADV_DONTNEED) }
    }

    /// Tells the kernel the range will be read soon (reads ahead in the background).
    public func willNeed(at offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset - offset % page
        _ = madvise(base + start, min(size - start, count + offset - start), MADV_WILLNEED)
    }
}
