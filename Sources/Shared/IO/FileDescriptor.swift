import Glibc

/// A thin owner-less wrapper around a POSIX file descriptor.
///
/// Every call retries on `EINTR` and loops over short reads and writes, so callers see
/// either the whole transfer or an `IOError` naming the file. Modelled on swift-system's
/// `FileDescriptor`, kept local so the hot paths stay free of extra layers.
public struct FileDescriptor: Sendable {
    public let rawValue: Int32
    /// The name used in error messages: a path, `<stdin>` or `<stdout>`.
    public let path: String

    public init(rawValue: Int32, path: String) {
        self.rawValue = rawValue
        self.path = path
    }

    public static let standardInput = FileDescriptor(rawValue: 0, path: "<stdin>")
    public static let standardOutput = FileDescriptor(rawValue: 1, path: "<stdout>")

    /// Opens an existing file for reading.
    public static func openForReading(_ path: String) throws -> FileDescriptor {
        let fd = retryingOnInterrupt { open(path, O_RDONLY | O_CLOEXEC) }
        if fd < 0 { throw IOError(.open, path: path, errno: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Creates a new file that must not exist yet (temporary outputs). Opened read-write so
    /// writers can verify what they wrote through a read-only mapping.
    public static func createExclusive(_ path: String, mode: mode_t = 0o644) throws -> FileDescriptor {
        let fd = retryingOnInterrupt { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode) }
        if fd < 0 { throw IOError(.create, path: path, errno: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    /// Creates a new file for reading and writing (spool files); fails if it exists.
    public static func createReadWrite(_ path: String) throws -> FileDescriptor {
        let fd = retryingOnInterrupt { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        if fd < 0 { throw IOError(.create, path: path, errno: errno) }
        return FileDescriptor(rawValue: fd, path: path)
    }

    public func close() {
        _ = Glibc.close(rawValue)
    }

    public var isTerminal: Bool { isatty(rawValue) == 1 }

    /// The size of a regular file, or nil for pipes and terminals.
    public func regularFileSize() throws -> Int? {
        var st = stat()
        if fstat(rawValue, &st) != 0 { throw IOError(.stat, path: path, errno: errno) }
        if (st.st_mode & S_IFMT) == S_IFREG { return Int(st.st_size) }
        return nil
    }

    /// Reads up to `buffer.count` bytes; returns fewer only at end of file.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.read(rawValue, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw IOError(.read, path: path, errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// One read(2): whatever is available now, at least one byte; 0 only at end of file.
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            let n = Glibc.read(rawValue, buffer.baseAddress!, buffer.count)
            if n >= 0 { return n }
            if errno == EINTR || errno == EAGAIN { continue }
            throw IOError(.read, path: path, errno: errno)
        }
    }

    /// Reads exactly `buffer.count` bytes at `offset`, or throws if the file is shorter.
    public func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw IOError(.read, path: path, errno: errno, detail: "at offset \(offset + done)")
            }
            if n == 0 {
                throw IOError(.read, path: path, errno: EIO,
                              detail: "file ends at offset \(offset + done), \(buffer.count - done) bytes short")
            }
            done += n
        }
    }

    /// Writes all of `buffer`, retrying short writes.
    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.write(rawValue, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw IOError(.write, path: path, errno: errno)
            }
            done += n
        }
    }

    /// Writes several buffers in order with as few system calls as possible.
    public func writeAll(_ parts: [UnsafeRawBufferPointer]) throws {
        var iov = parts.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress!), iov_len: $0.count)
        }
        var first = 0
        while first < iov.count {
            let n = iov.withUnsafeMutableBufferPointer { p in
                Glibc.writev(rawValue, p.baseAddress! + first, Int32(min(p.count - first, 1024)))
            }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw IOError(.write, path: path, errno: errno)
            }
            var left = n
            while first < iov.count && left >= iov[first].iov_len {
                left -= iov[first].iov_len
                first += 1
            }
            if left > 0 {
                iov[first].iov_base = iov[first].iov_base! + left
                iov[first].iov_len -= left
            }
        }
    }

    /// Writes all of `buffer` at `offset` without moving the file position.
    public func pwriteAll(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw IOError(.write, path: path, errno: errno, detail: "at offset \(offset + done)")
            }
            done += n
        }
    }

    /// Hints the kernel about the access pattern; failures are harmless and ignored.
    public func adviseSequential() {
        _ = posix_fadvise(rawValue, 0, 0, POSIX_FADV_SEQUENTIAL)
    }

    /// Grows a pipe's kernel buffer so large writes need fewer context switches.
    /// Ignored for anything that is not a pipe.
    public func enlargePipeBuffer(to bytes: Int32 = 1 << 20) {
        #if os(Linux)
        _ = fcntl(rawValue, 1031 /* F_SETPIPE_SZ */, bytes)
        #endif
    }

    public func fsync() throws {
        if Glibc.fsync(rawValue) != 0 { throw IOError(.sync, path: path, errno: errno) }
    }
}

@inline(__always)
func retryingOnInterrupt(_ body: () -> Int32) -> Int32 {
    while true {
        let r = body()
        if r < 0 && errno == EINTR { continue }
        return r
    }
}
