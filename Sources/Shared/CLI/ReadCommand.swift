import ArgumentParser
import Glibc

/// `ckpt-read`: any checkpoint → ckpt stream on stdout (or a table with `--list`).
public struct ReadCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ckpt-read",
        abstract: "Read a checkpoint and write it as a ckpt stream on stdout.",
        discussion: """
            INPUT is a .safetensors file, a torch.save file (.pt/.pth/.bin, zip or legacy), a \
            NumPy .npy/.npz file, a sharded checkpoint (its *.index.json, or the folder holding \
            it), or a saved ckpt stream ('-' reads one from stdin). The format is recognised \
            from the content.

            Examples:
              ckpt-read model.safetensors | ckpt-write out.safetensors
              ckpt-read --list model.safetensors
              ckpt-read --only 'encoder.*' --compress zlib model.safetensors > enc.ckpts
              ckpt-read --part 0/3 model.safetensors | ckpt-write --part 0/3 out/
                  (and 1/3, 2/3, anywhere, in any order; then ckpt-write --finalize out/)

            --part K/N emits the K-th of N parts (K from 0, as $SLURM_ARRAY_TASK_ID with \
            --array=0-(N-1)): byte-balanced, never splitting a tensor, computed from the manifest \
            alone so that every part's process agrees. A LoRA base and its adapters stay in one \
            part; --group-rules keeps together the inputs a later ckpt-slice stacks.
            """,
        version: Tool.version)

    @Argument(help: "The checkpoint to read.")
    public var input: String

    @Flag(help: "Print a table of tensors (name, dtype, shape, bytes) without reading data.")
    public var list = false

    @Option(help: ArgumentHelp("Emit only tensors whose name matches GLOB (repeatable).", valueName: "glob"))
    public var only: [String] = []

    @Option(help: ArgumentHelp("Skip tensors whose name matches GLOB (repeatable).", valueName: "glob"))
    public var exclude: [String] = []

    @Option(help: ArgumentHelp("torch, orbax: emit only the sub-tree at this path (torch: dotted, e.g. model, state_dict; orbax: /, e.g. params), named from there.", valueName: "path"))
    public var root: String?

    @Flag(help: "torch: emit tensors that are the very same view of one storage once (aliases go to the header metadata).")
    public var dedupe = false

    @Option(help: ArgumentHelp("NumPy: what opaque <V2/<V1 arrays matching GLOB hold, e.g. '*=BF16' (repeatable).", valueName: "glob=dtype"))
    public var dtypeHint: [String] = []

    @Option(help: ArgumentHelp("Orbax: read this step of a CheckpointManager root (default: the latest).", valueName: "n"))
    public var step: Int?

    @Flag(inversion: .prefixedNo, help: "Orbax: drop a trailing /value from names (default: when every array leaf ends in value, as in openpi).")
    public var stripValue: Bool?

    @Option(help: ArgumentHelp("Orbax: decode the next array on another core while this one is written, holding at most SIZE of arrays (default 1GiB; 0: one array at a time).", valueName: "size"))
    public var readAhead: String?

    @Option(help: ArgumentHelp("Emit tensors whose name matches GLOB before the others, each group in input order (repeatable; file inputs). For a later lora-merge: --first '*lora*' sends adapters before their bases, so no base is held.", valueName: "glob"))
    public var first: [String] = []

    @Option(help: ArgumentHelp("Emit only the K-th of N byte-balanced parts of the tensors, K from 0 to N-1 (for N pipelines run apart; ckpt-write --part and --finalize put them together).", valueName: "K/N"))
    public var part: String?

    @Option(help: ArgumentHelp("With --part: keep in one part the inputs a later ckpt-slice --rules NAME|FILE combines (stacks, mul operands); a shipped set by name or a file (repeatable).", valueName: "name|file"))
    public var groupRules: [String] = []

    @Option(name: .customLong("set"), help: ArgumentHelp("With --group-rules: a value for ${NAME} in the rules (repeatable), as ckpt-slice --set.", valueName: "NAME=VALUE"))
    public var values: [String] = []

    @Flag(inversion: .prefixedNo, help: "With --part: keep a LoRA base and its adapters in one part, as lora-merge pairs them (PEFT and openpi names).")
    public var groupLora = true

    @OptionGroup public var stream: StreamOutputOptions
    @OptionGroup public var progressOptions: ProgressOptions

    public init() {}

    public func validate() throws {
        if let readAhead, parseByteSize(readAhead) == nil {
            throw ValidationError("--read-ahead takes a size such as 1GiB, 512MB or 0, not '\(readAhead)'")
        }
        if let part, PartSpec(argument: part) == nil { throw ValidationError(PartSpec.problem(part)) }
        if part == nil && (!groupRules.isEmpty || !values.isEmpty) {
            throw ValidationError("--group-rules and --set plan the groups of --part: give --part K/N")
        }
        _ = try SliceCommand.parseValues(values)
    }

    public func run() throws {
        try Tool.run("ckpt-read") {
            let producer = "ckpt-read \(Tool.release)"
            var options = ReadOptions()
            options.selection = TensorSelection(only: only, exclude: exclude)
            options.torch = TorchReader.Options(root: root, dedupe: dedupe)
            options.hints = try DTypeHints(arguments: dtypeHint)
            options.orbax = OrbaxReader.Options(step: step, stripValue: stripValue, root: root)
            if let size = readAhead.flatMap(parseByteSize) {
                options.orbax.readAhead = size == 0 ? .off : ReadAhead(budget: size, depth: 1)
            }
            var source = try openSource(input, options: options, producer: producer)
            try options.selection.requireSomeTensor(in: source, of: input)
            var partKey: PartHeader?
            if let spec = part.flatMap(PartSpec.init(argument:)) {
                (source, partKey) = try openPart(spec, of: source, options: options, producer: producer)
            }
            if !first.isEmpty {
                guard let planned = source as? PlannedSource else {
                    throw UsageError("--first reorders a file's tensors; a stream is read in the order it was written")
                }
                source = planned.reordered(first: first)
            }
            if list {
                guard let manifest = source.manifest else {
                    throw UsageError("--list needs a manifest, and this stream has none")
                }
                print(TensorTable.render(manifest), terminator: "")
                return
            }
            let writer = try stream.makeWriter(producer: producer)
            if let partKey { writer.headerExtensions[PartHeader.key] = partKey.json }
            try pump(from: source, to: writer, progress: progressOptions.makeProgress(label: "ckpt-read"))
        }
    }

    /// Plans the partition on `whole`'s manifest and returns the source of part `spec` with its
    /// header key. The input is opened again selecting the part's tensors by name, so a reader
    /// skips the others without reading their data (a stream on stdin cannot be reopened: its
    /// other tensors are read and dropped).
    func openPart(_ spec: PartSpec, of whole: TensorSource, options: ReadOptions, producer: String) throws -> (TensorSource, PartHeader) {
        guard let manifest = whole.manifest else {
            throw UsageError("--part plans from the input's manifest, and this stream has none (ckpt-read writes one)")
        }
        var groups = TensorGroups(count: manifest.count)
        let names = groupLora ? PartitionGrouping.lora(manifest, into: &groups) : nil
        if !groupRules.isEmpty {
            let given = try SliceCommand.parseValues(values)
            var rules: [SliceRule] = []
            for name in groupRules { rules += try SliceRuleParser.parse(file: try RuleLibrary.resolve(name), values: given) }
            try PartitionGrouping.rules(rules, manifest: manifest, names: names, into: &groups)
        }
        let partition = Partition(manifest, groups: groups, count: spec.count)
        let mine = partition.tensors(in: spec.index, of: manifest)
        let key = PartHeader(index: spec.index, count: spec.count, input: Partition.manifestDigest(manifest), plan: partition.digest, tensors: mine.count)
        if !progressOptions.quiet {
            let total = partition.bytes.reduce(0, +)
            Tool.note("ckpt-read", "part \(spec): \(mine.count) of \(manifest.count) tensors, \(formatBytes(partition.bytes[spec.index])) of \(formatBytes(total))"
                      + " (parts \(formatBytes(partition.bytes.min()!))..\(formatBytes(partition.bytes.max()!)))")
        }
        var selected = options
        selected.selection.names = Set(mine.map(\.name))
        if input == "-" { return (SelectedSource(whole, selection: selected.selection), key) }
        return (try openSource(input, options: selected, producer: producer), key)
    }
}

/// The `--list` table: one row per tensor, then a totals line.
public enum TensorTable {
    public static func render(_ tensors: [TensorDescriptor]) -> String {
        let shapes = tensors.map { "[" + $0.shape.map(String.init).joined(separator: ",") + "]" }
        let nameWidth = max(4, tensors.map(\.name.count).max() ?? 0)
        let shapeWidth = max(5, shapes.map(\.count).max() ?? 0)
        func pad(_ s: String, _ w: Int) -> String { s + String(repeating: " ", count: max(0, w - s.count)) }
        var out = pad("name", nameWidth) + "  " + pad("dtype", 11) + "  " + pad("shape", shapeWidth) + "  bytes\n"
        var total = 0
        for (t, shape) in zip(tensors, shapes) {
            out += pad(t.name, nameWidth) + "  " + pad(t.dtype.rawValue, 11) + "  " + pad(shape, shapeWidth) + "  \(t.byteCount)\n"
            total += t.byteCount
        }
        out += "\(tensors.count) tensors, \(total) bytes (\(formatBytes(total)))\n"
        return out
    }

    /// Reads a table `render` printed back into descriptors (names without spaces), so a
    /// `ckpt-read --list` saved earlier can be planned against; nil if `text` is not one.
    public static func parse(_ text: String) -> [TensorDescriptor]? {
        var lines = text.split(separator: "\n").map(String.init)
        guard let head = lines.first, head.split(separator: " ").map(String.init) == ["name", "dtype", "shape", "bytes"],
              let last = lines.last, last.contains(" tensors, ") else { return nil }
        lines.removeFirst()
        lines.removeLast()
        var out: [TensorDescriptor] = []
        for line in lines {
            let f = line.split(separator: " ").map(String.init)
            guard f.count == 4, let dtype = DType(rawValue: f[1]), f[2].hasPrefix("["), f[2].hasSuffix("]") else { return nil }
            let dims = f[2].dropFirst().dropLast().split(separator: ",").map { Int($0) }
            guard !dims.contains(nil), let d = try? TensorDescriptor(name: f[0], dtype: dtype, shape: dims.map { $0! }),
                  Int(f[3]) == d.byteCount else { return nil }
            out.append(d)
        }
        return out
    }
}
