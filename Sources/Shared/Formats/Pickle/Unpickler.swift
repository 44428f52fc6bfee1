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
    init(_ items: [PickleValue] = []) { self.items = items }
}

public final class PickleDict {
    public var entries: [(key: PickleValue, value: PickleValue)] = []
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
        }
    }
}

/// Resolves persistent ids (torch's storages) during unpickling.
public typealias PersistentLoad = (PickleValue, Int) throws -> PickleValue

public struct Unpickler {
    private let bytes: UnsafeRawBufferPointer
    private let file: String
    private var pos: Int
    private var stack: [PickleValue] = []
    private var marks: [Int] = []
    private var memo: [Int: PickleValue] = [:]
    private let persistentLoad: PersistentLoad

    /// Unpickles one pickle starting at `offset`; returns the value and the offset after STOP.
    public static func load(_ bytes: UnsafeRawBufferPointer, at offset: Int = 0, file: String,
                            persistentLoad: @escaping PersistentLoad) throws -> (PickleValue, Int) {
        var u = Unpickler(bytes: bytes, file: file, pos: offset, persistentLoad: persistentLoad)
        let v = try u.run()
        return (v, u.pos)
    }

    private init(bytes: UnsafeRawBufferPointer, file: String, pos: Int, persistentLoad: @escaping PersistentLoad) {
        self.bytes = bytes
        self.file = file
        self.pos = pos
        self.persistentLoad = persistentLoad
    }

    private func fail(_ r: PickleError.Reason, at: Int? = nil) -> PickleError {
        PickleError(reason: r, file: file, offset: at ?? pos)
    }

    // MARK: reading

    private mutating func take(_ n: Int) throws -> UnsafeRawBufferPointer {
        // Lengths come from the file: check them against what is there before using them.
        guard n >= 0, n <= bytes.count - pos else { throw fail(.truncated) }
        defer { pos += n }
        return UnsafeRawBufferPointer(rebasing: bytes[pos..<pos + n])
    }

    private mutating func u8() throws -> Int { Int(try take(1)[0]) }

    private mutating func uint(_ n: Int) throws -> UInt64 {
        let b = try take(n)
        var v: UInt64 = 0
        for i in (0..<n).reversed() { v = v << 8 | UInt64(b[i]) }
        return v
    }

    private mutating func length(_ n: Int) throws -> Int {
        let v = try uint(n)
        guard v <= UInt64(bytes.count - pos) else { throw fail(.truncated) }
        return Int(v)
    }

    private mutating func line() throws -> String {
        guard let nl = bytes[pos...].firstIndex(of: 0x0A) else { throw fail(.truncated) }
        let s = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[pos..<nl]), as: UTF8.self)
        pos = nl + 1
        return s
    }

    private mutating func utf8(_ n: Int) throws -> String {
        let at = pos
        guard let s = String(validating: try take(n), as: UTF8.self) else { throw fail(.badValue("string is not valid UTF-8"), at: at) }
        return s
    }

    // MARK: stack

    private mutating func pop(_ op: String) throws -> PickleValue {
        guard let v = stack.popLast() else { throw fail(.stackUnderflow(op)) }
        return v
    }

    private mutating func popMark(_ op: String) throws -> [PickleValue] {
        guard let m = marks.popLast(), m <= stack.count else { throw fail(.stackUnderflow(op)) }
        let items = Array(stack[m...])
        stack.removeSubrange(m...)
        return items
    }

    private mutating func top(_ op: String) throws -> PickleValue {
        guard let v = stack.last else { throw fail(.stackUnderflow(op)) }
        return v
    }

    private mutating func push(_ v: PickleValue) throws {
        guard stack.count < 10_000_000 else { throw fail(.tooLarge("stack deeper than 10 million values")) }
        stack.append(v)
    }

    private mutating func memoize(_ key: Int) throws {
        guard memo.count < 50_000_000 else { throw fail(.tooLarge("memo larger than 50 million entries")) }
        memo[key] = try top("PUT")
    }

    private mutating func get(_ key: Int) throws {
        guard let v = memo[key] else { throw fail(.badValue("memo key \(key) was never stored")) }
        try push(v)
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
            case 0x95: _ = try take(8) // FRAME: framing is transparent to a reader with the whole pickle
            case 0x2E: // STOP
                guard let v = stack.popLast() else { throw fail(.stackUnderflow("STOP")) }
                return v
            case 0x28: marks.append(stack.count) // MARK
            case 0x30: _ = try pop("POP")
            case 0x31: _ = try popMark("POP_MARK")
            case 0x32: try push(try top("DUP"))
            // Integers
            case 0x4A: try push(.int(Int(Int32(bitPattern: UInt32(try uint(4))))))  // BININT
            case 0x4B: try push(.int(try u8()))  // BININT1
            case 0x4D: try push(.int(Int(try uint(2))))  // BININT2
            case 0x8A, 0x8B: // LONG1, LONG4
                let n = op == 0x8A ? try u8() : try length(4)
                try push(Unpickler.long(Array(try take(n))))
            case 0x49: // INT (text); "00"/"01" are False/True
                let s = try line()
                if s == "00" { try push(.bool(false)) } else if s == "01" { try push(.bool(true)) } else {
                    guard let v = Int(s) else { throw fail(.badValue("invalid INT \(s)"), at: at) }
                    try push(.int(v))
                }
            case 0x4C: // LONG (text, trailing L)
                var s = try line()
                if s.hasSuffix("L") { s.removeLast() }
                guard let v = Int(s) else { throw fail(.badValue("LONG \(s) out of range"), at: at) }
                try push(.int(v))
            case 0x88: try push(.bool(true))
            case 0x89: try push(.bool(false))
            case 0x4E: try push(.none)
            // Floats
            case 0x47: try push(.float(Double(bitPattern: try (0..<8).reduce(UInt64(0)) { a, _ in a << 8 | UInt64(try u8()) })))
            case 0x46:
                let s = try line()
                guard let v = Double(s) else { throw fail(.badValue("invalid FLOAT \(s)"), at: at) }
                try push(.float(v))
            // Strings and bytes
            case 0x58: try push(.string(try utf8(try length(4))))  // BINUNICODE
            case 0x8C: try push(.string(try utf8(try u8())))  // SHORT_BINUNICODE
            case 0x8D: try push(.string(try utf8(try length(8))))  // BINUNICODE8
            case 0x56: try push(.string(try line()))  // UNICODE (raw-unicode-escape; ASCII in practice)
            case 0x54: try push(.bytes(Array(try take(try length(4)))))  // BINSTRING (py2 str)
            case 0x55: try push(.bytes(Array(try take(try u8()))))  // SHORT_BINSTRING
            case 0x53: // STRING: a quoted Python 2 literal
                var s = try line()
                if s.count >= 2, let q = s.first, q == "'" || q == "\"", s.last == q { s = String(s.dropFirst().dropLast()) }
                try push(.bytes(Array(s.utf8)))
            case 0x42: try push(.bytes(Array(try take(try length(4)))))  // BINBYTES
            case 0x43: try push(.bytes(Array(try take(try u8()))))  // SHORT_BINBYTES
            case 0x8E: try push(.bytes(Array(try take(try length(8)))))  // BINBYTES8
            case 0x96: try push(.bytes(Array(try take(try length(8)))))  // BYTEARRAY8
            // Containers
            case 0x29: try push(.tuple([]))
            case 0x74: try push(.tuple(try popMark("TUPLE")))
            case 0x85: try push(.tuple([try pop("TUPLE1")]))
            case 0x86:
                let b = try pop("TUPLE2"), a = try pop("TUPLE2")
                try push(.tuple([a, b]))
            case 0x87:
                let c = try pop("TUPLE3"), b = try pop("TUPLE3"), a = try pop("TUPLE3")
                try push(.tuple([a, b, c]))
            case 0x5D: try push(.list(PickleList()))
            case 0x6C: try push(.list(PickleList(try popMark("LIST"))))
            case 0x61: // APPEND
                let v = try pop("APPEND")
                guard case .list(let l) = try top("APPEND") else { throw fail(.badValue("APPEND to a non-list"), at: at) }
                l.items.append(v)
            case 0x65: // APPENDS
                let items = try popMark("APPENDS")
                guard case .list(let l) = try top("APPENDS") else { throw fail(.badValue("APPENDS to a non-list"), at: at) }
                l.items.append(contentsOf: items)
            case 0x7D: try push(.dict(PickleDict()))
            case 0x64: // DICT
                let items = try popMark("DICT")
                guard items.count % 2 == 0 else { throw fail(.badValue("DICT with an odd number of items"), at: at) }
                let d = PickleDict()
                for i in stride(from: 0, to: items.count, by: 2) { d.entries.append((items[i], items[i + 1])) }
                try push(.dict(d))
            case 0x73: // SETITEM
                let v = try pop("SETITEM"), k = try pop("SETITEM")
                guard case .dict(let d) = try top("SETITEM") else { throw fail(.badValue("SETITEM on a non-dict"), at: at) }
                d.entries.append((k, v))
            case 0x75: // SETITEMS
                let items = try popMark("SETITEMS")
                guard items.count % 2 == 0 else { throw fail(.badValue("SETITEMS with an odd number of items"), at: at) }
                guard case .dict(let d) = try top("SETITEMS") else { throw fail(.badValue("SETITEMS on a non-dict"), at: at) }
                for i in stride(from: 0, to: items.count, by: 2) { d.entries.append((items[i], items[i + 1])) }
            case 0x8F: try push(.list(PickleList()))  // EMPTY_SET, kept as a list
            case 0x90: // ADDITEMS
                let items = try popMark("ADDITEMS")
                guard case .list(let l) = try top("ADDITEMS") else { throw fail(.badValue("ADDITEMS to a non-set"), at: at) }
                l.items.append(contentsOf: items)
            case 0x91: try push(.list(PickleList(try popMark("FROZENSET"))))
            // Memo
            case 0x70: // PUT (text)
                guard let k = Int(try line()) else { throw fail(.badValue("invalid PUT key"), at: at) }
                try memoize(k)
            case 0x71: try memoize(try u8())  // BINPUT
            case 0x72: try memoize(Int(try uint(4)))  // LONG_BINPUT
            case 0x94: try memoize(memo.count)  // MEMOIZE
            case 0x67: // GET (text)
                guard let k = Int(try line()) else { throw fail(.badValue("invalid GET key"), at: at) }
                try get(k)
            case 0x68: try get(try u8())
            case 0x6A: try get(Int(try uint(4)))
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
            case 0x50: // PERSID (text)
                try push(try persistentLoad(.string(try line()), at))
            case 0x52: // REDUCE
                let args = try pop("REDUCE"), callable = try pop("REDUCE")
                guard case .global(let g) = callable, case .tuple(let a) = args else {
                    throw fail(.badValue("REDUCE needs an allowed global and an argument tuple (got \(callable.typeName))"), at: at)
                }
                try push(try TorchRebuild.call(g, a, file: file, at: at))
            case 0x81: // NEWOBJ: cls.__new__(cls, *args)
                let args = try pop("NEWOBJ"), cls = try pop("NEWOBJ")
                guard case .global(let g) = cls, case .tuple(let a) = args else { throw fail(.badValue("malformed NEWOBJ"), at: at) }
                try push(try TorchRebuild.call(g, a, file: file, at: at))
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

    private func resolve(_ module: String, _ name: String, at: Int) throws -> PickleGlobal {
        let g = PickleGlobal(module: module, name: name)
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
}
