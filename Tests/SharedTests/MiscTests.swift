import Testing
@testable import Shared

@Suite struct JSONTests {
    @Test func roundTripsKeepingOrderAndNumbers() throws {
        let text = #"{"z":1,"a":[true,false,null,-0.5e3,"\u00e9\n\"x\""],"m":{}}"#
        let v = try JSONParser.parse(text)
        #expect(v.objectValue?.keys == ["z", "a", "m"])
        #expect(String(decoding: JSONWriter.compact(v), as: UTF8.self) == #"{"z":1,"a":[true,false,null,-0.5e3,"é\n\"x\""],"m":{}}"#)
    }

    @Test func surrogatePairsAndEscapes() throws {
        #expect(try JSONParser.parse(#""\ud83d\ude00\/""#) == .string("😀/"))
        #expect(throws: JSONParser.Error.self) { try JSONParser.parse(#""\ud83d""#) }
        #expect(String(decoding: JSONWriter.compact(.string("\u{1}\t")), as: UTF8.self) == #""\u0001\t""#)
    }

    @Test func refusesWhatIsNotJSON() {
        for bad in ["", "{", "{\"a\":1,}", "[1 2]", "01", "1.", "nul", "{\"a\":1,\"a\":2}", "\"\u{1}\"", "[] x"] {
            #expect(throws: JSONParser.Error.self, "\(bad)") { try JSONParser.parse(bad) }
        }
        #expect(throws: JSONParser.Error.self) { try JSONParser.parse([0x22, 0xC3, 0x28, 0x22]) }
        #expect(throws: JSONParser.Error.self) { try JSONParser.parse(String(repeating: "[", count: 10_000)) }
    }

    @Test func pythonIndentation() {
        let v = JSONValue.object(JSONObject([("b", .array([.int(1), .string("ü")])), ("a", .object(JSONObject()))]))
        #expect(String(decoding: JSONWriter.pythonIndented(v), as: UTF8.self) == "{\n  \"a\": {},\n  \"b\": [\n    1,\n    \"\\u00fc\"\n  ]\n}")
    }
}

@Suite struct CLIHelperTests {
    @Test func byteSizes() {
        #expect(parseByteSize("5GB") == 5_000_000_000)
        #expect(parseByteSize("2GiB") == 2 << 30)
        #expect(parseByteSize("500 MB") == 500_000_000)
        #expect(parseByteSize("1.5kb") == 1500)
        #expect(parseByteSize("123") == 123)
        #expect(parseByteSize("5 parsecs") == nil)
        #expect(parseByteSize("-1GB") == nil)
    }

    @Test func selection() {
        let s = TensorSelection(only: ["encoder.*", "pooler.*"], exclude: ["*.bias"])
        #expect(s.includes("encoder.layer.0.weight"))
        #expect(!s.includes("encoder.layer.0.bias"))
        #expect(!s.includes("embeddings.word"))
        #expect(TensorSelection.all.includes("anything/at/all"))
    }

    @Test func descriptorsRefuseOverflow() {
        #expect(throws: ShapeError.self) { try TensorDescriptor(name: "x", dtype: .f32, shape: [Int.max / 2, 3]) }
        #expect(throws: ShapeError.self) { try TensorDescriptor(name: "x", dtype: .f32, shape: [-1]) }
        #expect(try! TensorDescriptor(name: "s", dtype: .f64, shape: []).byteCount == 8)
    }

    @Test func tableListsEveryTensorAndTotals() throws {
        let t = TensorTable.render([try TensorDescriptor(name: "w", dtype: .bf16, shape: [2, 3]), try TensorDescriptor(name: "b", dtype: .f32, shape: [3])])
        let lines = t.split(separator: "\n")
        #expect(lines.count == 4)
        #expect(lines[1].split(separator: " ", omittingEmptySubsequences: true) == ["w", "BF16", "[2,3]", "12"])
        #expect(lines[3] == "2 tensors, 24 bytes (24 B)")
    }
}
