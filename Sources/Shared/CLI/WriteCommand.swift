import ArgumentParser
import Glibc

/// `ckpt-write`: ckpt stream on stdin → a checkpoint file (or shards).
public struct WriteCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ckpt-write",
        abstract: "Read a ckpt stream on stdin and write it as a checkpoint.",
        discussion: """
            The format is taken from --format, else from OUT's extension (.safetensors, .pt/.pth/.bin, \
            .npz, .npy, .msgpack, .ckpts; Orbax folders need --format orbax). \
            If OUT is a folder, the file is OUT/model.safetensors. The output appears only when \
            the whole stream was read and checked; a failed run leaves nothing behind.

            Examples:
              ckpt-read a.safetensors | ckpt-write b.safetensors
              ckpt-read big.safetensors | ckpt-write --max-shard-size 5GB out/model.safetensors
            """,
        version: Tool.version)

    @Argument(help: "The file to write (or a folder for model.safetensors).")
    public var out: String

    @Option(help: ArgumentHelp("Output format: \(CheckpointFormat.writable.map(\.rawValue).joined(separator: ", ")).", valueName: "format"))
    public var format: String?

    @Option(help: ArgumentHelp("Split into Hugging Face shards of at most SIZE (e.g. 5GB, 2GiB).", valueName: "size"))
    public var maxShardSize: String?

    @Option(help: ArgumentHelp("Read the stream from FILE instead of stdin.", valueName: "file"))
    public var input: String = "-"

    @Option(help: ArgumentHelp("torch, orbax, msgpack: nest the tensors under this key, e.g. model → {\"model\": {...}} (openpi's Orbax params: --nest params).", valueName: "key"))
    public var nest: String?

    @Option(help: ArgumentHelp("msgpack, orbax: split tensor names into nested keys on this separator.", valueName: "sep"))
    public var sep: String = "/"

    @Option(help: ArgumentHelp("msgpack: chunk arrays larger than this, as flax does (default 1GiB, flax's MAX_CHUNK_SIZE).", valueName: "size"))
    public var msgpackChunk: String?

    @Option(help: ArgumentHelp("orbax: cut arrays larger than this into chunks along axis 0 (default 2GiB).", valueName: "size"))
    public var orbaxChunk: String?

    @Flag(help: ArgumentHelp("safetensors, orbax: write through the page cache. By default files of 64 MiB and more bypass it (O_DIRECT) where the file system allows."))
    public var bufferedIO = false

    @Option(help: ArgumentHelp("eqx: the template folder (weights.eqx and leaves.json of the target model) that gives the leaves' order, shapes and non-array values.", valueName: "dir"))
    public var like: String?

    @Option(help: ArgumentHelp("eqx: copy array leaves matching GLOB from the template (buffers the source does not store; repeatable).", valueName: "glob"))
    public var keep: [String] = []

    @Option(help: ArgumentHelp("eqx: write array leaves matching GLOB as zeros (parts the source model does not have; repeatable).", valueName: "glob"))
    public var zeros: [String] = []

    @Flag(help: "Replace existing output files.")
    public var force = false

    @OptionGroup public var progressOptions: ProgressOptions

    public init() {}

    public func validate() throws {
        if let format, CheckpointFormat(rawValue: format) == nil {
            throw ValidationError("unknown --format '\(format)'; known: \(CheckpointFormat.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let maxShardSize, (parseByteSize(maxShardSize) ?? 0) <= 0 {
            throw ValidationError("--max-shard-size takes a size such as 5GB or 500MiB, not '\(maxShardSize)'")
        }
    }

    public func run() throws {
        try Tool.run("ckpt-write") {
            var path = out
            var isDir = false
            var st = stat()
            if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR && format != "orbax" && format != "eqx" { isDir = true }
            let fmt: CheckpointFormat
            if let format { fmt = CheckpointFormat(rawValue: format)! } else if isDir { fmt = .safetensors } else {
                guard let f = CheckpointFormat.forOutput(path) else {
                    throw UsageError("cannot tell the format of '\(out)' from its name: give --format")
                }
                fmt = f
            }
            if isDir { path += "/model.safetensors" }
            guard CheckpointFormat.writable.contains(fmt) else {
                throw NotImplementedError("writing \(fmt.rawValue)")
            }
            if nest != nil && ![.torch, .orbax, .msgpack].contains(fmt) { throw UsageError("--nest applies to torch, orbax and msgpack output") }
            if path == "-" && fmt != .ckpts {
                throw UsageError("\(fmt.rawValue) output needs a file: it cannot be written to stdout")
            }
            if fmt == .eqx && like == nil { throw UsageError("eqx output needs --like TEMPLATE_DIR (weights.eqx and leaves.json of the target model)") }
            if fmt != .eqx && (like != nil || !keep.isEmpty || !zeros.isEmpty) { throw UsageError("--like, --keep and --zeros apply to eqx output") }
            if maxShardSize != nil && fmt != .safetensors {
                throw UsageError("--max-shard-size applies to safetensors output only")
            }
            if path != "-" { try MissingOutputFolderError.check(output: fmt == .orbax || fmt == .eqx ? out : path) }
            let source = try openStreamInput(input)
            let quiet = progressOptions.quiet
            let sink: TensorSink
            switch fmt {
            case .safetensors:
                sink = SafetensorsWriter(path: path, maxShardSize: maxShardSize.flatMap(parseByteSize), overwrite: force,
                                         directIO: !bufferedIO, log: { if !quiet { Tool.note("ckpt-write", $0) } })
            case .torch:
                sink = TorchWriter(path: path, nest: nest, overwrite: force)
            case .npy, .npz:
                sink = NumPyWriter(path: path, single: fmt == .npy, overwrite: force)
            case .orbax:
                sink = OrbaxWriter(path: out, separator: sep, nest: nest, maxChunkBytes: orbaxChunk.flatMap(parseByteSize) ?? (2 << 30), overwrite: force,
                                   directIO: !bufferedIO)
            case .msgpack:
                sink = FlaxMsgpackWriter(path: path, separator: sep, nest: nest, maxChunkSize: msgpackChunk.flatMap(parseByteSize) ?? FlaxMsgpack.maxChunkSize,
                                         overwrite: force, log: { if !quiet { Tool.note("ckpt-write", $0) } })
            case .eqx:
                guard let like else { throw UsageError("eqx output needs --like TEMPLATE_DIR") }
                sink = EqxWriter(folder: out, template: try EqxTemplate(folder: like), keep: keep, zeros: zeros, overwrite: force,
                                 log: { if !quiet { Tool.note("ckpt-write", $0) } })
            case .ckpts:
                // (Not through a StreamOutputOptions made here: property wrappers of an
                // unparsed ParsableArguments cannot be read.)
                sink = try StreamOutputOptions.makeWriter(output: path, compression: .none, force: force, producer: source.header.producer)
            }
            try pump(from: source, to: sink, progress: progressOptions.makeProgress(label: "ckpt-write"))
        }
    }
}
