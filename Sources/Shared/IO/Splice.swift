import CLinux
import Glibc

extension FileDescriptor {
    /// True for pipes and FIFOs: the only inputs splice(2) can move from without a copy here.
    public var isPipe: Bool {
        var st = stat()
        return fstat(rawValue, &st) == 0 && (st.st_mode & S_IFMT) == S_IFIFO
    }

    /// Moves up to `count` bytes from this pipe into `target` at `offset` inside the kernel
    /// (no copy through user memory). Returns the bytes moved: fewer only at end of input.
    public func splice(count: Int, to target: FileDescriptor, at offset: Int) throws -> Int {
        var done = 0
        var out = Int64(offset)
        while done < count {
            let n = ckpt_splice(rawValue, nil, target.rawValue, &out, count - done, 1)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                // EINVAL before anything moved means "this pair cannot splice": callers fall
                // back to copying. After a partial move it is just a failure.
                let e = errno == EINVAL && done > 0 ? EIO : errno
                throw IOError(.write, path: target.path, errno: e, detail: "splice from \(path) after \(done) bytes")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// CRC-32 of bytes `[offset, offset + count)` of a regular file, read through a
    /// read-only mapping of the page cache rather than copied out.
    public func crc32(offset: Int, count: Int) throws -> UInt32 {
        guard count > 0 else { return 0 }
        let page = MappedFile.pageSize
        let start = offset - offset % page
        let length = count + (offset - start)
        guard let map = mmap(nil, length, PROT_READ, MAP_SHARED | ckpt_map_populate(), rawValue, off_t(start)),
              map != MAP_FAILED else {
            throw IOError(.mmap, path: path, errno: errno)
        }
        defer { munmap(map, length) }
        return CRC32.checksum(UnsafeRawBufferPointer(start: map + (offset - start), count: count))
    }
}
