// OCDBT, tensorstore's "optionally-cooperative distributed B+tree" key-value store, as
// specified in tensorstore/kvstore/ocdbt/index.rst and format/*.cc. Read-only: the manifest's latest version
// gives the B+tree root; leaves hold each key's value inline or as (data file, offset, length).

public struct OrbaxError: CkptError, Equatable {
    public var message: String
    public var file: String
    public var offset: Int?
    public var tensor: String?
    public init(_ message: String, file: String, offset: Int? = nil, tensor: String? = nil) {
        self.message = message
        self.file = file
        self.offset = offset
        self.tensor = tensor
    }
    public var exitStatus: SysExit { .dataError }
    public var description: String {
        var s = file
        if let offset { s += ": byte \(offset)" }
        if let tensor { s += ": array \(tensor)" }
        return s + ": " + message
    }
}

/// Where a value lives.
public enum KVValue: Sendable {
    case inline([UInt8])
    case file(MappedFile, offset: Int, count: Int)

    public var count: Int {
        switch self {
        case .inline(let b): return b.count
        case .file(_, _, let n): return n
        }
    }

    /// Drops the value's pages from this process's mapping once it has been decoded.
    public func release() {
        if case .file(let f, let o, let n) = self { f.drop(offset: o, count: n) }
    }

    /// The value's bytes, valid while the value (and its file) lives.
    public func withBytes<T>(_ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        switch self {
        case .inline(let b): return try b.withUnsafeBytes(body)
        case .file(let f, let o, let n): return try body(f.bytes(at: o, count: n))
        }
    }
}

/// A little reader for OCDBT's encodings: LEB128 varints, little-endian fixed fields.
struct OCDBTCursor {
    let bytes: [UInt8]
    var pos = 0
    let file: String
    let base: Int

    func fail(_ m: String) -> OrbaxError { OrbaxError("OCDBT: \(m)", file: file, offset: base + pos) }

    mutating func u8() throws -> Int {
        guard pos < bytes.count else { throw fail("truncated") }
        defer { pos += 1 }
        return Int(bytes[pos])
    }

    mutating func varint(max: UInt64 = UInt64.max) throws -> UInt64 {
        var v: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            let b = UInt64(try u8())
            guard shift < 64 else { throw fail("varint too long") }
            v |= (b & 0x7F) << shift
            if b & 0x80 == 0 { break }
            shift += 7
        }
        guard v <= max else { throw fail("value \(v) out of range") }
        return v
    }

    mutating func int(max: Int = Int.max) throws -> Int { Int(try varint(max: UInt64(max))) }

    mutating func u64le() throws -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(try u8()) << (8 * UInt64(i)) }
        return v
    }

    mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, n <= bytes.count - pos else { throw fail("truncated: needs \(n) bytes") }
        defer { pos += n }
        return bytes[pos..<pos + n]
    }
}

public final class OCDBTStore {
    public let root: String
    public private(set) var values: [(key: String, value: KVValue)] = []
    private var files: [String: MappedFile] = [:]

    public static let manifestMagic: UInt32 = 0x0CDB_3A2A
    static let versionNodeMagic: UInt32 = 0x0CDB_1234
    static let btreeNodeMagic: UInt32 = 0x0CDB_20DE

    /// Opens the database in `directory` (its `manifest.ocdbt`) and lists every key.
    public init(directory: String) throws {
        root = directory
        let manifestPath = directory + "/manifest.ocdbt"
        let raw = try readWholeFile(manifestPath, limit: 1 << 30)
        let body = try OCDBTStore.envelope(raw, magic: OCDBTStore.manifestMagic, file: manifestPath, base: 0)
        var c = OCDBTCursor(bytes: body, file: manifestPath + " (manifest body)", base: 0)
        _ = try c.take(16)  // uuid
        let kind = try c.u8()
        guard kind == 0 else { throw c.fail("numbered manifests (manifest_kind \(kind)) are not supported") }
        _ = try c.varint()  // max_inline_value_bytes
        _ = try c.varint()  // max_decoded_node_bytes
        let arity = try c.u8()
        guard (1...16).contains(arity) else { throw c.fail("version_tree_arity_log2 \(arity)") }
        if try c.varint() == 1 { _ = try c.take(4) }  // zstd level
        let table = try OCDBTStore.dataFileTable(&c, transitive: "")
        // Leaf version entries: the latest version is the last one.
        let n = try c.int(max: 1 << 16)
        guard n >= 1 else { throw c.fail("no versions") }
        var generations: [UInt64] = []
        for _ in 0..<n { generations.append(try c.varint()) }
        var heights: [Int] = []
        for _ in 0..<n { heights.append(try c.u8()) }
        var ids: [Int] = [], offsets: [UInt64] = [], lengths: [UInt64] = []
        for _ in 0..<n { ids.append(try c.int(max: table.count - 1)) }
        for _ in 0..<n { offsets.append(try c.varint()) }
        for _ in 0..<n { lengths.append(try c.varint()) }
        let last = n - 1
        if offsets[last] == UInt64.max && lengths[last] == UInt64.max { return }  // empty tree
        try readNode(table[ids[last]], offset: offsets[last], length: lengths[last], height: heights[last], prefix: [])
    }

    /// The 4.2 envelope: magic (u32 BE), length (u64 LE), version, compression, body, crc32c.
    static func envelope(_ raw: [UInt8], magic: UInt32, file: String, base: Int) throws -> [UInt8] {
        func fail(_ m: String) -> OrbaxError { OrbaxError("OCDBT: \(m)", file: file, offset: base) }
        guard raw.count >= 16 else { throw fail("too short for an OCDBT header") }
        let m = UInt32(raw[0]) << 24 | UInt32(raw[1]) << 16 | UInt32(raw[2]) << 8 | UInt32(raw[3])
        guard m == magic else { throw fail("bad magic 0x\(String(m, radix: 16)), expected 0x\(String(magic, radix: 16))") }
        var length: UInt64 = 0
        for i in 0..<8 { length |= UInt64(raw[4 + i]) << (8 * UInt64(i)) }
        guard length == UInt64(raw.count) else { throw fail("declares \(length) bytes, has \(raw.count)") }
        let stored = raw[(raw.count - 4)...].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
        let actual = raw.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(raw.count - 4)])) }
        guard stored == actual else { throw fail("crc32c mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(actual, radix: 16)))") }
        var c = OCDBTCursor(bytes: Array(raw[0..<(raw.count - 4)]), pos: 12, file: file, base: base)
        guard try c.varint() == 0 else { throw fail("unsupported format version") }
        let compression = try c.varint()
        let body = Array(raw[c.pos..<(raw.count - 4)])
        switch compression {
        case 0: return body
        case 1:
            do {
                return try body.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 30) }
            } catch { throw fail("zstd: \(error)") }
        default: throw fail("unknown compression \(compression)")
        }
    }

    /// 4.4 DataFileTable: returns full paths and base paths (for the transitive rule).
    static func dataFileTable(_ c: inout OCDBTCursor, transitive: String) throws -> [(path: String, base: String)] {
        let n = try c.int(max: 1 << 20)
        var prefix = [0]
        for _ in 1..<max(n, 1) where n > 1 { prefix.append(try c.int(max: 65535)) }
        var suffix: [Int] = [], baseLength: [Int] = []
        for _ in 0..<n { suffix.append(try c.int(max: 65535)) }
        for _ in 0..<n { baseLength.append(try c.int(max: 65535)) }
        var out: [(String, String)] = []
        var previous: [UInt8] = []
        for i in 0..<n {
            guard prefix[i] <= previous.count else { throw c.fail("data file path prefix longer than the previous path") }
            let path = Array(previous[0..<prefix[i]]) + Array(try c.take(suffix[i]))
            guard baseLength[i] <= path.count else { throw c.fail("base path longer than the path") }
            let p = String(decoding: path, as: UTF8.self)
            guard !p.contains("..") && !p.hasPrefix("/") else { throw c.fail("data file path \(p) leaves the checkpoint") }
            out.append((transitive + p, transitive + String(decoding: path[0..<baseLength[i]], as: UTF8.self)))
            previous = path
        }
        return out
    }

    private func mapped(_ relative: String) throws -> MappedFile {
        if let f = files[relative] { return f }
        let path = root + "/" + relative
        let fd = try FileDescriptor.openForReading(path)
        let f = try MappedFile(fd, size: try fd.regularFileSize() ?? 0)
        files[relative] = f
        return f
    }

    private func region(_ ref: (path: String, base: String), offset: UInt64, length: UInt64) throws -> (MappedFile, Int, Int) {
        let f = try mapped(ref.path)
        guard offset <= UInt64(f.size), length <= UInt64(f.size) - offset else {
            throw OrbaxError("OCDBT reference [\(offset), +\(length)) lies outside the \(f.size)-byte file", file: root + "/" + ref.path)
        }
        return (f, Int(offset), Int(length))
    }

    /// 4.6: decodes a B+tree node and recurses; leaf keys get `prefix` prepended.
    private func readNode(_ ref: (path: String, base: String), offset: UInt64, length: UInt64, height: Int, prefix: [UInt8], depth: Int = 0) throws {
        guard depth < 64 else { throw OrbaxError("OCDBT: B+tree deeper than 64", file: root) }
        let (file, at, count) = try region(ref, offset: offset, length: length)
        let raw = [UInt8](file.bytes(at: at, count: count))
        let body = try OCDBTStore.envelope(raw, magic: OCDBTStore.btreeNodeMagic, file: root + "/" + ref.path, base: at)
        var c = OCDBTCursor(bytes: body, file: root + "/" + ref.path + " (node at \(at))", base: 0)
        let h = try c.u8()
        guard h == height else { throw c.fail("node height \(h), its parent says \(height)") }
        // Paths in this node's table are relative to the base path it was reached through.
        let table = try OCDBTStore.dataFileTable(&c, transitive: ref.base)
        let n = try c.int(max: 1_048_576)
        guard n >= 1 else { throw c.fail("empty node") }
        var keyPrefix = [0]
        for _ in 1..<n where n > 1 { keyPrefix.append(try c.int(max: 65535)) }
        var keySuffix: [Int] = []
        for _ in 0..<n { keySuffix.append(try c.int(max: 65535)) }
        var subtreePrefix: [Int] = []
        if height > 0 { for _ in 0..<n { subtreePrefix.append(try c.int(max: 65535)) } }
        var keys: [[UInt8]] = []
        var previous: [UInt8] = []
        for i in 0..<n {
            guard keyPrefix[i] <= previous.count else { throw c.fail("key prefix longer than the previous key") }
            let k = Array(previous[0..<keyPrefix[i]]) + Array(try c.take(keySuffix[i]))
            if i > 0 { guard previous.lexicographicallyPrecedes(k) else { throw c.fail("keys not strictly increasing") } }
            keys.append(k)
            previous = k
        }
        if height == 0 {
            var lengths: [Int] = [], kinds: [Int] = []
            for _ in 0..<n { lengths.append(try c.int()) }
            for _ in 0..<n { kinds.append(try c.u8()) }
            let indirect = kinds.filter { $0 == 1 }.count
            var ids: [Int] = [], offsets: [UInt64] = []
            for _ in 0..<indirect { ids.append(try c.int(max: max(table.count - 1, 0))) }
            for _ in 0..<indirect { offsets.append(try c.varint()) }
            var j = 0
            for i in 0..<n {
                let key = String(decoding: prefix + keys[i], as: UTF8.self)
                switch kinds[i] {
                case 0:
                    guard lengths[i] <= 1 << 20 else { throw c.fail("inline value over 1 MiB") }
                    values.append((key, .inline(Array(try c.take(lengths[i])))))
                case 1:
                    guard !table.isEmpty else { throw c.fail("indirect value with no data files") }
                    let (f, o, l) = try region(table[ids[j]], offset: offsets[j], length: UInt64(lengths[i]))
                    values.append((key, .file(f, offset: o, count: l)))
                    j += 1
                default: throw c.fail("unknown value kind \(kinds[i])")
                }
            }
        } else {
            var ids: [Int] = [], offsets: [UInt64] = [], lengths: [UInt64] = []
            for _ in 0..<n { ids.append(try c.int(max: max(table.count - 1, 0))) }
            for _ in 0..<n { offsets.append(try c.varint()) }
            for _ in 0..<n { lengths.append(try c.varint()) }
            for i in 0..<n {
                guard subtreePrefix[i] <= keys[i].count else { throw c.fail("subtree prefix longer than its key") }
                try readNode(table[ids[i]], offset: offsets[i], length: lengths[i], height: height - 1,
                             prefix: prefix + keys[i][0..<subtreePrefix[i]], depth: depth + 1)
            }
        }
    }
}
