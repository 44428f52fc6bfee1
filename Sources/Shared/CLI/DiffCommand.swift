import ArgumentParser
import Glibc

/// `ckpt-diff A B`: compares two checkpoints tensor by tensor; exits like cmp(1).
public struct DiffCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ckpt-diff",
        abstract: "Compare two checkpoints tensor by tensor.",
        discussion: """
            A and B are any checkpoints ckpt-read reads, or streams ('-' for stdin). For each tensor in both: \
            max and mean absolute difference, max relative difference, cosine similarity, NaN and Inf counts. \
            Tensors are equal when |a - b| <= atol + rtol*|b| everywhere (NaN equals NaN) and their types \
            match; by default (rtol = atol = 0) only identical values are equal.

            Exit status: 0 equal, 1 different (a tensor differs, or is only in one of them), 2 trouble.

            Examples:
              ckpt-diff original.safetensors converted.safetensors
              ckpt-diff --rules bert-torch-to-flax model.safetensors flax_params.msgpack
              ckpt-diff --rtol 1e-5 --atol 1e-6 --json a.pt b.safetensors
              ckpt-diff --exclude '*.position_ids' pytorch_model.bin model.safetensors
            """,
        version: Tool.version)

    @Argument(help: "The first checkpoint (or stream).")
    public var a: String

    @Argument(help: "The second checkpoint (or stream).")
    public var b: String

    @Option(help: ArgumentHelp("Compare only tensors whose name matches GLOB (repeatable), in each input, before --rules, as ckpt-read selects.", valueName: "glob"))
    public var only: [String] = []

    @Option(help: ArgumentHelp("Leave out tensors whose name matches GLOB (repeatable), e.g. buffers a conversion drops.", valueName: "glob"))
    public var exclude: [String] = []

    @Option(help: ArgumentHelp("Relative tolerance.", valueName: "x"))
    public var rtol: Double = 0

    @Option(help: ArgumentHelp("Absolute tolerance.", valueName: "x"))
    public var atol: Double = 0

    @Option(name: .long, help: ArgumentHelp("Apply this rule set (a shipped name, see ckpt-slice --list-rules, or a file) to A first, to compare across layouts (repeatable).", valueName: "name|file"))
    public var rules: [String] = []

    @Option(name: .customLong("set"), help: ArgumentHelp("A value for ${NAME} in the rules (repeatable).", valueName: "NAME=VALUE"))
    public var values: [String] = []

    @Flag(help: "Print JSON instead of a table.")
    public var json = false

    @Flag(help: "Print only the summary line.")
    public var brief = false

    public init() {}

    public func validate() throws {
        guard rtol >= 0, atol >= 0, rtol.isFinite, atol.isFinite else { throw ValidationError("--rtol and --atol take finite numbers >= 0") }
        guard !(a == "-" && b == "-") else { throw ValidationError("only one of A and B can be stdin") }
    }

    public func run() throws {
        do {
            let report = try compare()
            print(json ? report.json() : report.table(brief: brief), terminator: "")
            if !report.equal { throw ExitCode(1) }
        } catch let e as ExitCode {
            throw e
        } catch let e as CkptError {
            StandardError.write("ckpt-diff: \(e.description)\n")
            throw ExitCode(2)
        } catch {
            StandardError.write("ckpt-diff: \(error)\n")
            throw ExitCode(2)
        }
    }

    func compare() throws -> DiffReport {
        var options = ReadOptions()
        options.selection = TensorSelection(only: only, exclude: exclude)
        var sourceA = try openSource(a, options: options, producer: "ckpt-diff")
        try options.selection.requireSomeTensor(in: sourceA, of: a)
        if !rules.isEmpty {
            var all: [SliceRule] = []
            let given = try SliceCommand.parseValues(values)
            for name in rules { all += try SliceRuleParser.parse(file: try RuleLibrary.resolve(name), values: given) }
            sourceA = try SliceSource(upstream: sourceA, rules: all, keepUnmatched: false)
        }
        let sourceB = try openSource(b, options: options, producer: "ckpt-diff")
        try options.selection.requireSomeTensor(in: sourceB, of: b)
        return try DiffReport.build(a: sourceA, b: sourceB, rtol: rtol, atol: atol, nameA: a == "-" ? "<stdin>" : a, nameB: b == "-" ? "<stdin>" : b)
    }
}
