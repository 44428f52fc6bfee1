import Glibc

/// The writing side of partitioned conversion: `ckpt-write --part K/N DIR` writes part K's
/// shard (safetensors) or array folders (Orbax) into DIR and then a part record,
/// `DIR/.ckpt-parts/part-K-of-N.json`; `ckpt-write --finalize DIR` checks the records and
/// writes what makes DIR a checkpoint (the index, or `_METADATA`). Until then DIR has neither,
/// so a half-written checkpoint never looks complete. Formats in docs/formats.md.
public enum PartRecords {
    public static let folderName = ".ckpt-parts"

    public static func recordName(_ spec: PartSpec) -> String { "part-\(spec.index)-of-\(spec.count).json" }

    /// `part-K-of-N.json` → K/N; nil for any other name (temporary files, staging folders).
    static func parseRecordName(_ name: String) -> PartSpec? {
        guard name.hasPrefix("part-"), name.hasSuffix(".json") else { return nil }
        let middle = name.dropFirst("part-".count).dropLast(".json".count)
        guard let r = middle.firstRange(of: "-of-") else { return nil }
        return PartSpec(argument: middle[..<r.lowerBound] + "/" + middle[r.upperBound...])
    }

    /// The shard part K writes: `model-{K+1:05d}-of-{N:05d}.safetensors`, the name
    /// huggingface_hub gives the (K+1)-th of N shards.
    public static func shardName(_ spec: PartSpec) -> String {
        SafetensorsIndex.shardName(stem: "model", index: spec.index + 1, count: spec.count)
    }

    static let safetensorsIndex = "model.safetensors.index.json"

    /// The files whose presence makes a folder a finished checkpoint of `format`.
    static func finishedMarkers(_ format: CheckpointFormat) -> [String] {
        format == .orbax ? ["_METADATA", "_sharding"] : [safetensorsIndex, "model.safetensors"]
    }

    /// Before a part writes: the output folder exists (made here if its parent does: N
    /// processes may race to make it) with its records folder, and holds no finished
    /// checkpoint, which a part's files would silently mix with (`force`: its index or
    /// metadata is removed first, so the folder stops looking complete at once).
    public static func prepare(folder: String, format: CheckpointFormat, force: Bool) throws {
        try MissingOutputFolderError.check(output: folder)
        for dir in [folder, folder + "/" + folderName] {
            if mkdir(dir, 0o755) != 0 && errno != EEXIST { throw IOError(.mkdir, path: dir, errno: errno) }
            guard isDirectory(dir) else {
                throw IOError(.mkdir, path: dir, errno: ENOTDIR, detail: "--part writes into a folder")
            }
        }
        for name in finishedMarkers(format) {
            let p = folder + "/" + name
            var st = stat()
            guard lstat(p, &st) == 0 else { continue }
            guard force else { throw PartsError(.finishedCheckpointPresent(file: name), folder: folder) }
            if unlink(p) != 0 && errno != ENOENT { throw IOError(.unlink, path: p, errno: errno) }
        }
    }
}

/// One part's record: what it wrote, so `--finalize` can check it without reading data.
struct PartRecord {
    struct Entry {
        var name: String
        var dtype: String
        var shape: [Int]
        /// The shard (safetensors) or array folder (Orbax) holding it.
        var file: String
        /// Orbax: the key path of the leaf.
        var keys: [String]?
    }
    var format: CheckpointFormat
    var spec: PartSpec
    /// The stream's `part` header key; nil when the stream had none.
    var streamPart: PartHeader?
    /// Every file the part wrote (relative to the output folder) and its size.
    var files: [(path: String, size: Int)]
    var tensors: [Entry]

    var json: JSONValue {
        let tensors = self.tensors.map { e -> JSONValue in
            var o = JSONObject([("name", .string(e.name)), ("dtype", .string(e.dtype)), ("shape", .array(e.shape.map { .int($0) })),
                                ("file", .string(e.file))])
            if let keys = e.keys { o["keys"] = .array(keys.map { .string($0) }) }
            return .object(o)
        }
        return .object(JSONObject([
            ("format", .string(format.rawValue)), ("index", .int(spec.index)), ("count", .int(spec.count)),
            ("stream_part", streamPart?.json ?? .null),
            ("files", .array(files.map { .object(JSONObject([("path", .string($0.path)), ("size", .int($0.size))])) })),
            ("tensors", .array(tensors)),
        ]))
    }

    init(format: CheckpointFormat, spec: PartSpec, streamPart: PartHeader?, files: [(path: String, size: Int)], tensors: [Entry]) {
        self.format = format
        self.spec = spec
        self.streamPart = streamPart
        self.files = files
        self.tensors = tensors
    }

    /// Reads a record; `file` names it in errors.
    init(bytes: [UInt8], file: String, folder: String) throws {
        func bad(_ what: String) -> PartsError { PartsError(.recordUnreadable(record: file, detail: what), folder: folder) }
        let root: JSONValue
        do { root = try JSONParser.parse(bytes) } catch { throw bad("invalid JSON: \(error.description)") }
        guard let o = root.objectValue else { throw bad("not a JSON object") }
        guard let f = o["format"]?.stringValue.flatMap(CheckpointFormat.init(rawValue:)), f == .safetensors || f == .orbax else {
            throw bad("no format safetensors or orbax")
        }
        guard let k = o["index"]?.nonNegativeIntValue, let n = o["count"]?.nonNegativeIntValue, k < n else { throw bad("no index below count") }
        var streamPart: PartHeader?
        if let p = o["stream_part"], p != .null {
            guard let parsed = PartHeader(json: p) else { throw bad("stream_part is not a part key") }
            streamPart = parsed
        }
        var files: [(path: String, size: Int)] = []
        for v in o["files"]?.arrayValue ?? [] {
            guard let e = v.objectValue, let p = e["path"]?.stringValue, PartRecord.isRelative(p), let s = e["size"]?.nonNegativeIntValue else {
                throw bad("a files entry without a relative path and a size")
            }
            files.append((p, s))
        }
        var tensors: [Entry] = []
        for v in o["tensors"]?.arrayValue ?? [] {
            guard let e = v.objectValue, let name = e["name"]?.stringValue, let dtype = e["dtype"]?.stringValue,
                  let shape = e["shape"]?.arrayValue?.map(\.nonNegativeIntValue), !shape.contains(nil),
                  let file = e["file"]?.stringValue, PartRecord.isRelative(file) else {
                throw bad("a tensors entry without name, dtype, shape and file")
            }
            var keys: [String]?
            if let k = e["keys"] {
                guard let list = k.arrayValue?.map(\.stringValue), !list.contains(nil), !list.isEmpty else { throw bad("keys is not a list of strings") }
                keys = list.map { $0! }
            }
            if f == .orbax && keys == nil { throw bad("an Orbax tensor without keys") }
            tensors.append(Entry(name: name, dtype: dtype, shape: shape.map { $0! }, file: file, keys: keys))
        }
        self.init(format: f, spec: PartSpec(index: k, count: n), streamPart: streamPart, files: files, tensors: tensors)
    }

    /// A path inside the output folder (no absolute paths, no `..`), as the writer makes them.
    static func isRelative(_ p: String) -> Bool {
        !p.isEmpty && !p.hasPrefix("/") && !p.split(separator: "/", omittingEmptySubsequences: false).contains { $0.isEmpty || $0 == ".." || $0 == "." }
    }
}

/// `ckpt-write --part K/N`: writes through a safetensors or Orbax writer, then the part record.
/// The record is written (atomically) only after the shard or arrays are in place, and an
/// earlier record of the same part is removed before anything is written: a part that fails
/// or is killed half-way has no record, so `--finalize` refuses until it is run again.
public final class PartSink: FileRegionSink {
    public enum Output {
        case safetensors(SafetensorsWriter)
        case orbax(OrbaxWriter)
    }
    public let folder: String
    public let spec: PartSpec
    private let output: Output
    private let inner: TensorSink
    private let log: (String) -> Void
    private var streamPart: PartHeader?
    private var tensors: [TensorDescriptor] = []

    /// A sink for part `spec` in `folder` (call `PartRecords.prepare` first).
    public static func safetensors(folder: String, spec: PartSpec, directIO: Bool, log: @escaping (String) -> Void) -> PartSink {
        let w = SafetensorsWriter(path: folder + "/" + PartRecords.shardName(spec), overwrite: true, directIO: directIO, log: log)
        w.isShard = true
        return PartSink(folder: folder, spec: spec, output: .safetensors(w), log: log)
    }

    public static func orbax(folder: String, spec: PartSpec, separator: String, nest: String?, maxChunkBytes: Int, directIO: Bool,
                             log: @escaping (String) -> Void) -> PartSink {
        // Arrays are made in a temporary folder inside the records folder and moved into place.
        let w = OrbaxWriter(path: folder + "/" + PartRecords.folderName + "/arrays-\(spec.index)-of-\(spec.count)", separator: separator,
                            nest: nest, maxChunkBytes: maxChunkBytes, overwrite: true, directIO: directIO)
        w.arraysInto = folder
        return PartSink(folder: folder, spec: spec, output: .orbax(w), log: log)
    }

    init(folder: String, spec: PartSpec, output: Output, log: @escaping (String) -> Void) {
        self.folder = folder
        self.spec = spec
        self.output = output
        switch output {
        case .safetensors(let w): inner = w
        case .orbax(let w): inner = w
        }
        self.log = log
    }

    private var recordPath: String { folder + "/" + PartRecords.folderName + "/" + PartRecords.recordName(spec) }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        if let raw = header.extensions[PartHeader.key] {
            guard let p = PartHeader(json: raw) else { throw PartsError(.streamKeyMalformed, folder: folder) }
            guard p.index == spec.index && p.count == spec.count else {
                throw PartsError(.streamIsAnotherPart(stream: PartSpec(index: p.index, count: p.count), given: spec), folder: folder)
            }
            streamPart = p
        } else {
            log("the stream has no part key (it was not cut by ckpt-read --part): --finalize can only check that parts share no tensor")
        }
        if unlink(recordPath) != 0 && errno != ENOENT { throw IOError(.unlink, path: recordPath, errno: errno) }
        try inner.begin(header, manifest: manifest)
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        tensors.append(tensor.descriptor)
        try inner.beginTensor(tensor)
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws { try inner.write(chunk) }
    public func endTensor() throws { try inner.endTensor() }

    public func nextFileRegion() -> (descriptor: FileDescriptor, offset: Int)? { (inner as? FileRegionSink)?.nextFileRegion() }

    public func didWriteRegion(count: Int) throws {
        guard let regions = inner as? FileRegionSink else { preconditionFailure("a region was written to a sink that gives none") }
        try regions.didWriteRegion(count: count)
    }

    public func finish() throws {
        var files: [(path: String, size: Int)] = []
        var entries: [PartRecord.Entry] = []
        let format: CheckpointFormat
        switch output {
        case .safetensors(let w):
            format = .safetensors
            let shard = PartRecords.shardName(spec)
            if tensors.isEmpty {
                // An empty part writes no shard (the index would name none), and removes its own
                // from an earlier run; its record still says it is done.
                w.abort()
                let p = folder + "/" + shard
                if unlink(p) != 0 && errno != ENOENT { throw IOError(.unlink, path: p, errno: errno) }
            } else {
                try w.finish()
                files.append((shard, try PartSink.size(folder + "/" + shard)))
                entries = tensors.map { PartRecord.Entry(name: $0.name, dtype: $0.dtype.rawValue, shape: $0.shape, file: shard) }
            }
        case .orbax(let w):
            format = .orbax
            try w.finish()
            for (d, leaf) in zip(tensors, w.leaves) {
                for name in try listDirectory(folder + "/" + leaf.param).sorted() {
                    let rel = leaf.param + "/" + name
                    files.append((rel, try PartSink.size(folder + "/" + rel)))
                }
                entries.append(PartRecord.Entry(name: d.name, dtype: d.dtype.rawValue, shape: d.shape, file: leaf.param, keys: leaf.keys))
            }
        }
        let record = PartRecord(format: format, spec: spec, streamPart: streamPart, files: files, tensors: entries)
        let out = try AtomicOutput(path: recordPath, overwrite: true)
        do {
            var bytes = JSONWriter.compact(record.json)
            bytes.append(UInt8(ascii: "\n"))
            try bytes.withUnsafeBytes { try out.descriptor.writeAll($0) }
            try out.commit()
        } catch {
            out.abort()
            throw error
        }
    }

    public func abort() { inner.abort() }

    static func size(_ path: String) throws -> Int {
        var st = stat()
        guard stat(path, &st) == 0 else { throw IOError(.stat, path: path, errno: errno) }
        return Int(st.st_size)
    }
}

/// `ckpt-write --finalize DIR`: reads every part record (no tensor data), checks that all N
/// parts are there, complete, from one input and disjoint, then writes the index (safetensors)
/// or `_METADATA` and `_sharding` (Orbax) and removes the records.
public enum PartFinalizer {
    public struct Summary {
        public var format: CheckpointFormat
        public var parts: Int
        public var tensors: Int
        public var bytes: Int
        public var written: [String]
        /// Shard-named files no part wrote (an earlier run's, with another N): left in place.
        public var strays: [String] = []
    }

    /// - Returns: what was written, or nil when `folder` was finalized before (no records, the
    ///   index or `_METADATA` present).
    @discardableResult
    public static func finalize(folder: String, format expected: CheckpointFormat?, force: Bool) throws -> Summary? {
        var st = stat()
        guard stat(folder, &st) == 0 else { throw IOError(.stat, path: folder, errno: errno) }
        let recordsDir = folder + "/" + PartRecords.folderName
        guard stat(recordsDir, &st) == 0 else {
            let done = [PartRecords.safetensorsIndex, "_METADATA"].contains { lstat(folder + "/" + $0, &st) == 0 }
            if done { return nil }
            throw PartsError(.noRecords, folder: folder)
        }
        var records: [PartRecord] = []
        for name in try listDirectory(recordsDir).sorted() {
            guard let spec = PartRecords.parseRecordName(name) else { continue }
            let r = try PartRecord(bytes: try readWholeFile(recordsDir + "/" + name, limit: 1 << 30), file: name, folder: folder)
            guard r.spec == spec else {
                throw PartsError(.recordUnreadable(record: name, detail: "it says part \(r.spec)"), folder: folder)
            }
            records.append(r)
        }
        guard let first = records.first else { throw PartsError(.noRecords, folder: folder) }
        let counts = Set(records.map(\.spec.count))
        guard counts.count == 1 else {
            throw PartsError(.countsDiffer(records: records.map { PartRecords.recordName($0.spec) }), folder: folder)
        }
        let n = first.spec.count
        records.sort { $0.spec.index < $1.spec.index }
        let present = Set(records.map(\.spec.index))
        let missing = (0..<n).filter { !present.contains($0) }
        guard missing.isEmpty else { throw PartsError(.missing(parts: missing, count: n), folder: folder) }
        for r in records where r.format != first.format {
            throw PartsError(.formatsDiffer(a: first.spec, aFormat: first.format.rawValue, b: r.spec, bFormat: r.format.rawValue), folder: folder)
        }
        if let expected, expected != first.format {
            throw UsageError("--format \(expected.rawValue): the parts in \(folder) are \(first.format.rawValue)")
        }
        // One input, one plan: the parts' stream keys agree (parts whose stream had no key
        // were cut some other way; they are checked for disjoint names only).
        let keyed = records.filter { $0.streamPart != nil }
        if let a = keyed.first {
            for b in keyed.dropFirst() {
                let pa = a.streamPart!, pb = b.streamPart!
                if pa.input != pb.input {
                    throw PartsError(.inputsDiffer(a: a.spec, aDigest: pa.input, b: b.spec, bDigest: pb.input), folder: folder)
                }
                if pa.plan != pb.plan {
                    throw PartsError(.plansDiffer(a: a.spec, b: b.spec), folder: folder)
                }
            }
        }
        // Every file each part wrote is there, at the size it wrote.
        for r in records {
            for f in r.files {
                let p = folder + "/" + f.path
                guard lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
                    throw PartsError(.fileDamaged(part: r.spec, file: f.path, size: f.size, actual: nil), folder: folder)
                }
                guard Int(st.st_size) == f.size else {
                    throw PartsError(.fileDamaged(part: r.spec, file: f.path, size: f.size, actual: Int(st.st_size)), folder: folder)
                }
            }
        }
        // Each tensor is in a file its record lists, and a safetensors shard's header (read: a
        // few KiB, no tensor data) holds exactly the tensors its record gives it, so the index
        // written below agrees with the shards.
        for r in records {
            let name = PartRecords.recordName(r.spec)
            for e in r.tensors where !r.files.contains(where: { $0.path == e.file || $0.path.hasPrefix(e.file + "/") }) {
                throw PartsError(.recordUnreadable(record: name, detail: "tensor \(e.name) is in \(e.file), which the record does not list"), folder: folder)
            }
            guard r.format == .safetensors else { continue }
            for f in r.files {
                guard let mapped = try MappedFile.open(folder + "/" + f.path), mapped.size == f.size else {
                    throw PartsError(.fileDamaged(part: r.spec, file: f.path, size: f.size, actual: nil, holds: true), folder: folder)
                }
                let held = try SafetensorsHeader.read(from: mapped).entries.map(\.descriptor)
                let listed = r.tensors.filter { $0.file == f.path }
                let same = held.count == listed.count && Set(held.map { "\($0.name) \($0.dtype.rawValue) \($0.shape)" })
                    == Set(listed.map { "\($0.name) \($0.dtype) \($0.shape)" })
                guard same else { throw PartsError(.fileDamaged(part: r.spec, file: f.path, size: f.size, actual: nil, holds: true), folder: folder) }
            }
        }
        // No tensor (and no Orbax array folder) in two parts.
        var owner: [String: PartSpec] = [:]
        var folderOwner: [String: PartSpec] = [:]
        var bytes = 0
        for r in records {
            for e in r.tensors {
                if let other = owner[e.name] { throw PartsError(.tensorInTwoParts(tensor: e.name, a: other, b: r.spec), folder: folder) }
                owner[e.name] = r.spec
                if r.format == .orbax {
                    if let other = folderOwner[e.file] { throw PartsError(.tensorInTwoParts(tensor: e.file, a: other, b: r.spec), folder: folder) }
                    folderOwner[e.file] = r.spec
                }
                guard let dtype = DType(rawValue: e.dtype), let d = try? TensorDescriptor(name: e.name, dtype: dtype, shape: e.shape) else {
                    throw PartsError(.recordUnreadable(record: PartRecords.recordName(r.spec), detail: "tensor \(e.name): not a dtype and shape"), folder: folder)
                }
                bytes += d.byteCount
            }
        }
        var written: [String] = []
        switch first.format {
        case .orbax:
            let leaves = records.flatMap { $0.tensors.map { (keys: $0.keys!, param: $0.file, shape: $0.shape) } }
            let (metadata, sharding) = OrbaxWriter.metadataFiles(leaves)
            // _METADATA last: it is what makes the folder a checkpoint.
            try writeAtomically(folder + "/_sharding", sharding, force: force)
            try writeAtomically(folder + "/_METADATA", metadata, force: force)
            written = ["_sharding", "_METADATA"]
        default:
            // The index huggingface_hub and transformers write (encoded() sorts the weight map).
            let index = SafetensorsIndex(metadata: JSONObject([("total_size", .int(bytes))]),
                                         weightMap: records.flatMap { $0.tensors.map { ($0.name, $0.file) } })
            try writeAtomically(folder + "/" + PartRecords.safetensorsIndex, index.encoded(), force: force)
            written = [PartRecords.safetensorsIndex]
        }
        try removeTree(recordsDir)
        var summary = Summary(format: first.format, parts: n, tensors: owner.count, bytes: bytes, written: written)
        if first.format == .safetensors {
            let ours = Set(records.flatMap { $0.files.map(\.path) })
            summary.strays = try listDirectory(folder).filter { $0.hasPrefix("model-") && $0.hasSuffix(".safetensors") && !ours.contains($0) }.sorted()
        }
        return summary
    }

    static func writeAtomically(_ path: String, _ bytes: [UInt8], force: Bool) throws {
        let out = try AtomicOutput(path: path, overwrite: force)
        do {
            try bytes.withUnsafeBytes { try out.descriptor.writeAll($0) }
            try out.commit()
        } catch {
            out.abort()
            throw error
        }
    }
}

/// Why a part cannot be written, or the parts cannot be finalized (yet).
public struct PartsError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        /// Parts without a record: not run, still running, or failed.
        case missing(parts: [Int], count: Int)
        case noRecords
        case countsDiffer(records: [String])
        case formatsDiffer(a: PartSpec, aFormat: String, b: PartSpec, bFormat: String)
        case inputsDiffer(a: PartSpec, aDigest: String, b: PartSpec, bDigest: String)
        case plansDiffer(a: PartSpec, b: PartSpec)
        /// A file a record names is missing (`actual` nil) or has another size.
        /// `holds`: the file is there at its size but holds other tensors than the record says.
        case fileDamaged(part: PartSpec, file: String, size: Int, actual: Int?, holds: Bool = false)
        case tensorInTwoParts(tensor: String, a: PartSpec, b: PartSpec)
        case recordUnreadable(record: String, detail: String)
        case streamKeyMalformed
        case streamIsAnotherPart(stream: PartSpec, given: PartSpec)
        case finishedCheckpointPresent(file: String)
    }
    public var reason: Reason
    public var folder: String

    public init(_ reason: Reason, folder: String) {
        self.reason = reason
        self.folder = folder
    }

    public var exitStatus: SysExit {
        switch reason {
        case .missing, .noRecords: return .tempFail
        case .streamIsAnotherPart: return .usage
        case .finishedCheckpointPresent: return .cantCreate
        default: return .dataError
        }
    }

    public var description: String {
        switch reason {
        case .missing(let parts, let n):
            let list = parts.count > 20 ? parts.prefix(20).map(String.init).joined(separator: ", ") + ", ... (\(parts.count) in all)"
                : parts.map(String.init).joined(separator: ", ")
            return "\(folder): \(parts.count == 1 ? "part" : "parts") \(list) of 0..\(n - 1) \(parts.count == 1 ? "has" : "have") no record: "
                + "not run, still running, or failed; finalize again when \(parts.count == 1 ? "it has" : "they have") finished (nothing written)"
        case .noRecords:
            return "\(folder): no part has finished yet (no records in \(PartRecords.folderName)/); finalize again when the parts are done (nothing written)"
        case .countsDiffer(let records):
            return "\(folder): the part records are of different part counts (\(records.joined(separator: ", "))); remove the stale ones from \(PartRecords.folderName)/"
        case .formatsDiffer(let a, let fa, let b, let fb):
            return "\(folder): part \(a) wrote \(fa) and part \(b) \(fb)"
        case .inputsDiffer(let a, let da, let b, let db):
            return "\(folder): part \(a) and part \(b) were cut from different inputs (manifest sha256 \(da.prefix(12))… and \(db.prefix(12))…): run them again from one input"
        case .plansDiffer(let a, let b):
            return "\(folder): part \(a) and part \(b) were cut from one input by different plans (other --group-rules, --set or --no-group-lora): run every part with the same options"
        case .fileDamaged(let p, let f, let size, let actual, let holds):
            let what = holds ? "holds other tensors than part \(p) wrote" : actual.map { "is \($0) bytes, part \(p) wrote \(size)" } ?? "is missing (part \(p) wrote it)"
            return "\(folder)/\(f): \(what): run part \(p) again"
        case .tensorInTwoParts(let t, let a, let b):
            return "\(folder): \(t) is in part \(a) and in part \(b): the parts were not cut by one ckpt-read --part plan"
        case .recordUnreadable(let r, let detail):
            return "\(folder)/\(PartRecords.folderName)/\(r): not a part record ckpt-write wrote (\(detail))"
        case .streamKeyMalformed:
            return "the stream's part header key is malformed (not index, count, input and tensors)"
        case .streamIsAnotherPart(let s, let g):
            return "the stream is part \(s) (ckpt-read --part \(s)) but ckpt-write was given --part \(g)"
        case .finishedCheckpointPresent(let f):
            return "\(folder)/\(f): the folder holds a finished checkpoint, which this part's files would mix with; --force removes \(f) first"
        }
    }
}
