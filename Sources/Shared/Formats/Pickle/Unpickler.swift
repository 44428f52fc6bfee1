// A restricted unpickler for PyTorch checkpoints, following the opcode definitions of
// CPython's Lib/pickletools.py (protocols 0–5). It executes nothing: GLOBAL and
// STACK_GLOBAL resolve only the names in `PickleGlobal.allowed` (the ones
// torch.load(weights_only=True) needs to rebuild tensors); anything else is refused
// before it could be called, with an error naming it.

/// A value built by the unpickler. Lists and dicts are classes because pickles mutate them
/// after creation (APPEND, SETITEMS) and share them through the memo.
public indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    /// An integer beyond 64 bits, little-endian two's complement (only kept, never used).
    case bigInt([UInt8])
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple([PickleValue])
    case list(PickleList)
    case dict(PickleDict)
    case global(PickleGlobal)
    /// A storage named by a persistent id.
    case storage(StorageRef)
    /// A tensor rebuilt by one of torch's `_rebuild_*` functions.
    case tensor(TensorRef)

    var typeName: String {
        switch self {
        case .none: return "None"
        case .bool: return "bool"
        case .int, .bigInt: return "int"
        case .float: return "float"
        case .string: return "str"
        case .bytes: return "bytes"
        case .tuple: return "tuple"
        case .list: return "list"
        case .dict: return "dict"
        case .global(let g): return "global \(g)"
        case .storage: return "storage"
        case .tensor: return "tensor"
        }
    }
}

public final class PickleList {
    public var items: [PickleValue] = []
    /// Nesting depth as last recorded (1 + the deepest item when it was added); the unpickler
    /// checks the true depth once the pickle is complete.
    var depth = 1
    init(_ items: [PickleValue] = []) { self.items = items }
}

public final class PickleDict {
    public var entries: [(key: PickleValue, value: PickleValue)] = []
    var depth = 1
}

/// A storage referenced by a persistent id: torch's `('storage', type, key, location, numel)`.
public struct StorageRef: Equatable, Sendable {
    /// The storage whose bytes are in the file.
    public var key: String
    /// The element type the storage class implies (UntypedStorage: U8, numel in bytes).
    public var dtype: DType
    /// Elements a tensor on this storage may address.
    public var numel: Int
    /// Legacy storage views (`view_metadata`): where the view starts in the root storage, in elements.
    public var offset = 0
    /// Elements of the root storage (what the legacy file stores for `key`).
    public var rootNumel: Int
}

/// A tensor as torch describes it: a strided view of a storage (offsets and strides in
/// elements of `dtype`).
public struct TensorRef: Equatable, Sendable {
    public var storage: StorageRef
    public var dtype: DType
    public var storageOffset: Int
    public var shape: [Int]
    public var stride: [Int]
}

/// A module-qualified name, e.g. `torch._utils._rebuild_tensor_v2`.
public struct PickleGlobal: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var module: String
    public var name: String
    public var description: String { "\(module).\(name)" }

    /// Storage classes and the element type they hold.
    public static let storageTypes: [String: DType] = [
        "DoubleStorage": .f64, "FloatStorage": .f32, "HalfStorage": .f16, "BFloat16Storage": .bf16,
        "LongStorage": .i64, "IntStorage": .i32, "ShortStorage": .i16, "CharStorage": .i8, "ByteStorage": .u8,
        "BoolStorage": .bool, "ComplexFloatStorage": .c64,
    ]

    /// torch dtype objects (`torch.float32`, ...) and our dtype for each.
    public static let torchDTypes: [String: DType] = [
        "float64": .f64, "float32": .f32, "float16": .f16, "bfloat16": .bf16, "int64": .i64, "int32": .i32,
        "int16": .i16, "int8": .i8, "uint8": .u8, "uint16": .u16, "uint32": .u32, "uint64": .u64, "bool": .bool,
        "complex64": .c64, "float8_e4m3fn": .f8e4m3, "float8_e5m2": .f8e5m2, "float8_e8m0fnu": .f8e8m0,
        "float8_e4m3fnuz": .f8e4m3fnuz, "float8_e5m2fnuz": .f8e5m2fnuz,
    ]

    /// Everything the unpickler will resolve. The allowlist of torch's weights_only
    /// unpickler, less what no checkpoint of weights needs (quantized and sparse tensors).
    public static let allowed: Set<PickleGlobal> = {
        var s: Set<PickleGlobal> = [
            PickleGlobal(module: "collections", name: "OrderedDict"),
            PickleGlobal(module: "torch._utils", name: "_rebuild_tensor"),
            PickleGlobal(module: "torch._utils", name: "_rebuild_tensor_v2"),
            PickleGlobal(module: "torch._utils", name: "_rebuild_tensor_v3"),
            PickleGlobal(module: "torch._utils", name: "_rebuild_parameter"),
            PickleGlobal(module: "torch._utils", name: "_rebuild_parameter_with_state"),
            PickleGlobal(module: "torch._tensor", name: "_rebuild_from_type_v2"),
            PickleGlobal(module: "torch.storage", name: "UntypedStorage"),
            PickleGlobal(module: "torch.storage", name: "TypedStorage"),
            PickleGlobal(module: "torch.nn.parameter", name: "Parameter"),
            PickleGlobal(module: "torch", name: "Tensor"),
            PickleGlobal(module: "torch", name: "Size"),
            PickleGlobal(module: "torch", name: "device"),
            PickleGlobal(module: "_codecs", name: "encode"),
            PickleGlobal(module: "builtins", name: "set"),
            PickleGlobal(module: "builtins", name: "bytearray"),
        ]
        for name in storageTypes.keys {
            s.insert(PickleGlobal(module: "torch", name: name))
            s.insert(PickleGlobal(module: "torch.cuda", name: name))
        }
        for name in torchDTypes.keys { s.insert(PickleGlobal(module: "torch", name: name)) }
        return s
    }()
}

public struct PickleError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case forbiddenGlobal(String)
        case unsupportedOpcode(UInt8)
        case truncated
        case stackUnderflow(String)
        case badValue(String)
        case tooLarge(String)
        case unsupportedProtocol(Int)
        case tooDeep(limit: Int)
    }
    public var reason: Reason
    public var file: String
    public var offset: Int

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        let at = "\(file): pickle byte \(offset)"
        switch reason {
        case .forbiddenGlobal(let g):
            return "\(at): refusing to load global \(g): only the names needed to rebuild tensors are allowed (nothing was executed)"
        case .unsupportedOpcode(let op): return "\(at): pickle opcode 0x\(String(op, radix: 16)) is not allowed in a checkpoint"
        case .truncated: return "\(at): pickle ends early (no STOP)"
        case .stackUnderflow(let op): return "\(at): malformed pickle: \(op) with too few values on the stack"
        case .badValue(let why): return "\(at): \(why)"
        case .tooLarge(let why): return "\(at): \(why)"
        case .unsupportedProtocol(let p): return "\(at): pickle protocol \(p) is not supported"
        case .tooDeep(let limit):
            return "\(at): objects nested deeper than \(limit) levels (or containing themselves): not a checkpoint"
        }
    }
}

/// Resolves persistent ids (torch's storages) during unpickling.
public typealias PersistentLoad = (PickleValue, Int) throws -> PickleValue

public struct Unpickler {
    /// Deepest nesting of containers accepted, as the JSON and msgpack parsers (a state dict
    /// nests a handful of levels; deeper pickles would only exhaust the stack of the walks).
    public static let maxDepth = 256
    /// Nodes a finished object may expand to through shared (memoized) references: a pickle of
    /// a few KB can otherwise describe 2**64 paths.
    public static let maxNodes = 10_000_000

    /// A value on the stack or in the memo, with its nesting depth (containers: 1 + deepest item).
    private struct Entry {
        var value: PickleValue
        var depth: Int
    }

    /// The pickle's bytes, read only through this bounds-checked cursor.
    private var cursor: ByteCursor
    private let file: String
    /// Where the next opcode or argument is read.
    private var pos: Int { cursor.readerIndex }
    private var stack: [Entry] = []
    private var marks: [Int] = []
    private var memo: [Int: Entry] = [:]
    /// Every list and dict made, so a rejected object can be taken apart without recursion
    /// (a deep or self-containing structure would otherwise overflow the stack when freed).
    private var lists: [PickleList] = []
    private var dicts: [PickleDict] = []
    private let persistentLoad: PersistentLoad

    /// Unpickles one pickle starting at `offset`; returns the value and the offset after STOP.
    public static func load(_ bytes: UnsafeRawBufferPointer, at offset: Int = 0, file: String,
                            persistentLoad: @escaping PersistentLoad) throws -> (PickleValue, Int) {
        var cursor = ByteCursor(unsafeBytes: bytes)
        do { try cursor.moveReaderIndex(to: offset) } catch { throw PickleError(reason: .truncated, file: file, offset: offset) }
        var u = Unpickler(cursor: cursor, file: file, persistentLoad: persistentLoad)
        do {
            let v = try u.run()
            let reached = try u.checkShape(v, at: offset)
            // What the object does not reach (left on the stack or in the memo) may still hold
            // a cycle: empty it, as for a rejected object.
            for l in u.lists where !reached.contains(ObjectIdentifier(l)) { l.items.removeAll() }
            for d in u.dicts where !reached.contains(ObjectIdentifier(d)) { d.entries.removeAll() }
            u.lists.removeAll()
            u.dicts.removeAll()
            return (v, u.pos)
        } catch {
            u.dismantle()
            throw error
        }
    }

    private init(cursor: ByteCursor, file: String, persistentLoad: @escaping PersistentLoad) {
        self.cursor = cursor
        self.file = file
        self.persistentLoad = persistentLoad
    }

    private func fail(_ r: PickleError.Reason, at: Int? = nil) -> PickleError {
        PickleError(reason: r, file: file, offset: at ?? pos)
    }

    // MARK: reading (every length comes from the file: the cursor checks it against what is there)

    /// A read past the end: the pickle is truncated where that read started.
    private func truncated(_ e: ByteCursorError) -> PickleError { fail(.truncated, at: e.offset) }

    private mutating func bytes(_ n: Int) throws -> [UInt8] {
        do { return try cursor.readBytes(n) } catch { throw truncated(error) }
    }

    private mutating func skip(_ n: Int) throws {
        do { try cursor.skip(n) } catch { throw truncated(error) }
    }

    private mutating func u8() throws -> Int {
        do { return Int(try cursor.readByte()) } catch { throw truncated(error) }
    }

    private mutating func integer<T: FixedWidthInteger>(_: T.Type, _ endianness: Endianness = .little) throws -> T {
        do { return try cursor.readInteger(endianness: endianness, as: T.self) } catch { throw truncated(error) }
    }

    /// A little-endian length of `width` bytes (4 or 8) that must fit in what is left.
    private mutating func length(_ width: Int) throws -> Int {
        let at = pos
        let v = width == 4 ? UInt64(try integer(UInt32.self)) : try integer(UInt64.self)
        guard v <= UInt64(cursor.remaining) else { throw fail(.truncated, at: at) }
        return Int(v)
    }

    /// The bytes up to the next newline, which is consumed (protocol 0's text arguments).
    private mutating func lineBytes() throws -> [UInt8] {
        let newline = try cursor.withUnsafeBytes(at: pos, count: cursor.remaining) { $0.firstIndex(of: 0x0A) }
        guard let newline else { throw fail(.truncated) }
        let line = try bytes(newline)
        try skip(1)
        return line
    }

    /// A text argument: ASCII in every pickle Python writes (module names, numbers, keys).
    private mutating func line() throws -> String { String(decoding: try lineBytes(), as: UTF8.self) }

    private mutating func utf8(_ n: Int) throws -> String {
        let at = pos
        let s: String?
        do { s = try cursor.readUTF8(n) } catch { throw truncated(error) }
        guard let s else { throw fail(.badValue("string is not valid UTF-8"), at: at) }
        return s
    }

    // MARK: stack

    private mutating func popEntry(_ op: String) throws -> Entry {
        guard let e = stack.popLast() else { throw fail(.stackUnderflow(op)) }
        return e
    }

    private mutating func pop(_ op: String) throws -> PickleValue { try popEntry(op).value }

    private mutating func popMark(_ op: String) throws -> [Entry] {
        guard let m = marks.popLast(), m <= stack.count else { throw fail(.stackUnderflow(op)) }
        let items = Array(stack[m...])
        stack.removeSubrange(m...)
        return items
    }

    private mutating func top(_ op: String) throws -> PickleValue {
        guard let e = stack.last else { throw fail(.stackUnderflow(op)) }
        return e.value
    }

    /// The depth a value has now (a list or dict may have grown since it was pushed).
    private static func depth(_ e: Entry) -> Int {
        switch e.value {
        case .list(let l): return l.depth
        case .dict(let d): return d.depth
        default: return e.depth
        }
    }

    private mutating func push(_ v: PickleValue, depth: Int = 0) throws {
        guard stack.count < 10_000_000 else { throw fail(.tooLarge("stack deeper than 10 million values")) }
        guard depth <= Unpickler.maxDepth else { throw fail(.tooDeep(limit: Unpickler.maxDepth)) }
        stack.append(Entry(value: v, depth: depth))
    }

    /// A container holding `items`: one level deeper than the deepest of them.
    private mutating func pushContainer(_ v: PickleValue, _ items: [Entry]) throws {
        try push(v, depth: 1 + (items.map(Unpickler.depth).max() ?? 0))
    }

    private mutating func newList(_ items: [Entry] = []) throws {
        let l = PickleList(items.map(\.value))
        l.depth = 1 + (items.map(Unpickler.depth).max() ?? 0)
        lists.append(l)
        try push(.list(l), depth: l.depth)
    }

    private mutating func newDict(_ items: [Entry] = []) throws {
        let d = PickleDict()
        dicts.append(d)
        try push(.dict(d), depth: 1)
        try addPairs(items, to: d, op: "DICT")
    }

    private mutating func append(_ items: [Entry], to l: PickleList) throws {
        let deepest = items.map(Unpickler.depth).max() ?? 0
        guard deepest < Unpickler.maxDepth else { throw fail(.tooDeep(limit: Unpickler.maxDepth)) }
        l.depth = max(l.depth, deepest + 1)
        l.items.append(contentsOf: items.map(\.value))
    }

    private mutating func addPairs(_ items: [Entry], to d: PickleDict, op: String) throws {
        guard items.count % 2 == 0 else { throw fail(.badValue("\(op) with an odd number of items")) }
        let deepest = items.map(Unpickler.depth).max() ?? 0
        guard deepest < Unpickler.maxDepth else { throw fail(.tooDeep(limit: Unpickler.maxDepth)) }
        d.depth = max(d.depth, deepest + 1)
        for i in stride(from: 0, to: items.count, by: 2) { d.entries.append((items[i].value, items[i + 1].value)) }
    }

    private mutating func memoize(_ key: Int) throws {
        guard memo.count < 50_000_000 else { throw fail(.tooLarge("memo larger than 50 million entries")) }
        guard let e = stack.last else { throw fail(.stackUnderflow("PUT")) }
        memo[key] = e
    }

    private mutating func get(_ key: Int) throws {
        guard let e = memo[key] else { throw fail(.badValue("memo key \(key) was never stored")) }
        try push(e.value, depth: Unpickler.depth(e))
    }

    // MARK: the finished object

    /// The depths recorded while building can be stale (a list grown after it was put into
    /// another), so the finished object is walked once, without recursion: nesting at most
    /// `maxDepth` (which also rules out a container holding itself) and at most `maxNodes`
    /// nodes counted along every path. Every later recursive walk relies on this.
    /// Returns the lists and dicts the object reaches.
    private func checkShape(_ root: PickleValue, at: Int) throws -> Set<ObjectIdentifier> {
        var pending: [(PickleValue, Int)] = [(root, 0)]
        var reached = Set<ObjectIdentifier>()
        var nodes = 0
        while let (v, depth) = pending.popLast() {
            nodes += 1
            guard nodes <= Unpickler.maxNodes else {
                throw fail(.tooLarge("object expands to more than \(Unpickler.maxNodes) values through shared references"), at: at)
            }
            let children: [PickleValue]
            switch v {
            case .tuple(let items): children = items
            case .list(let l): children = l.items; reached.insert(ObjectIdentifier(l))
            case .dict(let d): children = d.entries.flatMap { [$0.key, $0.value] }; reached.insert(ObjectIdentifier(d))
            default: continue
            }
            guard depth < Unpickler.maxDepth else { throw fail(.tooDeep(limit: Unpickler.maxDepth), at: at) }
            for c in children { pending.append((c, depth + 1)) }
        }
        return reached
    }

    /// Empties every list and dict made, so freeing a rejected object never recurses deeper
    /// than the tuples nested directly in one another (bounded when they were built).
    private mutating func dismantle() {
        stack.removeAll()
        memo.removeAll()
        for l in lists { l.items.removeAll() }
        for d in dicts { d.entries.removeAll() }
        lists.removeAll()
        dicts.removeAll()
    }

    // MARK: the loop

    private mutating func run() throws -> PickleValue {
        while true {
            let at = pos
            let op = UInt8(try u8())
            switch op {
            case 0x80: // PROTO
                let p = try u8()
                guard p <= 5 else { throw fail(.unsupportedProtocol(p), at: at) }
            case 0x95: try skip(8) // FRAME: framing is transparent to a reader with the whole pickle
            case 0x2E: // STOP
                guard let e = stack.popLast() else { throw fail(.stackUnderflow("STOP")) }
                return e.value
            case 0x28: marks.append(stack.count) // MARK
            case 0x30: _ = try pop("POP")
            case 0x31: _ = try popMark("POP_MARK")
            case 0x32: // DUP
                guard let e = stack.last else { throw fail(.stackUnderflow("DUP")) }
                try push(e.value, depth: Unpickler.depth(e))
            // Integers
            case 0x4A: try push(.int(Int(try integer(Int32.self))))  // BININT
            case 0x4B: try push(.int(try u8()))  // BININT1
            case 0x4D: try push(.int(Int(try integer(UInt16.self))))  // BININT2
            case 0x8A, 0x8B: // LONG1, LONG4
                let n = op == 0x8A ? try u8() : try length(4)
                try push(Unpickler.long(try bytes(n)))
            case 0x49: // INT (text); "00"/"01" are False/True
                let s = try line()
                if s == "00" { try push(.bool(false)) } else if s == "01" { try push(.bool(true)) } else {
                    guard let v = Int(s) else { throw fail(.badValue("invalid INT \(s)"), at: at) }
                    try push(.int(v))
                }
            case 0x4C: // LONG (text, trailing L): protocol 0 writes torch's magic number this way
                var s = try line()
                if s.hasSuffix("L") { s.removeLast() }
                guard let v = Unpickler.decimalLong(s) else { throw fail(.badValue("invalid LONG \(s)"), at: at) }
                try push(v)
            case 0x88: try push(.bool(true))
            case 0x89: try push(.bool(false))
            case 0x4E: try push(.none)
            // Floats
            case 0x47: try push(.float(Double(bitPattern: try integer(UInt64.self, .big))))  // BINFLOAT, big-endian
            case 0x46:
                let s = try line()
                guard let v = Double(s) else { throw fail(.badValue("invalid FLOAT \(s)"), at: at) }
                try push(.float(v))
            // Strings and bytes
            case 0x58: try push(.string(try utf8(try length(4))))  // BINUNICODE
            case 0x8C: try push(.string(try utf8(try u8())))  // SHORT_BINUNICODE
            case 0x8D: try push(.string(try utf8(try length(8))))  // BINUNICODE8
            case 0x56: // UNICODE: raw-unicode-escape
                guard let s = Unpickler.rawUnicodeEscape(try lineBytes()) else { throw fail(.badValue("invalid UNICODE escape"), at: at) }
                try push(.string(s))
            case 0x54: try push(.bytes(try bytes(try length(4))))  // BINSTRING (py2 str)
            case 0x55: try push(.bytes(try bytes(try u8())))  // SHORT_BINSTRING
            case 0x53: // STRING: a quoted Python 2 literal
                guard let b = Unpickler.quotedString(try lineBytes()) else { throw fail(.badValue("invalid STRING literal"), at: at) }
                try push(.bytes(b))
            case 0x42: try push(.bytes(try bytes(try length(4))))  // BINBYTES
            case 0x43: try push(.bytes(try bytes(try u8())))  // SHORT_BINBYTES
            case 0x8E: try push(.bytes(try bytes(try length(8))))  // BINBYTES8
            case 0x96: try push(.bytes(try bytes(try length(8))))  // BYTEARRAY8
            // Containers
            case 0x29: try push(.tuple([]), depth: 1)
            case 0x74: // TUPLE
                let items = try popMark("TUPLE")
                try pushContainer(.tuple(items.map(\.value)), items)
            case 0x85, 0x86, 0x87: // TUPLE1, TUPLE2, TUPLE3
                let n = Int(op) - 0x84
                guard stack.count >= n else { throw fail(.stackUnderflow("TUPLE\(n)")) }
                let items = Array(stack.suffix(n))
                stack.removeLast(n)
                try pushContainer(.tuple(items.map(\.value)), items)
            case 0x5D: try newList()  // EMPTY_LIST
            case 0x6C: try newList(try popMark("LIST"))
            case 0x61: // APPEND
                let v = try popEntry("APPEND")
                guard case .list(let l) = try top("APPEND") else { throw fail(.badValue("APPEND to a non-list"), at: at) }
                try append([v], to: l)
            case 0x65: // APPENDS
                let items = try popMark("APPENDS")
                guard case .list(let l) = try top("APPENDS") else { throw fail(.badValue("APPENDS to a non-list"), at: at) }
                try append(items, to: l)
            case 0x7D: try newDict()  // EMPTY_DICT
            case 0x64: try newDict(try popMark("DICT"))
            case 0x73: // SETITEM
                let v = try popEntry("SETITEM"), k = try popEntry("SETITEM")
                guard case .dict(let d) = try top("SETITEM") else { throw fail(.badValue("SETITEM on a non-dict"), at: at) }
                try addPairs([k, v], to: d, op: "SETITEM")
            case 0x75: // SETITEMS
                let items = try popMark("SETITEMS")
                guard case .dict(let d) = try top("SETITEMS") else { throw fail(.badValue("SETITEMS on a non-dict"), at: at) }
                try addPairs(items, to: d, op: "SETITEMS")
            case 0x8F: try newList()  // EMPTY_SET, kept as a list
            case 0x90: // ADDITEMS
                let items = try popMark("ADDITEMS")
                guard case .list(let l) = try top("ADDITEMS") else { throw fail(.badValue("ADDITEMS to a non-set"), at: at) }
                try append(items, to: l)
            case 0x91: try newList(try popMark("FROZENSET"))
            // Memo
            case 0x70: // PUT (text)
                guard let k = Int(try line()) else { throw fail(.badValue("invalid PUT key"), at: at) }
                try memoize(k)
            case 0x71: try memoize(try u8())  // BINPUT
            case 0x72: try memoize(Int(try integer(UInt32.self)))  // LONG_BINPUT
            case 0x94: try memoize(memo.count)  // MEMOIZE
            case 0x67: // GET (text)
                guard let k = Int(try line()) else { throw fail(.badValue("invalid GET key"), at: at) }
                try get(k)
            case 0x68: try get(try u8())
            case 0x6A: try get(Int(try integer(UInt32.self)))
            // Names: resolved against the allowlist, nothing is imported or called.
            case 0x63: // GLOBAL "module\nname\n"
                let module = try line(), name = try line()
                try push(.global(try resolve(module, name, at: at)))
            case 0x93: // STACK_GLOBAL
                let n = try pop("STACK_GLOBAL"), m = try pop("STACK_GLOBAL")
                guard case .string(let module) = m, case .string(let name) = n else {
                    throw fail(.badValue("STACK_GLOBAL needs two strings"), at: at)
                }
                try push(.global(try resolve(module, name, at: at)))
            case 0x51: // BINPERSID
                let pid = try pop("BINPERSID")
                try push(try persistentLoad(pid, at))
            case 0x50: // PERSID (text: protocol 0 writes the id's str())
                try push(try persistentLoad(.string(try line()), at))
            case 0x52: // REDUCE
                let args = try pop("REDUCE"), callable = try pop("REDUCE")
                guard case .global(let g) = callable, case .tuple(let a) = args else {
                    throw fail(.badValue("REDUCE needs an allowed global and an argument tuple (got \(callable.typeName))"), at: at)
                }
                try pushResult(try TorchRebuild.call(g, a, file: file, at: at))
            case 0x81: // NEWOBJ: cls.__new__(cls, *args)
                let args = try pop("NEWOBJ"), cls = try pop("NEWOBJ")
                guard case .global(let g) = cls, case .tuple(let a) = args else { throw fail(.badValue("malformed NEWOBJ"), at: at) }
                try pushResult(try TorchRebuild.call(g, a, file: file, at: at))
            case 0x62: // BUILD: set state; only plain state on dicts and tensors is accepted, and ignored
                let state = try pop("BUILD")
                let target = try top("BUILD")
                switch (target, state) {
                case (.dict, _), (.tensor, .none), (.tensor, .dict), (.tensor, .tuple): break
                default: throw fail(.badValue("BUILD on \(target.typeName) is not supported"), at: at)
                }
            default:
                // INST, OBJ, EXT*, NEWOBJ_EX, NEXT_BUFFER, READONLY_BUFFER and unknown bytes.
                throw fail(.unsupportedOpcode(op), at: at)
            }
        }
    }

    /// What an allowed call returned: containers it made are registered like any other.
    private mutating func pushResult(_ v: PickleValue) throws {
        switch v {
        case .list(let l):
            lists.append(l)
            try push(v, depth: l.depth)
        case .dict(let d):
            dicts.append(d)
            try push(v, depth: d.depth)
        case .tuple: try push(v, depth: 1)
        default: try push(v)
        }
    }

    /// Python 2 module names, as Python 3's unpickler maps them (`_compat_pickle`).
    static let python2Modules = ["__builtin__": "builtins", "copy_reg": "copyreg"]

    private func resolve(_ module: String, _ name: String, at: Int) throws -> PickleGlobal {
        let g = PickleGlobal(module: Unpickler.python2Modules[module] ?? module, name: name)
        guard PickleGlobal.allowed.contains(g) else { throw fail(.forbiddenGlobal(g.description), at: at) }
        return g
    }

    /// LONG1/LONG4 payload: little-endian two's complement.
    static func long(_ b: [UInt8]) -> PickleValue {
        if b.isEmpty { return .int(0) }
        if b.count > 8 {
            // Fits in 64 bits if the extra bytes only extend the sign.
            let sign: UInt8 = b[7] & 0x80 != 0 ? 0xFF : 0
            guard b[8...].allSatisfy({ $0 == sign }) else { return .bigInt(b) }
        }
        var v: UInt64 = 0
        for (i, byte) in b.prefix(8).enumerated() { v |= UInt64(byte) << (8 * UInt64(i)) }
        if b.count < 8 && b.last! & 0x80 != 0 { v |= ~UInt64(0) << (8 * UInt64(b.count)) }
        return .int(Int(Int64(bitPattern: v)))
    }

    /// A decimal LONG argument as `long` would hold it: minimal little-endian two's complement
    /// (what LONG1 carries for the same number), so both spellings compare equal.
    static func decimalLong(_ s: String) -> PickleValue? {
        var digits = Substring(s)
        let negative = digits.first == "-"
        if negative || digits.first == "+" { digits = digits.dropFirst() }
        guard !digits.isEmpty, digits.count <= 4096, digits.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        var magnitude: [UInt8] = []  // little-endian
        for c in digits.utf8 {
            var carry = Int(c - 48)
            for i in magnitude.indices {
                let v = Int(magnitude[i]) * 10 + carry
                magnitude[i] = UInt8(v & 0xFF)
                carry = v >> 8
            }
            while carry > 0 { magnitude.append(UInt8(carry & 0xFF)); carry >>= 8 }
        }
        if magnitude.isEmpty { return .int(0) }
        var b = magnitude
        if b.last! & 0x80 != 0 { b.append(0) }
        if negative {  // two's complement of the magnitude
            var carry = 1
            for i in b.indices {
                let v = Int(~b[i]) + carry
                b[i] = UInt8(v & 0xFF)
                carry = v >> 8
            }
            // Drop sign bytes a shorter encoding does not need.
            while b.count > 1, b[b.count - 1] == 0xFF, b[b.count - 2] & 0x80 != 0 { b.removeLast() }
        }
        return long(b)
    }

    /// UNICODE's raw-unicode-escape: bytes are Latin-1 characters except `\uXXXX` and
    /// `\UXXXXXXXX` (how pickle writes backslashes, newlines and characters beyond Latin-1).
    static func rawUnicodeEscape(_ b: [UInt8]) -> String? {
        var out = String.UnicodeScalarView()
        var i = 0
        while i < b.count {
            if b[i] == 0x5C, i + 1 < b.count, b[i + 1] == UInt8(ascii: "u") || b[i + 1] == UInt8(ascii: "U") {
                let n = b[i + 1] == UInt8(ascii: "u") ? 4 : 8
                guard i + 2 + n <= b.count, let v = UInt32(String(decoding: b[(i + 2)..<(i + 2 + n)], as: UTF8.self), radix: 16),
                      let scalar = Unicode.Scalar(v) else { return nil }
                out.append(scalar)
                i += 2 + n
            } else {
                out.append(Unicode.Scalar(b[i]))
                i += 1
            }
        }
        return String(out)
    }

    /// STRING's argument: a Python 2 `repr` of a byte string, quotes included.
    static func quotedString(_ b: [UInt8]) -> [UInt8]? {
        guard b.count >= 2, let q = b.first, q == UInt8(ascii: "'") || q == UInt8(ascii: "\""), b[b.count - 1] == q else { return nil }
        var out: [UInt8] = []
        var i = 1
        let end = b.count - 1
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        while i < end {
            let c = b[i]
            guard c == 0x5C else { out.append(c); i += 1; continue }
            guard i + 1 < end else { return nil }
            let e = b[i + 1]
            i += 2
            switch e {
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "a"): out.append(0x07)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "v"): out.append(0x0B)
            case UInt8(ascii: "x"):
                guard i + 1 < end, let h = hex(b[i]), let l = hex(b[i + 1]) else { return nil }
                out.append(h << 4 | l)
                i += 2
            case 48...55:  // up to three octal digits
                var v = Int(e - 48)
                var k = 0
                while k < 2, i < end, (48...55).contains(b[i]) { v = v * 8 + Int(b[i] - 48); i += 1; k += 1 }
                out.append(UInt8(v & 0xFF))
            case 0x5C, 0x27, 0x22: out.append(e)  // \\ \' \"
            default: out.append(contentsOf: [0x5C, e])  // Python keeps unknown escapes as they are
            }
        }
        return out
    }
}
