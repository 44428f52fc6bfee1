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
    }

    /// The captures if `name` matches the whole pattern (backtracking over `{rest*}`).
    public func match(_ name: String) -> [String: String]? {
        let chars = Array(name.utf8)
        var captures: [String: String] = [:]
        func go(_ t: Int, _ at: Int) -> Bool {
            if t == tokens.count { return at == chars.count }
            switch tokens[t] {
            case .literal(let s):
                let u = Array(s.utf8)
                guard at + u.count <= chars.count, Array(chars[at..<at + u.count]) == u else { return false }
                return go(t + 1, at + u.count)
            case .capture(let n, let kind):
                switch kind {
                case .oneOf(let words):
                    for w in words {
                        let u = Array(w.utf8)
                        if at + u.count <= chars.count, Array(chars[at..<at + u.count]) == u {
                            captures[n] = w
                            if go(t + 1, at + u.count) { return true }
                        }
                    }
                    return false
                case .segment, .integer, .rest:
                    var end = at
                    // Longest first for segments and integers is fine: the next token is a literal
                    // or the end; for rest, try every split.
                    var ends: [Int] = []
                    while end < chars.count {
                        let c = chars[end]
                        if kind == .segment && (c == UInt8(ascii: "/") || c == UInt8(ascii: ".")) { break }
                        if kind == .integer && !(c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) { break }
                        end += 1
                        ends.append(end)
                    }
                    for e in ends.reversed() {
                        captures[n] = String(decoding: chars[at..<e], as: UTF8.self)
                        if go(t + 1, e) { return true }
                    }
                    return false
                }
            }
        }
        return go(0, 0) ? captures : nil
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
