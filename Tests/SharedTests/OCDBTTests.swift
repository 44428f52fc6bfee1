import Foundation
import Testing
@testable import Shared

@Suite struct OCDBTTests {
    static var fixtures: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().path + "/fixtures/orbax"
    }

    @Test func crc32cCheckValue() {
        #expect(Array("123456789".utf8).withUnsafeBytes { CRC32C.checksum($0) } == 0xE306_9283)
    }

    /// A height-3 B+tree with version nodes, written by tensorstore with small inline limits:
    /// every key and value must match the listing tensorstore gave.
    @Test func deepBTreeMatchesTensorstoresListing() throws {
        let store = try OCDBTStore(directory: Self.fixtures + "/g_deep_btree")
        let expected = try JSONParser.parse(readFile(Self.fixtures + "/g_deep_btree.expected.json")).objectValue!
        #expect(store.values.count == expected.count)
        #expect(store.values.count == 400)
        for (key, value) in store.values {
            let hex = try value.withBytes { $0.map { String(format2: $0) }.joined() }
            #expect(expected[key]?.stringValue == hex, "\(key)")
        }
        // Keys come out in bytewise order, as the B+tree stores them.
        let keys = store.values.map { Array($0.key.utf8) }
        #expect(zip(keys, keys.dropFirst()).allSatisfy { $0.lexicographicallyPrecedes($1) })
    }

    @Test func envelopeChecks() throws {
        let raw = readFile(Self.fixtures + "/hand/ocdbt_raw/manifest.ocdbt")
        func reason(_ bytes: [UInt8]) -> OrbaxError.Reason? {
            do { _ = try OCDBTStore.envelope(bytes, magic: OCDBTStore.manifestMagic, file: "m", base: 0); return nil } catch let e as OrbaxError {
                return e.reason
            } catch { return nil }
        }
        #expect(try OCDBTStore.envelope(raw, magic: OCDBTStore.manifestMagic, file: "m", base: 0).count > 16)
        var bad = raw
        bad[0] ^= 1
        #expect(reason(bad) == .badMagic(found: OCDBTStore.manifestMagic ^ 0x0100_0000, expected: OCDBTStore.manifestMagic))
        bad = raw
        bad[20] ^= 1  // any bit: the crc32c catches it
        guard case .checksumMismatch = reason(bad) else {
            Issue.record("expected a crc32c mismatch")
            return
        }
        #expect(reason(Array(raw.dropLast())) == .lengthMismatch(declared: UInt64(raw.count), actual: raw.count - 1))
    }
}

/// Hand-made OCDBT stores, each breaking one rule of tensorstore's format.
@Suite struct OCDBTBadInputTests {
    static func varint(_ v: UInt64) -> [UInt8] {
        var v = v, out: [UInt8] = []
        while v >= 0x80 { out.append(UInt8(v & 0x7F) | 0x80); v >>= 7 }
        return out + [UInt8(v)]
    }
    func varint(_ v: Int) -> [UInt8] { Self.varint(UInt64(v)) }

    /// The 4.2 envelope around `body`, with a correct length and crc32c.
    static func envelope(_ magic: UInt32, _ body: [UInt8], version: UInt64 = 0, compression: UInt64 = 0) -> [UInt8] {
        envelope(magic, raw: varint(version) + varint(compression) + body)
    }

    /// The envelope around `raw` (version and compression varints, then the body).
    static func envelope(_ magic: UInt32, raw: [UInt8]) -> [UInt8] {
        var w = withUnsafeBytes(of: magic.bigEndian, Array.init) + [UInt8](repeating: 0, count: 8) + raw
        let length = UInt64(w.count + 4)
        for i in 0..<8 { w[4 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt64(i))) }
        let crc = w.withUnsafeBytes { CRC32C.checksum($0) }
        return w + withUnsafeBytes(of: crc.littleEndian, Array.init)
    }

    /// A data file table (4.4): paths with their shared-prefix and base-path lengths.
    func table(_ paths: [String], prefixes: [Int]? = nil, bases: [Int]? = nil) -> [UInt8] {
        let p = prefixes ?? paths.map { _ in 0 }
        var w = varint(paths.count)
        for i in paths.indices.dropFirst() { w += varint(p[i]) }
        for i in paths.indices { w += varint(paths[i].utf8.count - p[i]) }
        for i in paths.indices { w += varint(bases?[i] ?? 0) }
        for i in paths.indices { w += Array(paths[i].utf8.dropFirst(p[i])) }
        return w
    }

    /// A manifest body with one version whose root is `[offset, +length)` of data file `id`.
    func manifest(kind: UInt8 = 0, arity: UInt8 = 4, table: [UInt8], versions: Int = 1, height: UInt8 = 0, id: Int = 0,
                  offset: UInt64 = 0, length: UInt64 = 0) -> [UInt8] {
        var w = [UInt8](repeating: 0, count: 16) + [kind] + varint(0) + varint(0) + [arity] + varint(0) + table + varint(versions)
        for _ in 0..<versions { w += varint(1) }
        for _ in 0..<versions { w.append(height) }
        for _ in 0..<versions { w += varint(id) }
        for _ in 0..<versions { w += Self.varint(offset) }
        for _ in 0..<versions { w += Self.varint(length) }
        return w
    }

    /// A B+tree node body: height, table, keys (prefix lengths, suffix lengths, subtree
    /// prefixes for inner nodes, suffix bytes), then `rest` (the values or children).
    func node(height: UInt8 = 0, table: [UInt8], keys: [String], prefixes: [Int]? = nil, subtree: [Int]? = nil, rest: [UInt8]) -> [UInt8] {
        let p = prefixes ?? keys.map { _ in 0 }
        var w = [height] + table + varint(keys.count)
        for i in keys.indices.dropFirst() { w += varint(p[i]) }
        for i in keys.indices { w += varint(keys[i].utf8.count - p[i]) }
        if height > 0 { for i in keys.indices { w += varint(subtree?[i] ?? 0) } }
        for i in keys.indices { w += Array(keys[i].utf8.dropFirst(p[i])) }
        return w + rest
    }

    /// Leaf values: inline `(length, kind 0)` each.
    func inline(_ values: [[UInt8]]) -> [UInt8] {
        values.flatMap { varint($0.count) } + values.map { _ in UInt8(0) } + values.flatMap { $0 }
    }

    /// Writes a store whose manifest body is `manifest` and whose data file `d` holds `data`.
    func store(_ manifestBody: [UInt8], data: [UInt8] = [], rawManifest: [UInt8]? = nil) -> String {
        let dir = temporaryDirectory()
        writeFile(dir + "/manifest.ocdbt", rawManifest ?? Self.envelope(OCDBTStore.manifestMagic, manifestBody))
        writeFile(dir + "/d", data)
        return dir
    }

    /// A store whose root is `nodeBody` (as the only node, in data file `d`).
    func store(root nodeBody: [UInt8], height: UInt8 = 0) -> String {
        let n = Self.envelope(OCDBTStore.btreeNodeMagic, nodeBody)
        return store(manifest(table: table(["d"]), height: height, length: UInt64(n.count)), data: n)
    }

    func failure(_ dir: String) -> OrbaxError? {
        do { _ = try OCDBTStore(directory: dir); return nil } catch let e as OrbaxError { return e } catch {
            Issue.record("not an OrbaxError: \(error)")
            return nil
        }
    }

    @Test func aGoodStoreReads() throws {
        let s = try OCDBTStore(directory: store(root: node(table: table([]), keys: ["a", "b"], rest: inline([[1], [2, 3]]))))
        #expect(s.values.map(\.key) == ["a", "b"])
        #expect(try s.values.map { try $0.value.withBytes(Array.init) } == [[1], [2, 3]])
    }

    @Test func envelopeRules() {
        let body = manifest(table: table([]), versions: 1, offset: .max, length: .max)
        #expect(failure(store(body)) == nil)
        #expect(failure(store(body, rawManifest: [0x0C, 0xDB, 0x3A, 0x2A]))?.reason == .tooShortForHeader)
        #expect(failure(store(body, rawManifest: Self.envelope(OCDBTStore.manifestMagic, body, version: 1)))?.reason
            == .unsupportedFormatVersion(version: 1))
        #expect(failure(store(body, rawManifest: Self.envelope(OCDBTStore.manifestMagic, body, compression: 7)))?.reason
            == .unknownCompression(method: 7))
        guard case .decompressionFailed = failure(store(body, rawManifest: Self.envelope(OCDBTStore.manifestMagic, body, compression: 1)))?.reason else {
            Issue.record("expected decompressionFailed")
            return
        }
        // The compression varint runs into the checksum: version 0, then 0x80 and nothing more.
        let cut = failure(store(body, rawManifest: Self.envelope(OCDBTStore.manifestMagic, raw: [0x00, 0x80])))
        #expect(cut?.reason == .truncated(needed: 2, available: 1))
        #expect(cut?.offset == 13)
    }

    @Test func manifestRules() {
        #expect(failure(store(manifest(kind: 1, table: table([]))))?.reason == .numberedManifest(kind: 1))
        #expect(failure(store(manifest(arity: 0, table: table([]))))?.reason == .badVersionTreeArity(log2: 0))
        #expect(failure(store(manifest(table: table([]), versions: 0)))?.reason == .noVersions)
        #expect(failure(store(manifest(table: table([]), id: 0, offset: 0, length: 1)))?.reason == .referenceWithoutDataFiles)
        #expect(failure(store(manifest(table: table(["d"]), id: 1)))?.reason == .valueOutOfRange(value: 1, max: 0))
        let body = manifest(table: table(["d"]), offset: 0, length: 100)
        #expect(failure(store(body, data: [1, 2, 3]))?.reason == .referenceOutsideFile(offset: 0, length: 100, fileSize: 3))
        // Cut short: the error names the byte where the read started.
        let cut = failure(store(Array(body.dropLast(2))))
        #expect(cut?.reason == .truncated(needed: 1, available: 0))
        #expect(cut?.offset == body.count - 2)
        #expect(cut?.file.hasSuffix("manifest.ocdbt (manifest body)") == true)
        // Varints: more than 10 bytes, and a 10th byte with bits beyond 64.
        let long = [UInt8](repeating: 0, count: 16) + [0] + [UInt8](repeating: 0x80, count: 10) + [0]
        #expect(failure(store(long))?.reason == .varintTooLong)
        let wide = [UInt8](repeating: 0, count: 16) + [0] + [UInt8](repeating: 0xFF, count: 9) + [0x7F]
        #expect(failure(store(wide))?.reason == .varintOverflow)
    }

    @Test func dataFileTableRules() {
        // Two paths, the second sharing 3 bytes of the 2-byte first: n, prefix, suffixes, bases, bytes.
        let prefixTooLong = varint(2) + varint(3) + varint(2) + varint(1) + varint(0) + varint(0) + Array("abc".utf8)
        #expect(failure(store(manifest(table: prefixTooLong)))?.reason == .dataFilePrefixTooLong)
        #expect(failure(store(manifest(table: table(["ab"], bases: [3]))))?.reason == .basePathTooLong)
        #expect(failure(store(manifest(table: table(["../etc/passwd"]))))?.reason == .dataFilePathEscapes(path: "../etc/passwd"))
        #expect(failure(store(manifest(table: table(["/etc/passwd"]))))?.reason == .dataFilePathEscapes(path: "/etc/passwd"))
        #expect(failure(store(manifest(table: varint(1 << 21))))?.reason == .valueOutOfRange(value: 1 << 21, max: 1 << 20))
    }

    @Test func leafNodeRules() {
        let t = table([])
        #expect(failure(store(root: node(table: t, keys: ["a"], rest: inline([[1]])), height: 1))?.reason == .heightMismatch(node: 0, parent: 1))
        #expect(failure(store(root: node(table: t, keys: [], rest: [])))?.reason == .emptyNode)
        #expect(failure(store(root: node(table: t, keys: ["a", "ab"], prefixes: [0, 2], rest: inline([[1], [2]]))))?.reason == .keyPrefixTooLong)
        #expect(failure(store(root: node(table: t, keys: ["b", "a"], rest: inline([[1], [2]]))))?.reason == .keysNotIncreasing)
        #expect(failure(store(root: node(table: t, keys: ["a", "a"], rest: inline([[1], [2]]))))?.reason == .keysNotIncreasing)
        #expect(failure(store(root: node(table: t, keys: ["a"], rest: varint(2 << 20) + [0])))?.reason == .inlineValueTooLarge(length: 2 << 20))
        #expect(failure(store(root: node(table: t, keys: ["a"], rest: varint(1) + [1] + varint(0) + varint(0))))?.reason == .referenceWithoutDataFiles)
        #expect(failure(store(root: node(table: t, keys: ["a"], rest: varint(1) + [2])))?.reason == .unknownValueKind(kind: 2))
        #expect(failure(store(root: node(table: t, keys: ["a"], rest: varint(3) + [0] + [1])))?.reason == .truncated(needed: 3, available: 1))
        // An indirect value past the end of its data file (`d`, which holds just this node).
        let indirect = node(table: table(["d"]), keys: ["a"], rest: varint(5) + [1] + varint(0) + varint(1000))
        #expect(failure(store(root: indirect))?.reason
            == .referenceOutsideFile(offset: 1000, length: 5, fileSize: Self.envelope(OCDBTStore.btreeNodeMagic, indirect).count))
    }

    @Test func innerNodeRules() {
        // An inner node whose one child is a leaf stored right after it in `d`.
        let leaf = Self.envelope(OCDBTStore.btreeNodeMagic, node(table: table([]), keys: ["x"], rest: inline([[9]])))
        func inner(subtree: Int, key: String = "k", table t: [UInt8]? = nil, childHeight: UInt8 = 1) -> String {
            // The inner node's length depends on the child offset's varint: fix it at 2 bytes.
            let placeholder = node(height: childHeight, table: t ?? table(["d"]), keys: [key], subtree: [subtree],
                                   rest: varint(0) + [0x80, 0x01] + varint(leaf.count))
            let innerSize = Self.envelope(OCDBTStore.btreeNodeMagic, placeholder).count
            let body = node(height: childHeight, table: t ?? table(["d"]), keys: [key], subtree: [subtree],
                            rest: varint(0) + [UInt8(innerSize & 0x7F) | 0x80, UInt8(innerSize >> 7)] + varint(leaf.count))
            let n = Self.envelope(OCDBTStore.btreeNodeMagic, body)
            return store(manifest(table: table(["d"]), height: childHeight, length: UInt64(n.count)), data: n + leaf)
        }
        #expect(failure(inner(subtree: 1)) == nil)
        #expect((try? OCDBTStore(directory: inner(subtree: 1)))?.values.map(\.key) == ["kx"])
        #expect(failure(inner(subtree: 2))?.reason == .subtreePrefixTooLong)
        #expect(failure(inner(subtree: 0, table: table([])))?.reason == .referenceWithoutDataFiles)
    }

    @Test func treeDepthIsBounded() {
        // 70 inner nodes in a chain, heights 70 down to 1, each pointing at the next in `d`.
        var data: [UInt8] = []
        var nodes: [(offset: Int, count: Int)] = []
        let depth = 70
        // Build from the bottom: a leaf, then parents that point at the node before them.
        let leaf = Self.envelope(OCDBTStore.btreeNodeMagic, node(table: table([]), keys: ["x"], rest: inline([[9]])))
        data += leaf
        nodes.append((0, leaf.count))
        for h in 1...depth {
            let child = nodes.last!
            let body = node(height: UInt8(h), table: table(["d"]), keys: ["k"], subtree: [0],
                            rest: varint(0) + Self.varint(UInt64(child.offset)) + varint(child.count))
            let n = Self.envelope(OCDBTStore.btreeNodeMagic, body)
            nodes.append((data.count, n.count))
            data += n
        }
        let root = nodes.last!
        let dir = store(manifest(table: table(["d"]), height: UInt8(depth), offset: UInt64(root.offset), length: UInt64(root.count)), data: data)
        #expect(failure(dir)?.reason == .treeTooDeep(limit: 64))
    }
}

import CZstd

@Suite struct ZstdTests {
    /// A frame written in two streaming calls, so zstd cannot put its size in the header
    /// (tensorstore writes some OCDBT nodes this way).
    static func frameWithoutSize(_ data: [UInt8]) -> [UInt8] {
        let cctx = ZSTD_createCCtx()!
        defer { ZSTD_freeCCtx(cctx) }
        var out = [UInt8](repeating: 0, count: ZSTD_compressBound(data.count) + 64)
        var written = 0
        data.withUnsafeBytes { d in
            out.withUnsafeMutableBytes { o in
                var input = ZSTD_inBuffer(src: d.baseAddress, size: d.count, pos: 0)
                var output = ZSTD_outBuffer(dst: o.baseAddress, size: o.count, pos: 0)
                _ = ZSTD_compressStream2(cctx, &output, &input, ZSTD_e_continue)
                var empty = ZSTD_inBuffer(src: nil, size: 0, pos: 0)
                while ZSTD_compressStream2(cctx, &output, &empty, ZSTD_e_end) != 0 {}
                written = output.pos
            }
        }
        return Array(out[0..<written])
    }

    @Test func framesWithAndWithoutADeclaredSize() throws {
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 * 7 / 3) }
        let frame = Self.frameWithoutSize(data)
        #expect(frame.withUnsafeBytes { ZstdCodec.declaredSize($0) } == nil)
        #expect(try frame.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 20) } == data)
        #expect(throws: ZstdCodec.Failure.self) { try frame.withUnsafeBytes { try ZstdCodec.decompress($0, limit: 100_000) } }
        #expect(throws: ZstdCodec.Failure.self) { try Array(frame.dropLast(3)).withUnsafeBytes { try ZstdCodec.decompress($0, limit: 1 << 20) } }
    }
}

@Suite struct ZstdFileDecoderTests {
    private func compressed(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: ZSTD_compressBound(data.count))
        let n = out.withUnsafeMutableBytes { o in data.withUnsafeBytes { ZSTD_compress(o.baseAddress, o.count, $0.baseAddress, $0.count, 3) } }
        return Array(out[0..<n])
    }

    private func mapped(_ bytes: [UInt8]) throws -> MappedFile {
        let path = temporaryDirectory() + "/frames.zst"
        writeFile(path, bytes)
        let fd = try FileDescriptor.openForReading(path)
        return try MappedFile(fd, size: bytes.count)
    }

    /// Decodes `stored` in pieces of `piece` bytes, expecting `expected` bytes.
    private func decode(_ stored: [UInt8], expected: Int, piece: Int) throws -> [UInt8] {
        let file = try mapped(stored)
        let decoder = try ZstdCodec.FileDecoder(file, offset: 0, count: stored.count, expected: expected)
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: piece)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try decoder.read(into: $0) }
            out += buffer[0..<n]
            if n < piece { break }
        }
        try decoder.finish()
        return out
    }

    private let data = (0..<1_000_003).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 11 & 0x3f) }

    @Test func decodesPieceByPieceAcrossFrames() throws {
        #expect(try decode(compressed(data), expected: data.count, piece: 65_537) == data)
        // Two frames back to back decode as one stream (tensorstore may write several).
        let two = compressed(Array(data[0..<400_000])) + ZstdTests.frameWithoutSize(Array(data[400_000...]))
        #expect(try decode(two, expected: data.count, piece: 1 << 20) == data)
    }

    @Test func refusesTruncatedShortAndLongData() throws {
        let frame = compressed(data)
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(Array(frame.dropLast(9)), expected: data.count, piece: 1 << 16) }
        // More bytes than the array holds, and fewer.
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(frame, expected: data.count - 1, piece: 1 << 16) }
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(frame, expected: data.count + 1, piece: 1 << 16) }
        // (zstd frames carry no checksum unless asked to, so only damage the decoder can see.)
        var corrupt = frame
        corrupt[0] ^= 0xff
        #expect(throws: ZstdCodec.Failure.self) { _ = try decode(corrupt, expected: data.count, piece: 1 << 16) }
    }
}
