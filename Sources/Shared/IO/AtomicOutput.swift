import Glibc

/// An output file that appears under its final name only when the run succeeds.
///
/// Data goes to `.<name>.ckpt-<pid>-<n>.tmp` in the same folder (same file system, so the
/// final `rename(2)` is atomic). `commit()` renames it into place; anything else — an
/// error, `abort()`, SIGINT/SIGTERM/SIGHUP — removes it, so a failed run never leaves a
/// partial file behind. An existing final path is only replaced with `overwrite`.
public final class AtomicOutput {
    public let finalPath: String
    public let temporaryPath: String
    public let descriptor: FileDescriptor
    private var slot: Int
    private var done = false

    public init(path: String, overwrite: Bool) throws {
        var st = stat()
        if !overwrite && lstat(path, &st) == 0 { throw OutputExistsError(path: path) }
        finalPath = path
        let (dir, base) = splitPath(path)
        TemporaryFiles.installSignalHandlers()
        let n = TemporaryFiles.nextSerial()
        temporaryPath = (dir.isEmpty ? "" : dir + "/") + ".\(base).ckpt-\(getpid())-\(n).tmp"
        // Registered before it exists: a signal between the two would otherwise leave it.
        slot = TemporaryFiles.register(temporaryPath)
        do { descriptor = try FileDescriptor.createExclusive(temporaryPath) } catch {
            TemporaryFiles.unregister(slot)
            throw error
        }
    }

    /// Flushes to disk and renames into place.
    public func commit() throws {
        precondition(!done, "AtomicOutput committed twice")
        done = true
        defer { TemporaryFiles.unregister(slot) }
        descriptor.close()
        if rename(temporaryPath, finalPath) != 0 {
            let e = errno
            unlink(temporaryPath)
            throw IOError(.rename, path: finalPath, errno: e)
        }
    }

    /// Removes the temporary file. Safe to call more than once.
    public func abort() {
        guard !done else { return }
        done = true
        descriptor.close()
        unlink(temporaryPath)
        TemporaryFiles.unregister(slot)
    }

    deinit { abort() }
}

/// Splits `a/b/c` into (`a/b`, `c`); a bare name gives an empty folder.
public func splitPath(_ path: String) -> (directory: String, name: String) {
    guard let slash = path.lastIndex(of: "/") else { return ("", path) }
    let dir = String(path[..<slash])
    return (dir.isEmpty ? "/" : dir, String(path[path.index(after: slash)...]))
}

/// Temporary files and folders to remove if a signal ends the process. The signal handler
/// may only call async-signal-safe functions (unlink, rmdir), so paths are kept as C strings
/// in a fixed table and removed in reverse order: a folder's contents before the folder.
enum TemporaryFiles {
    static let capacity = 1 << 16
    nonisolated(unsafe) static let table: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = {
        let t = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: capacity)
        t.initialize(repeating: nil, count: capacity)
        return t
    }()
    nonisolated(unsafe) static let isFolder: UnsafeMutablePointer<Bool> = {
        let t = UnsafeMutablePointer<Bool>.allocate(capacity: capacity)
        t.initialize(repeating: false, count: capacity)
        return t
    }()
    nonisolated(unsafe) static var used = 0
    nonisolated(unsafe) static var serial = 0
    nonisolated(unsafe) static var installed = false
    static let lock = Mutex()

    static func nextSerial() -> Int {
        lock.withLock { serial += 1; return serial }
    }

    /// Slots are handed out in creation order, so removing in reverse empties folders first.
    static func register(_ path: String, folder: Bool = false) -> Int {
        lock.withLock {
            if used == capacity {
                // Reuse freed slots from the end, keeping creation order among live entries.
                while used > 0 && table[used - 1] == nil { used -= 1 }
                guard used < capacity else { return -1 }
            }
            table[used] = strdup(path)
            isFolder[used] = folder
            used += 1
            return used - 1
        }
    }

    static func unregister(_ slot: Int) {
        guard slot >= 0 else { return }
        lock.withLock {
            let p = table[slot]
            table[slot] = nil
            free(p)
        }
    }

    static func installSignalHandlers() {
        lock.withLock {
            guard !installed else { return }
            installed = true
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                signal(sig) { sig in
                    var i = TemporaryFiles.used
                    while i > 0 {
                        i -= 1
                        if let p = TemporaryFiles.table[i] {
                            if TemporaryFiles.isFolder[i] { rmdir(p) } else { unlink(p) }
                        }
                    }
                    signal(sig, SIG_DFL)
                    raise(sig)
                }
            }
        }
    }
}
