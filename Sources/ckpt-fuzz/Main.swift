import Glibc
import Shared

// ckpt-fuzz TARGET [libFuzzer flags and corpus folders]   (built with -DFUZZING)
// ckpt-fuzz TARGET FILE-OR-FOLDER...                      (plain build: replays inputs)
// ckpt-fuzz --list
// The target may also come from CKPT_FUZZ_TARGET (libFuzzer re-runs itself without the
// target argument when minimizing, so the argument is copied there).

func say(_ s: String) {
    var b = Array(s.utf8)
    _ = b.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}

func listTargets() {
    for t in fuzzTargets { print(t.name) }
}

func usage() -> Never {
    let names = fuzzTargets.map(\.name).joined(separator: ", ")
    say("usage: ckpt-fuzz TARGET [inputs or libFuzzer flags] | --list\ntargets: \(names)\n")
    exit(2)
}

/// Picks the target from argv[1] (removed from the arguments) or CKPT_FUZZ_TARGET.
func chooseTarget(_ args: inout [String]) -> FuzzTarget {
    if args.count > 1, args[1] == "--list" { listTargets(); exit(0) }
    if args.count > 1, args[1] == "--describe" {
        for t in fuzzTargets { print("\(t.name)\t\(t.about)") }
        exit(0)
    }
    var name: String?
    if args.count > 1, !args[1].hasPrefix("-"), target(named: args[1]) != nil {
        name = args.remove(at: 1)
    } else if let env = getenv("CKPT_FUZZ_TARGET") {
        name = String(cString: env)
    }
    guard let name, let t = target(named: name) else { usage() }
    setenv("CKPT_FUZZ_TARGET", name, 1)
    return t
}

nonisolated(unsafe) var chosen: FuzzTarget?

#if FUZZING
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Int32

@main
struct FuzzMain {
    static func main() {
        var args = CommandLine.arguments
        chosen = chooseTarget(&args)
        _ = Scratch.shared
        Scratch.shared.markSetUpDone()
        var cArgs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        var argc = Int32(args.count)
        let code = cArgs.withUnsafeMutableBufferPointer { buf -> Int32 in
            var argv = buf.baseAddress!
            return LLVMFuzzerRunDriver(&argc, &argv) { data, size in
                _ = runOne(chosen!, UnsafeRawBufferPointer(start: data, count: size))
                return 0
            }
        }
        exit(code)
    }
}
#else
@main
struct ReplayMain {
    static func main() {
        var args = CommandLine.arguments
        let t = chooseTarget(&args)
        _ = Scratch.shared
        Scratch.shared.markSetUpDone()
        var paths: [String] = []
        for a in args.dropFirst() {
            var st = stat()
            guard stat(a, &st) == 0 else { say("ckpt-fuzz: \(a): no such file or folder\n"); exit(2) }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                let names = ((try? listDirectory(a)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
                paths += names.map { a + "/" + $0 }
            } else {
                paths.append(a)
            }
        }
        var threw = 0
        for p in paths {
            guard let bytes = try? readWholeFile(p, limit: 1 << 30) else { say("ckpt-fuzz: cannot read \(p)\n"); exit(2) }
            let e = bytes.withUnsafeBytes { runOne(t, $0) }
            let fds = lastRunLeakedDescriptors.isEmpty ? "" : " (left descriptors open: \(lastRunLeakedDescriptors.joined(separator: ", ")))"
            if let e {
                threw += 1
                print("\(t.name) \(p): rejected\(fds): \(String(describing: e).prefix(200))")
            } else {
                print("\(t.name) \(p): accepted\(fds)")
            }
        }
        print("\(t.name): \(paths.count) inputs, \(paths.count - threw) accepted, \(threw) rejected, no crash")
    }
}
#endif
