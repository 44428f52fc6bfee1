import ArgumentParser

/// `ckpt-slice`: ckpt stream in → renamed, reshaped, split, stacked, cast stream out, by rules.
public struct SliceCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ckpt-slice",
        abstract: "Rename, reshape, split, stack and cast tensors by rule files.",
        discussion: """
            Rules (docs/rules.md), one per line, first match wins:
              SOURCE -> TARGET | op | op ...     e.g.  {m*}/kernel -> {m}.weight | rearrange "i o -> o i"
              drop PATTERN                       keep PATTERN                include other.rules
            Every input must be matched by a rule (or --keep-unmatched); two rules writing one name,
            or a shape an expression does not fit, is an error naming the rule's file and line.

            Examples:
              ckpt-read flax.msgpack | ckpt-slice --rules flax-to-torch | ckpt-write model.safetensors
              ckpt-slice --plan --rules bert-torch-to-flax --input model.safetensors
              ckpt-slice --rules my-model.rules --rules torch-to-flax ...   # your rules first, then a shipped set
              ckpt-slice --list-rules
            """,
        version: Tool.version)

    @Option(name: .long, help: ArgumentHelp("A shipped rule set by name (see --list-rules) or a rule file (repeatable; earlier ones' rules match first).", valueName: "name|file"))
    public var rules: [String] = []

    @Flag(help: "List the shipped rule sets (name and what each converts) and where they were found.")
    public var listRules = false

    @Option(name: .customLong("set"), help: ArgumentHelp("A value for ${NAME} in the rules (repeatable), over the files' 'default NAME=VALUE'.", valueName: "NAME=VALUE"))
    public var values: [String] = []

    @Flag(help: "Print what each input becomes (names, types, shapes) and the memory the plan holds, reading no data.")
    public var plan = false

    @Flag(help: "Pass tensors no rule matches through unchanged instead of failing.")
    public var keepUnmatched = false

    @Option(help: ArgumentHelp("Finally cast every float tensor written to this type (F32, BF16, F16, ...), as `cast?` would; without --rules, every float tensor of the input.", valueName: "dtype"))
    public var cast: String?

    @Option(help: ArgumentHelp("Read FILE (a stream, any checkpoint ckpt-read reads, or with --plan a saved ckpt-read --list table) instead of stdin.", valueName: "file"))
    public var input: String = "-"

    @OptionGroup public var stream: StreamOutputOptions
    @OptionGroup public var progressOptions: ProgressOptions

    public init() {}

    public func validate() throws {
        _ = try SliceCommand.parseValues(values)
        if rules.isEmpty && !listRules && cast == nil {
            throw ValidationError("give at least one --rules NAME or FILE (--list-rules shows the shipped ones), or --cast alone")
        }
        if let cast, DType(userName: cast).map(SliceCast.supported(to:)) != true {
            throw ValidationError("--cast takes F32, F64, BF16, F16, F8_E4M3 or F8_E5M2, not '\(cast)'")
        }
    }

    public func run() throws {
        try Tool.run("ckpt-slice") {
            if listRules {
                let sets = RuleLibrary.list()
                guard !sets.isEmpty else { throw UsageError("no shipped rule sets found (searched: \(RuleLibrary.folders().joined(separator: ", ")); CKPT_RULES_PATH adds folders)") }
                print(RuleLibrary.render(sets), terminator: "")
                return
            }
            var all: [SliceRule] = []
            let given = try SliceCommand.parseValues(values)
            for name in rules { all += try SliceRuleParser.parse(file: try RuleLibrary.resolve(name), values: given) }
            if plan, input != "-", let bytes = try? readWholeFile(input, limit: 1 << 28),
               let table = String(validating: bytes, as: UTF8.self).flatMap(TensorTable.parse) {
                // A `ckpt-read --list` table saved earlier: plan against it.
                let p = try SlicePlan(rules: all, inputs: table, keepUnmatched: keepUnmatched || rules.isEmpty, cast: cast.flatMap(DType.init(userName:)))
                print(SliceCommand.render(p, inputs: table), terminator: "")
                return
            }
            let upstream = try openSource(input, options: ReadOptions(), producer: "ckpt-slice \(Tool.release)")
            if plan && upstream.manifest == nil {
                throw UsageError("--plan needs a stream with a manifest (ckpt-read writes one), a checkpoint, or a ckpt-read --list table")
            }
            // `--cast T` alone casts every float tensor and passes the rest.
            let source = try SliceSource(upstream: upstream, rules: all, keepUnmatched: keepUnmatched || rules.isEmpty,
                                         cast: cast.flatMap(DType.init(userName:)))
            if plan {
                print(SliceCommand.render(source.plan, inputs: upstream.manifest ?? []), terminator: "")
                return
            }
            let writer = try stream.makeWriter(producer: "ckpt-slice \(Tool.release)")
            try pump(from: source, to: writer, progress: progressOptions.makeProgress(label: "ckpt-slice"))
        }
    }

    /// `--set NAME=VALUE` items as a dictionary.
    public static func parseValues(_ items: [String]) throws -> [String: String] {
        var out: [String: String] = [:]
        for item in items {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, !kv[0].isEmpty, !kv[1].isEmpty else { throw ValidationError("--set takes NAME=VALUE, not '\(item)'") }
            out[kv[0]] = kv[1]
        }
        return out
    }

    static func render(_ plan: SlicePlan, inputs: [TensorDescriptor]) -> String {
        func d(_ t: TensorDescriptor) -> String { "\(t.name) \(t.dtype.rawValue)\(t.shapeText)" }
        var out = ""
        var shown = Set<Int>()
        var peak = (bytes: 0, at: "")
        for t in inputs {
            switch plan.assignments[t.name] {
            case .drop(let r)?: out += "\(d(t))  -> dropped (\(r.location))\n"
            case .pass(let name, let r)?:
                out += "\(d(t))  -> \(name == t.name ? "kept" : name) (\(r?.location ?? "--keep-unmatched"))\n"
            case .group(let g)?, .operand(let g)?:
                guard shown.insert(g).inserted else { continue }
                let group = plan.groups[g]
                if group.streams {
                    out += "\(d(t))  -> \(d(group.outputs[0])) (\(group.rule.location), streams)\n"
                    continue
                }
                let operands = group.operands.values.map { "\(d($0)) (operand)" }
                out += (group.inputs.map(d) + operands).joined(separator: "\n") + "\n"
                let outs = group.outputs.count > 4 ? [d(group.outputs[0]), "... \(group.outputs.count - 2) more ...", d(group.outputs.last!)] : group.outputs.map(d)
                let stacking = group.inputs.count > 1 ? "stacks \(group.inputs.count) inputs, "
                    : group.perSlice != nil ? "one slice of the leading axis at a time, " : ""
                out += "  -> " + outs.joined(separator: "\n  -> ") + "\n"
                out += "     (\(group.rule.location): \(stacking)holds \(formatBytes(group.memory)))\n"
                if group.memory > peak.bytes { peak = (group.memory, group.rule.location) }
            case nil: break
            }
        }
        out += "\(inputs.count) inputs -> \(plan.outputs.count) outputs; "
        out += peak.bytes == 0 ? "every tensor streams (chunks only)\n" : "peak held \(formatBytes(peak.bytes)) (\(peak.at))\n"
        return out
    }
}
