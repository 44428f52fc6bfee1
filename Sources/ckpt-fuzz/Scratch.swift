import Glibc
import Shared

/// Where the targets whose parser needs a path put the input: one folder per process on a
/// tmpfs (/dev/shm, so nothing reaches a disk), made once. Single-file targets rewrite one
/// reused file in place; folder targets lay out the files of a multi-file input and remove
/// them again after the run.
final class Scratch: @unchecked Sendable {
    static let shared = Scratch()

    let root: String
    private var open: [String: Int32] = [:]
    private var laidOut: [String] = []
    private var madeDirs: [String] = []
    /// The lowest descriptor number free after set-up: a run's descriptors are from here up.
    private(set) var firstRunDescriptor: Int32 = 0

    private init() {
        var base = "/dev/shm"
        var st = stat()
        if stat(base, &st) != 0 || (st.st_mode & S_IFMT) != S_IFDIR { base = String(cString: getenv("TMPDIR") ?? strdup("/tmp")) }
        root = base + "/ckpt-fuzz-\(getpid())"
        _ = mkdir(root, 0o700)
        atexit { Scratch.shared.removeAll() }
    }

    /// A reused file under the scratch folder holding exactly `data`; returns its path and descriptor.
    func file(_ name: String, _ data: UnsafeRawBufferPointer) -> (path: String, fd: Int32) {
        let path = root + "/" + name
        let fd: Int32
        if let f = open[name] { fd = f } else {
            fd = Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            precondition(fd >= 0, "cannot create \(path)")
            open[name] = fd
            markSetUpDone()
        }
        precondition(ftruncate(fd, 0) == 0)
        if data.count > 0 { precondition(pwrite(fd, data.baseAddress, data.count, 0) == data.count) }
        _ = lseek(fd, 0, SEEK_SET)
        return (path, fd)
    }

    func markSetUpDone() {
        let probe = dup(0)
        if probe >= 0 { close(probe) }
        firstRunDescriptor = max(firstRunDescriptor, probe)
    }

    /// The descriptors a run left open on files under the scratch folder: a descriptor leak
    /// (every reader's `MappedFile` closes its own). They are reported, never closed here: the
    /// owner would close the number again later, by then perhaps another file's (a double close
    /// once took libdispatch's epoll descriptor and left its manager thread spinning).
    func openRunDescriptors() -> [(fd: Int32, path: String)] {
        var found: [(fd: Int32, path: String)] = []
        guard firstRunDescriptor > 2 else { return [] }
        var link = [CChar](repeating: 0, count: 4096)
        let prefix = Array(root.utf8)
        // Descriptors are handed out lowest first: stop at the first gap of 16.
        var fd = firstRunDescriptor, gap = 0
        while gap < 16 {
            // fcntl first: cheap, and most runs leave nothing open (no readlink, no string).
            if fcntl(fd, F_GETFD) < 0 { gap += 1; fd += 1; continue }
            let n = readlink("/proc/self/fd/\(fd)", &link, link.count)
            if n < 0 { gap += 1; fd += 1; continue }
            gap = 0
            let isOurs = n >= prefix.count && link.withUnsafeBufferPointer { b in
                (0..<prefix.count).allSatisfy { UInt8(bitPattern: b[$0]) == prefix[$0] }
            }
            if isOurs && !open.values.contains(fd) {
                found.append((fd, String(decoding: link[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)))
            }
            fd += 1
        }
        return found
    }

    /// A fresh folder `root/<dir>` holding `files` (relative paths; unsafe names are skipped).
    func folder(_ dir: String, _ files: [(name: String, bytes: ArraySlice<UInt8>)]) -> String {
        let top = root + "/" + dir
        makeDir(top)
        for (name, bytes) in files {
            let parts = name.split(separator: "/").map(String.init)
            guard !parts.isEmpty, parts.count <= 4,
                  parts.allSatisfy({ $0 != "." && $0 != ".." && $0.utf8.count <= 64 && !$0.contains("\0") }) else { continue }
            var p = top
            for d in parts.dropLast() { p += "/" + d; makeDir(p) }
            p += "/" + parts.last!
            let fd = Glibc.open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { continue }  // a folder of that name, or listed twice
            laidOut.append(p)
            bytes.withUnsafeBytes { b in if b.count > 0 { _ = write(fd, b.baseAddress, b.count) } }
            close(fd)
        }
        return top
    }

    private func makeDir(_ p: String) {
        if mkdir(p, 0o700) == 0 { madeDirs.append(p) }
    }

    /// Removes what `folder` laid out.
    func clearFolder() {
        for p in laidOut.reversed() { unlink(p) }
        for d in madeDirs.reversed() { rmdir(d) }
        laidOut.removeAll(keepingCapacity: true)
        madeDirs.removeAll(keepingCapacity: true)
    }

    func removeAll() {
        clearFolder()
        for (name, fd) in open { close(fd); unlink(root + "/" + name) }
        open.removeAll()
        rmdir(root)
    }
}

/// A multi-file input: `==> relative/path <==` lines (as `head` prints several files) each
/// start a file whose bytes run to the newline before the next such line, or to the end.
/// Input that does not start with a header is one file named `fallback`.
func splitFiles(_ data: UnsafeRawBufferPointer, fallback: String) -> [(name: String, bytes: ArraySlice<UInt8>)] {
    let bytes = [UInt8](data)
    let open: [UInt8] = Array("==> ".utf8), close: [UInt8] = Array(" <==".utf8)
    // Header starts: offset 0 or right after a newline (found with memchr: inputs run to 64 KiB
    // and this runs on every execution).
    var heads: [(start: Int, name: String, body: Int)] = []
    bytes.withUnsafeBytes { b in
        let base = b.baseAddress!
        func lineEnd(from i: Int) -> Int {
            guard i < b.count, let p = memchr(base + i, 0x0A, b.count - i) else { return b.count }
            return base.distance(to: UnsafeRawPointer(p))
        }
        func matches(_ pattern: [UInt8], at i: Int) -> Bool {
            i >= 0 && i + pattern.count <= b.count && memcmp(base + i, pattern, pattern.count) == 0
        }
        guard b.count > 0 else { return }
        var i = 0
        while i < b.count {
            let j = lineEnd(from: i)  // the line is i..<j
            if j < b.count && j - i >= open.count + close.count && matches(open, at: i) && matches(close, at: j - close.count) {
                heads.append((i, String(decoding: b[(i + open.count)..<(j - close.count)], as: UTF8.self), j + 1))
            }
            i = j + 1
        }
    }
    guard let first = heads.first, first.start == 0 else { return [(fallback, bytes[...])] }
    var files: [(String, ArraySlice<UInt8>)] = []
    for (k, h) in heads.enumerated() {
        var end = k + 1 < heads.count ? heads[k + 1].start : bytes.count
        if k + 1 < heads.count && end > h.body { end -= 1 }  // the newline before the next header
        files.append((h.name, bytes[h.body..<max(end, h.body)]))
    }
    return files
}

/// Reads every tensor a source plans, touching every byte of every chunk, so a reader's
/// out-of-bounds plan is reached (ASan on heap memory; SIGSEGV/SIGBUS past a mapping).
@inline(never)
func drain(_ source: TensorSource) throws {
    _ = source.header
    _ = source.manifest
    var sum: UInt64 = 0
    var tensors = 0
    while let t = try source.nextTensor() {
        tensors += 1
        sum &+= UInt64(truncatingIfNeeded: t.descriptor.byteCount)
        while let chunk = try source.nextChunk() {
            for b in chunk { sum &+= UInt64(b) }
        }
        if tensors >= 100_000 { break }
    }
    blackHole(sum)
}

nonisolated(unsafe) var blackHoleSink: UInt64 = 0
@inline(never)
func blackHole(_ v: UInt64) { blackHoleSink &+= v }
