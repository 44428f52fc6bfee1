import Glibc

/// Reads a `.safetensors` file, or a sharded checkpoint through its
/// `*.safetensors.index.json`: headers first (so the manifest is known before any data),
/// then each tensor's bytes in file order, straight from the mapped file.
public enum SafetensorsReader {
    /// - Parameter path: a `.safetensors` file, an `*.index.json`, or a folder holding one of them.
    public static func open(path: String, selection: TensorSelection = .all, producer: String) throws -> PlannedSource {
        let (files, index) = try locate(path)
        var metadata = JSONObject()
        var owner: [String: String] = [:]
        var plan: [(TensorHeader, TensorData)] = []
        for (i, file) in files.enumerated() {
            guard let mapped = try MappedFile.open(file) else {
                throw SafetensorsError(.index(detail: "not a regular file"), file: file)
            }
            mapped.descriptor?.adviseSequential()
            let h = try SafetensorsHeader.read(from: mapped)
            if i == 0, let m = h.metadata { metadata = m }
            for e in h.entries {
                if let other = owner[e.descriptor.name] {
                    throw SafetensorsError(.duplicateTensor(otherFile: other), file: file, tensor: e.descriptor.name)
                }
                owner[e.descriptor.name] = splitPath(file).name
                // The header was validated against the file size: the range is inside the mapping.
                if selection.includes(e.descriptor.name) { plan.append((TensorHeader(e.descriptor), .mapped(mapped, offset: h.dataStart + e.begin))) }
            }
        }
        if let (indexPath, idx) = index {
            try idx.verify(owners: owner, indexPath: indexPath)
            for (k, v) in idx.metadata where k != "total_size" && !metadata.contains(k) { metadata[k] = v }
        }
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "safetensors", metadata: metadata), plan: plan)
    }

    /// The files to read, in order, and the index if there is one.
    static func locate(_ path: String) throws -> ([String], (String, SafetensorsIndex)?) {
        if RemoteLocation.isRemote(path) { return try locateRemote(path) }
        var st = stat()
        guard stat(path, &st) == 0 else { throw IOError(.open, path: path, errno: errno) }
        var indexPath: String?
        if (st.st_mode & S_IFMT) == S_IFDIR {
            let names = try listDirectory(path)
            let indexes = names.filter { $0.hasSuffix(".safetensors.index.json") }
            if indexes.count > 1 {
                throw SafetensorsError(.index(detail: "several *.safetensors.index.json files: name one of them"), file: path)
            } else if let only = indexes.first {
                indexPath = path + "/" + only
            } else {
                let files = names.filter { $0.hasSuffix(".safetensors") }
                if files.contains("model.safetensors") { return ([path + "/model.safetensors"], nil) }
                guard files.count == 1 else {
                    throw SafetensorsError(.index(detail: files.isEmpty ? "no .safetensors file in this folder"
                                                                : "several .safetensors files and no index: name one of them"), file: path)
                }
                return ([path + "/" + files[0]], nil)
            }
        } else if path.hasSuffix(".json") {
            indexPath = path
        }
        guard let indexPath else { return ([path], nil) }
        return try shards(indexPath: indexPath, bytes: try readWholeFile(indexPath, limit: 1 << 30))
    }

    /// The shard files an index names, next to it.
    private static func shards(indexPath: String, bytes: [UInt8]) throws -> ([String], (String, SafetensorsIndex)?) {
        let idx = try SafetensorsIndex.parse(bytes, file: indexPath)
        let (dir, _) = splitPath(indexPath)
        var files: [String] = []
        for f in Set(idx.weightMap.map(\.file)).sorted() { files.append((dir.isEmpty ? "" : dir + "/") + f) }
        return (files, (indexPath, idx))
    }

    /// A URL names a file or an index: a folder or Hub repo, which cannot be listed, was
    /// resolved to one of them by `CheckpointFormat.locateRemote` (`openSource`).
    static func locateRemote(_ path: String) throws -> ([String], (String, SafetensorsIndex)?) {
        guard try RemoteLocation(path).name.hasSuffix(".json") else { return ([path], nil) }
        return try shards(indexPath: path, bytes: try readWholeFile(path, limit: 1 << 30))
    }
}

