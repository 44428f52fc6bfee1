import Testing
@testable import Shared

/// One broken rule per archive: `ZipArchive` must refuse it with that rule's reason.
@Suite struct ZipBadInputTests {
    /// A one-member archive ("d/x"), every field adjustable.
    struct Archive {
        var name = Array("d/x".utf8)
        var data = Array("hello".utf8)
        var method: UInt16 = 0
        var flags: UInt16 = 0
        var compressedSize: UInt32?
        var localSignature: UInt32 = 0x0403_4B50
        var centralSignature: UInt32 = 0x0201_4B50
        var localOffset: UInt32 = 0
        var centralExtra: [UInt8] = []
        var disk: UInt16 = 0
        var count: UInt16 = 1
        var centralSizeDelta = 0
        /// Bytes between the central directory and the end record (a zip64 record and locator).
        var beforeEnd: (_ cdOffset: Int, _ cdSize: Int, _ at: Int) -> [UInt8] = { _, _, _ in [] }

        var bytes: [UInt8] {
            var w = ByteWriter()
            w.u32(localSignature); w.u16(20); w.u16(flags); w.u16(method); w.u32(0); w.u32(CRC32.checksum(data))
            w.u32(compressedSize ?? UInt32(data.count)); w.u32(UInt32(data.count)); w.u16(UInt16(name.count)); w.u16(0)
            w.raw(name); w.raw(data)
            let cd = w.bytes.count
            w.u32(centralSignature); w.u16(20); w.u16(20); w.u16(flags); w.u16(method); w.u32(0); w.u32(CRC32.checksum(data))
            w.u32(compressedSize ?? UInt32(data.count)); w.u32(UInt32(data.count)); w.u16(UInt16(name.count))
            w.u16(UInt16(centralExtra.count)); w.u16(0); w.u16(0); w.u16(0); w.u32(0); w.u32(localOffset)
            w.raw(name); w.raw(centralExtra)
            let cdSize = w.bytes.count - cd + centralSizeDelta
            w.raw(beforeEnd(cd, cdSize, w.bytes.count))
            w.u32(0x0605_4B50); w.u16(disk); w.u16(0); w.u16(count); w.u16(count); w.u32(UInt32(cdSize)); w.u32(UInt32(cd)); w.u16(0)
            return w.bytes
        }
    }

    func open(_ bytes: [UInt8]) throws -> ZipArchive {
        let path = temporaryDirectory() + "/a.zip"
        writeFile(path, bytes)
        return try ZipArchive(try MappedFile(try FileDescriptor.openForReading(path), size: bytes.count))
    }

    /// The error opening `bytes` (or reading its one member) gives.
    func failure(_ bytes: [UInt8], read: Bool = false) -> ZipError? {
        do {
            let z = try open(bytes)
            if read { _ = try z.read(z.entries[0]) }
            return nil
        } catch let e as ZipError { return e } catch {
            Issue.record("not a ZipError: \(error)")
            return nil
        }
    }

    @Test func theBaseArchiveReads() throws {
        let z = try open(Archive().bytes)
        #expect(try z.readBytes(z.entries[0], limit: 10) == Array("hello".utf8))
    }

    @Test func endRecord() {
        #expect(failure([UInt8](repeating: 0, count: 21))?.reason == .noEndRecord)
        #expect(failure(Array(Archive().bytes.dropLast()))?.reason == .noEndRecord)
        var a = Archive()
        a.disk = 1
        #expect(failure(a.bytes)?.reason == .multiDisk)
    }

    @Test func zip64EndRecord() {
        var a = Archive()
        // A locator pointing past the end of the file.
        a.beforeEnd = { _, _, _ in
            var w = ByteWriter()
            w.u32(0x0706_4B50); w.u32(0); w.u64(1 << 40); w.u32(1)
            return w.bytes
        }
        #expect(failure(a.bytes)?.reason == .badZip64EndRecord)
        // A locator pointing at something that is not a zip64 end record.
        a.beforeEnd = { _, _, _ in
            var w = ByteWriter()
            w.u32(0x0706_4B50); w.u32(0); w.u64(0); w.u32(1)
            return w.bytes
        }
        #expect(failure(a.bytes)?.reason == .badZip64EndRecord)
        // A good zip64 record is followed.
        a.beforeEnd = { cd, size, at in
            var w = ByteWriter()
            w.u32(0x0606_4B50); w.u64(44); w.u16(45); w.u16(45); w.u32(0); w.u32(0); w.u64(1); w.u64(1)
            w.u64(UInt64(size)); w.u64(UInt64(cd))
            w.u32(0x0706_4B50); w.u32(0); w.u64(UInt64(at)); w.u32(1)
            return w.bytes
        }
        #expect(failure(a.bytes) == nil)
        // In a tiny file, a locator must not make the reader trap.
        var w = ByteWriter()
        w.u32(0x0706_4B50); w.u32(0); w.u64(0); w.u32(1)
        w.u32(0x0605_4B50); w.zeros(18)
        #expect(failure(w.bytes)?.reason == .badZip64EndRecord)
    }

    @Test func centralDirectory() {
        var a = Archive()
        a.centralSizeDelta = 1000
        #expect(failure(a.bytes)?.reason == .centralDirectoryOutOfBounds(offset: 38, size: 49 + 1000))
        a = Archive()
        a.count = 2  // 2 × 46 bytes cannot fit in 49
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 1))
        a = Archive()
        a.centralSignature = 0x1234_5678
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 0))
        a = Archive()
        a.centralSizeDelta = -2  // the name runs past the directory
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 0))
    }

    @Test func zip64ExtraField() {
        var a = Archive()
        a.centralExtra = [0x01, 0x00, 0x10, 0x00] + [0, 0, 0]  // declares 16 bytes, holds 3
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 0))
        a.localOffset = 0xFFFF_FFFF
        a.centralExtra = [0x01, 0x00, 0x04, 0x00, 0, 0, 0, 0]  // too short for the u64 it must hold
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 0))
        #expect(failure(a.bytes)?.member == "d/x")
        a.centralExtra = [0x01, 0x00, 0x08, 0x00] + [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]  // over Int.max
        #expect(failure(a.bytes)?.reason == .badCentralEntry(index: 0))
        a.centralExtra = [0x01, 0x00, 0x08, 0x00] + [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]  // Int.max: no overflow
        #expect(failure(a.bytes)?.reason == .memberOutOfBounds(offset: Int.max, size: 30))
    }

    @Test func members() {
        var a = Archive()
        a.flags = 1
        #expect(failure(a.bytes)?.reason == .encrypted)
        a = Archive()
        a.method = 12
        #expect(failure(a.bytes)?.reason == .unsupportedMethod(method: 12))
        a = Archive()
        a.compressedSize = 4
        #expect(failure(a.bytes)?.reason == .sizeMismatch(declared: 5, actual: 4))
        a = Archive()
        a.localSignature = 0
        #expect(failure(a.bytes)?.reason == .badLocalHeader)
        #expect(failure(a.bytes)?.description.hasSuffix("a.zip: zip member d/x: local file header is missing or malformed") == true)
        a = Archive()
        a.localOffset = 30  // points at the name and data: no local header signature there
        #expect(failure(a.bytes)?.reason == .badLocalHeader)
        a.localOffset = 1000
        #expect(failure(a.bytes)?.reason == .memberOutOfBounds(offset: 1000, size: 30))
        a = Archive()
        a.method = 8
        a.data = Array("hello".utf8)  // not deflate data
        a.compressedSize = 5
        #expect(failure(a.bytes) == nil)
        guard case .inflateFailed = failure(a.bytes, read: true)?.reason else {
            Issue.record("expected inflateFailed")
            return
        }
    }
}
