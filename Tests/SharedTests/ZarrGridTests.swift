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
            #expect(e.reason == .zarr(.gridLargerThanStore(shape: [1_048_576, 1_048_576], chunks: [2, 3], count: 183_252_287_488, stored: 1)))
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

    func problem(_ json: String) -> ZarrProblem? {
        do { _ = try array(json); return nil } catch let e as OrbaxError {
            if case .zarr(let p) = e.reason { return p }
            return nil
        } catch { return nil }
    }

    @Test func eachMetadataRuleHasItsProblem() {
        let base = #""zarr_format": 2, "dtype": "<f4", "shape": [4], "chunks": [2], "compressor": null"#
        #expect(problem("not json") != nil)
        #expect(problem("[1]") == .metadataNotObject)
        #expect(problem("{" + base + #", "filters": [{"id": "delta"}]}"#) == .unsupported("filters are not supported"))
        #expect(problem(#"{"zarr_format": 2, "dtype": "<f4", "chunks": [2]}"#) == .fieldMissing(key: "shape"))
        #expect(problem(#"{"zarr_format": 2, "dtype": "<f4", "shape": [4.5], "chunks": [2]}"#) == .fieldNotIntegers(key: "shape"))
        #expect(problem(#"{"zarr_format": 2, "dtype": [["a", "<f4"]], "shape": [4], "chunks": [2]}"#) == .structuredDType)
        #expect(problem(#"{"zarr_format": 2, "dtype": "<f4", "shape": [4], "chunks": [2, 2]}"#) == .chunksDoNotFitShape)
        #expect(problem(#"{"zarr_format": 2, "dtype": "<f4", "shape": [4], "chunks": [2], "compressor": {"level": 1}}"#) == .compressorWithoutID)
        #expect(problem(#"{"zarr_format": 2, "dtype": "<f8", "shape": [4611686018427387904], "chunks": [4611686018427387904]}"#)
                == .chunkTooLarge(chunks: [4_611_686_018_427_387_904], dtype: .f64))
        #expect(problem(#"{"zarr_format": 7}"#) == .unsupported("zarr_format 7 is not supported"))
        let v3 = #""zarr_format": 3, "data_type": "float32", "shape": [4], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2]}}"#
        #expect(problem("{" + v3 + #", "codecs": [{"configuration": {}}]}"#) == .codecWithoutName)
        #expect(problem("{" + v3 + "}") == .fieldMissing(key: "codecs"))
        #expect(problem("{" + v3 + #", "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [0], "codecs": [{"name": "bytes"}], "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}]}}]}"#)
                == .innerChunksDoNotFitShape(inner: [0]))
    }
}
