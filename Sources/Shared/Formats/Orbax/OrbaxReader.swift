import Glibc

// Orbax PyTree checkpoints (orbax-checkpoint's PyTreeCheckpointHandler / StandardCheckpointer):
// `_METADATA` names every leaf by its key path; array leaves are zarr arrays stored under
// the param name (`'.'.join(keys)`) in OCDBT (`manifest.ocdbt`) or as plain folders.
// The choices made are in docs/formats.md (Orbax).

public enum OrbaxReader {
    public struct Options: Sendable {
        /// Pick this step of a CheckpointManager root (default: the latest).
        public var step: Int?
        /// Remove a trailing `value` path element (openpi's training checkpoints). nil: do it
        /// when every array leaf ends in `value`.
        public var stripValue: Bool?
        /// Decode arrays ahead on other cores (zstd decoding of one chunk is single-threaded).
        public var readAhead: ReadAhead
        /// Emit only the sub-tree at this `/` path, named relative to it.
        public var root: String?
        public init(step: Int? = nil, stripValue: Bool? = nil, readAhead: ReadAhead = Options.defaultReadAhead, root: String? = nil) {
            self.step = step
            self.stripValue = stripValue
            self.readAhead = readAhead
            self.root = root
        }
        /// One array decoded ahead while another is emitted, when both fit in 1 GiB.
        public static let defaultReadAhead = ReadAhead(budget: 1 << 30, depth: 1)
    }

    /// Is `path` an Orbax checkpoint, a step folder holding one, or a manager root?
    public static func recognises(_ path: String) -> Bool { (try? resolve(LocalFolder(path), step: nil)) != nil }

    /// A remote manager root has no more chunk files per array than this (a URL cannot be
    /// listed to count them): the bound a declared chunk grid is checked against there.
    static let remoteChunkLimit = 1 << 16

    /// Finds the PyTree checkpoint folder: `folder` itself (it holds `_METADATA`), its `params/`
    /// or `default/` item, or the latest (or `step`) numbered step of a CheckpointManager root
    /// (a URL cannot be listed: there the step must be given).
    static func resolve(_ folder: FolderStorage, step: Int?) throws -> FolderStorage {
        if try folder.exists("_METADATA") { return folder }
        for item in ["params", "default"] where try folder.exists(item + "/_METADATA") { return folder.sub(item) }
        if try folder.exists("manifest.ocdbt") || folder.list("ocdbt.process_0") != nil {
            throw OrbaxError(.missingMetadata, file: folder.root)
        }
        guard let names = folder.list("") else {
            if let step { return try resolve(folder.sub(String(step)), step: nil) }
            throw RemoteError(.unsupported(detail: "no _METADATA (nor params/ or default/) here, and a URL cannot be listed for steps: give --step N, or the step folder's URL"), url: folder.root)
        }
        let steps = names.compactMap { Int($0) }.filter { folder.list(String($0)) != nil }.sorted()
        guard !steps.isEmpty else { throw OrbaxError(.notACheckpoint, file: folder.root) }
        let chosen: Int
        if let step {
            guard steps.contains(step) else { throw OrbaxError(.noSuchStep(step: step, steps: steps), file: folder.root) }
            chosen = step
        } else {
            chosen = steps.last!
        }
        return try resolve(folder.sub(String(chosen)), step: nil)
    }

    public static func open(path: String, selection: TensorSelection = .all, options: Options = Options(),
                            producer: String) throws -> PlannedSource {
        let store = try resolve(RemoteLocation.isRemote(path) ? RemoteFolder(try RemoteLocation(path)) : LocalFolder(path), step: options.step)
        let dir = store.root
        let metaPath = store.path("_METADATA")
        let meta: JSONValue
        do { meta = try JSONParser.parse(try store.readWhole("_METADATA", limit: 1 << 30)) } catch let e as JSONParser.Error {
            throw OrbaxError(.metadataNotJSON(detail: e.description), file: metaPath)
        }
        guard let tree = meta.objectValue?["tree_metadata"]?.objectValue else { throw OrbaxError(.noTreeMetadata, file: metaPath) }
        let useOCDBT: Bool
        if case .bool(let b)? = meta.objectValue?["use_ocdbt"] { useOCDBT = b } else {
            useOCDBT = try store.exists("manifest.ocdbt")
        }

        // The store: OCDBT keys `<param>/<zarr key>`, or files `<dir>/<param>/<zarr key>`.
        // `get` runs on read-ahead threads too: `kv` is never changed after this, and the
        // file cache is locked.
        let kv = useOCDBT ? Dictionary(try OCDBTStore(store).values.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 }) : [:]
        var fileCache: [String: MappedFile] = [:]
        let fileCacheLock = Mutex()
        func get(_ key: String) throws -> KVValue? {
            if useOCDBT { return kv[key] }
            guard !key.split(separator: "/").contains("..") else { return nil }
            let f = try fileCacheLock.withLock { () throws -> MappedFile? in
                if let f = fileCache[key] { return f }
                let f = try store.open(key)
                fileCache[key] = f
                return f
            }
            return f.map { .file($0, offset: 0, count: $0.size) }
        }

        // How many chunks each array has in the store, counted from what exists (OCDBT keys in
        // order, files), so a declared chunk grid is checked against it before it is walked.
        let sortedKeys = useOCDBT ? kv.keys.sorted() : []
        func storedChunks(_ a: ZarrArray, _ param: String) -> Int {
            let limit = a.chunkCount ?? Int.max
            let prefix = param + "/"
            guard useOCDBT else {
                return store.countFiles(param, atMost: limit, maxDepth: a.shape.count + 1, matching: { a.isChunkKey($0) })
                    ?? remoteChunkLimit
            }
            var lo = 0, hi = sortedKeys.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if sortedKeys[mid] < prefix { lo = mid + 1 } else { hi = mid }
            }
            var n = 0
            while lo < sortedKeys.count, n < limit, sortedKeys[lo].hasPrefix(prefix) {
                if a.isChunkKey(sortedKeys[lo].dropFirst(prefix.count)) { n += 1 }
                lo += 1
            }
            return n
        }

        var strings: JSONObject?
        var arrays: [(keys: [String], param: String)] = []
        var metadata = JSONObject()
        for (_, entry) in tree {
            guard let e = entry.objectValue, let keyMeta = e["key_metadata"]?.arrayValue,
                  let value = e["value_metadata"]?.objectValue else { throw OrbaxError(.malformedTreeEntry, file: metaPath) }
            let keys = try keyMeta.map { k -> String in
                guard let s = k.objectValue?["key"]?.stringValue else { throw OrbaxError(.keyNotString, file: metaPath) }
                return s
            }
            let param = keys.joined(separator: ".")
            let type = value["value_type"]?.stringValue ?? ""
            if case .bool(true)? = value["skip_deserialize"] { continue }  // None, empty dicts
            switch type {
            case "jax.Array", "np.ndarray": arrays.append((keys, param))
            case "scalar":
                // A Python int/float: a rank-0 zarr array. Not a weight: it goes to the metadata.
                let a = try zarr(param, get: get, file: dir)
                try a.checkGrid(stored: storedChunks(a, param), file: dir)
                let bytes = try a.assemble(file: dir, get: { try get(param + "/" + $0) })
                let raw = ByteCursor(bytes.copyBytes())
                let v: JSONValue
                switch a.dtype {
                case .i64 where raw.remaining == 8: v = .number(String(try raw.getInteger(at: 0, endianness: .little, as: Int64.self)))
                case .f64 where raw.remaining == 8: v = .number("\(Double(bitPattern: try raw.getInteger(at: 0, endianness: .little, as: UInt64.self)))")
                default: v = .string("<\(a.dtype.rawValue) scalar>")
                }
                metadata[keys.joined(separator: "/")] = v
            case "string":
                if strings == nil {
                    strings = (try? JSONParser.parse(try store.readWhole("_strings.json", limit: 1 << 26)))?.objectValue ?? JSONObject()
                }
                metadata[keys.joined(separator: "/")] = strings?[param] ?? .null
            default:
                throw OrbaxError(.unsupportedValueType(param: param, valueType: "\(type)"), file: metaPath)
            }
        }

        // openpi's training checkpoints end every path with a `value` leaf; its own
        // restore_params strips it. Default: strip when every array leaf has it.
        let strip = options.stripValue ?? (!arrays.isEmpty && arrays.allSatisfy { $0.keys.last == "value" })
        var plan: [(TensorHeader, TensorData)] = []
        var names = Set<String>()
        let root = options.root.map { $0.split(separator: "/").map(String.init) } ?? []
        if !root.isEmpty && !arrays.contains(where: { $0.keys.starts(with: root) }) {
            throw OrbaxError(.nothingUnderRoot(root: root.joined(separator: "/")), file: metaPath)
        }
        for (keys, param) in arrays {
            // --root: only the sub-tree at that path, named from there (openpi keeps its params
            // under a top-level "params" key).
            guard keys.starts(with: root) else { continue }
            var parts = Array(keys.dropFirst(root.count))
            if strip && parts.count > 1 && parts.last == "value" { parts.removeLast() }
            let name = parts.joined(separator: "/")
            guard names.insert(name).inserted else { throw OrbaxError(.duplicateLeaf(name: name), file: metaPath) }
            guard selection.includes(name) else { continue }
            var a = try zarr(param, get: get, file: dir)
            a.name = name
            let d = try a.descriptor
            try a.checkGrid(stored: storedChunks(a, param), file: dir)
            try a.validate(file: dir, get: { try get(param + "/" + $0) })
            let array = a
            // A single chunk that fills the array (orbax's usual layout) is its row-major bytes:
            // in place when uncompressed, decoded chunk by chunk as the stream goes when zstd.
            let single = a.innerChunks == nil && a.chunks == a.shape && !d.shape.contains(0)
                ? try get(param + "/" + a.chunkKey([Int](repeating: 0, count: a.shape.count))) : nil
            if a.codec == nil, case .file(let f, let o, let n)? = single {
                guard n == d.byteCount else { throw OrbaxError(.chunkSizeMismatch(holds: n, expected: d.byteCount), file: dir, tensor: name) }
                plan.append((TensorHeader(d), .mapped(f, offset: o)))
            } else if a.codec == .zstd, case .file(let f, let o, let n)? = single {
                plan.append((TensorHeader(d), .streamed { try ZarrStreamedChunk(f, offset: o, count: n, array: array, file: dir) }))
            } else if ZarrSplitArray.streams(a) {
                // Split into chunks (orbax splits arrays over ~2 GB): streamed without assembling.
                plan.append((TensorHeader(d), .streamed { ZarrSplitArray(array, file: dir, get: { try get(param + "/" + $0) }) }))
            } else {
                plan.append((TensorHeader(d), .materialized { try array.assemble(file: dir, get: { try get(param + "/" + $0) }) }))
            }
        }
        // Over a URL, one array at a time: a remote file's pages are given back once read (they
        // are its memory, not a page cache), so no other thread may be reading the same data
        // file while the stream releases what it has sent.
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "orbax", metadata: metadata), plan: plan,
                             readAhead: store.isRemote ? .off : options.readAhead)
    }

    static func zarr(_ param: String, get: (String) throws -> KVValue?, file: String) throws -> ZarrArray {
        for (key, format) in [(".zarray", 2), ("zarr.json", 3)] {
            if let v = try get(param + "/" + key) {
                let bytes = try v.withBytes { [UInt8]($0) }
                let a = try ZarrArray.parse(bytes, name: param, file: file)
                guard a.zarrFormat == format else { throw OrbaxError(.zarrFormatMismatch(key: key, format: a.zarrFormat), file: file, tensor: param) }
                return a
            }
        }
        throw OrbaxError(.noZarrMetadata, file: file, tensor: param)
    }
}
