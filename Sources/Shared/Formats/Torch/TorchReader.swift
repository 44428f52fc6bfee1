import Glibc

// PyTorch checkpoints as torch.save writes them (torch/serialization.py):
// - the zip format (default since 1.6): `<prefix>/data.pkl` (the object, protocol 2+),
//   `<prefix>/data/<key>` raw storages, `<prefix>/byteorder`, `<prefix>/version`;
// - the legacy format (`_use_new_zipfile_serialization=False`): five pickles — magic
//   number, protocol 1001, sys_info, the object, the sorted storage keys — then for each key
//   an i64 element count and the raw storage.
// Objects are rebuilt by `Unpickler` (restricted: it executes nothing).

/// What can be wrong with a torch checkpoint outside its pickle (`PickleError` covers that):
/// the file, the tensor where one is concerned, and one reason per rule.
public struct TorchError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case notARegularFile
        /// torch < 0.4 wrote tar archives.
        case tarFormat
        case notATorchFile
        case zipWithoutFolder
        case badByteOrder(String)
        case missingStorageRecord(key: String)
        case storageRecordSize(key: String, bytes: Int, elements: Int, dtype: DType, needed: Int)
        case badLegacyMagic
        case badLegacyProtocolVersion
        case bigEndianLegacy
        case missingLegacyKeyList
        case legacyKeyNotAString
        case endsBeforeStorage(key: String)
        case unusedStorage(key: String)
        case storageCountMismatch(key: String, declared: Int, pickled: Int)
        case storagePastEnd(key: String, elements: Int)
        case trailingBytes(count: Int)
        case storageNotInFile(key: String)
        case storageDescribedTwoWays(key: String)
        case duplicateName
        case unsupportedDictKey(type: String, under: String)
        case bareStorage
        case noSingleFileInFolder(severalIndexes: Bool)
        case inTwoShards(first: String, second: String)
    }
    public var reason: Reason
    public var file: String
    public var tensor: String?

    public init(_ reason: Reason, file: String, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }
    public var description: String { tensor.map { "\(file): tensor \($0): \(message)" } ?? "\(file): \(message)" }

    var message: String {
        switch reason {
        case .notARegularFile: return "not a regular file"
        case .tarFormat: return "a tar-era torch checkpoint (before torch 0.4): load and re-save it with a current torch"
        case .notATorchFile: return "not a torch checkpoint (neither a zip archive nor the legacy pickle format)"
        case .zipWithoutFolder: return "zip archive has no records under a folder: not written by torch.save"
        case .badByteOrder(let text): return "byteorder record says \"\(text)\""
        case .missingStorageRecord(let key): return "storage record data/\(key) is missing from the archive"
        case .storageRecordSize(let key, let bytes, let elements, let dtype, let needed):
            return "storage data/\(key) holds \(bytes) bytes, its \(elements) \(dtype.rawValue) elements need \(needed)"
        case .badLegacyMagic: return "legacy magic number is wrong"
        case .badLegacyProtocolVersion: return "legacy protocol version is not 1001"
        case .bigEndianLegacy: return "big-endian legacy checkpoints are not supported"
        case .missingLegacyKeyList: return "legacy storage key list is missing"
        case .legacyKeyNotAString: return "legacy storage key is not a string"
        case .endsBeforeStorage(let key): return "file ends before storage \(key)"
        case .unusedStorage(let key): return "storage \(key) is listed but no tensor uses it"
        case .storageCountMismatch(let key, let declared, let pickled): return "storage \(key) declares \(declared) elements, the pickle says \(pickled)"
        case .storagePastEnd(let key, let elements): return "storage \(key) (\(elements) elements) runs past the end of the file"
        case .trailingBytes(let count): return "\(count) unexpected bytes after the last storage"
        case .storageNotInFile(let key): return "storage \(key) is not in the file"
        case .storageDescribedTwoWays(let key): return "storage \(key) is described with different sizes or types by different tensors"
        case .duplicateName: return "two entries flatten to the same name"
        case .unsupportedDictKey(let type, let under): return "dict key of type \(type) under \"\(under)\""
        case .bareStorage: return "a bare storage (not inside a tensor) is not supported"
        case .noSingleFileInFolder(let several):
            return several ? "several *.bin.index.json files: name one of them" : "no single torch file or index in this folder: name one"
        case .inTwoShards(let first, let second): return "tensor appears in \(first) and \(second)"
        }
    }
}

public enum TorchReader {
    /// torch's `MAGIC_NUMBER` 0x1950a86a20f9469cfc6c as the unpickler holds it (`.bigInt`), whatever the
    /// protocol spelled it as (LONG1 from protocol 2 on, a decimal LONG at protocols 0 and 1).
    static let legacyMagic: [UInt8] = [0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19]

    /// Whether `head` (a file's first bytes) starts with the legacy format's first pickle, the
    /// magic number: the one test that tells a legacy torch file from anything else.
    public static func startsWithLegacyMagic(_ head: UnsafeRawBufferPointer) -> Bool {
        guard let (v, _) = try? Unpickler.load(head, file: "", persistentLoad: { _, at in
            throw PickleError(reason: .badValue("persistent id"), file: "", offset: at)
        }), case .bigInt(let b) = v else { return false }
        return b == legacyMagic
    }

    /// Bytes enough to hold the magic-number pickle at any protocol (24 at protocol 4, 28 at 0).
    static let legacyMagicPrefix = 64

    public struct Options: Sendable {
        /// Emit only the sub-tree under this dotted path (e.g. `model`, `state_dict`).
        public var root: String?
        /// Keep the first name of tensors that are exactly the same view of one storage.
        public var dedupe = false
        public init(root: String? = nil, dedupe: Bool = false) {
            self.root = root
            self.dedupe = dedupe
        }
    }

    public static func open(path: String, selection: TensorSelection = .all, options: Options = Options(),
                            producer: String) throws -> PlannedSource {
        guard let file = try MappedFile.open(path) else { throw TorchError(.notARegularFile, file: path) }
        let size = file.size
        let head = try file.bytes(at: 0, count: min(size, legacyMagicPrefix))
        if head.starts(with: [0x50, 0x4B, 0x03, 0x04]) {
            return try openZip(file, path: path, selection: selection, options: options, producer: producer)
        }
        if startsWithLegacyMagic(head) {
            return try openLegacy(file, path: path, selection: selection, options: options, producer: producer)
        }
        if size > 262, try file.bytes(at: 257, count: 5).elementsEqual(Array("ustar".utf8)) {
            throw TorchError(.tarFormat, file: path)
        }
        throw TorchError(.notATorchFile, file: path)
    }

    // MARK: - Zip format

    static func openZip(_ file: MappedFile, path: String, selection: TensorSelection, options: Options, producer: String) throws -> PlannedSource {
        let zip = try ZipArchive(file)
        guard let first = zip.entries.first, let slash = first.name.firstIndex(of: "/") else {
            throw TorchError(.zipWithoutFolder, file: path)
        }
        let prefix = String(first.name[..<slash])
        guard let pkl = zip.entry(prefix + "/data.pkl") else {
            throw ZipError(.missingMember, file: path, member: prefix + "/data.pkl")
        }
        guard zip.entry(prefix + "/version") != nil || zip.entry(prefix + "/.data/version") != nil else {
            throw ZipError(.missingMember, file: path, member: prefix + "/version")
        }
        var bigEndian = false
        if let bo = zip.entry(prefix + "/byteorder") {
            let text = String(decoding: try zip.readBytes(bo, limit: 64), as: UTF8.self)
            guard text == "little" || text == "big" else { throw TorchError(.badByteOrder(text), file: path) }
            bigEndian = text == "big"
        }
        let pickle = try zip.read(pkl, limit: 1 << 30)
        let (root, _) = try withExtendedLifetime(pickle) {
            try Unpickler.load(pickle.bytes, file: path + ":" + pkl.name) { pid, at in
                try storageRef(pid, legacy: false, file: path, at: at)
            }
        }
        let (tensors, metadata) = try namedTensors(root, options, selection, path)
        var plan: [(TensorHeader, TensorData)] = []
        for (name, t, descriptor) in tensors {
            guard let record = zip.entry("\(prefix)/data/\(t.storage.key)") else {
                throw TorchError(.missingStorageRecord(key: t.storage.key), file: path, tensor: name)
            }
            let storageBytes = t.storage.numel * t.dtype.size
            guard record.size == storageBytes else {
                throw TorchError(.storageRecordSize(key: t.storage.key, bytes: record.size, elements: t.storage.numel, dtype: t.dtype, needed: storageBytes),
                                 file: path, tensor: name)
            }
            let contiguous = StridedCopy.isContiguous(shape: t.shape, stride: t.stride)
            if record.method == 0 && contiguous && !bigEndian {
                plan.append((TensorHeader(descriptor), .mapped(file, offset: record.dataOffset + t.storageOffset * t.dtype.size)))
            } else {
                // Deflated records (torch never writes them, other tools may), strided views and
                // big-endian data are rebuilt one tensor at a time.
                plan.append((TensorHeader(descriptor), .materialized {
                    if record.method == 0 { return try materialize(zip.storedBytes(record), t, descriptor, bigEndian: bigEndian) }
                    let inflated = try zip.read(record)
                    return try withExtendedLifetime(inflated) { try materialize(inflated.bytes, t, descriptor, bigEndian: bigEndian) }
                }))
            }
        }
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "torch", metadata: metadata), plan: plan)
    }

    /// From the unpickled object to the tensors to emit: `--root`, flattening, `--dedupe`,
    /// `--only/--exclude`, and each tensor's descriptor (shape overflow checked).
    static func namedTensors(_ root: PickleValue, _ options: Options, _ selection: TensorSelection, _ path: String)
        throws -> ([(String, TensorRef, TensorDescriptor)], JSONObject) {
        let (tensors, flattened) = try flatten(try subtree(root, options.root, path), path: path)
        var metadata = flattened
        let kept = try dedupe(tensors, options, &metadata).filter { selection.includes($0.0) }
        return (try kept.map { ($0.0, $0.1, try TensorDescriptor(name: $0.0, dtype: $0.1.dtype, shape: $0.1.shape)) }, metadata)
    }

    static func materialize(_ storage: UnsafeRawBufferPointer, _ t: TensorRef, _ d: TensorDescriptor, bigEndian: Bool) throws -> AlignedBuffer {
        let out = try AlignedBuffer(capacity: max(d.byteCount, 1))
        out.count = d.byteCount
        if d.byteCount > 0 {
            StridedCopy.gather(from: storage.baseAddress!, elementSize: t.dtype.size, offset: t.storageOffset,
                               shape: t.shape, stride: t.stride, into: out.pointer)
        }
        if bigEndian { StridedCopy.swapBytes(out.pointer, count: d.byteCount, elementSize: t.dtype == .c64 ? 4 : t.dtype.size) }
        return out
    }

    // MARK: - Legacy format

    static func openLegacy(_ file: MappedFile, path: String, selection: TensorSelection, options: Options, producer: String) throws -> PlannedSource {
        // Its storages follow the pickles with no index: the whole file is walked, so not over a network.
        if file.isRemote { throw RemoteError(.unsupported(detail: "a legacy (pre-1.6) torch.save file is read whole, not by position: download it first"), url: path) }
        let all = try file.bytes(at: 0, count: file.size)
        let noStorage: PersistentLoad = { _, at in
            throw PickleError(reason: .badValue("unexpected persistent id in a header pickle"), file: path, offset: at)
        }
        var (magic, pos) = try Unpickler.load(all, at: 0, file: path, persistentLoad: noStorage)
        guard case .bigInt(let b) = magic, b == legacyMagic else {
            throw TorchError(.badLegacyMagic, file: path)
        }
        let protocolVersion: PickleValue
        (protocolVersion, pos) = try Unpickler.load(all, at: pos, file: path, persistentLoad: noStorage)
        guard case .int(1001) = protocolVersion else { throw TorchError(.badLegacyProtocolVersion, file: path) }
        let sysInfo: PickleValue
        (sysInfo, pos) = try Unpickler.load(all, at: pos, file: path, persistentLoad: noStorage)
        if case .dict(let d) = sysInfo {
            for (k, v) in d.entries {
                if case .string("little_endian") = k, case .bool(false) = v {
                    throw TorchError(.bigEndianLegacy, file: path)
                }
            }
        }
        var storages: [String: StorageRef] = [:]
        let root: PickleValue
        (root, pos) = try Unpickler.load(all, at: pos, file: path) { pid, at in
            let s = try storageRef(pid, legacy: true, file: path, at: at)
            if case .storage(let ref) = s, storages[ref.key] == nil { storages[ref.key] = ref }
            return s
        }
        let keysValue: PickleValue
        (keysValue, pos) = try Unpickler.load(all, at: pos, file: path, persistentLoad: noStorage)
        guard case .list(let keyList) = keysValue else { throw TorchError(.missingLegacyKeyList, file: path) }

        // The storages follow in key-list order: i64 element count, then the raw elements.
        var dataOffset: [String: Int] = [:]
        for k in keyList.items {
            // Python 2 wrote the keys as byte strings (SHORT_BINSTRING).
            guard let key = storageKey(k) else { throw TorchError(.legacyKeyNotAString, file: path) }
            guard pos + 8 <= file.size else { throw TorchError(.endsBeforeStorage(key: key), file: path) }
            let countBytes = try file.bytes(at: pos, count: 8)
            let count = Int(Int64(littleEndian: countBytes.loadUnaligned(as: Int64.self)))
            guard let ref = storages[key] else {
                throw TorchError(.unusedStorage(key: key), file: path)
            }
            guard count == ref.rootNumel else {
                throw TorchError(.storageCountMismatch(key: key, declared: count, pickled: ref.rootNumel), file: path)
            }
            let bytes = count.multipliedReportingOverflow(by: ref.dtype.size)
            guard !bytes.overflow, pos + 8 + bytes.partialValue <= file.size else {
                throw TorchError(.storagePastEnd(key: key, elements: count), file: path)
            }
            dataOffset[key] = pos + 8
            pos += 8 + bytes.partialValue
        }
        guard pos == file.size else { throw TorchError(.trailingBytes(count: file.size - pos), file: path) }

        let (tensors, metadata) = try namedTensors(root, options, selection, path)
        var plan: [(TensorHeader, TensorData)] = []
        for (name, t, descriptor) in tensors {
            guard let base = dataOffset[t.storage.key], let root = storages[t.storage.key] else {
                throw TorchError(.storageNotInFile(key: t.storage.key), file: path, tensor: name)
            }
            // Every persistent id naming a key must describe the storage the file holds for it
            // (the first one sized it): a later one claiming more elements would read past it.
            // Compared in bytes: an untyped storage counts bytes, and _rebuild_tensor_v3 views it
            // in elements of the tensor's type.
            let rootBytes = root.rootNumel * root.dtype.size
            guard t.storage.rootNumel * t.storage.dtype.size == rootBytes,
                  (t.storage.offset + t.storage.numel) * t.storage.dtype.size <= rootBytes else {
                throw TorchError(.storageDescribedTwoWays(key: t.storage.key), file: path, tensor: name)
            }
            let viewOffset = t.storage.offset
            let start = base + (viewOffset + t.storageOffset) * t.dtype.size
            if StridedCopy.isContiguous(shape: t.shape, stride: t.stride) {
                plan.append((TensorHeader(descriptor), .mapped(file, offset: start)))
            } else {
                // The closure holds `file`, so the mapping outlives the plan.
                plan.append((TensorHeader(descriptor), .materialized {
                    try materialize(file.bytes(at: base + viewOffset * t.dtype.size, count: t.storage.numel * t.dtype.size), t, descriptor, bigEndian: false)
                }))
            }
        }
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "torch", metadata: metadata), plan: plan)
    }

    // MARK: - Shared

    /// torch's persistent ids: `('storage', StorageType, key, location, numel)` in zip files,
    /// `(..., view_metadata)` with a sixth element in legacy files.
    static func storageRef(_ pid: PickleValue, legacy: Bool, file: String, at: Int) throws -> PickleValue {
        func bad(_ why: String) -> PickleError { PickleError(reason: .badValue("persistent id: \(why)"), file: file, offset: at) }
        var pid = pid
        if case .string(let repr) = pid {
            // Protocol 0 writes the id as its str(): "('storage', <class 'torch.FloatStorage'>, '0', 'cpu', 12)".
            guard let parsed = PersistentIDText.parse(repr) else { throw bad("text id \(repr.prefix(120)) is not a storage tuple") }
            pid = parsed
        }
        guard case .tuple(let t) = pid, t.count >= 5, storageKey(t[0]) == "storage" else { throw bad("expected ('storage', type, key, location, numel)") }
        guard case .global(let type) = t[1] else { throw bad("storage type is not a class") }
        let dtype: DType
        if type == PickleGlobal(module: "torch.storage", name: "UntypedStorage") {
            dtype = .u8
        } else if let d = PickleGlobal.storageTypes[type.name] {
            dtype = d
        } else {
            throw bad("\(type) is not a storage type")
        }
        guard let key = storageKey(t[2]), case .int(let numel) = t[4], numel >= 0 else { throw bad("malformed key or size") }
        var ref = StorageRef(key: key, dtype: dtype, numel: numel, rootNumel: numel)
        // Legacy views (torch < 0.4): (view key, offset, size) into the root storage `key`.
        if legacy, t.count >= 6, case .tuple(let view) = t[5], view.count == 3, case .int(let off) = view[1], case .int(let n) = view[2] {
            guard off >= 0, n >= 0, off + n <= numel else { throw bad("storage view [\(off), +\(n)) outside its storage of \(numel)") }
            ref.offset = off
            ref.numel = n
        }
        return .storage(ref)
    }

    static func subtree(_ root: PickleValue, _ path: String?, _ file: String) throws -> PickleValue {
        guard let path, !path.isEmpty else { return root }
        var node = root
        for part in path.split(separator: ".") {
            guard case .dict(let d) = node, let v = d.entries.first(where: { key($0.key) == String(part) })?.value else {
                var keys: [String] = []
                if case .dict(let d) = node { keys = d.entries.compactMap { key($0.key) } }
                throw UsageError("\(file): --root \(path): no key \"\(part)\" (keys here: \(keys.joined(separator: ", ")))")
            }
            node = v
        }
        return node
    }

    /// A storage key: text, or a Python 2 byte string.
    static func storageKey(_ v: PickleValue) -> String? {
        switch v {
        case .string(let s): return s
        case .bytes(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }

    static func key(_ v: PickleValue) -> String? {
        switch v {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .bytes(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }

    /// Walks the object: tensors get dotted names (`model.encoder.weight`, list items by index);
    /// other leaves (numbers, strings, None) go to the metadata under the same names.
    static func flatten(_ root: PickleValue, path: String) throws -> ([(String, TensorRef)], JSONObject) {
        var tensors: [(String, TensorRef)] = []
        var metadata = JSONObject()
        var seen = Set<String>()
        func join(_ a: String, _ b: String) -> String { a.isEmpty ? b : a + "." + b }
        func add(_ name: String) throws {
            guard seen.insert(name).inserted else { throw TorchError(.duplicateName, file: path, tensor: name) }
        }
        func walk(_ v: PickleValue, _ name: String) throws {
            switch v {
            case .tensor(let t):
                try add(name)
                tensors.append((name, t))
            case .dict(let d):
                for (k, value) in d.entries {
                    guard let ks = key(k) else { throw TorchError(.unsupportedDictKey(type: k.typeName, under: name), file: path) }
                    try walk(value, join(name, ks))
                }
            case .list(let l):
                for (i, item) in l.items.enumerated() { try walk(item, join(name, String(i))) }
            case .tuple(let items):
                for (i, item) in items.enumerated() { try walk(item, join(name, String(i))) }
            case .none: try add(name); metadata[name] = .null
            case .bool(let b): try add(name); metadata[name] = .bool(b)
            case .int(let i): try add(name); metadata[name] = .int(i)
            case .float(let f): try add(name); metadata[name] = f.isFinite ? .number("\(f)") : .string("\(f)")
            case .string(let s): try add(name); metadata[name] = .string(s)
            case .bytes(let b): try add(name); metadata[name] = .string(b.map { String(format2: $0) }.joined())
            case .bigInt: try add(name); metadata[name] = .string("<integer wider than 64 bits>")
            case .global(let g): try add(name); metadata[name] = .string(g.description)
            case .storage: throw TorchError(.bareStorage, file: path, tensor: name)
            }
        }
        try walk(root, "")
        return (tensors, metadata)
    }

    /// With `--dedupe`, tensors that are the very same view (storage, offset, shape, stride,
    /// dtype) as an earlier one are dropped and recorded under metadata `ckpt.aliases`.
    static func dedupe(_ tensors: [(String, TensorRef)], _ options: Options, _ metadata: inout JSONObject) throws -> [(String, TensorRef)] {
        guard options.dedupe else { return tensors }
        var first: [String: String] = [:]
        var aliases = JSONObject()
        var kept: [(String, TensorRef)] = []
        for (name, t) in tensors {
            let id = "\(t.storage.key)|\(t.storage.offset + t.storageOffset)|\(t.shape)|\(t.stride)|\(t.dtype)"
            if let original = first[id] {
                aliases[name] = .string(original)
            } else {
                first[id] = name
                kept.append((name, t))
            }
        }
        if !aliases.isEmpty { metadata["ckpt.aliases"] = .object(aliases) }
        return kept
    }
}

extension String {
    /// Two lowercase hex digits.
    init(format2 byte: UInt8) {
        let h = Array("0123456789abcdef")
        self = String([h[Int(byte >> 4)], h[Int(byte & 15)]])
    }
}

extension TorchReader {
    /// A torch file, or a sharded checkpoint through `pytorch_model.bin.index.json` (or the
    /// folder holding it): every shard's tensors, checked against the index's weight_map.
    public static func openAny(path: String, selection: TensorSelection, options: Options, producer: String) throws -> PlannedSource {
        // A URL is a file or an index (openSource resolved a folder to one of them).
        var isFolder = false
        if !RemoteLocation.isRemote(path) {
            var st = stat()
            guard stat(path, &st) == 0 else { throw IOError(.open, path: path, errno: errno) }
            isFolder = (st.st_mode & S_IFMT) == S_IFDIR
        }
        var indexPath: String?
        if isFolder {
            let names = try listDirectory(path)
            let indexes = names.filter { $0.hasSuffix(".bin.index.json") }
            if let only = indexes.first, indexes.count == 1 {
                indexPath = path + "/" + only
            } else {
                let files = names.filter { $0.hasSuffix(".bin") || $0.hasSuffix(".pt") || $0.hasSuffix(".pth") }
                guard files.count == 1 else {
                    throw TorchError(.noSingleFileInFolder(severalIndexes: indexes.count > 1), file: path)
                }
                return try open(path: path + "/" + files[0], selection: selection, options: options, producer: producer)
            }
        } else if path.hasSuffix(".json") {
            indexPath = path
        }
        guard let indexPath else { return try open(path: path, selection: selection, options: options, producer: producer) }
        let idx = try SafetensorsIndex.parse(try readWholeFile(indexPath, limit: 1 << 30), file: indexPath)
        let (dir, _) = splitPath(indexPath)
        var plan: [(TensorHeader, TensorData)] = []
        var metadata = JSONObject()
        var owner: [String: String] = [:]
        for f in Set(idx.weightMap.map(\.file)).sorted() {
            let shard = try open(path: (dir.isEmpty ? "" : dir + "/") + f, selection: .all, options: options, producer: producer)
            for (k, v) in shard.header.metadata where !metadata.contains(k) { metadata[k] = v }
            for (t, data) in shard.plan {
                if let other = owner[t.descriptor.name] {
                    throw TorchError(.inTwoShards(first: other, second: f), file: indexPath, tensor: t.descriptor.name)
                }
                owner[t.descriptor.name] = f
                if selection.includes(t.descriptor.name) { plan.append((t, data)) }
            }
        }
        try idx.verify(owners: owner, indexPath: indexPath)
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "torch", metadata: metadata), plan: plan)
    }
}
