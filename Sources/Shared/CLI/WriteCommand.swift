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

            Partitioned (N pipelines, on one host or many; K from 0 to N-1):
              ckpt-read --part K/N big.safetensors | ckpt-write --part K/N out/
                  (for each K, anywhere, in any order)
              ckpt-write --finalize out/      (when all are done: checks them, writes the index)
            --part writes out/model-{K+1}-of-{N}.safetensors (or, with --format orbax, the part's \
            array folders) and a record in out/.ckpt-parts/; running a part again replaces its own \
            files. --finalize refuses (exit 75) while a part has no record, and (exit 65) parts \
            of different inputs or damaged files; only then does out/ get its index (or Orbax's \
            _METADATA), so a half-written checkpoint never looks complete.
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

    @Option(help: ArgumentHelp("Write part K of N (K from 0) into the folder OUT: one safetensors shard, or Orbax array folders, and a part record; the stream is ckpt-read --part K/N's.", valueName: "K/N"))
    public var part: String?

    @Flag(help: "Check that every part of the folder OUT is written, from one input, and write its index (Orbax: _METADATA); reads no stream.")
    public var finalize = false

    @Flag(help: "Replace existing output files (with --part: remove a finished checkpoint's index or _METADATA from the folder first).")
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
        if let part, PartSpec(argument: part) == nil { throw ValidationError(PartSpec.problem(part)) }
        if part != nil || finalize {
            let what = finalize ? "--finalize" : "--part"
            if part != nil && finalize { throw ValidationError("--part writes one part and --finalize ties them together: give one of them") }
            if let format, format != "safetensors" && format != "orbax" {
                throw ValidationError("\(what) writes safetensors shards or Orbax arrays, not \(format) (whose files cannot be written in parts)")
            }
            if out == "-" || out.hasSuffix(".safetensors") {
                throw ValidationError("\(what) takes the output folder (model-*-of-*.safetensors and the index go in it), not '\(out)'")
            }
            if maxShardSize != nil {
                throw ValidationError("--max-shard-size does not combine with \(what): each part is one shard (choose N for the shard size)")
            }
            if finalize && input != "-" { throw ValidationError("--finalize reads no stream (--input)") }
            if nest != nil && format != "orbax" || like != nil || !keep.isEmpty || !zeros.isEmpty || msgpackChunk != nil {
                throw ValidationError("\(what): --nest (orbax only), --like, --keep, --zeros and --msgpack-chunk do not apply")
            }
        }
    }

    /// `--part K/N`: this part's shard or arrays, then its record.
    func runPart(_ spec: PartSpec) throws {
        let fmt: CheckpointFormat = format == "orbax" ? .orbax : .safetensors
        let quiet = progressOptions.quiet
        let log: (String) -> Void = { if !quiet { Tool.note("ckpt-write", $0) } }
        let source = try openStreamInput(input)
        // The stream's own part first: a mismatched command makes no folder.
        if let p = source.header.extensions[PartHeader.key].flatMap(PartHeader.init(json:)), p.index != spec.index || p.count != spec.count {
            throw PartsError(.streamIsAnotherPart(stream: PartSpec(index: p.index, count: p.count), given: spec), folder: out)
        }
        try PartRecords.prepare(folder: out, format: fmt, force: force)
        let sink: PartSink
        if fmt == .orbax {
            sink = PartSink.orbax(folder: out, spec: spec, separator: sep, nest: nest, maxChunkBytes: orbaxChunk.flatMap(parseByteSize) ?? (2 << 30),
                                  directIO: !bufferedIO, log: log)
        } else {
            sink = PartSink.safetensors(folder: out, spec: spec, directIO: !bufferedIO, log: log)
        }
        let totals = try pump(from: source, to: sink, progress: progressOptions.makeProgress(label: "ckpt-write"))
        log("part \(spec): \(totals.tensors) tensors, \(formatBytes(totals.bytes)) written; ckpt-write --finalize \(out) when every part is done")
    }

    /// `--finalize`: the index (or `_METADATA`) from the part records.
    func runFinalize() throws {
        let quiet = progressOptions.quiet
        guard let s = try PartFinalizer.finalize(folder: out, format: format.flatMap(CheckpointFormat.init(rawValue:)), force: force) else {
            if !quiet { Tool.note("ckpt-write", "\(out) is finalized already (no part records; its index or _METADATA is there)") }
            return
        }
        if !quiet {
            Tool.note("ckpt-write", "\(out): \(s.parts) parts, \(s.tensors) tensors, \(formatBytes(s.bytes)); wrote \(s.written.joined(separator: ", "))")
        }
        if !quiet && !s.strays.isEmpty {
            Tool.note("ckpt-write", "warning: \(s.strays.joined(separator: ", ")) in \(out) \(s.strays.count == 1 ? "is" : "are") not in the index (no part wrote \(s.strays.count == 1 ? "it" : "them"): an earlier run's?)")
        }
    }

    public func run() throws {
        try Tool.run("ckpt-write") {
            if let spec = part.flatMap(PartSpec.init(argument:)) { return try runPart(spec) }
            if finalize { return try runFinalize() }
            var path = out
            let isDir = format != "orbax" && format != "eqx" && isDirectory(path)
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
            if !quiet, let p = source.header.extensions[PartHeader.key].flatMap(PartHeader.init(json:)) {
                Tool.note("ckpt-write", "warning: the stream is part \(p.index)/\(p.count) of its input (ckpt-read --part): the output holds that part only; ckpt-write --part \(p.index)/\(p.count) DIR writes it as a shard")
            }
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
