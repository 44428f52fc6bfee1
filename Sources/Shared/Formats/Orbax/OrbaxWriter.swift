import Glibc

/// Writes an Orbax PyTree checkpoint (`--format orbax`) in the simplest layout orbax restores
/// (found by experiment, restored by orbax in the tests; docs/formats.md): no OCDBT, one zarr v2 folder per array named by
/// its param name (`'.'.join(keys)`), `.zarray` with no compressor, the raw row-major bytes as
/// chunk files; `_METADATA` with every leaf's key path, and `_sharding` (single-device) so that
/// `PyTreeCheckpointer().restore(dir)` works without arguments as well as
/// `StandardCheckpointer().restore(dir)`.
///
/// Arrays up to 2 GiB are one chunk; larger ones are cut along the first axis (as orbax keeps
/// chunks under 2 GiB), each chunk a contiguous slice of the stream, so every tensor streams
/// straight to its files. The folder is built under a temporary name and renamed into place.
/// Chunk files of `directThreshold` and more bypass the page cache (`DirectFileWriter`, as
/// safetensors output does).
public final class OrbaxWriter: TensorSink {
    public let path: String
    public let separator: String
    /// A top-level key every name goes under (`--nest params`: openpi's `{"params": ...}`).
    public let nest: String?
    public let overwrite: Bool
    /// Arrays larger than this are cut into chunks along axis 0 (orbax keeps chunks under 2 GiB).
    public let maxChunkBytes: Int
    public let directIO: Bool
    public let directThreshold: Int

    /// Part mode (`ckpt-write --format orbax --part`): the array folders are moved into this
    /// folder on success, beside other parts' arrays, and no `_METADATA` is written (that is
    /// `--finalize`'s). `path` is then only where the temporary folder is made.
    public var arraysInto: String?

    private var temporary: String?
    /// Every array written: its key path, param name (its folder) and shape.
    public private(set) var leaves: [(keys: [String], param: String, shape: [Int])] = []
    private var params = Set<String>()
    /// The chunk file being written.
    private struct ChunkFile {
        var fd: FileDescriptor?
        var direct: DirectFileWriter?
        var chunk: Int
        var written: Int
        let chunkBytes: Int
        let dir: String
        let key: (Int) -> String

        /// Flushes a direct writer, then closes the file; returns the bytes written directly.
        mutating func close() throws -> Int {
            defer {
                direct = nil
                fd?.close()
                fd = nil
            }
            try direct?.finish()
            return direct?.bytesWrittenDirectly ?? 0
        }
    }
    private var current: ChunkFile?
    /// Bytes written around the page cache (O_DIRECT), summed over closed chunk files.
    public private(set) var bytesWrittenDirectly = 0
    private var tensorWritten = 0
    private var descriptor: TensorDescriptor?
    /// Everything created under the temporary folder, registered so a signal removes it too.
    private var registered: [Int] = []

    /// Registers `p` before it is made: a signal between making and registering would
    /// otherwise leave it behind.
    private func willCreate(_ p: String, folder: Bool = false) {
        TemporaryFiles.installSignalHandlers()
        registered.append(TemporaryFiles.register(p, folder: folder))
    }

    private func forgetRegistered() {
        for slot in registered { TemporaryFiles.unregister(slot) }
        registered = []
    }

    public init(path: String, separator: String = "/", nest: String? = nil, maxChunkBytes: Int = 2 << 30, overwrite: Bool,
                directIO: Bool = true, directThreshold: Int = DirectFileWriter.defaultThreshold) {
        self.path = path
        self.separator = separator
        self.nest = nest
        self.maxChunkBytes = maxChunkBytes
        self.overwrite = overwrite
        self.directIO = directIO
        self.directThreshold = directThreshold
    }

    static let dtypes: [DType: String] = [
        .bool: "|b1", .i8: "|i1", .u8: "|u1", .i16: "<i2", .u16: "<u2", .i32: "<i4", .u32: "<u4", .i64: "<i8", .u64: "<u8",
        .f16: "<f2", .f32: "<f4", .f64: "<f8", .c64: "<c8", .bf16: "bfloat16", .f8e4m3: "float8_e4m3fn", .f8e5m2: "float8_e5m2",
    ]

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        var st = stat()
        if arraysInto == nil && stat(path, &st) == 0 && !overwrite { throw OutputExistsError(path: path) }
        let (dir, base) = splitPath(path)
        let tmp = (dir.isEmpty ? "" : dir + "/") + ".\(base).ckpt-\(getpid()).tmp"
        try removeTree(tmp)
        willCreate(tmp, folder: true)
        guard mkdir(tmp, 0o755) == 0 else { throw IOError(.mkdir, path: tmp, errno: errno) }
        temporary = tmp
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        guard let zdtype = OrbaxWriter.dtypes[d.dtype] else {
            throw OrbaxError(.noZarrDType(dtype: d.dtype.rawValue), file: path, tensor: d.name)
        }
        let keys = (nest.map { [$0] } ?? []) + (separator.isEmpty ? [d.name] : d.name.components(separatedBy: separator))
        guard !keys.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." || $0.contains("/") && separator != "/" }) else {
            throw OrbaxError(.reservedKey, file: path, tensor: d.name)
        }
        let param = keys.joined(separator: ".")
        guard params.insert(param).inserted else {
            throw OrbaxError(.paramNameClash(param: param), file: path, tensor: d.name)
        }
        leaves.append((keys, param, d.shape))
        descriptor = d
        tensorWritten = 0

        // Chunks: the whole array, or slices along axis 0 of at most 2 GiB.
        var chunks = d.shape.map { max($0, 1) }
        var chunkBytes = d.byteCount
        if d.byteCount > maxChunkBytes, let rows = d.shape.first, rows > 1 {
            let rowBytes = d.byteCount / rows
            let perChunk = max(1, maxChunkBytes / max(rowBytes, 1))
            chunks[0] = perChunk
            chunkBytes = perChunk * rowBytes
        }
        let dir = temporary! + "/" + param
        willCreate(dir, folder: true)
        guard mkdir(dir, 0o755) == 0 else { throw IOError(.mkdir, path: dir, errno: errno) }
        let zarray = JSONObject([
            ("chunks", .array(chunks.map { .int($0) })), ("compressor", .null), ("dimension_separator", .string(".")),
            ("dtype", .string(zdtype)), ("fill_value", .null), ("filters", .null), ("order", .string("C")),
            ("shape", .array(d.shape.map { .int($0) })), ("zarr_format", .int(2)),
        ])
        try writeFile(dir + "/.zarray", JSONWriter.compact(.object(zarray)))
        let rank = d.shape.count
        let key: (Int) -> String = { i in rank == 0 ? "0" : ([String(i)] + Array(repeating: "0", count: rank - 1)).joined(separator: ".") }
        current = ChunkFile(fd: nil, direct: nil, chunk: 0, written: 0, chunkBytes: chunkBytes, dir: dir, key: key)
        if d.byteCount > 0 { try openChunk() }
    }

    private func openChunk() throws {
        guard var c = current else { return }
        bytesWrittenDirectly += try c.close()
        let file = c.dir + "/" + c.key(c.chunk)
        willCreate(file)
        let fd = try FileDescriptor.createExclusive(file)
        c.fd = fd
        c.direct = DirectFileWriter.forOutput(path: file, buffered: fd, size: c.chunkBytes, enabled: directIO, threshold: directThreshold)
        c.written = 0
        current = c
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        guard let d = descriptor, tensorWritten + chunk.count <= d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(descriptor?.byteCount ?? 0), received: UInt64(tensorWritten + chunk.count)), source: path)
        }
        var done = 0
        while done < chunk.count {
            if current!.written == current!.chunkBytes {
                current!.chunk += 1
                try openChunk()
            }
            let n = min(chunk.count - done, current!.chunkBytes - current!.written)
            let piece = UnsafeRawBufferPointer(rebasing: chunk[done..<done + n])
            if let direct = current!.direct {
                try direct.write(piece, at: current!.written)
            } else {
                try current!.fd!.writeAll(piece)
            }
            current!.written += n
            done += n
        }
        tensorWritten += done
    }

    public func endTensor() throws {
        guard var c = current, let d = descriptor else { return }
        current = nil
        defer { _ = try? c.close() }
        try c.direct?.finish()
        bytesWrittenDirectly += c.direct?.bytesWrittenDirectly ?? 0
        // zarr edge chunks are full-size: pad the last one with zeros.
        if d.byteCount > 0 && c.written < c.chunkBytes {
            if ftruncate(c.fd!.rawValue, off_t(c.chunkBytes)) != 0 { throw IOError(.write, path: c.dir, errno: errno) }
        }
    }

    /// `_METADATA` and `_sharding` for these leaves, as orbax writes them.
    public static func metadataFiles(_ leaves: [(keys: [String], param: String, shape: [Int])]) -> (metadata: [UInt8], sharding: [UInt8]) {
        var tree = JSONObject()
        var sharding = JSONObject()
        for (keys, param, shape) in leaves {
            tree["(" + keys.map(OrbaxWriter.pythonRepr).joined(separator: ", ") + (keys.count == 1 ? ",)" : ")")] = .object(JSONObject([
                ("key_metadata", .array(keys.map { .object(JSONObject([("key", .string($0)), ("key_type", .int(2))])) })),
                ("value_metadata", .object(JSONObject([("value_type", .string("jax.Array")), ("skip_deserialize", .bool(false)),
                                                       ("write_shape", .array(shape.map { .int($0) }))]))),
            ]))
            sharding[base64URL(Array(param.utf8))] = .string("{\"sharding_type\": \"SingleDeviceSharding\", \"device_str\": \"cpu:0\"}")
        }
        let metadata = JSONObject([("tree_metadata", .object(tree)), ("use_ocdbt", .bool(false)), ("use_zarr3", .bool(false)),
                                   ("store_array_data_equal_to_fill_value", .bool(true)), ("custom_metadata", .null)])
        return (JSONWriter.compact(.object(metadata)), JSONWriter.compact(.object(sharding)))
    }

    public func finish() throws {
        guard let tmp = temporary else { return }
        if let into = arraysInto {
            // A part: each array folder into place, replacing one of the same name (this part's
            // own, from an earlier run of it: the partition is the same every run).
            for leaf in leaves {
                let target = into + "/" + leaf.param
                try removeTree(target)
                guard rename(tmp + "/" + leaf.param, target) == 0 else { throw IOError(.rename, path: target, errno: errno) }
            }
            guard rmdir(tmp) == 0 else { throw IOError(.unlink, path: tmp, errno: errno) }
            forgetRegistered()
            temporary = nil
            return
        }
        let (metadata, sharding) = OrbaxWriter.metadataFiles(leaves)
        try writeFile(tmp + "/_METADATA", metadata)
        try writeFile(tmp + "/_sharding", sharding)
        // Into place: an existing folder (with --force) is moved aside first, then removed.
        var st = stat()
        var old: String?
        if stat(path, &st) == 0 {
            old = tmp + ".old"
            guard rename(path, old!) == 0 else { throw IOError(.rename, path: path, errno: errno) }
        }
        guard rename(tmp, path) == 0 else { throw IOError(.rename, path: path, errno: errno) }
        forgetRegistered()
        temporary = nil
        if let old { try removeTree(old) }
    }

    public func abort() {
        _ = try? current?.close()  // waits for a direct write in flight before the files go
        current = nil
        if let tmp = temporary { try? removeTree(tmp) }
        forgetRegistered()
        temporary = nil
    }

    private func writeFile(_ p: String, _ bytes: [UInt8]) throws {
        willCreate(p)
        let fd = try FileDescriptor.createExclusive(p)
        defer { fd.close() }
        try bytes.withUnsafeBytes { try fd.writeAll($0) }
    }

    /// Python's repr of a str (how orbax spells tree_metadata keys).
    static func pythonRepr(_ s: String) -> String {
        let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
        var out = String(quote)
        for ch in s.unicodeScalars {
            switch ch {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if Character(ch) == quote { out += "\\" + String(quote) } else { out.unicodeScalars.append(ch) }
            }
        }
        return out + String(quote)
    }
}

/// base64 with the URL-safe alphabet and padding (Python's `base64.urlsafe_b64encode`).
func base64URL(_ bytes: [UInt8]) -> String {
    let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    var out = ""
    var i = 0
    while i < bytes.count {
        let b0 = Int(bytes[i]), b1 = i + 1 < bytes.count ? Int(bytes[i + 1]) : 0, b2 = i + 2 < bytes.count ? Int(bytes[i + 2]) : 0
        out.append(table[b0 >> 2])
        out.append(table[(b0 & 3) << 4 | b1 >> 4])
        out.append(i + 1 < bytes.count ? table[(b1 & 15) << 2 | b2 >> 6] : "=")
        out.append(i + 2 < bytes.count ? table[b2 & 63] : "=")
        i += 3
    }
    return out
}

/// Removes a folder we created, and everything in it (no symlinks are followed).
func removeTree(_ path: String) throws {
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    if (st.st_mode & S_IFMT) == S_IFDIR {
        for name in try listDirectory(path) { try removeTree(path + "/" + name) }
        guard rmdir(path) == 0 else { throw IOError(.unlink, path: path, errno: errno) }
    } else {
        guard unlink(path) == 0 else { throw IOError(.unlink, path: path, errno: errno) }
    }
}
