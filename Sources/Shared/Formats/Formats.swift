import Glibc

/// The checkpoint formats the tools read and write, and how to recognise them.
public enum CheckpointFormat: String, CaseIterable, Sendable {
    /// A saved ckpt stream (what `tee` or `-o x.ckpts` leaves on disk).
    case ckpts
    case safetensors
    /// torch.save files (.pt, .pth, .bin): zip or legacy.
    case torch
    case npy
    case npz
    /// Flax's msgpack serialization (`flax.serialization.to_bytes`).
    case msgpack
    /// An Orbax PyTree checkpoint folder.
    case orbax
    /// Equinox's `tree_serialise_leaves` (`weights.eqx`, written against a template model).
    case eqx

    /// What `ckpt-write` can produce (every format but eqx is also read).
    public static let writable: [CheckpointFormat] = [.safetensors, .torch, .npz, .npy, .msgpack, .orbax, .eqx, .ckpts]

    /// Guesses the format of an output path from its name.
    public static func forOutput(_ path: String) -> CheckpointFormat? {
        if path.hasSuffix(".safetensors") { return .safetensors }
        if path.hasSuffix(".ckpts") { return .ckpts }
        if path.hasSuffix(".pt") || path.hasSuffix(".pth") || path.hasSuffix(".bin") { return .torch }
        if path.hasSuffix(".npy") { return .npy }
        if path.hasSuffix(".npz") { return .npz }
        if path.hasSuffix(".msgpack") { return .msgpack }
        return nil
    }

    /// Recognises an input by its content (magic bytes), or a folder or index by what it names.
    public static func detect(_ path: String) throws -> CheckpointFormat {
        if RemoteLocation.isRemote(path) { return try locateRemote(path).format }
        var st = stat()
        guard stat(path, &st) == 0 else { throw IOError(.open, path: path, errno: errno) }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            if OrbaxReader.recognises(path) { return .orbax }
            let names = try listDirectory(path)
            if names.contains("manifest.ocdbt") || names.contains("_CHECKPOINT_METADATA") { return .orbax }
            if names.contains(where: { $0.hasSuffix(".safetensors") || $0.hasSuffix(".safetensors.index.json") }) { return .safetensors }
            if names.contains(where: { $0.hasSuffix(".bin.index.json") || $0.hasSuffix(".bin") || $0.hasSuffix(".pt") || $0.hasSuffix(".pth") }) {
                return .torch
            }
            return .safetensors
        }
        if path.hasSuffix(".json") {
            let idx = try SafetensorsIndex.parse(try readWholeFile(path, limit: 1 << 30), file: path)
            return idx.weightMap.allSatisfy({ $0.file.hasSuffix(".safetensors") }) ? .safetensors : .torch
        }
        return try detectFile(path)
    }

    /// What a URL holds, and the URL to give its reader. A URL names a file, recognised by
    /// its content like a local one, or a folder (a Hub repo, a bucket prefix), which cannot be
    /// listed: a folder is what answers 404 itself, and holds the files formats name (Orbax's
    /// metadata, transformers' index or single file), looked for in that order; the reader then
    /// gets that file (an Orbax checkpoint, the folder).
    static func locateRemote(_ path: String) throws -> (format: CheckpointFormat, path: String) {
        let location = try RemoteLocation(path)
        if location.name.hasSuffix(".json") {
            let idx = try SafetensorsIndex.parse(try readWholeFile(path, limit: 1 << 30), file: path)
            return (idx.weightMap.allSatisfy({ $0.file.hasSuffix(".safetensors") }) ? .safetensors : .torch, path)
        }
        if !path.hasSuffix("/"), let object = try RemoteObject.openIfPresent(location) {
            return (try detect(MappedFile(remote: object), path: path), path)
        }
        let probes: [(String, CheckpointFormat)] = [
            ("_METADATA", .orbax), ("params/_METADATA", .orbax), ("default/_METADATA", .orbax), ("_CHECKPOINT_METADATA", .orbax),
            ("model.safetensors.index.json", .safetensors), ("model.safetensors", .safetensors),
            ("pytorch_model.bin.index.json", .torch), ("pytorch_model.bin", .torch),
        ]
        for (name, format) in probes where try RemoteObject.openIfPresent(location.appending(name)) != nil {
            return (format, format == .orbax ? location.text : location.appending(name).text)
        }
        throw RemoteError(.notFound, url: location.display + " (neither a file nor a folder holding " + probes.map(\.0).joined(separator: ", ")
                                       + "; an Orbax CheckpointManager root cannot be listed: give --step N)")
    }

    /// A file's format from its structure, each test one that no other format can pass (a
    /// first byte alone can: 0x80 opens a msgpack map and a protocol-2+ pickle; a safetensors
    /// length can start with any byte).
    static func detectFile(_ path: String) throws -> CheckpointFormat {
        guard let file = try MappedFile.open(path) else { throw FormatDetectionError(file: path, reason: .notARegularFile) }
        return try detect(file, path: path)
    }

    static func detect(_ file: MappedFile, path: String) throws -> CheckpointFormat {
        let size = file.size
        guard size > 0 else { throw FormatDetectionError(file: path, reason: .empty) }
        let head = try file.bytes(at: 0, count: min(size, TorchReader.legacyMagicPrefix))
        if head.starts(with: StreamFormat.magic) { return .ckpts }
        if head.starts(with: NpyHeader.magic) { return .npy }
        if head.starts(with: [0x50, 0x4B, 0x03, 0x04]) || head.starts(with: [0x50, 0x4B, 0x05, 0x06]) {
            // torch.save archives hold <prefix>/data.pkl; numpy's hold *.npy members.
            let zip = try ZipArchive(file)
            if zip.entries.contains(where: { $0.name.hasSuffix("/data.pkl") }) { return .torch }
            if zip.entries.allSatisfy({ $0.name.hasSuffix(".npy") }) { return .npz }
            throw FormatDetectionError(file: path, reason: .unknownZip)
        }
        if TorchReader.startsWithLegacyMagic(head) { return .torch }
        if size > 262, try file.bytes(at: 257, count: 5).elementsEqual(Array("ustar".utf8)) { return .torch }  // tar-era torch, refused by its reader
        // safetensors: a u64 header length, then that many bytes of a JSON object (padded with spaces).
        if size >= 10 {
            let length = try ByteCursor(unsafeBytes: head).getInteger(at: 0, endianness: .little, as: UInt64.self)
            if length >= 2, length <= UInt64(size - 8), head[8] == UInt8(ascii: "{") {
                let last = try file.bytes(at: 8 + Int(length) - 1, count: 1)[0]
                if last == UInt8(ascii: "}") || last == UInt8(ascii: " ") { return .safetensors }
            }
        }
        // Flax msgpack: one map that ends exactly where the file does.
        if (0x80...0x8F).contains(head[0]) || head[0] == 0xDE || head[0] == 0xDF {
            // Skipping the map reads all of it: not over a network.
            if file.isRemote { throw RemoteError(.unsupported(detail: "Flax msgpack is read whole, not by position: download it first"), url: path) }
            var cursor = MsgpackCursor(try ByteCursor(file), file: path)
            if (try? cursor.skip()) != nil, cursor.position == size { return .msgpack }
        }
        // Nothing matched: a file named for a format goes to that format's reader, whose error
        // says what is wrong with it (a safetensors header too large, say).
        if let named = forOutput(path) { return named }
        throw FormatDetectionError(file: path, reason: .unrecognised)
    }
}

/// An input whose format could not be told.
public struct FormatDetectionError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case notARegularFile
        case empty
        /// A zip archive that is neither a torch.save archive nor an `.npz`.
        case unknownZip
        /// No format's structure matched.
        case unrecognised
    }
    public var file: String
    public var reason: Reason
    public var exitStatus: SysExit { .dataError }

    /// What detection tries, in order, for the message.
    static let tried = "ckpt stream, NumPy .npy, zip (torch.save or .npz), legacy torch pickle, safetensors, Flax msgpack"

    public var description: String {
        switch reason {
        case .notARegularFile: return "\(file): not a regular file or folder"
        case .empty: return "\(file): the file is empty"
        case .unknownZip: return "\(file): a zip archive with no data.pkl (torch.save) and not only .npy members (.npz)"
        case .unrecognised: return "\(file): not a checkpoint format ckpt reads (tried: \(FormatDetectionError.tried))"
        }
    }
}

/// How to read: which tensors, and the format-specific choices.
public struct ReadOptions: Sendable {
    public var selection = TensorSelection.all
    public var torch = TorchReader.Options()
    public var hints = DTypeHints()
    public var orbax = OrbaxReader.Options()
    public init() {}
}

/// Opens any readable checkpoint as a tensor source.
public func openSource(_ path: String, options: ReadOptions, producer: String) throws -> TensorSource {
    if path == "-" {
        return SelectedSource(try openStreamInput("-"), selection: options.selection)
    }
    var path = path
    let format: CheckpointFormat
    if RemoteLocation.isRemote(path) {
        // --step names a step of an Orbax manager root, which a URL cannot list.
        (format, path) = options.orbax.step != nil ? (.orbax, path) : try CheckpointFormat.locateRemote(path)
        switch format {
        case .safetensors, .torch, .npy, .npz, .orbax: break
        case .ckpts: throw RemoteError(.unsupported(detail: "a saved ckpt stream is read from a pipe: curl -sf URL | ckpt-read -"), url: path)
        case .msgpack, .eqx: throw RemoteError(.unsupported(detail: "\(format.rawValue) is read whole, not by position: download it first"), url: path)
        }
    } else {
        format = try CheckpointFormat.detect(path)
    }
    switch format {
    case .ckpts: return SelectedSource(try openStreamInput(path), selection: options.selection)
    case .safetensors: return try SafetensorsReader.open(path: path, selection: options.selection, producer: producer)
    case .torch: return try TorchReader.openAny(path: path, selection: options.selection, options: options.torch, producer: producer)
    case .npy, .npz: return try NumPyReader.open(path: path, selection: options.selection, hints: options.hints, producer: producer)
    case .msgpack: return try FlaxMsgpackReader.open(path: path, selection: options.selection, producer: producer)
    case .orbax: return try OrbaxReader.open(path: path, selection: options.selection, options: options.orbax, producer: producer)
    case .eqx: throw NotImplementedError("reading weights.eqx (its leaves have no names)")
    }
}

/// Applies `--only/--exclude` to a source that cannot skip data itself (a stream): the
/// data of unselected tensors is read and discarded.
public final class SelectedSource: TensorSource {
    private let inner: TensorSource
    private let selection: TensorSelection
    public let header: StreamHeader
    public let manifest: [TensorDescriptor]?

    public init(_ inner: TensorSource, selection: TensorSelection) {
        self.inner = inner
        self.selection = selection
        header = inner.header
        manifest = inner.manifest?.filter { selection.includes($0.name) }
    }

    public func nextTensor() throws -> TensorHeader? {
        while let t = try inner.nextTensor() {
            if selection.includes(t.descriptor.name) { return t }
            while try inner.nextChunk() != nil {}
        }
        return nil
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? { try inner.nextChunk() }
}
