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

    /// What `ckpt-write` can produce so far.
    public static let writable: [CheckpointFormat] = [.safetensors, .torch, .npz, .npy, .msgpack, .orbax, .ckpts]

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
        let fd = try FileDescriptor.openForReading(path)
        defer { fd.close() }
        var head = [UInt8](repeating: 0, count: 16)
        let n = try head.withUnsafeMutableBytes { try fd.readFully(into: $0) }
        if n >= 8 && Array(head[0..<8]) == StreamFormat.magic { return .ckpts }
        if n >= 6 && Array(head[0..<6]) == NpyHeader.magic { return .npy }
        if n >= 14 && Array(head[0..<14]) == TorchReader.legacyMagic { return .torch }
        if n >= 4 && head[0..<4] == [0x50, 0x4B, 0x03, 0x04] {
            // torch.save archives hold <prefix>/data.pkl; numpy's hold *.npy members.
            let size = try fd.regularFileSize() ?? 0
            let zip = try ZipArchive(try MappedFile(try FileDescriptor.openForReading(path), size: size))
            return zip.entries.contains(where: { $0.name.hasSuffix("/data.pkl") }) ? .torch : .npz
        }
        // safetensors: a u64 header length, then JSON starting with "{". A msgpack map starts
        // with 0x80-0x8F, 0xDE or 0xDF, which can also be a safetensors length's first byte.
        if n >= 9 {
            var length: UInt64 = 0
            for i in (0..<8).reversed() { length = length << 8 | UInt64(head[i]) }
            let size = try fd.regularFileSize() ?? 0
            if length <= UInt64(max(size - 8, 0)) && head[8] == UInt8(ascii: "{") { return .safetensors }
        }
        if n >= 1 && ((0x80...0x8F).contains(head[0]) || head[0] == 0xDE || head[0] == 0xDF) { return .msgpack }
        return .safetensors
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
    switch try CheckpointFormat.detect(path) {
    case .ckpts: return SelectedSource(try openStreamInput(path), selection: options.selection)
    case .safetensors: return try SafetensorsReader.open(path: path, selection: options.selection, producer: producer)
    case .torch: return try TorchReader.openAny(path: path, selection: options.selection, options: options.torch, producer: producer)
    case .npy, .npz: return try NumPyReader.open(path: path, selection: options.selection, hints: options.hints, producer: producer)
    case .msgpack: return try FlaxMsgpackReader.open(path: path, selection: options.selection, producer: producer)
    case .orbax: return try OrbaxReader.open(path: path, selection: options.selection, options: options.orbax, producer: producer)
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
