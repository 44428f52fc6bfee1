import Glibc

/// The shipped rule sets, found by name from any working folder: `--rules bert-torch-to-flax`
/// means `bert-torch-to-flax.rules` in the first of these folders that has it:
///
/// 1. each folder of `$CKPT_RULES_PATH` (colon-separated), for rule sets of one's own;
/// 2. beside the executable, as installed: `<prefix>/share/ckpt/rules` for `<prefix>/bin/ckpt-slice`
///    (a pip wheel's or `make install`'s layout), `<dir>/rules` for a tarball's `bin/`;
/// 3. the source tree the executable was built in (`.build/<triple>/<config>/ckpt-slice` →
///    `rules/` three folders up).
///
/// An argument holding a `/`, or naming a file that exists, is a path and is used as it is.
public enum RuleLibrary {
    /// The folders searched, in order (existing ones only).
    public static func folders(environment: [String: String] = currentEnvironment(), executable: String? = executablePath()) -> [String] {
        var out: [String] = []
        for p in (environment["CKPT_RULES_PATH"] ?? "").split(separator: ":") where !p.isEmpty { out.append(String(p)) }
        if let executable {
            var dir = splitPath(executable).directory
            // bin/ → ../share/ckpt/rules or ../rules; .build/<triple>/<config>/ → ../../../rules.
            for _ in 0..<4 {
                out.append(dir + "/share/ckpt/rules")
                out.append(dir + "/rules")
                dir = splitPath(dir).directory
                if dir.isEmpty || dir == "/" { break }
            }
        }
        var seen = Set<String>()
        return out.filter { isDirectory($0) && seen.insert($0).inserted }
    }

    /// The file a `--rules` argument means.
    public static func resolve(_ nameOrPath: String, folders: [String] = folders()) throws -> String {
        if nameOrPath.contains("/") || isRegularFile(nameOrPath) { return nameOrPath }
        let file = nameOrPath.hasSuffix(".rules") ? nameOrPath : nameOrPath + ".rules"
        for f in folders where isRegularFile(f + "/" + file) { return f + "/" + file }
        let known = list(folders: folders).map(\.name)
        throw UsageError("no rule set named '\(nameOrPath)' (shipped: \(known.isEmpty ? "none found" : known.joined(separator: ", "))); "
                         + "give a path to use a file of your own, or set CKPT_RULES_PATH")
    }

    /// Every rule set found (the first of a name wins), with the first line of its header comment.
    public static func list(folders: [String] = folders()) -> [(name: String, description: String, path: String)] {
        var out: [(name: String, description: String, path: String)] = []
        var seen = Set<String>()
        for f in folders {
            for entry in (try? listDirectory(f)) ?? [] where entry.hasSuffix(".rules") {
                let name = String(entry.dropLast(".rules".count))
                guard seen.insert(name).inserted else { continue }
                out.append((name, description(of: f + "/" + entry), f + "/" + entry))
            }
        }
        return out.sorted { $0.name < $1.name }
    }

    /// The first sentence of the file's leading comment (at most 120 characters).
    static func description(of path: String) -> String {
        guard let bytes = try? readWholeFile(path, limit: 1 << 20) else { return "" }
        var text = ""
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false) {
            let t = line.drop(while: { $0 == " " || $0 == "\t" })
            guard t.hasPrefix("#") else { break }
            let words = t.drop(while: { $0 == "#" || $0 == " " })
            if words.isEmpty { if text.isEmpty { continue } else { break } }
            text += (text.isEmpty ? "" : " ") + words
        }
        // Up to the first sentence's full stop (". " or the end).
        var previous: Character = " "
        for (i, c) in zip(text.indices, text) {
            if previous == ".", c == " " {
                let sentence = String(text[..<i])
                if !sentence.hasSuffix("e.g.") && !sentence.hasSuffix("i.e.") {
                    text = sentence
                    break
                }
            }
            previous = c
        }
        return text.count > 120 ? String(text.prefix(119)) + "…" : text
    }

    /// The table `--list-rules` prints.
    public static func render(_ sets: [(name: String, description: String, path: String)]) -> String {
        let width = sets.map(\.name.count).max() ?? 0
        return sets.map { $0.name + String(repeating: " ", count: width + 2 - $0.name.count) + $0.description + "\n" }.joined()
    }

    public static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func currentEnvironment() -> [String: String] {
        guard let value = getenv("CKPT_RULES_PATH") else { return [:] }
        return ["CKPT_RULES_PATH": String(cString: value)]
    }

    static func isRegularFile(_ p: String) -> Bool {
        var st = stat()
        return stat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }
}
