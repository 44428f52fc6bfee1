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
            let hex = value.withBytes { $0.map { String(format2: $0) }.joined() }
            #expect(expected[key]?.stringValue == hex, "\(key)")
        }
        // Keys come out in bytewise order, as the B+tree stores them.
        let keys = store.values.map { Array($0.key.utf8) }
        #expect(zip(keys, keys.dropFirst()).allSatisfy { $0.lexicographicallyPrecedes($1) })
    }

    @Test func envelopeChecks() throws {
        let raw = readFile(Self.fixtures + "/hand/ocdbt_raw/manifest.ocdbt")
        #expect(try OCDBTStore.envelope(raw, magic: OCDBTStore.manifestMagic, file: "m", base: 0).count > 16)
        var bad = raw
        bad[0] ^= 1
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(bad, magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
        bad = raw
        bad[20] ^= 1  // any bit: the crc32c catches it
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(bad, magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
        #expect(throws: OrbaxError.self) { try OCDBTStore.envelope(Array(raw.dropLast()), magic: OCDBTStore.manifestMagic, file: "m", base: 0) }
    }
}
