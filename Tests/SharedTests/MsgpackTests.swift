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
        let tokens = try w.withUnsafeBytes { b -> [MsgpackCursor.Token] in
            var c = MsgpackCursor(b, file: "t")
            var out: [MsgpackCursor.Token] = []
            while c.position < b.count { out.append(try c.next()) }
            return out
        }
        #expect(tokens == [.map(1), .string("k"), .uint(70000), .int(-128), .double(1.5)])
    }

    @Test func forgedCountsAndTruncationAreRefused() {
        for bad: [UInt8] in [[0xDD, 0xFF, 0xFF, 0xFF, 0xFF], [0xC6, 0, 0, 1, 0, 1], [0xDA, 0, 5, 0x61], [0xC1], [0xCB, 0]] {
            bad.withUnsafeBytes { b in
                var c = MsgpackCursor(b, file: "t")
                #expect(throws: MsgpackError.self, "\(bad)") { try c.skip() }
            }
        }
    }
}
