import Testing
@testable import Shared

@Suite struct ZarrGridTests {
    func array(_ json: String) throws -> ZarrArray { try ZarrArray.parse(Array(json.utf8), name: "w", file: "f") }

    static let v2 = #"{"zarr_format": 2, "dtype": "<f4", "shape": [1048576, 1048576], "chunks": [2, 3], "compressor": null, "filters": null, "order": "C"}"#

    @Test func aDeclaredGridIsCheckedAgainstTheStoredChunksBeforeItIsWalked() throws {
        let a = try array(Self.v2)
        #expect(a.chunkCount == 524_288 * 349_526)
        do {
            try a.checkGrid(stored: 1, file: "f")
            Issue.record("a grid of 1.8e11 chunks over one stored chunk was accepted")
        } catch let e as OrbaxError {
            #expect(e.description.contains("makes 183252287488 chunks, the store holds 1"))
        }
        let small = try array(#"{"zarr_format": 2, "dtype": "<f4", "shape": [4, 6], "chunks": [2, 3], "compressor": null, "filters": null}"#)
        try small.checkGrid(stored: 4, file: "f")
        var seen: [[Int]] = []
        small.forEachChunkIndex { seen.append($0) }
        #expect(seen == [[0, 0], [0, 1], [1, 0], [1, 1]])
    }

    @Test func gridsAndChunkSizesThatOverflowAreRefused() throws {
        let huge = try array(#"{"zarr_format": 2, "dtype": "<f4", "shape": [9223372036854775807, 9223372036854775807], "chunks": [1, 1], "compressor": null, "filters": null}"#)
        #expect(huge.chunkCount == nil)
        #expect(throws: OrbaxError.self) { try huge.checkGrid(stored: Int.max, file: "f") }
        #expect(throws: OrbaxError.self) {
            _ = try array(#"{"zarr_format": 2, "dtype": "<f8", "shape": [4611686018427387904, 4], "chunks": [4611686018427387904, 4], "compressor": null, "filters": null}"#)
        }
    }

    @Test func chunkKeysByFormatAndRank() throws {
        let v2 = try array(Self.v2)
        #expect(v2.isChunkKey("0.12") && !v2.isChunkKey("0") && !v2.isChunkKey("0.x") && !v2.isChunkKey(".zarray") && !v2.isChunkKey("0."))
        let v3 = try array(#"{"zarr_format": 3, "data_type": "float32", "shape": [4, 6], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3]}}, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}"#)
        #expect(v3.isChunkKey("c/1/0") && !v3.isChunkKey("c/1") && !v3.isChunkKey("zarr.json") && !v3.isChunkKey("d/1/0"))
    }
}
