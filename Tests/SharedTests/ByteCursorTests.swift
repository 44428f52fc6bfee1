import Testing
@testable import Shared

@Suite struct ByteCursorTests {
    let golden: [UInt8] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF]

    /// The reason and offset of the error `body` throws, or nil if it throws none.
    func failure<R>(_ body: () throws -> R) -> ByteCursorError? {
        do { _ = try body(); return nil } catch let e as ByteCursorError { return e } catch { return nil }
    }

    @Test func integersInBothByteOrders() throws {
        var c = ByteCursor(golden)
        #expect(try c.getInteger(at: 0, endianness: .little, as: UInt16.self) == 0x0201)
        #expect(try c.getInteger(at: 0, endianness: .big, as: UInt16.self) == 0x0102)
        #expect(try c.getInteger(at: 1, endianness: .little, as: UInt32.self) == 0x0504_0302)
        #expect(try c.getInteger(at: 1, endianness: .big, as: UInt32.self) == 0x0203_0405)
        #expect(try c.getInteger(at: 0, endianness: .little, as: UInt64.self) == 0x0807_0605_0403_0201)
        #expect(try c.getInteger(at: 0, endianness: .big, as: UInt64.self) == 0x0102_0304_0506_0708)
        #expect(try c.getInteger(at: 8, endianness: .big, as: Int8.self) == -1)
        #expect(try c.getInteger(at: 7, endianness: .little, as: Int16.self) == -248)  // 0xFF08
        #expect(c.readerIndex == 0)  // get* does not move
        #expect(try c.readInteger(endianness: .big, as: UInt8.self) == 1)
        #expect(try c.readInteger(endianness: .little, as: UInt16.self) == 0x0302)
        #expect(try c.readInteger(endianness: .big, as: UInt32.self) == 0x0405_0607)
        #expect(c.offset == 7 && c.remaining == 2)
        #expect(try c.readBytes(2) == [0x08, 0xFF])
        #expect(c.isAtEnd)
    }

    @Test func everyShortReadThrowsWithItsOffsetAndLeavesTheIndex() {
        var c = ByteCursor(golden)
        try? c.skip(6)
        #expect(failure { try c.readInteger(endianness: .little, as: UInt32.self) }
            == ByteCursorError(.truncated(needed: 4, available: 3), offset: 6, reading: "UInt32"))
        #expect(failure { try c.readInteger(endianness: .big, as: UInt64.self) }
            == ByteCursorError(.truncated(needed: 8, available: 3), offset: 6, reading: "UInt64"))
        #expect(failure { try c.readBytes(4) } == ByteCursorError(.truncated(needed: 4, available: 3), offset: 6, reading: "4 bytes"))
        #expect(failure { try c.readSlice(4) }?.reason == .truncated(needed: 4, available: 3))
        #expect(failure { try c.skip(4) }?.reason == .truncated(needed: 4, available: 3))
        #expect(failure { try c.readUTF8(4) }?.offset == 6)
        #expect(failure { try c.readBytes(-1) }?.reason == .truncated(needed: -1, available: 3))
        #expect(c.readerIndex == 6)
        #expect(failure { try c.getInteger(at: 9, endianness: .little, as: UInt8.self) }
            == ByteCursorError(.truncated(needed: 1, available: 0), offset: 9, reading: "UInt8"))
        #expect(failure { try c.getInteger(at: 10, endianness: .little, as: UInt8.self) }?.reason
            == .indexOutOfRange(index: 10, startIndex: 0, endIndex: 9))
        #expect(failure { try c.getInteger(at: -1, endianness: .little, as: UInt8.self) }?.reason
            == .indexOutOfRange(index: -1, startIndex: 0, endIndex: 9))
        #expect(failure { try c.getInteger(at: Int.max, endianness: .little, as: UInt64.self) } != nil)
        #expect(failure { try c.getBytes(at: 8, count: Int.max) }?.reason == .truncated(needed: Int.max, available: 1))
        #expect(failure { try c.moveReaderIndex(to: 10) } != nil)
        #expect(ByteCursorError(.truncated(needed: 4, available: 3), offset: 6, reading: "UInt32").description
            == "byte 6: truncated: UInt32 needs 4 bytes, 3 left")
    }

    /// Every width, at every position of every prefix of the golden bytes: a read that fits
    /// gives the bytes in the asked order, one that does not throws `truncated` at its start.
    @Test func everyWidthAtEveryPositionOfEveryPrefix() throws {
        func check<T: FixedWidthInteger>(_: T.Type) {
            let w = MemoryLayout<T>.size
            for n in 0...golden.count {
                let prefix = Array(golden[0..<n])
                for at in 0...n {
                    for order in [Endianness.little, .big] {
                        var c = ByteCursor(prefix)
                        try? c.skip(at)
                        let result = Result { try c.readInteger(endianness: order, as: T.self) }
                        if at + w <= n {
                            let bytes = Array(prefix[at..<(at + w)])
                            let expected = (order == .little ? bytes.reversed() : bytes).reduce(T.zero) { $0 << 8 | T(truncatingIfNeeded: $1) }
                            #expect((try? result.get()) == expected)
                            #expect(c.readerIndex == at + w)
                        } else {
                            #expect(failure { try result.get() } == ByteCursorError(.truncated(needed: w, available: n - at), offset: at, reading: "\(T.self)"))
                            #expect(c.readerIndex == at)
                        }
                    }
                }
            }
        }
        check(UInt8.self); check(Int16.self); check(UInt16.self); check(Int32.self); check(UInt32.self); check(Int64.self); check(UInt64.self)
        #expect(try ByteCursor([0xFF, 0xFF, 0xFF, 0xFE]).getInteger(at: 0, endianness: .big, as: Int32.self) == -2)
        #expect(try ByteCursor([0xFE, 0xFF, 0xFF, 0xFF]).getInteger(at: 0, endianness: .little, as: Int32.self) == -2)
    }

    @Test func slicesKeepTheirParentsCoordinatesAndBounds() throws {
        var c = ByteCursor(golden)
        try c.skip(2)
        var s = try c.readSlice(3)
        #expect(c.readerIndex == 5)
        #expect(s.startIndex == 2 && s.endIndex == 5 && s.readerIndex == 2 && s.remaining == 3)
        #expect(try s.readInteger(endianness: .big, as: UInt16.self) == 0x0304)
        #expect(failure { try s.readInteger(endianness: .big, as: UInt16.self) }
            == ByteCursorError(.truncated(needed: 2, available: 1), offset: 4, reading: "UInt16"))
        #expect(failure { try s.getInteger(at: 1, endianness: .big, as: UInt8.self) }?.reason
            == .indexOutOfRange(index: 1, startIndex: 2, endIndex: 5))
    }

    @Test func unsafeAndMappedBytes() throws {
        let v = try golden.withUnsafeBytes { b throws -> UInt32 in
            var c = ByteCursor(unsafeBytes: b)
            return try c.readInteger(endianness: .little, as: UInt32.self)
        }
        #expect(v == 0x0403_0201)
        let path = temporaryDirectory() + "/golden"
        writeFile(path, golden)
        let file = try MappedFile(try FileDescriptor.openForReading(path), size: golden.count)
        var c = try ByteCursor(file, offset: 4, count: 4)
        #expect(c.readerIndex == 4)
        #expect(try c.readInteger(endianness: .big, as: UInt32.self) == 0x0506_0708)
        #expect(failure { try c.readByte() } == ByteCursorError(.truncated(needed: 1, available: 0), offset: 8, reading: "UInt8"))
    }

    @Test func utf8() throws {
        var c = ByteCursor(Array("hé".utf8) + [0xC3])
        #expect(try c.readUTF8(3) == "hé")
        #expect(try c.readUTF8(1) == nil)
        #expect(c.readerIndex == 3)
    }

    @Test func varints() throws {
        func read(_ b: [UInt8]) throws(ByteCursorError) -> UInt64 {
            var c = ByteCursor(b)
            let v = try c.readULEB128()
            guard c.isAtEnd else { throw ByteCursorError(.truncated(needed: 0, available: c.remaining), offset: c.readerIndex, reading: "rest") }
            return v
        }
        #expect(try read([0x00]) == 0)
        #expect(try read([0x7F]) == 127)
        #expect(try read([0x80, 0x01]) == 128)
        #expect(try read([0xE5, 0x8E, 0x26]) == 624_485)  // the example in Wikipedia's LEB128 article
        #expect(try read([0x80, 0x00]) == 0)  // non-minimal, but within 10 bytes: accepted
        #expect(try read([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]) == UInt64.max)
        // Overflowing: a 10th byte with more than the one bit left.
        #expect(failure { try read([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02]) }
            == ByteCursorError(.varintOverflow(bitWidth: 64), offset: 0, reading: "varint"))
        // Overlong: the continuation bit still set after 10 bytes.
        #expect(failure { try read([UInt8](repeating: 0x80, count: 10) + [0x00]) }
            == ByteCursorError(.varintTooLong(maxBytes: 10), offset: 0, reading: "varint"))
        // Truncated inside the varint: the error points at its first byte, the index stays.
        var c = ByteCursor([0x05, 0x80, 0x80])
        #expect(try c.readULEB128() == 5)
        #expect(failure { try c.readULEB128() } == ByteCursorError(.truncated(needed: 3, available: 2), offset: 1, reading: "varint"))
        #expect(c.readerIndex == 1)
        #expect(failure { try ByteCursor([]).getInteger(at: 0, endianness: .little, as: UInt8.self) } != nil)
        // Narrower types: 300 does not fit a UInt8; UInt32 allows 5 bytes.
        var n = ByteCursor([0xAC, 0x02])
        #expect(failure { try n.readULEB128(as: UInt8.self) }?.reason == .varintOverflow(bitWidth: 8))
        #expect(try n.readULEB128(as: UInt16.self) == 300)
        var w = ByteCursor([0x80, 0x80, 0x80, 0x80, 0x80, 0x01])
        #expect(failure { try w.readULEB128(as: UInt32.self) }?.reason == .varintTooLong(maxBytes: 5))
    }
}
