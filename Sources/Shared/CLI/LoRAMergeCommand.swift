import ArgumentParser
import Glibc

/// `lora-merge`: ckpt stream in → the same stream with every LoRA adapter folded into its base.
public struct LoRAMergeCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "lora-merge",
        abstract: "Fold LoRA adapters into their base weights, as the runtime applied them.",
        discussion: """
            Reads a ckpt stream on stdin, replaces every base weight that has an adapter by the merged \
            weight (computed in float32, written in the base's type unless --dtype), consumes the adapter \
            tensors, and passes everything else through. An adapter without a base, a base missing part of \
            its adapter, or shapes that do not fit, is an error listing every offender (exit 65).

            Schemes (auto-detected from the names unless --scheme):
              peft     Hugging Face PEFT: <m>.lora_A.weight [r,in], <m>.lora_B.weight [out,r]; the adapter \
            in the stream or from --adapter DIR; scale from adapter_config.json.
              openpi   openpi einsum LoRA: <m>/w with <m>/lora_a, <m>/lora_b, merged through the einsum \
            equation (--config sets alpha); FeedForward <m>_lora_a/b merged unscaled, as openpi runs it.
              generic  --a-suffix, --b-suffix, --base-suffix and --scale.

            Examples:
              ckpt-read base.safetensors | lora-merge --adapter my-lora/ | ckpt-write merged.safetensors
              ckpt-read ckpt/params | lora-merge --config gemma_2b_lora --config '*_1/*=gemma_300m_lora' | ...
            """,
        version: Tool.version)

    @Option(help: ArgumentHelp("auto, peft, openpi or generic.", valueName: "scheme"))
    public var scheme: String = "auto"

    @Option(help: ArgumentHelp("PEFT: a folder with adapter_model.safetensors (or .bin) and adapter_config.json.", valueName: "dir"))
    public var adapter: String?

    @Option(help: ArgumentHelp("PEFT: adapter_config.json for adapters that come in the stream.", valueName: "file"))
    public var adapterConfig: String?

    @Option(help: ArgumentHelp("openpi: LoRA config for weights matching GLOB (first match; no GLOB: all): gemma_2b_lora, gemma_300m_lora or rank=R,alpha=A[,rslora] (repeatable).", valueName: "[glob=]config"))
    public var config: [String] = []

    @Option(help: ArgumentHelp("openpi, generic: LoRA alpha for every einsum weight (with --rank, --rslora).", valueName: "alpha"))
    public var alpha: Double?

    @Option(help: ArgumentHelp("openpi, generic: the LoRA rank the adapters must have.", valueName: "rank"))
    public var rank: Int?

    @Flag(help: "openpi: scale by alpha/sqrt(rank) (rank-stabilized LoRA).")
    public var rslora = false

    @Option(help: ArgumentHelp("openpi, generic: the einsum equation a weight is used with, e.g. 'BTD,NDH->BTNH' (repeatable, first match).", valueName: "[glob=]equation"))
    public var equation: [String] = []

    @Option(help: ArgumentHelp("generic: name suffix of A tensors, e.g. .lora_down.weight.", valueName: "suffix"))
    public var aSuffix: String?

    @Option(help: ArgumentHelp("generic: name suffix of B tensors, e.g. .lora_up.weight.", valueName: "suffix"))
    public var bSuffix: String?

    @Option(help: ArgumentHelp("generic: name suffix of base weights (default .weight).", valueName: "suffix"))
    public var baseSuffix: String = ".weight"

    @Option(help: ArgumentHelp("generic: the scale applied to A·B.", valueName: "x"))
    public var scale: Double?

    @Option(help: ArgumentHelp("Write merged tensors as this type (F32, BF16, F16, F64) instead of the base's.", valueName: "dtype"))
    public var dtype: String?

    @Flag(help: "Pass adapters that found no base (and bases whose adapter is incomplete) through unmerged, printing each.")
    public var allowUnmerged = false

    @Option(help: ArgumentHelp("Read the stream from FILE instead of stdin.", valueName: "file"))
    public var input: String = "-"

    @OptionGroup public var stream: StreamOutputOptions
    @OptionGroup public var progressOptions: ProgressOptions

    public init() {}

    public func validate() throws {
        guard scheme == "auto" || LoRASchemeKind(rawValue: scheme) != nil else {
            throw ValidationError("unknown --scheme '\(scheme)'; known: auto, \(LoRASchemeKind.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let dtype, DType(userName: dtype).map(FloatConversion.canNarrow(to:)) != true {
            throw ValidationError("--dtype takes F32, BF16, F16 or F64, not '\(dtype)'")
        }
        if scheme == "generic" && (aSuffix == nil || bSuffix == nil || scale == nil) {
            throw ValidationError("--scheme generic needs --a-suffix, --b-suffix and --scale")
        }
        if (aSuffix != nil || bSuffix != nil) && scheme != "generic" {
            throw ValidationError("--a-suffix and --b-suffix belong to --scheme generic")
        }
        if adapter != nil && adapterConfig != nil {
            throw ValidationError("--adapter DIR already holds adapter_config.json; --adapter-config is for adapters in the stream")
        }
        if (alpha == nil) != (rank == nil) && alpha == nil {
            throw ValidationError("--rank needs --alpha (the scale is alpha/rank)")
        }
    }

    /// `GLOB=VALUE` or `VALUE` (when `isValue` accepts the whole text).
    static func scoped(_ text: String, isValue: (String) -> Bool) -> (glob: String?, value: String) {
        if isValue(text) || !text.contains("=") { return (nil, text) }
        let i = text.firstIndex(of: "=")!
        return (String(text[..<i]), String(text[text.index(after: i)...]))
    }

    func makeSchemes() throws -> [LoRASchemeKind: LoRAScheme] {
        var openpi = LoRAScheme(kind: .openpi)
        for c in config {
            let (glob, spec) = LoRAMergeCommand.scoped(c) { (try? EinsumLoRAConfig.parse($0)) != nil }
            openpi.einsumConfigs.append((glob, try EinsumLoRAConfig.parse(spec)))
        }
        if let alpha { openpi.einsumConfigs.append((nil, EinsumLoRAConfig(rank: rank, alpha: alpha, rslora: rslora))) }
        let equations = equation.map { e in LoRAMergeCommand.scoped(e) { !$0.contains("=") } }.map { (glob: $0.glob, equation: $0.value) }
        openpi.equations = equations
        var peft = LoRAScheme(kind: .peft)
        if let dir = adapter {
            peft.peft = try PEFTAdapterConfig(json: try parseJSONFile(dir + "/adapter_config.json"), file: dir + "/adapter_config.json")
        } else if let file = adapterConfig {
            peft.peft = try PEFTAdapterConfig(json: try parseJSONFile(file), file: file)
        }
        var generic = LoRAScheme(kind: .generic)
        generic.aSuffix = aSuffix ?? ""
        generic.bSuffix = bSuffix ?? ""
        generic.baseSuffix = baseSuffix
        generic.genericScale = scale
        generic.equations = equations
        var schemes: [LoRASchemeKind: LoRAScheme] = [.peft: peft, .openpi: openpi]
        if aSuffix != nil { schemes[.generic] = generic }
        return schemes
    }

    func parseJSONFile(_ path: String) throws -> JSONValue {
        do { return try JSONParser.parse(try readWholeFile(path, limit: 1 << 26)) } catch let e as JSONParser.Error {
            throw LoRAError(.configNotJSON(detail: e.description), file: path)
        }
    }

    /// Every tensor of the adapter file, read whole (adapters are small).
    func loadAdapter(_ dir: String) throws -> [(TensorDescriptor, [UInt8])] {
        var path = dir + "/adapter_model.safetensors"
        var st = stat()
        if stat(path, &st) != 0 { path = dir + "/adapter_model.bin" }
        guard stat(path, &st) == 0 else { throw LoRAError(.noAdapterModel, file: dir) }
        let source = try openSource(path, options: ReadOptions(), producer: "lora-merge")
        var out: [(TensorDescriptor, [UInt8])] = []
        while let t = try source.nextTensor() {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(t.descriptor.byteCount)
            while let c = try source.nextChunk() { bytes += c }
            out.append((t.descriptor, bytes))
        }
        return out
    }

    public func run() throws {
        try Tool.run("lora-merge") {
            let kind = LoRASchemeKind(rawValue: scheme)
            var options = LoRAMerger.Options(scheme: kind ?? (adapter != nil || adapterConfig != nil ? .peft : aSuffix != nil ? .generic : nil),
                                             schemes: try makeSchemes())
            options.outputType = dtype.flatMap(DType.init(userName:))
            options.allowUnmerged = allowUnmerged
            if let adapter { options.external = try loadAdapter(adapter) }
            let upstream = try openStreamInput(input)
            let merger = try LoRAMerger(upstream: upstream, options: options)
            let writer = try stream.makeWriter(producer: "lora-merge \(Tool.release)")
            try pump(from: merger, to: writer, progress: progressOptions.makeProgress(label: "lora-merge"))
            if !progressOptions.quiet { report(merger) }
        }
    }

    func report(_ merger: LoRAMerger) {
        let s = merger.summary
        for name in s.unmerged { Tool.note("lora-merge", "warning: \(name) passed through unmerged (--allow-unmerged)") }
        if s.narrowed > 0, let t = s.narrowedType {
            Tool.note("lora-merge", "warning: \(s.narrowed) merged tensors written as \(t.rawValue): rounding changed them by max \(short(s.drift.maxAbs)), mean \(short(s.drift.meanAbs)) (abs) against the float32 merge; --dtype F32 keeps it")
        }
        let total = s.modules.values.reduce(0, +)
        if total == 0 {
            Tool.note("lora-merge", "no LoRA adapters found; \(s.passed) tensors passed through unchanged")
            return
        }
        let perScheme = s.modules.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key.rawValue) \($0.value)" }.joined(separator: ", ")
        let scales = s.scales.sorted { $0.key < $1.key }.map { "\($0.key) x\($0.value)" }.joined(separator: ", ")
        let rate = s.mergeSeconds > 0 ? s.flops / s.mergeSeconds / 1e9 : 0
        Tool.note("lora-merge", "merged \(total) modules (\(perScheme)); scale \(scales); \(s.adaptersConsumed) adapter tensors consumed, \(s.passed) tensors passed through; \(short(s.flops / 1e9)) GFLOP in \(short(s.mergeSeconds)) s (\(short(rate)) GFLOP/s)")
        if s.held > 0 {
            Tool.note("lora-merge", "\(s.held) bases came before their adapters and were held until they did (at most \(formatBytes(s.heldPeakBytes)) at once); ckpt-read --first '*lora*' sends adapters first")
        }
    }

    func short(_ x: Double) -> String {
        if x == 0 { return "0" }
        let digits = max(0, 2 - Int(floor(log10(abs(x)))))
        if abs(x) < 1e-3 {
            var e = 0
            var m = x
            while abs(m) < 1 { m *= 10; e -= 1 }
            return "\((m * 10).rounded() / 10)e\(e)"
        }
        let p = pow(10, Double(digits))
        return "\((x * p).rounded() / p)"
    }
}
