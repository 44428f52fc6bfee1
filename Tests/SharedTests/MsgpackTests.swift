import Testing
@testable import Shared

@Suite struct MsgpackTests {
    func encoded(_ f: (inout [UInt8]) -> Void) -> [UInt8] {
        var w: [UInt8] = []
        f(&w)
        return w
    }

    /// Vectors from the msgpack spec's type table, at each size boundary.
    @Test func encoderPicksTheSmallestForm() {
        #expect(encoded { MsgpackEncoder.uint(127, into: &$0) } == [0x7F])
        #expect(encoded { MsgpackEncoder.uint(128, into: &$0) } == [0xCC, 0x80])
        #expect(encoded { MsgpackEncoder.uint(65536, into: &$0) } == [0xCE, 0, 1, 0, 0])
        #expect(encoded { MsgpackEncoder.uint(1 << 32, into: &$0) } == [0xCF, 0, 0, 0, 1, 0, 0, 0, 0])
        #expect(encoded { MsgpackEncoder.map(15, into: &$0) } == [0x8F])
        #expect(encoded { MsgpackEncoder.map(16, into: &$0) } == [0xDE, 0, 16])
        #expect(encoded { MsgpackEncoder.string("abc", into: &$0) } == [0xA3, 0x61, 0x62, 0x63])
        #expect(encoded { MsgpackEncoder.string(String(repeating: "x", count: 32), into: &$0) }.prefix(2) == [0xD9, 32])
        #expect(encoded { MsgpackEncoder.binHeader(300, into: &$0) } == [0xC5, 1, 44])
        #expect(encoded { MsgpackEncoder.extHeader(type: 3, 16, into: &$0) } == [0xD8, 3])
        #expect(encoded { MsgpackEncoder.extHeader(type: 1, 38, into: &$0) } == [0xC7, 38, 1])
    }

    @Test func cursorReadsBackWhatTheEncoderWrites() throws {
        var w: [UInt8] = []
        MsgpackEncoder.map(1, into: &w)
        MsgpackEncoder.string("k", into: &w)
        MsgpackEncoder.uint(70000, into: &w)
        w += [0xD0, 0x80, 0xCB] + withUnsafeBytes(of: (1.5).bitPattern.bigEndian, Array.init)
        var c = MsgpackCursor(ByteCursor(w), file: "t")
        var tokens: [MsgpackCursor.Token] = []
        while c.position < w.count { tokens.append(try c.next()) }
        #expect(tokens == [.map(1), .string("k"), .uint(70000), .int(-128), .double(1.5)])
    }

    /// The error `bytes` give a cursor skipping one value.
    func skipFailure(_ bytes: [UInt8]) -> MsgpackError? {
        var c = MsgpackCursor(ByteCursor(bytes), file: "t")
        do { try c.skip(); return nil } catch { return error }
    }

    @Test func forgedCountsAndTruncationAreRefused() {
        #expect(skipFailure([0xDD, 0xFF, 0xFF, 0xFF, 0xFF]) == MsgpackError(.countExceedsInput(count: 0xFFFF_FFFF), file: "t", offset: 5))
        #expect(skipFailure([0x93, 0x01]) == MsgpackError(.countExceedsInput(count: 3), file: "t", offset: 1))
        #expect(skipFailure([0xC6, 0, 0, 1, 0, 1]) == MsgpackError(.truncated(needed: 256, available: 1), file: "t", offset: 5))
        #expect(skipFailure([0xDA, 0, 5, 0x61]) == MsgpackError(.truncated(needed: 5, available: 1), file: "t", offset: 3))
        #expect(skipFailure([0xCB, 0]) == MsgpackError(.truncated(needed: 8, available: 1), file: "t", offset: 1))
        #expect(skipFailure([0xD4, 1]) == MsgpackError(.truncated(needed: 1, available: 0), file: "t", offset: 2))
        #expect(skipFailure([]) == MsgpackError(.truncated(needed: 1, available: 0), file: "t", offset: 0))
        #expect(skipFailure([0xC1]) == MsgpackError(.unknownType(byte: 0xC1), file: "t", offset: 0))
        #expect(skipFailure([0x91, 0xA1, 0xFF]) == MsgpackError(.stringNotUTF8, file: "t", offset: 2))
        #expect(skipFailure([UInt8](repeating: 0x91, count: 600) + [0xC0])?.reason == .nestingTooDeep(limit: 512))
        #expect(MsgpackError(.truncated(needed: 8, available: 1), file: "t", offset: 1).description == "t: byte 1: truncated: needs 8 more bytes")
    }
}

/// Flax's tree rules, one bad file each; the reason and the tensor it names are checked.
@Suite struct FlaxMsgpackBadInputTests {
    func string(_ s: String) -> [UInt8] { var w: [UInt8] = []; MsgpackEncoder.string(s, into: &w); return w }
    func ext(_ type: Int8, _ payload: [UInt8]) -> [UInt8] {
        var w: [UInt8] = []
        MsgpackEncoder.extHeader(type: type, payload.count, into: &w)
        return w + payload
    }
    /// An ext 1 array payload `(shape, dtype, data)`.
    func array(_ shape: [Int], _ dtype: String, _ data: [UInt8]) -> [UInt8] {
        var w: [UInt8] = [0x93]
        MsgpackEncoder.array(shape.count, into: &w)
        for d in shape { MsgpackEncoder.uint(d, into: &w) }
        w += string(dtype)
        MsgpackEncoder.binHeader(data.count, into: &w)
        return ext(1, w + data)
    }
    /// `{"w": value}`
    func leaf(_ value: [UInt8]) -> [UInt8] { [0x81] + string("w") + value }
    /// A chunked array map with the given marker, shape and chunks entries.
    func chunked(marker: [UInt8] = [0xC3], shape: [UInt8], chunks: [UInt8]) -> [UInt8] {
        leaf([0x83] + string(FlaxMsgpack.chunkedArrayKey) + marker + string("shape") + shape + string("chunks") + chunks)
    }

    func failure(_ bytes: [UInt8]) -> MsgpackError? {
        let path = temporaryDirectory() + "/bad.msgpack"
        writeFile(path, bytes)
        do { _ = try FlaxMsgpackReader.open(path: path, producer: "t"); return nil } catch let e as MsgpackError { return e } catch {
            Issue.record("not a MsgpackError: \(error)")
            return nil
        }
    }

    @Test func readsAGoodFile() throws {
        #expect(failure(leaf(array([2], "int8", [1, 2]))) == nil)
    }

    @Test func msgpackRules() {
        #expect(failure([0x80, 0x00])?.reason == .trailingBytes(count: 1))
        #expect(failure([0x81, 0xA1])?.reason == .truncated(needed: 1, available: 0))
        #expect(failure([0xDF, 0xFF, 0xFF, 0xFF, 0xFF])?.reason == .countExceedsInput(count: 0xFFFF_FFFF))
        let dir = temporaryDirectory()
        #expect { _ = try FlaxMsgpackReader.open(path: dir, producer: "t") } throws: { ($0 as? MsgpackError)?.reason == .notARegularFile }
    }

    @Test func treeRules() {
        let two = [0x82] + string("a") + [0x01] + string("a") + [0x02]
        #expect(failure(two)?.reason == .duplicateLeaf)
        #expect(failure(two)?.tensor == "a")
        #expect(failure([0x81, 0xC0, 0x01])?.reason == .mapKeyNotStringOrInteger)
        #expect(failure(leaf(ext(9, [0x78])))?.reason == .unknownExtType(type: 9))
        #expect(failure(leaf(ext(2, [0x90])))?.reason == .malformedComplex)
    }

    @Test func arrayPayloadRules() {
        #expect(failure(leaf(ext(1, [0x90])))?.reason == .malformedArrayPayload)
        #expect(failure(leaf(ext(1, [0x93, 0x91, 0xC0, 0xC0, 0xC0])))?.reason == .shapeNotIntegers)
        #expect(failure(leaf(ext(1, [0x93, 0x90, 0xC0, 0xC0])))?.reason == .dtypeNotString)
        #expect(failure(leaf(array([2], "float128", [UInt8](repeating: 0, count: 32))))?.reason == .unsupportedDType(name: "float128"))
        #expect(failure(leaf(ext(1, [0x93, 0x90] + string("int8") + [0xC0])))?.reason == .dataNotTrailingBin)
        #expect(failure(leaf(ext(1, [0x93, 0x90] + string("int8") + [0xC4, 0x00, 0xC0])))?.reason == .dataNotTrailingBin)
        #expect(failure(leaf(array([2], "int8", [1])))?.reason == .dataSizeMismatch(dtype: "int8", shape: [2], needed: 2, holds: 1))
        #expect(failure(leaf(array([2], "int8", [1])))?.tensor == "w")
        guard case .invalidShape(shape: [1 << 40, 1 << 40], _) = failure(leaf(array([1 << 40, 1 << 40], "float64", [])))?.reason else {
            Issue.record("expected invalidShape")
            return
        }
    }

    @Test func chunkedArrayRules() {
        let shape3 = [0x81] + string("0") + [0x03]
        let chunk0 = [0x81] + string("0") + array([3], "int8", [1, 2, 3])
        #expect(failure(chunked(shape: shape3, chunks: chunk0)) == nil)
        #expect(failure(chunked(marker: [0xC2], shape: shape3, chunks: chunk0))?.reason == .chunkedMarkerNotTrue)
        #expect(failure(chunked(shape: [0xC0], chunks: chunk0))?.reason == .chunkedNoShapeMap)
        #expect(failure(chunked(shape: [0x81] + string("1") + [0x03], chunks: chunk0))?.reason == .chunkedShapeEntryMalformed(index: 0))
        #expect(failure(chunked(shape: shape3, chunks: [0xC0]))?.reason == .chunkedNoChunksMap)
        #expect(failure(chunked(shape: shape3, chunks: [0x81] + string("0") + [0xC0]))?.reason == .chunkedChunkNotArray(index: 0))
        #expect(failure(chunked(shape: shape3, chunks: [0x81] + string("0") + array([1, 3], "int8", [1, 2, 3])))?.reason
            == .chunkedChunkNotOneDimensional(index: 0))
        #expect(failure(chunked(shape: shape3, chunks: [0x80]))?.reason == .chunkedNoChunks)
        #expect(failure(chunked(shape: shape3, chunks: [0x81] + string("0") + array([2], "int8", [1, 2])))?.reason
            == .chunkedSizeMismatch(dtype: "I8", shape: [3]))
    }
}
