// NumPy's .npy format (numpy/lib/format.py, "NEP 1"): `\x93NUMPY`, major, minor, a header
// length (u16 LE in 1.0, u32 LE in 2.0 and 3.0), then a Python dict literal
// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` and the raw data.
// .npz is a zip of .npy members (numpy.savez: stored; savez_compressed: deflated).

/// What is wrong with a .npy file or .npz archive, one case per rule, with the file and
/// the array it concerns.
public struct NumPyError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case notARegularFile
        case badMagic
        case unsupportedVersion(major: UInt8, minor: UInt8)
        case headerTruncated
        case headerLengthPastData(length: Int)
        case headerNotLiteral(text: String)
        case headerNotDict
        case wrongHeaderKeys(keys: [String])
        case fortranOrderNotBool
        case shapeNotTuple
        case shapeNotNonNegativeInts
        case structuredDType
        case noByteOrder(descr: String)
        /// `<V1`/`<V2` without a `--dtype-hint` for the array.
        case opaqueVoidNeedsHint(descr: String)
        case hintDoesNotFit(hint: String, descr: String)
        case objectArray
        case unsupportedDType(descr: String)
        // .npz
        case memberNotNpy(member: String)
        case duplicateArray
        // writing
        case duplicateArrayInStream
        // data
        case dataTooShort(available: Int, dtype: String, shape: [Int], needed: Int)
        case trailingBytes(count: Int)
    }

    public var reason: Reason
    public var file: String
    public var tensor: String?

    public init(_ reason: Reason, file: String, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }
    public var description: String { tensor.map { "\(file): array \($0): \(reasonText)" } ?? "\(file): \(reasonText)" }

    private var reasonText: String {
        switch reason {
        case .notARegularFile: return "not a regular file"
        case .badMagic: return "not a .npy array (bad magic)"
        case .unsupportedVersion(let major, let minor): return ".npy version \(major).\(minor) is not supported"
        case .headerTruncated: return "header is truncated"
        case .headerLengthPastData(let n): return "header length \(n) runs past the data"
        case .headerNotLiteral(let text): return "header is not a Python literal: \(text.prefix(80))"
        case .headerNotDict: return "header is not a dict"
        case .wrongHeaderKeys(let keys): return "header keys must be descr, fortran_order and shape (got \(keys))"
        case .fortranOrderNotBool: return "fortran_order is not a bool"
        case .shapeNotTuple: return "shape is not a tuple"
        case .shapeNotNonNegativeInts: return "shape holds something other than a non-negative int"
        case .structuredDType: return "structured dtypes (a list descr) are not supported"
        case .noByteOrder(let descr): return "descr \(descr) has no byte order"
        case .opaqueVoidNeedsHint(let descr):
            return "stores opaque \(descr) (how numpy saves ml_dtypes bfloat16/float8): say what it holds with --dtype-hint '\(tensor ?? "NAME")=BF16'"
        case .hintDoesNotFit(let hint, let descr): return "--dtype-hint \(hint) does not fit \(descr)"
        case .objectArray: return "object arrays are refused (they are pickles)"
        case .unsupportedDType(let descr): return "dtype \(descr) is not supported"
        case .memberNotNpy(let member): return "member \(member) is not a .npy array"
        case .duplicateArray: return "array listed twice"
        case .duplicateArrayInStream: return "array name appears twice"
        case .dataTooShort(let available, let dtype, let shape, let needed): return "holds \(available) data bytes, \(dtype)\(shape) needs \(needed)"
        case .trailingBytes(let n): return "\(n) bytes after the array's data"
        }
    }
}

/// `--dtype-hint GLOB=DTYPE`: what an opaque void dtype (`<V2`, `<V1`) holds. numpy has no
/// bfloat16 or float8: arrays of ml_dtypes types are saved as raw void bytes.
public struct DTypeHints: Sendable {
    public var rules: [(glob: String, dtype: DType)] = []
    public init() {}

    public init(arguments: [String]) throws {
        for a in arguments {
            guard let eq = a.lastIndex(of: "="), let d = DType(rawValue: String(a[a.index(after: eq)...])) else {
                throw UsageError("--dtype-hint takes GLOB=DTYPE with a dtype such as BF16 or F8_E4M3, not '\(a)'")
            }
            rules.append((String(a[..<eq]), d))
        }
    }

    public func dtype(for name: String) -> DType? { rules.first { globMatches($0.glob, name) }?.dtype }
}

/// A parsed .npy header.
public struct NpyHeader: Equatable {
    public var dtype: DType
    public var bigEndian: Bool
    public var fortranOrder: Bool
    public var shape: [Int]
    /// Bytes before the data: magic, version, length field, header text.
    public var dataOffset: Int

    public static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]

    public static func parse(_ b: UnsafeRawBufferPointer, name: String, hints: DTypeHints, file: String) throws -> NpyHeader {
        func fail(_ r: NumPyError.Reason) -> NumPyError { NumPyError(r, file: file, tensor: name) }
        var c = ByteCursor(unsafeBytes: b)
        guard let magic = try? c.readBytes(6), magic == NpyHeader.magic, let major = try? c.readByte(), let minor = try? c.readByte() else {
            throw fail(.badMagic)
        }
        let headerLength: Int
        do {
            switch major {
            case 1: headerLength = Int(try c.readInteger(endianness: .little, as: UInt16.self))
            case 2, 3: headerLength = Int(try c.readInteger(endianness: .little, as: UInt32.self))
            default: throw fail(.unsupportedVersion(major: major, minor: minor))
            }
        } catch let e as NumPyError { throw e } catch { throw fail(.headerTruncated) }
        guard let headerBytes = try? c.readBytes(headerLength) else { throw fail(.headerLengthPastData(length: headerLength)) }
        let text = String(decoding: headerBytes, as: UTF8.self)
        var p = PythonLiteral(text)
        let dict: [String: PythonLiteral.Value]
        do {
            guard case .dict(let d) = try p.parse() else { throw fail(.headerNotDict) }
            dict = d
        } catch let e as NumPyError { throw e } catch { throw fail(.headerNotLiteral(text: String(text.prefix(80)))) }
        guard Set(dict.keys) == ["descr", "fortran_order", "shape"] else {
            throw fail(.wrongHeaderKeys(keys: dict.keys.sorted()))
        }
        guard case .bool(let fortran) = dict["fortran_order"]! else { throw fail(.fortranOrderNotBool) }
        guard case .tuple(let dims) = dict["shape"]! else { throw fail(.shapeNotTuple) }
        let shape = try dims.map { d -> Int in
            guard case .int(let i) = d, i >= 0 else { throw fail(.shapeNotNonNegativeInts) }
            return i
        }
        guard case .string(let descr) = dict["descr"]! else {
            throw fail(.structuredDType)
        }
        let (dtype, big) = try NpyHeader.dtype(descr, name: name, hints: hints, fail: fail)
        return NpyHeader(dtype: dtype, bigEndian: big, fortranOrder: fortran, shape: shape, dataOffset: c.offset)
    }

    static func dtype(_ descr: String, name: String, hints: DTypeHints, fail: (NumPyError.Reason) -> NumPyError) throws -> (DType, Bool) {
        guard let order = descr.first, "<>|=".contains(order) else { throw fail(.noByteOrder(descr: descr)) }
        let code = String(descr.dropFirst())
        let table: [String: DType] = ["f2": .f16, "f4": .f32, "f8": .f64, "i1": .i8, "i2": .i16, "i4": .i32, "i8": .i64,
                                      "u1": .u8, "u2": .u16, "u4": .u32, "u8": .u64, "b1": .bool, "c8": .c64]
        if let d = table[code] { return (d, order == ">") }
        if code == "V1" || code == "V2" {
            guard let d = hints.dtype(for: name) else {
                throw fail(.opaqueVoidNeedsHint(descr: descr))
            }
            guard d.size == Int(code.dropFirst())! else { throw fail(.hintDoesNotFit(hint: d.rawValue, descr: descr)) }
            return (d, false)
        }
        if code.hasPrefix("O") { throw fail(.objectArray) }
        throw fail(.unsupportedDType(descr: descr))
    }
}

/// The subset of Python literals .npy headers use: dicts, tuples, lists, strings, ints,
/// True/False/None.
struct PythonLiteral {
    indirect enum Value: Equatable {
        case dict([String: Value]), tuple([Value]), list([Value]), string(String), int(Int), bool(Bool), none
    }
    struct Invalid: Error {}

    private let c: [Character]
    private var i = 0
    init(_ text: String) { c = Array(text) }

    mutating func parse() throws -> Value {
        let v = try value()
        skip()
        guard i == c.count else { throw Invalid() }
        return v
    }

    private mutating func skip() { while i < c.count, c[i].isWhitespace { i += 1 } }

    private mutating func value() throws -> Value {
        skip()
        guard i < c.count else { throw Invalid() }
        switch c[i] {
        case "{":
            i += 1
            var d: [String: Value] = [:]
            while true {
                skip()
                if i < c.count, c[i] == "}" { i += 1; return .dict(d) }
                guard case .string(let k) = try value() else { throw Invalid() }
                skip()
                guard i < c.count, c[i] == ":" else { throw Invalid() }
                i += 1
                guard d[k] == nil else { throw Invalid() }
                d[k] = try value()
                skip()
                if i < c.count, c[i] == "," { i += 1 } else if i < c.count, c[i] == "}" { i += 1; return .dict(d) } else { throw Invalid() }
            }
        case "(", "[":
            let close: Character = c[i] == "(" ? ")" : "]"
            i += 1
            var items: [Value] = []
            while true {
                skip()
                if i < c.count, c[i] == close { i += 1; return close == ")" ? .tuple(items) : .list(items) }
                items.append(try value())
                skip()
                if i < c.count, c[i] == "," { i += 1 } else if i < c.count, c[i] == close {
                    i += 1
                    return close == ")" ? .tuple(items) : .list(items)
                } else { throw Invalid() }
            }
        case "'", "\"":
            let q = c[i]
            i += 1
            var s = ""
            while i < c.count, c[i] != q {
                if c[i] == "\\" { throw Invalid() }
                s.append(c[i])
                i += 1
            }
            guard i < c.count else { throw Invalid() }
            i += 1
            return .string(s)
        default:
            var word = ""
            while i < c.count, c[i].isLetter || c[i].isNumber || c[i] == "-" || c[i] == "_" {
                word.append(c[i])
                i += 1
            }
            switch word {
            case "True": return .bool(true)
            case "False": return .bool(false)
            case "None": return .none
            default:
                var digits = word
                if digits.hasSuffix("L") { digits.removeLast() }
                guard let v = Int(digits) else { throw Invalid() }
                return .int(v)
            }
        }
    }
}

public enum NumPyReader {
    /// A .npy file (one tensor, named by `name` or the file's base name) or a .npz archive.
    public static func open(path: String, selection: TensorSelection = .all, hints: DTypeHints = DTypeHints(),
                            producer: String) throws -> PlannedSource {
        guard let file = try MappedFile.open(path) else { throw NumPyError(.notARegularFile, file: path) }
        let size = file.size
        var plan: [(TensorHeader, TensorData)] = []
        let format: String
        if size >= 6, try file.bytes(at: 0, count: 6).starts(with: NpyHeader.magic) {
            format = "npy"
            var name = splitPath(path).name
            if name.hasSuffix(".npy") { name.removeLast(4) }
            let h = try NpyHeader.parse(try headerBytes(file, at: 0, available: size), name: name, hints: hints, file: path)
            if selection.includes(name) {
                plan.append(try entry(name: name, header: h, file: path, available: size - h.dataOffset,
                                      mapped: (file, h.dataOffset), exact: true) { try file.bytes(at: h.dataOffset, count: size - h.dataOffset) })
            }
        } else {
            format = "npz"
            let zip = try ZipArchive(file)
            var seen = Set<String>()
            for e in zip.entries {
                guard e.name.hasSuffix(".npy") else { throw NumPyError(.memberNotNpy(member: e.name), file: path) }
                let name = String(e.name.dropLast(4))
                guard seen.insert(name).inserted else { throw NumPyError(.duplicateArray, file: path, tensor: name) }
                guard selection.includes(name) else { continue }
                if e.method == 0 {
                    let h = try NpyHeader.parse(try headerBytes(file, at: e.dataOffset, available: e.size), name: name, hints: hints, file: path)
                    // The closure keeps the mapping alive (through `file`) until the data is used.
                    plan.append(try entry(name: name, header: h, file: path, available: e.size - h.dataOffset,
                                          mapped: (file, e.dataOffset + h.dataOffset), exact: false) {
                        try file.bytes(at: e.dataOffset + h.dataOffset, count: e.size - h.dataOffset)
                    })
                } else {
                    // Deflated: inflate the header now (for the manifest), the data when its turn comes.
                    // (A remote member is fetched whole here: npz members are deflated only by np.savez_compressed.)
                    let head = try ZlibCodec.inflateRawPrefix(try file.bytes(at: e.dataOffset, count: e.compressedSize), upTo: min(e.size, 65536 + 12))
                    let h = try head.withUnsafeBytes { try NpyHeader.parse($0, name: name, hints: hints, file: path) }
                    let d = try TensorDescriptor(name: name, dtype: h.dtype, shape: h.shape)
                    guard e.size - h.dataOffset >= d.byteCount else {
                        throw NumPyError(.dataTooShort(available: e.size - h.dataOffset, dtype: h.dtype.rawValue, shape: h.shape, needed: d.byteCount),
                                         file: path, tensor: name)
                    }
                    plan.append((TensorHeader(d), .materialized {
                        let member = try zip.read(e)
                        return try withExtendedLifetime(member) { try convert(UnsafeRawBufferPointer(rebasing: member.bytes[h.dataOffset...]), h, d) }
                    }))
                }
            }
        }
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: format), plan: plan)
    }

    /// The bytes of an .npy header at `offset` (at most `available`), up to the length it
    /// declares: its first 12 bytes are read first, so a remote file fetches only the header.
    static func headerBytes(_ file: MappedFile, at offset: Int, available: Int) throws -> UnsafeRawBufferPointer {
        let first = try file.bytes(at: offset, count: min(available, 12))
        var span = available
        if first.count >= 10, first.starts(with: NpyHeader.magic) {
            let b = { (i: Int) in Int(first[i]) }
            if first[6] == 1 { span = 10 + (b(8) | b(9) << 8) } else if first.count >= 12 { span = 12 + (b(8) | b(9) << 8 | b(10) << 16 | b(11) << 24) }
        }
        return try file.bytes(at: offset, count: min(available, span))
    }

    static func entry(name: String, header h: NpyHeader, file: String, available: Int, mapped: (MappedFile, Int), exact: Bool,
                      data: @escaping () throws -> UnsafeRawBufferPointer) throws -> (TensorHeader, TensorData) {
        let d = try TensorDescriptor(name: name, dtype: h.dtype, shape: h.shape)
        guard available >= d.byteCount else {
            throw NumPyError(.dataTooShort(available: available, dtype: h.dtype.rawValue, shape: h.shape, needed: d.byteCount), file: file, tensor: name)
        }
        if exact && available > d.byteCount {
            throw NumPyError(.trailingBytes(count: available - d.byteCount), file: file, tensor: name)
        }
        if !h.fortranOrder && !h.bigEndian { return (TensorHeader(d), .mapped(mapped.0, offset: mapped.1)) }
        return (TensorHeader(d), .materialized { try convert(data(), h, d) })
    }

    /// Fortran order → C order (a strided gather), big-endian → little-endian.
    static func convert(_ data: UnsafeRawBufferPointer, _ h: NpyHeader, _ d: TensorDescriptor) throws -> AlignedBuffer {
        let out = try AlignedBuffer(capacity: max(d.byteCount, 1))
        out.count = d.byteCount
        guard d.byteCount > 0 else { return out }
        if h.fortranOrder {
            var strides: [Int] = []
            var s = 1
            for n in h.shape { strides.append(s); s *= n }
            StridedCopy.gather(from: data.baseAddress!, elementSize: h.dtype.size, offset: 0, shape: h.shape, stride: strides, into: out.pointer)
        } else {
            out.pointer.copyMemory(from: data.baseAddress!, byteCount: d.byteCount)
        }
        if h.bigEndian { StridedCopy.swapBytes(out.pointer, count: d.byteCount, elementSize: h.dtype == .c64 ? 4 : h.dtype.size) }
        return out
    }
}
