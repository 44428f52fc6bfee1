import Glibc

// OCDBT, tensorstore's "optionally-cooperative distributed B+tree" key-value store, as
// specified in tensorstore/kvstore/ocdbt/index.rst and format/*.cc. Read-only: the manifest's latest version
// gives the B+tree root; leaves hold each key's value inline or as (data file, offset, length).

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

    /// The value's first `count` bytes (or all, if fewer): a remote file fetches only those.
    public func withPrefix<T>(_ count: Int, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        switch self {
        case .inline(let b): return try b.prefix(count).withUnsafeBytes(body)
        case .file(let f, let o, let n): return try body(try f.bytes(at: o, count: min(n, count)))
        }
    }

    /// The value's bytes, valid while the value (and its file) lives.
    public func withBytes<T>(_ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        switch self {
        case .inline(let b): return try b.withUnsafeBytes(body)
        case .file(let f, let o, let n): return try body(try f.bytes(at: o, count: n))
        }
    }
}

/// OCDBT's field encodings (LEB128 varints, fixed bytes) over a `ByteCursor`, failing with
/// an `OrbaxError` located in `file` at the offset of the field that did not parse.
extension ByteCursor {
    fileprivate func fail(_ r: OrbaxError.Reason, in file: String) -> OrbaxError { OrbaxError(r, file: file, offset: readerIndex) }

    fileprivate mutating func byte(in file: String) throws(OrbaxError) -> Int {
        do { return Int(try readByte()) } catch { throw OrbaxError(error, file: file, offset: error.offset) }
    }

    fileprivate mutating func varint(max: UInt64 = .max, in file: String) throws(OrbaxError) -> UInt64 {
        let at = readerIndex
        let v: UInt64
        do { v = try readULEB128() } catch { throw OrbaxError(error, file: file, offset: error.offset) }
        guard v <= max else { throw OrbaxError(.valueOutOfRange(value: v, max: max), file: file, offset: at) }
        return v
    }

    fileprivate mutating func int(max: Int = .max, in file: String) throws(OrbaxError) -> Int {
        Int(try varint(max: UInt64(max), in: file))
    }

    fileprivate mutating func bytes(_ n: Int, in file: String) throws(OrbaxError) -> [UInt8] {
        do { return try readBytes(n) } catch { throw OrbaxError(error, file: file, offset: error.offset) }
    }
}

public final class OCDBTStore {
    public let root: String
    public private(set) var values: [(key: String, value: KVValue)] = []
    private var files: [String: MappedFile] = [:]
    private let storage: FolderStorage

    public static let manifestMagic: UInt32 = 0x0CDB_3A2A
    static let versionNodeMagic: UInt32 = 0x0CDB_1234
    static let btreeNodeMagic: UInt32 = 0x0CDB_20DE

    /// Opens the database in `directory` (its `manifest.ocdbt`) and lists every key.
    public convenience init(directory: String) throws { try self.init(LocalFolder(directory)) }

    /// Opens the database in `storage` (local, or behind a URL: the manifest names every
    /// file it reads, so nothing is listed).
    public init(_ storage: FolderStorage) throws {
        self.storage = storage
        root = storage.root
        let manifestPath = storage.path("manifest.ocdbt")
        let raw = try storage.readWhole("manifest.ocdbt", limit: 1 << 30)
        let body = try OCDBTStore.envelope(raw, magic: OCDBTStore.manifestMagic, file: manifestPath, base: 0)
        let f = manifestPath + " (manifest body)"
        var c = ByteCursor(body)
        _ = try c.bytes(16, in: f)  // uuid
        let kind = try c.byte(in: f)
        guard kind == 0 else { throw c.fail(.numberedManifest(kind: kind), in: f) }
        _ = try c.varint(in: f)  // max_inline_value_bytes
        _ = try c.varint(in: f)  // max_decoded_node_bytes
        let arity = try c.byte(in: f)
        guard (1...16).contains(arity) else { throw c.fail(.badVersionTreeArity(log2: arity), in: f) }
        if try c.varint(in: f) == 1 { _ = try c.bytes(4, in: f) }  // zstd level
        let table = try OCDBTStore.dataFileTable(&c, transitive: "", file: f)
        // Leaf version entries: the latest version is the last one.
        let n = try c.int(max: 1 << 16, in: f)
        guard n >= 1 else { throw c.fail(.noVersions, in: f) }
        var generations: [UInt64] = []
        for _ in 0..<n { generations.append(try c.varint(in: f)) }
        var heights: [Int] = []
        for _ in 0..<n { heights.append(try c.byte(in: f)) }
        var ids: [Int] = [], offsets: [UInt64] = [], lengths: [UInt64] = []
        for _ in 0..<n { ids.append(try c.int(max: max(table.count - 1, 0), in: f)) }
        for _ in 0..<n { offsets.append(try c.varint(in: f)) }
        for _ in 0..<n { lengths.append(try c.varint(in: f)) }
        let last = n - 1
        if offsets[last] == UInt64.max && lengths[last] == UInt64.max { return }  // empty tree
        guard !table.isEmpty else { throw c.fail(.referenceWithoutDataFiles, in: f) }
        try readNode(table[ids[last]], offset: offsets[last], length: lengths[last], height: heights[last], prefix: [])
    }

    /// The 4.2 envelope: magic (u32 BE), length (u64 LE), version, compression, body, crc32c.
    static func envelope(_ raw: [UInt8], magic: UInt32, file: String, base: Int) throws -> [UInt8] {
        func fail(_ r: OrbaxError.Reason) -> OrbaxError { OrbaxError(r, file: file, offset: base) }
        let whole = ByteCursor(raw)
        guard raw.count >= 16,
              let m = try? whole.getInteger(at: 0, endianness: .big, as: UInt32.self),
              let length = try? whole.getInteger(at: 4, endianness: .little, as: UInt64.self),
              let stored = try? whole.getInteger(at: raw.count - 4, endianness: .little, as: UInt32.self) else {
            throw fail(.tooShortForHeader)
        }
        guard m == magic else { throw fail(.badMagic(found: m, expected: magic)) }
        guard length == UInt64(raw.count) else { throw fail(.lengthMismatch(declared: length, actual: raw.count)) }
        let actual = raw.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(raw.count - 4)])) }
        guard stored == actual else { throw fail(.checksumMismatch(stored: stored, computed: actual)) }
        // Version and compression varints, then the body up to the checksum.
        let version: UInt64, compression: UInt64, body: [UInt8]
        do {
            var c = try whole.getSlice(at: 12, count: raw.count - 16)
            version = try c.readULEB128()
            compression = try c.readULEB128()
            body = try c.readBytes(c.remaining)
        } catch { throw OrbaxError(error, file: file, offset: base + error.offset) }
        guard version == 0 else { throw fail(.unsupportedFormatVersion(version: version)) }
        switch compression {
        case 0: return body
        case 1:
            do {
                return try body.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 30) }
            } catch { throw fail(.decompressionFailed(detail: "\(error)")) }
        default: throw fail(.unknownCompression(method: compression))
        }
    }

    /// 4.4 DataFileTable: returns full paths and base paths (for the transitive rule).
    static func dataFileTable(_ c: inout ByteCursor, transitive: String, file f: String) throws(OrbaxError) -> [(path: String, base: String)] {
        let n = try c.int(max: 1 << 20, in: f)
        var prefix = [0]
        for _ in 1..<max(n, 1) where n > 1 { prefix.append(try c.int(max: 65535, in: f)) }
        var suffix: [Int] = [], baseLength: [Int] = []
        for _ in 0..<n { suffix.append(try c.int(max: 65535, in: f)) }
        for _ in 0..<n { baseLength.append(try c.int(max: 65535, in: f)) }
        var out: [(String, String)] = []
        var previous: [UInt8] = []
        for i in 0..<n {
            guard prefix[i] <= previous.count else { throw c.fail(.dataFilePrefixTooLong, in: f) }
            let path = Array(previous[0..<prefix[i]]) + (try c.bytes(suffix[i], in: f))
            guard baseLength[i] <= path.count else { throw c.fail(.basePathTooLong, in: f) }
            let p = String(decoding: path, as: UTF8.self)
            guard !p.contains("..") && !p.hasPrefix("/") else { throw c.fail(.dataFilePathEscapes(path: p), in: f) }
            out.append((transitive + p, transitive + String(decoding: path[0..<baseLength[i]], as: UTF8.self)))
            previous = path
        }
        return out
    }

    private func mapped(_ relative: String) throws -> MappedFile {
        if let f = files[relative] { return f }
        guard let f = try storage.open(relative) else { throw IOError(.open, path: storage.path(relative), errno: ENOENT) }
        files[relative] = f
        return f
    }

    private func region(_ ref: (path: String, base: String), offset: UInt64, length: UInt64) throws -> (MappedFile, Int, Int) {
        let f = try mapped(ref.path)
        guard offset <= UInt64(f.size), length <= UInt64(f.size) - offset else {
            throw OrbaxError(.referenceOutsideFile(offset: offset, length: length, fileSize: f.size), file: root + "/" + ref.path)
        }
        return (f, Int(offset), Int(length))
    }

    /// 4.6: decodes a B+tree node and recurses; leaf keys get `prefix` prepended.
    private func readNode(_ ref: (path: String, base: String), offset: UInt64, length: UInt64, height: Int, prefix: [UInt8], depth: Int = 0) throws {
        guard depth < 64 else { throw OrbaxError(.treeTooDeep(limit: 64), file: root) }
        let (file, at, count) = try region(ref, offset: offset, length: length)
        let raw = [UInt8](try file.bytes(at: at, count: count))
        let body = try OCDBTStore.envelope(raw, magic: OCDBTStore.btreeNodeMagic, file: root + "/" + ref.path, base: at)
        let f = root + "/" + ref.path + " (node at \(at))"
        var c = ByteCursor(body)
        let h = try c.byte(in: f)
        guard h == height else { throw c.fail(.heightMismatch(node: h, parent: height), in: f) }
        // Paths in this node's table are relative to the base path it was reached through.
        let table = try OCDBTStore.dataFileTable(&c, transitive: ref.base, file: f)
        let n = try c.int(max: 1_048_576, in: f)
        guard n >= 1 else { throw c.fail(.emptyNode, in: f) }
        var keyPrefix = [0]
        for _ in 1..<n where n > 1 { keyPrefix.append(try c.int(max: 65535, in: f)) }
        var keySuffix: [Int] = []
        for _ in 0..<n { keySuffix.append(try c.int(max: 65535, in: f)) }
        var subtreePrefix: [Int] = []
        if height > 0 { for _ in 0..<n { subtreePrefix.append(try c.int(max: 65535, in: f)) } }
        var keys: [[UInt8]] = []
        var previous: [UInt8] = []
        for i in 0..<n {
            guard keyPrefix[i] <= previous.count else { throw c.fail(.keyPrefixTooLong, in: f) }
            let k = Array(previous[0..<keyPrefix[i]]) + (try c.bytes(keySuffix[i], in: f))
            if i > 0 { guard previous.lexicographicallyPrecedes(k) else { throw c.fail(.keysNotIncreasing, in: f) } }
            keys.append(k)
            previous = k
        }
        if height == 0 {
            var lengths: [Int] = [], kinds: [Int] = []
            for _ in 0..<n { lengths.append(try c.int(in: f)) }
            for _ in 0..<n { kinds.append(try c.byte(in: f)) }
            let indirect = kinds.filter { $0 == 1 }.count
            var ids: [Int] = [], offsets: [UInt64] = []
            for _ in 0..<indirect { ids.append(try c.int(max: max(table.count - 1, 0), in: f)) }
            for _ in 0..<indirect { offsets.append(try c.varint(in: f)) }
            var j = 0
            for i in 0..<n {
                let key = String(decoding: prefix + keys[i], as: UTF8.self)
                switch kinds[i] {
                case 0:
                    guard lengths[i] <= 1 << 20 else { throw c.fail(.inlineValueTooLarge(length: lengths[i]), in: f) }
                    values.append((key, .inline(try c.bytes(lengths[i], in: f))))
                case 1:
                    guard !table.isEmpty else { throw c.fail(.referenceWithoutDataFiles, in: f) }
                    let (f, o, l) = try region(table[ids[j]], offset: offsets[j], length: UInt64(lengths[i]))
                    values.append((key, .file(f, offset: o, count: l)))
                    j += 1
                default: throw c.fail(.unknownValueKind(kind: kinds[i]), in: f)
                }
            }
        } else {
            var ids: [Int] = [], offsets: [UInt64] = [], lengths: [UInt64] = []
            for _ in 0..<n { ids.append(try c.int(max: max(table.count - 1, 0), in: f)) }
            for _ in 0..<n { offsets.append(try c.varint(in: f)) }
            for _ in 0..<n { lengths.append(try c.varint(in: f)) }
            guard !table.isEmpty else { throw c.fail(.referenceWithoutDataFiles, in: f) }
            for i in 0..<n {
                guard subtreePrefix[i] <= keys[i].count else { throw c.fail(.subtreePrefixTooLong, in: f) }
                try readNode(table[ids[i]], offset: offsets[i], length: lengths[i], height: height - 1,
                             prefix: prefix + keys[i][0..<subtreePrefix[i]], depth: depth + 1)
            }
        }
    }
}
