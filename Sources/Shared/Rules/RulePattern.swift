/// A tensor-name pattern of a slice rule (docs/rules.md):
///
///     llm/layers/attn/{m=q,kv}_einsum/w      literal text and captures
///     {name}      one path segment (no `/` or `.`)
///     {rest*}     one or more segments (anything)
///     {i:int}     a decimal integer
///     {s=q,k,v}   one of the listed words; the list's order is the axis order when stacking
///     {_=params/,}  a name starting with _ only matches (here: an optional params/ prefix)
///
/// In a target pattern `{name}` substitutes a capture, or names an axis to unstack along.
public struct RulePattern: Equatable, Sendable, CustomStringConvertible {
    public enum Kind: Equatable, Sendable {
        case segment, rest, integer
        case oneOf([String])
        var isSet: Bool { if case .oneOf = self { return true } else { return false } }
    }

    public enum Token: Equatable, Sendable {
        case literal(String)
        case capture(String, Kind)
    }

    public let tokens: [Token]
    public let text: String
    private let compiled: [Compiled]

    public var description: String { text }

    /// Names of the captures, in order; `{_...}` captures only match (never stacked or substituted).
    public var captureNames: [String] {
        tokens.compactMap { if case .capture(let n, _) = $0, !n.hasPrefix("_") { return n } else { return nil } }
    }

    public func kind(of name: String) -> Kind? {
        for case .capture(let n, let k) in tokens where n == name { return k }
        return nil
    }

    public struct ParseError: Error, CustomStringConvertible {
        public var description: String
    }

    public init(_ text: String) throws(ParseError) {
        self.text = text
        var tokens: [Token] = []
        var literal = ""
        var i = text.startIndex
        while i < text.endIndex {
            let c = text[i]
            if c == "}" { throw ParseError(description: "'}' without '{' in pattern '\(text)'") }
            guard c == "{" else {
                literal.append(c)
                i = text.index(after: i)
                continue
            }
            guard let close = text[i...].firstIndex(of: "}") else { throw ParseError(description: "'{' without '}' in pattern '\(text)'") }
            let body = String(text[text.index(after: i)..<close])
            if !literal.isEmpty { tokens.append(.literal(literal)); literal = "" }
            let kind: Kind
            var name = body
            if let eq = body.firstIndex(of: "=") {
                name = String(body[..<eq])
                let words = body[body.index(after: eq)...].split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingCharacters(in: " ") }
                guard words.count > 1 || !(words.first ?? "").isEmpty, Set(words).count == words.count else {
                    throw ParseError(description: "'{\(body)}' in pattern '\(text)': a set needs distinct words (one may be empty)")
                }
                kind = .oneOf(words)
            } else if body.hasSuffix(":int") {
                name = String(body.dropLast(4))
                kind = .integer
            } else if body.hasSuffix("*") {
                name = String(body.dropLast())
                kind = .rest
            } else {
                kind = .segment
            }
            guard !name.isEmpty, name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else {
                throw ParseError(description: "'{\(body)}' in pattern '\(text)': a capture needs a name of letters, digits and _")
            }
            if tokens.contains(where: { if case .capture(name, _) = $0 { return true } else { return false } }) {
                throw ParseError(description: "pattern '\(text)' captures {\(name)} twice")
            }
            if let last = tokens.last, case .capture(_, let lastKind) = last, !kind.isSet, !lastKind.isSet {
                throw ParseError(description: "pattern '\(text)': two captures in a row cannot be told apart")
            }
            tokens.append(.capture(name, kind))
            i = text.index(after: close)
        }
        if !literal.isEmpty { tokens.append(.literal(literal)) }
        self.tokens = tokens
        compiled = tokens.map {
            switch $0 {
            case .literal(let s): return .literal(Array(s.utf8))
            case .capture(_, .oneOf(let words)): return .oneOf(words.map { Array($0.utf8) })
            case .capture(_, let kind): return .run(kind)
            }
        }
    }

    /// The captures if `name` matches the whole pattern. Captures are tried longest first (set
    /// words in their listed order) and the first complete match wins. A capture never
    /// constrains later tokens, so a (token, position) state that failed once fails again: it
    /// is remembered, which keeps patterns with several `{rest*}` linear in states instead of
    /// exponential in backtracking.
    public func match(_ name: String) -> [String: String]? {
        var name = name
        return name.withUTF8 { chars -> [String: String]? in
            // Most (rule, tensor) pairs differ in a leading or trailing literal: check those first.
            if case .literal(let head)? = compiled.first, !chars.starts(with: head) { return nil }
            if case .literal(let tail)? = compiled.last, compiled.count > 1, !chars.reversed().starts(with: tail.reversed()) { return nil }
            var spans = [(start: Int, end: Int)](repeating: (0, 0), count: tokens.count)
            var failed: [Bool] = []  // (token, position) states known to fail; made on the first backtrack
            let width = chars.count + 1
            func matches(_ u: UnsafeBufferPointer<UInt8>, at: Int) -> Bool {
                guard at + u.count <= chars.count else { return false }
                for i in 0..<u.count where chars[at + i] != u[i] { return false }
                return true
            }
            func go(_ t: Int, _ at: Int) -> Bool {
                if t == tokens.count { return at == chars.count }
                if !failed.isEmpty && failed[t * width + at] { return false }
                let ok: Bool
                switch compiled[t] {
                case .literal(let u):
                    ok = u.withUnsafeBufferPointer { matches($0, at: at) } && go(t + 1, at + u.count)
                case .oneOf(let words):
                    ok = words.contains { w in
                        guard w.withUnsafeBufferPointer({ matches($0, at: at) }) else { return false }
                        spans[t] = (at, at + w.count)
                        return go(t + 1, at + w.count)
                    }
                case .run(let kind):
                    var end = at
                    while end < chars.count {
                        let c = chars[end]
                        if kind == .segment && (c == UInt8(ascii: "/") || c == UInt8(ascii: ".")) { break }
                        if kind == .integer && !(c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) { break }
                        end += 1
                    }
                    var found = false
                    var e = end
                    while e > at && !found {
                        spans[t] = (at, e)
                        found = go(t + 1, e)
                        e -= 1
                    }
                    ok = found
                }
                if !ok {
                    if failed.isEmpty { failed = [Bool](repeating: false, count: tokens.count * width) }
                    failed[t * width + at] = true
                }
                return ok
            }
            guard go(0, 0) else { return nil }
            var captures: [String: String] = [:]
            for (t, token) in tokens.enumerated() {
                if case .capture(let n, _) = token {
                    captures[n] = String(decoding: UnsafeBufferPointer(rebasing: chars[spans[t].start..<spans[t].end]), as: UTF8.self)
                }
            }
            return captures
        }
    }

    /// The tokens as UTF-8, the form `match` compares.
    private enum Compiled: Equatable, Sendable {
        case literal([UInt8])
        case oneOf([[UInt8]])
        case run(Kind)
    }

    /// The separator this pattern's literal text uses first (`/` or `.`), if any.
    public var separator: Character? {
        for case .literal(let s) in tokens {
            if let c = s.first(where: { $0 == "/" || $0 == "." }) { return c }
        }
        return nil
    }

    /// The name with captures (and axis indices) substituted; nil if one is unbound. Values of
    /// the captures in `rejoin` (several segments) have their `.` and `/` replaced by this
    /// pattern's separator, so `{p*}.weight -> {p}/kernel` turns `a.b` into `a/b`.
    public func substitute(_ values: [String: String], rejoin: Set<String> = []) -> String? {
        let sep = separator
        var out = ""
        for t in tokens {
            switch t {
            case .literal(let s): out += s
            case .capture(let n, _):
                guard let v = values[n] else { return nil }
                if let sep, rejoin.contains(n) {
                    out += String(v.map { $0 == "." || $0 == "/" ? sep : $0 })
                } else {
                    out += v
                }
            }
        }
        return out
    }
}
