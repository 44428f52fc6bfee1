import Glibc

// File-system helpers the readers share: folder listings, small whole files, and counting what
// a folder holds (to check declared sizes against what exists).

/// Names in a folder, sorted, without `.` and `..`.
public func listDirectory(_ path: String) throws -> [String] {
    guard let d = opendir(path) else { throw IOError(.open, path: path, errno: errno) }
    defer { closedir(d) }
    var names: [String] = []
    while let ent = readdir(d) {
        let name = withUnsafePointer(to: ent.pointee.d_name) {
            $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

/// Whether `path` is a folder (following symlinks); false if it does not exist.
public func isDirectory(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
}

/// A small file's bytes (indexes, configs); refuses files over `limit`. A URL is fetched.
public func readWholeFile(_ path: String, limit: Int) throws -> [UInt8] {
    if RemoteLocation.isRemote(path) { return try RemoteObject.open(RemoteLocation(path)).readAll(limit: limit) }
    let fd = try FileDescriptor.openForReading(path)
    defer { fd.close() }
    let size = try fd.regularFileSize() ?? 0
    guard size <= limit else { throw IOError(.read, path: path, errno: EFBIG, detail: "\(size) bytes, limit \(limit)") }
    var bytes = [UInt8](repeating: 0, count: size)
    try bytes.withUnsafeMutableBytes { try fd.pread(into: $0, at: 0) }
    return bytes
}

/// Regular files under `path` whose path relative to it satisfies `matching`, at most
/// `maxDepth` folders down; stops at `limit`, so the cost is bounded by what is asked and what
/// exists. A missing folder holds 0.
public func countFiles(_ path: String, atMost limit: Int, maxDepth: Int, matching: (String) -> Bool) -> Int {
    var count = 0
    func walk(_ relative: String, _ depth: Int) {
        guard depth <= maxDepth, count < limit, let d = opendir(relative.isEmpty ? path : path + "/" + relative) else { return }
        defer { closedir(d) }
        while count < limit, let ent = readdir(d) {
            let name = withUnsafePointer(to: ent.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            let child = relative.isEmpty ? name : relative + "/" + name
            var st = stat()
            guard lstat(path + "/" + child, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR: walk(child, depth + 1)
            case S_IFREG: if matching(child) { count += 1 }
            default: break
            }
        }
    }
    walk("", 0)
    return count
}
