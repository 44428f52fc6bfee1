import Glibc

/// The checkpoint formats the tools read and write, and how to recognise them.
public enum CheckpointFormat: String, CaseIterable, Sendable {
    /// A saved ckpt stream (what `tee` or `-o x.ckpts` leaves on disk).
    case ckpts
    case safetensors

    /// Guesses the format of an output path from its name.
    public static func forOutput(_ path: String) -> CheckpointFormat? {
        if path.hasSuffix(".safetensors") { return .safetensors }
        if path.hasSuffix(".ckpts") { return .ckpts }
        return nil
    }

    /// Recognises an input by its content (magic bytes), or a folder by what it holds.
    public static func detect(_ path: String) throws -> CheckpointFormat {
        var st = stat()
        guard stat(path, &st) == 0 else { throw IOError(.open, path: path, errno: errno) }
        if (st.st_mode & S_IFMT) == S_IFDIR { return .safetensors }
        let fd = try FileDescriptor.openForReading(path)
        defer { fd.close() }
        var head = [UInt8](repeating: 0, count: 8)
        let n = try head.withUnsafeMutableBytes { try fd.readFully(into: $0) }
        if n == 8 && head == StreamFormat.magic { return .ckpts }
        return .safetensors
    }
}

/// Opens any readable checkpoint as a tensor source.
public func openSource(_ path: String, selection: TensorSelection, producer: String) throws -> TensorSource {
    if path == "-" {
        return SelectedSource(try openStreamInput("-"), selection: selection)
    }
    switch try CheckpointFormat.detect(path) {
    case .ckpts: return SelectedSource(try openStreamInput(path), selection: selection)
    case .safetensors: return try SafetensorsReader.open(path: path, selection: selection, producer: producer)
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
