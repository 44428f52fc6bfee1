import Glibc

/// Writes tensors as one `.safetensors` file, or as Hugging Face shards plus
/// `<name>.index.json` when `maxShardSize` is set and exceeded.
///
/// With a manifest the layout is known before any data: headers are written first and
/// each chunk goes straight to its final offset (`pwrite`), in one pass, memory
/// independent of model size. Without one, data is spooled to a temporary file in the
/// output's folder and laid out at the end. Files appear only on success.
///
/// Files of `directThreshold` (64 MiB by default) and more are written with `O_DIRECT` where the file system
/// allows (`DirectFileWriter`): a checkpoint is written once and should not push everything
/// else out of the page cache; `directIO: false` writes through the cache.
public final class SafetensorsWriter: FileRegionSink {
    public let path: String
    public let maxShardSize: Int?
    public let overwrite: Bool
    public let directIO: Bool
    public let directThreshold: Int
    /// The file is one shard of a sharded checkpoint even when it is the only file written
    /// (`ckpt-write --part`): it gets the `format` metadata every shard gets.
    public var isShard = false
    private let log: (String) -> Void

    private struct OutputFile {
        var name: String
        var output: AtomicOutput
        var layout: SafetensorsLayout
        /// Data writes when this file bypasses the page cache; finished and released as soon
        /// as the file has all its bytes (`dataLeft`), so shards do not hold staging memory.
        var direct: DirectFileWriter?
        var dataLeft: Int
    }
    private var files: [OutputFile] = []
    /// `<name>.index.json`, when the tensors were sharded.
    private var index: AtomicOutput?
    /// Tensor name → (file, absolute offset); filled from the plan.
    private var placement: [String: (file: Int, offset: Int)] = [:]
    private var metadata: JSONObject?
    private var manifest: [TensorDescriptor]?
    private var received = 0

    /// Tensor data waiting for the layout (stream without a manifest).
    private var spool: Spool?

    private var current: TensorDescriptor?
    private var cursor = (file: 0, offset: 0)
    private var written = 0
    /// Bytes written around the page cache (O_DIRECT), summed over finished files.
    public private(set) var bytesWrittenDirectly = 0

    public init(path: String, maxShardSize: Int? = nil, overwrite: Bool, directIO: Bool = true,
                directThreshold: Int = DirectFileWriter.defaultThreshold, log: @escaping (String) -> Void) {
        self.path = path
        self.maxShardSize = maxShardSize
        self.overwrite = overwrite
        self.directIO = directIO
        self.directThreshold = directThreshold
        self.log = log
    }

    /// Metadata written as `__metadata__`: the stream's, with non-string values as JSON
    /// text (safetensors allows only strings). Streams from other formats get
    /// `"format": "pt"`, which transformers requires to load a file.
    static func safetensorsMetadata(_ header: StreamHeader) -> JSONObject? {
        var m = JSONObject()
        for (k, v) in header.metadata {
            m[k] = v.stringValue.map { .string($0) } ?? .string(String(decoding: JSONWriter.compact(v), as: UTF8.self))
        }
        if header.sourceFormat != "safetensors" && !m.contains("format") { m["format"] = .string("pt") }
        return m.isEmpty ? nil : m
    }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        metadata = SafetensorsWriter.safetensorsMetadata(header)
        self.manifest = manifest
        spool = try Spool.layOutOrSpool(manifest, beside: path, log: log, layOut: layOut)
    }

    /// Plans the files, creates them and writes their headers.
    private func layOut(_ tensors: [TensorDescriptor]) throws {
        var names = Set<String>()
        for t in tensors {
            guard names.insert(t.name).inserted else {
                throw SafetensorsError(.index(detail: "tensor name appears twice in the stream"), file: path, tensor: t.name)
            }
            guard t.name != "__metadata__" else {
                throw SafetensorsError(.index(detail: "a tensor cannot be named __metadata__ in safetensors (the header key is reserved)"),
                                       file: path, tensor: t.name)
            }
        }
        let groups: [[TensorDescriptor]]
        if let maxShardSize { groups = SafetensorsIndex.planShards(tensors, maxShardSize: maxShardSize) } else { groups = [tensors] }
        let (dir, base) = splitPath(path)
        let stem = base.hasSuffix(".safetensors") ? String(base.dropLast(".safetensors".count)) : base
        for (i, group) in groups.enumerated() {
            let name = groups.count == 1 ? base : SafetensorsIndex.shardName(stem: stem, index: i + 1, count: groups.count)
            let full = (dir.isEmpty ? "" : dir + "/") + name
            var shardMetadata = metadata
            if (groups.count > 1 || isShard) && shardMetadata?["format"] == nil {
                shardMetadata = shardMetadata ?? JSONObject()
                shardMetadata!["format"] = .string("pt")
            }
            let layout = SafetensorsLayout(tensors: group, metadata: shardMetadata)
            let out = try AtomicOutput(path: full, overwrite: overwrite)
            // Spooled data is copied in at the end by the spool, through the page cache.
            let direct = DirectFileWriter.forOutput(path: out.temporaryPath, buffered: out.descriptor, size: layout.fileSize,
                                                    enabled: directIO && spool == nil, threshold: directThreshold)
            files.append(OutputFile(name: name, output: out, layout: layout, direct: direct,
                                    dataLeft: layout.fileSize - layout.headerBytes.count))
            for (d, offset) in layout.placements { placement[d.name] = (i, offset) }
            try layout.headerBytes.withUnsafeBytes { try out.descriptor.pwriteAll($0, at: 0) }
            if ftruncate(out.descriptor.rawValue, off_t(layout.fileSize)) != 0 {
                throw IOError(.write, path: out.temporaryPath, errno: errno, detail: "reserving \(layout.fileSize) bytes")
            }
        }
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        current = d
        written = 0
        if let spool {
            cursor = (0, try spool.add(d, file: path))
        } else {
            try Spool.checkNext(d, at: received, of: manifest, file: path)
            guard let p = placement[d.name] else {
                throw StreamError(.manifestMismatch(detail: "tensor \(d) is not the manifest's next entry"), source: path, tensor: d.name)
            }
            cursor = p
        }
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        guard let d = current, written + chunk.count <= d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(current?.byteCount ?? 0), received: UInt64(written + chunk.count)),
                              source: path, tensor: current?.name)
        }
        if spool == nil, let direct = files[cursor.file].direct {
            try direct.write(chunk, at: cursor.offset + written)
            files[cursor.file].dataLeft -= chunk.count
            if files[cursor.file].dataLeft == 0 {
                try direct.finish()
                bytesWrittenDirectly += direct.bytesWrittenDirectly
                files[cursor.file].direct = nil
            }
        } else {
            let fd = spool?.output.descriptor ?? files[cursor.file].output.descriptor
            try fd.pwriteAll(chunk, at: cursor.offset + written)
        }
        written += chunk.count
    }

    public func nextFileRegion() -> (descriptor: FileDescriptor, offset: Int)? {
        guard current != nil, spool != nil || files[cursor.file].direct == nil else { return nil }
        return (spool?.output.descriptor ?? files[cursor.file].output.descriptor, cursor.offset + written)
    }

    public func didWriteRegion(count: Int) throws {
        guard let d = current, written + count <= d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(current?.byteCount ?? 0), received: UInt64(written + count)),
                              source: path, tensor: current?.name)
        }
        written += count
    }

    public func endTensor() throws {
        guard let d = current, written == d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(current?.byteCount ?? 0), received: UInt64(written)),
                              source: path, tensor: current?.name)
        }
        received += 1
        current = nil
    }

    public func finish() throws {
        if let spool {
            try layOut(spool.tensors.map(\.descriptor))
            for (i, (d, _)) in spool.tensors.enumerated() {
                let (f, to) = placement[d.name]!
                try spool.copy(i, to: [(files[f].output.descriptor, to, d.byteCount)])
            }
            spool.remove()
            self.spool = nil
        } else {
            try Spool.checkComplete(received, of: manifest, file: path)
        }
        if files.count > 1 {
            // encoded() sorts the weight map's keys, as transformers writes it.
            let content = SafetensorsIndex(
                metadata: JSONObject([("total_size", .int(files.reduce(0) { $0 + $1.layout.placements.reduce(0) { $0 + $1.descriptor.byteCount } }))]),
                weightMap: files.flatMap { f in f.layout.placements.map { ($0.descriptor.name, f.name) } })
            let (dir, base) = splitPath(path)
            let out = try AtomicOutput(path: (dir.isEmpty ? "" : dir + "/") + base + ".index.json", overwrite: overwrite)
            index = out
            try content.encoded().withUnsafeBytes { try out.descriptor.writeAll($0) }
        }
        for f in files {
            try f.direct?.finish()
            bytesWrittenDirectly += f.direct?.bytesWrittenDirectly ?? 0
        }
        for f in files { try f.output.commit() }
        try index?.commit()
    }

    public func abort() {
        spool?.remove()
        for i in files.indices { files[i].direct = nil }  // waits for a write in flight
        for f in files { f.output.abort() }
        index?.abort()
    }
}
