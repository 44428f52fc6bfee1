import Testing
@testable import Shared

/// The golden files were written by python/ckpt_stream (the Python implementation):
/// StreamWriter must reproduce them byte for byte, and StreamReader must read them.
@Suite struct StreamGoldenTests {
    static let header = StreamHeader(producer: "golden", sourceFormat: "test")
    static let tiny = [
        tensor("a", .f32, [2], [0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40]),
        tensor("b", .u8, [0], []),
    ]
    static let chunked = [tensor("x/y", .i16, [10], pattern(20, seed: 5)), tensor("z", .f64, [1], pattern(8, seed: 9))]

    static var allDtypes: [(TensorHeader, [UInt8])] {
        DType.allCases.enumerated().map { i, d in
            let shape = i % 2 == 1 ? [2, 3] : [3]
            let attrs = d == .bf16 ? JSONObject([("index", .int(i))]) : JSONObject()
            return tensor("t.\(d.rawValue.lowercased())", d, shape, pattern(shape.reduce(1, *) * d.size, seed: i), attributes: attrs)
        }
    }

    @Test func tinyIsByteIdentical() throws {
        #expect(try streamBytes(MemorySource(Self.tiny, header: Self.header), producer: "golden") == golden("tiny.ckpts"))
    }

    @Test func smallChunksAreByteIdentical() throws {
        let bytes = try streamBytes(MemorySource(Self.chunked, header: Self.header), chunkSize: 8, producer: "golden")
        #expect(bytes == golden("chunked.ckpts"))
    }

    @Test func everyDtypeIsByteIdentical() throws {
        let meta = JSONObject([("note", .string("one tensor per dtype")), ("n", .int(19))])
        let header = StreamHeader(producer: "golden", sourceFormat: "test", metadata: meta)
        let bytes = try streamBytes(MemorySource(Self.allDtypes, header: header, withManifest: false), producer: "golden")
        #expect(bytes == golden("all-dtypes.ckpts"))
    }

    @Test(arguments: ["tiny.ckpts", "chunked.ckpts", "chunked-zlib.ckpts", "all-dtypes.ckpts", "bytes-zlib.ckpts"])
    func goldenFilesReadBack(_ name: String) throws {
        let sink = try readStream(golden(name))
        let expected: [(TensorHeader, [UInt8])] = switch name {
        case "tiny.ckpts": Self.tiny
        case "all-dtypes.ckpts": Self.allDtypes
        case "bytes-zlib.ckpts": [tensor("u", .u8, [300], pattern(300, seed: 1))]
        default: Self.chunked
        }
        #expect(sink.header?.producer == "golden")
        #expect(sink.tensors.count == expected.count)
        for (got, want) in zip(sink.tensors, expected) {
            #expect(got.0 == want.0)
            #expect(got.1 == want.1)
        }
        #expect(sink.manifest == (name == "all-dtypes.ckpts" ? nil : expected.map(\.0.descriptor)))
        if name == "all-dtypes.ckpts" {
            #expect(sink.header?.metadata["n"] == .number("19"))
        }
    }

    @Test func everyDtypeHasItsSize() {
        let sizes: [DType: Int] = [.bool: 1, .u8: 1, .i8: 1, .f8e5m2: 1, .f8e4m3: 1, .f8e8m0: 1, .f8e4m3fnuz: 1, .f8e5m2fnuz: 1,
                                   .i16: 2, .u16: 2, .f16: 2, .bf16: 2, .i32: 4, .u32: 4, .f32: 4, .c64: 8, .f64: 8, .i64: 8, .u64: 8]
        for d in DType.allCases { #expect(d.size == sizes[d], "\(d)") }
        #expect(DType.allCases.count == 19)
    }
}
