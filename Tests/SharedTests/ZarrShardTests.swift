import Testing
@testable import Shared

/// The zarr v3 shard index (`sharding_indexed`, index at the end: (offset u64, nbytes u64)
/// per inner chunk, then a crc32c), read from hostile bytes.
@Suite struct ZarrShardTests {
    /// uint8[4] in one shard of two inner chunks of 2.
    static let metadata = #"""
    {"zarr_format": 3, "node_type": "array", "shape": [4], "data_type": "uint8",
     "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
     "chunk_key_encoding": {"name": "default"},
     "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [2], "codecs": [{"name": "bytes"}],
                 "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
    """#

    /// Inner chunk data, then the index for `entries` and its crc32c.
    static func shard(_ data: [UInt8], _ entries: [(UInt64, UInt64)], crcDelta: UInt32 = 0) -> [UInt8] {
        var index = ByteWriter()
        for (o, n) in entries { index.u64(o); index.u64(n) }
        var w = ByteWriter()
        w.raw(data)
        w.raw(index.bytes)
        w.u32(index.bytes.withUnsafeBytes { CRC32C.checksum($0) } &+ crcDelta)
        return w.bytes
    }

    func assemble(_ shard: [UInt8]) throws -> [UInt8] {
        let a = try ZarrArray.parse(Array(Self.metadata.utf8), name: "w", file: "z")
        return try a.assemble(file: "z") { key in key == "c/0" ? .inline(shard) : nil }.copyBytes()
    }

    func reason(_ shard: [UInt8]) -> OrbaxError.Reason? {
        do { _ = try assemble(shard); return nil } catch let e as OrbaxError {
            #expect(e.tensor == "w")
            return e.reason
        } catch {
            Issue.record("not an OrbaxError: \(error)")
            return nil
        }
    }

    @Test func readsAShardAndItsEmptyChunks() throws {
        #expect(try assemble(Self.shard([1, 2, 3, 4], [(0, 2), (2, 2)])) == [1, 2, 3, 4])
        let sparse = try assemble(Self.shard([3, 4], [(.max, .max), (0, 2)]))
        #expect(sparse == [0, 0, 3, 4])
    }

    @Test func indexRules() {
        #expect(reason([0, 0, 0]) == .shardShorterThanIndex(key: "c/0"))
        #expect(reason(Array(Self.shard([], [(.max, .max), (.max, .max)]).dropFirst())) == .shardShorterThanIndex(key: "c/0"))
        #expect(reason(Self.shard([1, 2, 3, 4], [(0, 2), (2, 2)], crcDelta: 1)) == .shardIndexChecksumMismatch(key: "c/0"))
        #expect(reason(Self.shard([1, 2, 3, 4], [(0, 2), (3, 2)])) == .innerChunkOutsideShard(key: "c/0", index: 1))
        #expect(reason(Self.shard([1, 2, 3, 4], [(.max, 2), (0, 2)])) == .innerChunkOutsideShard(key: "c/0", index: 0))
        #expect(reason(Self.shard([1, 2, 3, 4], [(0, .max), (0, 2)])) == .innerChunkOutsideShard(key: "c/0", index: 0))
        #expect(OrbaxError(.innerChunkOutsideShard(key: "c/0", index: 1), file: "z", tensor: "w").description
            == "z: array w: zarr: shard c/0: inner chunk 1 lies outside the shard")
    }
}
