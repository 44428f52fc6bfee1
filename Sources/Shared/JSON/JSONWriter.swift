/// Compact JSON output byte-compatible with Rust's serde_json (what the safetensors crate
/// uses): no spaces, non-ASCII passed through as UTF-8, only `"`, `\` and control
/// characters escaped.
public enum JSONWriter {
    public static func compact(_ value: JSONValue) -> [UInt8] {
        var out: [UInt8] = []
        write(value, to: &out)
        return out
    }

    public static func write(_ value: JSONValue, to out: inout [UInt8]) {
        switch value {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .number(let s): out.append(contentsOf: s.utf8)
        case .string(let s): writeString(s, to: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(v, to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            for (i, e) in o.entries.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                writeString(e.key, to: &out)
                out.append(UInt8(ascii: ":"))
                write(e.value, to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    public static func writeString(_ s: String, to out: inout [UInt8]) {
        out.append(0x22)
        for c in s.utf8 {
            switch c {
            case 0x22: out.append(contentsOf: [0x5C, 0x22])
            case 0x5C: out.append(contentsOf: [0x5C, 0x5C])
            case 0x08: out.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0x0A: out.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                out.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, hex[Int(c >> 4)], hex[Int(c & 15)]])
            default: out.append(c)
            }
        }
        out.append(0x22)
    }
}

extension JSONWriter {
    /// Output byte-identical to Python's `json.dumps(value, indent=indent, sort_keys=sortKeys)`
    /// (ensure_ascii on), which is how Hugging Face writes `*.index.json` files.
    public static func pythonIndented(_ value: JSONValue, indent: Int = 2, sortKeys: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        writePython(value, indent: indent, sortKeys: sortKeys, level: 0, to: &out)
        return out
    }

    private static func writePython(_ value: JSONValue, indent: Int, sortKeys: Bool, level: Int, to out: inout [UInt8]) {
        let pad = { (l: Int) in [UInt8](repeating: 0x20, count: l * indent) }
        switch value {
        case .string(let s): writeASCIIString(s, to: &out)
        case .array(let a) where !a.isEmpty:
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                out.append(contentsOf: (i > 0 ? ",\n" : "\n").utf8)
                out.append(contentsOf: pad(level + 1))
                writePython(v, indent: indent, sortKeys: sortKeys, level: level + 1, to: &out)
            }
            out.append(UInt8(ascii: "\n"))
            out.append(contentsOf: pad(level))
            out.append(UInt8(ascii: "]"))
        case .object(let o) where !o.isEmpty:
            var entries = o.entries
            if sortKeys { entries.sort { $0.key.unicodeScalars.lexicographicallyPrecedes($1.key.unicodeScalars) } }
            out.append(UInt8(ascii: "{"))
            for (i, e) in entries.enumerated() {
                out.append(contentsOf: (i > 0 ? ",\n" : "\n").utf8)
                out.append(contentsOf: pad(level + 1))
                writeASCIIString(e.key, to: &out)
                out.append(contentsOf: ": ".utf8)
                writePython(e.value, indent: indent, sortKeys: sortKeys, level: level + 1, to: &out)
            }
            out.append(UInt8(ascii: "\n"))
            out.append(contentsOf: pad(level))
            out.append(UInt8(ascii: "}"))
        default: write(value, to: &out)
        }
    }

    /// A string with every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
    private static func writeASCIIString(_ s: String, to out: inout [UInt8]) {
        let hex = Array("0123456789abcdef".utf8)
        func u(_ v: UInt16) -> [UInt8] {
            [0x5C, UInt8(ascii: "u"), hex[Int(v >> 12)], hex[Int(v >> 8 & 15)], hex[Int(v >> 4 & 15)], hex[Int(v & 15)]]
        }
        out.append(0x22)
        for scalar in s.unicodeScalars {
            if scalar.value < 0x80 {
                var one: [UInt8] = []
                writeString(String(scalar), to: &one)
                out.append(contentsOf: one.dropFirst().dropLast())
            } else {
                for unit in String(scalar).utf16 { out.append(contentsOf: u(unit)) }
            }
        }
        out.append(0x22)
    }
}
