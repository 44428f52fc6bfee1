import Testing
@testable import Shared

@Suite struct SafetensorsLayoutTests {
    func f32(_ values: [Float]) -> [UInt8] { values.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) } }

    /// Byte vectors from the safetensors crate's own tests (`test_serialization`, `test_empty`,
    /// `test_serialization_forced_alignement`).
    @Test func matchesTheCrateSerialization() throws {
        let attn = try TensorDescriptor(name: "attn.0", dtype: .f32, shape: [1, 2, 3])
        let layout = SafetensorsLayout(tensors: [attn], metadata: nil)
        // 64 bytes of JSON: already a multiple of 8, so no padding.
        let expected: [UInt8] = [64, 0, 0, 0, 0, 0, 0, 0] + Array(#"{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}"#.utf8)
        #expect(layout.headerBytes == expected)
        #expect(layout.fileSize == 72 + 24)

        let aligned = SafetensorsLayout(tensors: [try TensorDescriptor(name: "attn0", dtype: .f32, shape: [1, 1, 2, 3])], metadata: nil)
        #expect(Array(aligned.headerBytes[0..<8]) == [72, 0, 0, 0, 0, 0, 0, 0])
        #expect(aligned.headerBytes.suffix(7) == [UInt8](repeating: 0x20, count: 7)[...])

        #expect(SafetensorsLayout(tensors: [], metadata: nil).headerBytes == [8, 0, 0, 0, 0, 0, 0, 0] + Array("{}".utf8) + [UInt8](repeating: 0x20, count: 6))
        let withMeta = SafetensorsLayout(tensors: [], metadata: JSONObject([("framework", .string("pt"))]))
        #expect(withMeta.headerBytes == [40, 0, 0, 0, 0, 0, 0, 0] + Array(#"{"__metadata__":{"framework":"pt"}}"#.utf8) + [UInt8](repeating: 0x20, count: 5))
    }

    @Test func ordersByDtypeDescendingThenNameBytewise() throws {
        let names: [(String, DType)] = [("b", .f32), ("a", .bf16), ("Z", .f32), ("é", .u8), ("e", .u8), ("x", .i64), ("y", .bool)]
        let layout = SafetensorsLayout(tensors: try names.map { try TensorDescriptor(name: $0.0, dtype: $0.1, shape: [1]) }, metadata: nil)
        #expect(layout.placements.map(\.descriptor.name) == ["x", "Z", "b", "a", "e", "é", "y"])
        // Every tensor's data is aligned to its element size.
        for (d, offset) in layout.placements { #expect(offset % d.dtype.size == 0) }
    }
}

@Suite struct SafetensorsValidationTests {
    func parse(_ json: String, dataBytes: Int) throws(SafetensorsError) -> SafetensorsHeader {
        let j = Array(json.utf8)
        return try SafetensorsHeader.parse(json: j, fileSize: 8 + j.count + dataBytes, file: "f.safetensors")
    }

    func reason(_ json: String, dataBytes: Int) -> SafetensorsError.Reason? {
        do { _ = try parse(json, dataBytes: dataBytes); return nil } catch { return error.reason }
    }

    @Test func acceptsValidHeaders() throws {
        let h = try parse(#" {"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4],"extra":1},"__metadata__":{"k":"v"}} "#, dataBytes: 6)
        #expect(h.entries.map(\.descriptor.name) == ["a", "b"])
        #expect(h.metadata == JSONObject([("k", .string("v"))]))
        #expect(try parse("{}", dataBytes: 0).entries.isEmpty)
        #expect(try parse(#"{"__metadata__":null,"z":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]}}"#, dataBytes: 0).metadata == nil)
    }

    @Test func eachRuleHasItsError() {
        #expect(reason(#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#, dataBytes: 3)
                == .invalidOffset(expectedStart: 2, begin: 1, end: 3))
        #expect(reason(#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#, dataBytes: 3) == .invalidOffset(expectedStart: 0, begin: 1, end: 3))
        #expect(reason(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, dataBytes: 4)
                == .tensorInvalidInfo(dtype: "F32", shape: [2], bytes: 4))
        #expect(reason(#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#, dataBytes: 4) == .dataBeyondFile(dataEnd: 8, available: 4))
        #expect(reason(#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, dataBytes: 5) == .trailingBytes(count: 3))
        #expect(reason(#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, dataBytes: 0) == .validationOverflow)
        #expect(reason(#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#, dataBytes: 1) == .unsupportedDType(dtype: "F4"))
        for bad in [#"[]"#, #"{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#, #"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#,
                    #"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#, #"{"__metadata__":{"k":1}}"#, #"{"a":1}"#,
                    #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#, "{\"a\":{}, \"a\":{}}", "\u{FEFF}{}"] {
            guard case .invalidHeader = reason(bad, dataBytes: 0) else {
                Issue.record("accepted or misreported: \(bad)")
                continue
            }
        }
        #expect {
            try SafetensorsHeader.parse(json: [0x7B, 0xFF, 0x7D], fileSize: 11, file: "f")
        } throws: { ($0 as? SafetensorsError)?.reason == .headerNotUTF8 }
    }

    @Test func fileLevelChecks() throws {
        let dir = temporaryDirectory()
        func check(_ bytes: [UInt8]) -> SafetensorsError.Reason? {
            writeFile(dir + "/x.safetensors", bytes)
            do {
                _ = try SafetensorsHeader.read(from: try MappedFile.open(dir + "/x.safetensors")!)
                return nil
            } catch let e as SafetensorsError { return e.reason } catch { return nil }
        }
        #expect(check([1, 2, 3]) == .headerTooSmall(fileSize: 3))
        #expect(check([0, 0xE2, 0xF5, 0x05, 0, 0, 0, 0] + Array("{}".utf8)) == .headerTooLarge(length: 100_000_000 + 0x100))
        #expect(check([200, 0, 0, 0, 0, 0, 0, 0] + Array("{}".utf8)) == .invalidHeaderLength(length: 200, fileSize: 10))
        #expect(check([2, 0, 0, 0, 0, 0, 0, 0] + Array("{}".utf8)) == nil)
    }
}

@Suite struct ShardPlanTests {
    func d(_ name: String, _ bytes: Int) -> TensorDescriptor { try! TensorDescriptor(name: name, dtype: .u8, shape: [bytes]) }

    @Test func followsHuggingFaceSplitting() {
        let plan = SafetensorsIndex.planShards([d("a", 4), d("b", 4), d("c", 3), d("big", 20), d("e", 9)], maxShardSize: 10)
        // c would overflow [a, b]; big gets a shard of its own; e would overflow [c].
        #expect(plan.map { $0.map(\.name) } == [["a", "b"], ["big"], ["c"], ["e"]])
    }

    @Test func exactReferenceOrder() {
        // huggingface_hub appends an oversized tensor's shard immediately, before the current one.
        let plan = SafetensorsIndex.planShards([d("a", 4), d("big", 20), d("c", 3), d("e", 9)], maxShardSize: 10)
        #expect(plan.map { $0.map(\.name) } == [["big"], ["a", "c"], ["e"]])
    }

    @Test func shardNames() {
        #expect(SafetensorsIndex.shardName(stem: "model", index: 2, count: 13) == "model-00002-of-00013.safetensors")
    }

    @Test func indexMatchesPythonJSONDumps() {
        let idx = SafetensorsIndex(metadata: JSONObject([("total_size", .int(12))]),
                                   weightMap: [("b", "m-2.safetensors"), ("a\u{E9}", "m-1.safetensors")])
        let text = String(decoding: idx.encoded(), as: UTF8.self)
        #expect(text == "{\n  \"metadata\": {\n    \"total_size\": 12\n  },\n  \"weight_map\": {\n    \"a\\u00e9\": \"m-1.safetensors\",\n    \"b\": \"m-2.safetensors\"\n  }\n}\n")
    }
}
