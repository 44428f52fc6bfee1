import ArgumentParser
import Glibc

/// The five tools behind one binary (what `scripts/package.sh` ships, to keep the download to
/// one copy of the runtime): the tool is the name the binary runs as (`ckpt-read`, a symlink
/// or a wrapper's `exec -a`), or else its first argument (`ckpt read …` or `ckpt ckpt-read …`).
public enum MultiCall {
    static let tools: [(name: String, main: @Sendable ([String]) -> Void)] = [
        ("ckpt-read", { ReadCommand.main($0) }),
        ("ckpt-write", { WriteCommand.main($0) }),
        ("lora-merge", { LoRAMergeCommand.main($0) }),
        ("ckpt-slice", { SliceCommand.main($0) }),
        ("ckpt-diff", { DiffCommand.main($0) }),
    ]

    /// The tool `arguments` (argv) ask for, and the arguments to give it.
    static func resolve(_ arguments: [String]) -> (tool: String, arguments: [String])? {
        let invokedAs = String(arguments.first?.split(separator: "/").last ?? "")
        if tools.contains(where: { $0.name == invokedAs }) { return (invokedAs, Array(arguments.dropFirst())) }
        guard arguments.count > 1 else { return nil }
        let first = arguments[1]
        for t in tools where t.name == first || t.name == "ckpt-" + first || (t.name == "lora-merge" && first == "merge") {
            return (t.name, Array(arguments.dropFirst(2)))
        }
        return nil
    }

    public static func main(_ arguments: [String] = CommandLine.arguments) -> Never {
        if let (tool, rest) = resolve(arguments), let t = tools.first(where: { $0.name == tool }) {
            t.main(rest)
            exit(0)
        }
        let asked = arguments.dropFirst().first
        if asked == "--version" || asked == "-V" {
            print(Tool.version)
            exit(0)
        }
        let names = tools.map(\.name).joined(separator: ", ")
        let text = """
            ckpt \(Tool.version): checkpoint conversion between the JAX and PyTorch worlds, as Unix filters.
            usage: ckpt TOOL [arguments]   (or run it as TOOL: \(names))
            tools: read, write, merge (lora-merge), slice, diff; `ckpt TOOL --help` for each

            """
        let wanted = asked == nil || asked == "--help" || asked == "-h"
        if !wanted { StandardError.write("ckpt: unknown tool '\(asked!)'\n") }
        if wanted { print(text, terminator: "") } else { StandardError.write(text) }
        exit(wanted ? 0 : SysExit.usage.rawValue)
    }
}
