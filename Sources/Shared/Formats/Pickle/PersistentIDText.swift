/// Protocol 0 pickles carry a persistent id as text: `str()` of the tuple torch returned,
/// e.g. `('storage', <class 'torch.FloatStorage'>, '0', 'cpu', 12)` or, in legacy files, with a
/// sixth element `None` or `('key', offset, size)`. This reads exactly that grammar (quoted
/// strings, integers, None, `<class 'module.Name'>` resolved against the allowlist, nested
/// tuples); anything else is nil. torch.load itself cannot load these files.
enum PersistentIDText {
    static func parse(_ text: String) -> PickleValue? {
        var p = Parser(bytes: Array(text.utf8))
        guard let v = p.value(depth: 0) else { return nil }
        p.spaces()
        return p.i == p.bytes.count ? v : nil
    }

    private struct Parser {
        let bytes: [UInt8]
        var i = 0

        mutating func spaces() { while i < bytes.count, bytes[i] == 0x20 { i += 1 } }

        mutating func eat(_ s: String) -> Bool {
            let u = Array(s.utf8)
            guard bytes.count - i >= u.count, Array(bytes[i..<(i + u.count)]) == u else { return false }
            i += u.count
            return true
        }

        mutating func quoted() -> String? {
            guard i < bytes.count, bytes[i] == 0x27 || bytes[i] == 0x22 else { return nil }
            let q = bytes[i]
            i += 1
            let start = i
            while i < bytes.count, bytes[i] != q {
                if bytes[i] == 0x5C { return nil }  // keys and devices never need escapes
                i += 1
            }
            guard i < bytes.count else { return nil }
            defer { i += 1 }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }

        mutating func value(depth: Int) -> PickleValue? {
            spaces()
            guard i < bytes.count, depth < 4 else { return nil }
            switch bytes[i] {
            case 0x28:  // (
                i += 1
                var items: [PickleValue] = []
                spaces()
                if eat(")") { return .tuple([]) }
                while true {
                    guard let v = value(depth: depth + 1) else { return nil }
                    items.append(v)
                    spaces()
                    if eat(")") { return .tuple(items) }
                    guard eat(",") else { return nil }
                    spaces()
                    if eat(")") { return .tuple(items) }  // one-element tuple: ('x',)
                }
            case 0x27, 0x22:
                return quoted().map { .string($0) }
            case 0x3C:  // <class 'torch.FloatStorage'>
                guard eat("<class "), let dotted = quoted(), eat(">"), let dot = dotted.lastIndex(of: ".") else { return nil }
                let g = PickleGlobal(module: String(dotted[..<dot]), name: String(dotted[dotted.index(after: dot)...]))
                return PickleGlobal.allowed.contains(g) ? .global(g) : nil
            default:
                if eat("None") { return PickleValue.none }
                let start = i
                if bytes[i] == 0x2D { i += 1 }
                while i < bytes.count, (0x30...0x39).contains(bytes[i]), i - start < 20 { i += 1 }
                return Int(String(decoding: bytes[start..<i], as: UTF8.self)).map { .int($0) }
            }
        }
    }
}
