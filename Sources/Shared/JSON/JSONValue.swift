/// A JSON value that keeps object key order and number spelling, so metadata passes
/// through a pipeline unchanged (Foundation's JSONSerialization keeps neither).
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    /// The number exactly as written, e.g. `"24"`, `"-1.5e3"`.
    case number(String)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    public static func int(_ v: Int) -> JSONValue { .number(String(v)) }

    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var objectValue: JSONObject? { if case .object(let o) = self { return o } else { return nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }

    /// A non-negative integer written without fraction or exponent, as safetensors requires.
    public var nonNegativeIntValue: Int? {
        guard case .number(let s) = self, !s.isEmpty, s.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
        return Int(s)
    }
}

/// An ordered JSON object: entries in their order, and a hashed index of keys for lookups.
public struct JSONObject: Equatable, Sendable, Sequence {
    public private(set) var entries: [(key: String, value: JSONValue)] = []
    private var index: [String: Int] = [:]

    public init() {}

    public init(_ pairs: [(String, JSONValue)]) {
        for (k, v) in pairs { self[k] = v }
    }

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }
    public var keys: [String] { entries.map(\.key) }

    public subscript(key: String) -> JSONValue? {
        get { index[key].map { entries[$0].value } }
        set {
            if let i = index[key] {
                if let newValue { entries[i].value = newValue } else {
                    entries.remove(at: i)
                    reindex()
                }
            } else if let newValue {
                index[key] = entries.count
                entries.append((key, newValue))
            }
        }
    }

    public func contains(_ key: String) -> Bool { index[key] != nil }

    private mutating func reindex() {
        index = [:]
        for (i, e) in entries.enumerated() { index[e.key] = i }
    }

    public func makeIterator() -> IndexingIterator<[(key: String, value: JSONValue)]> { entries.makeIterator() }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        a.entries.count == b.entries.count && zip(a.entries, b.entries).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    }
}
