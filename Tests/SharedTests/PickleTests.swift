import Glibc
import Testing
@testable import Shared

@Suite struct UnpicklerTests {
    func load(_ bytes: [UInt8], storages: Bool = true) throws -> PickleValue {
        try bytes.withUnsafeBytes { b in
            try Unpickler.load(b, file: "t.pkl") { pid, at in
                guard storages else { Issue.record("persistent load must not run"); return .none }
                return try TorchReader.storageRef(pid, legacy: false, file: "t.pkl", at: at)
            }.0
        }
    }

    func reason(_ bytes: [UInt8]) -> PickleError.Reason? {
        do { _ = try load(bytes, storages: false); return nil } catch let e as PickleError { return e.reason } catch { return nil }
    }

    static func g(_ s: String) -> [UInt8] { [0x63] + Array(s.utf8) }  // GLOBAL "module\nname\n"
    static func str(_ s: String) -> [UInt8] { [0x58] + withUnsafeBytes(of: UInt32(s.utf8.count).littleEndian, Array.init) + Array(s.utf8) }

    /// The smallest data.pkl torch accepts (../shared/notes/formats.md §1.5), built by hand.
    static let handMade: [UInt8] = [0x80, 0x02] + g("collections\nOrderedDict\n") + [0x29, 0x52] + str("w")
        + g("torch._utils\n_rebuild_tensor_v2\n") + [0x28, 0x28] + str("storage") + g("torch\nFloatStorage\n")
        + str("0") + str("cpu") + [0x4B, 0x06, 0x74, 0x51, 0x4B, 0x00, 0x28, 0x4B, 0x02, 0x4B, 0x03, 0x74,
                                   0x28, 0x4B, 0x03, 0x4B, 0x01, 0x74, 0x89]
        + g("collections\nOrderedDict\n") + [0x29, 0x52, 0x74, 0x52, 0x73, 0x2E]

    @Test func rebuildsATensorFromTheHandMadePickle() throws {
        guard case .dict(let d) = try load(Self.handMade) else { Issue.record("not a dict"); return }
        #expect(d.entries.count == 1)
        guard case .string("w") = d.entries[0].key, case .tensor(let t) = d.entries[0].value else { Issue.record("bad entry"); return }
        #expect(t == TensorRef(storage: StorageRef(key: "0", dtype: .f32, numel: 6, rootNumel: 6), dtype: .f32,
                               storageOffset: 0, shape: [2, 3], stride: [3, 1]))
    }

    @Test func forbiddenGlobalsAreRefusedBeforeAnythingElse() {
        #expect(reason([0x80, 0x02] + Self.g("os\nsystem\n") + Self.str("rm -rf /") + [0x85, 0x52, 0x2E]) == .forbiddenGlobal("os.system"))
        #expect(reason([0x80, 0x04, 0x8C, 0x08] + Array("builtins".utf8) + [0x8C, 0x04] + Array("eval".utf8) + [0x93, 0x2E])
                == .forbiddenGlobal("builtins.eval"))
        #expect(reason([0x80, 0x02] + Self.g("numpy.core.multiarray\n_reconstruct\n") + [0x2E]) == .forbiddenGlobal("numpy.core.multiarray._reconstruct"))
    }

    @Test func protocol4Opcodes() throws {
        // FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, EMPTY_TUPLE, REDUCE, BINGET.
        let p: [UInt8] = [0x80, 0x04, 0x95, 0x20, 0, 0, 0, 0, 0, 0, 0, 0x8C, 0x0B] + Array("collections".utf8) + [0x94, 0x8C, 0x0B]
            + Array("OrderedDict".utf8) + [0x94, 0x93, 0x94, 0x29, 0x52, 0x94, 0x68, 0x03, 0x2E]
        guard case .dict = try load(p) else { Issue.record("expected the memoized OrderedDict"); return }
    }

    @Test func integers() throws {
        #expect(Unpickler.long([0xFF]).intValue == -1)
        #expect(Unpickler.long([0x00, 0x80]).intValue == -32768)
        #expect(Unpickler.long([0x00, 0x80, 0x00]).intValue == 32768)
        #expect(Unpickler.long([0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0xFF]).intValue == Int.min)
        #expect(Unpickler.long([]).intValue == 0)
        if case .bigInt = Unpickler.long([0, 0, 0, 0, 0, 0, 0, 0, 1]) {} else { Issue.record("2**64 must stay a big integer") }
        #expect(try load([0x4A, 0xFE, 0xFF, 0xFF, 0xFF, 0x2E]).intValue == -2)
    }

    @Test func malformedPicklesHaveTheirErrors() {
        #expect(reason([0x80, 0x02, 0x4B]) == .truncated)
        #expect(reason([0x80, 0x02, 0x58, 0xFF, 0xFF, 0xFF, 0x7F, 0x2E]) == .truncated)  // a 2 GiB string in 8 bytes
        #expect(reason([0x68, 0x05, 0x2E]) == .badValue("memo key 5 was never stored"))
        #expect(reason([0x30, 0x2E]) == .stackUnderflow("POP"))
        #expect(reason([0x69] + Array("os\nsystem\n".utf8) + [0x2E]) == .unsupportedOpcode(0x69))  // INST
        #expect(reason([0x80, 0x06, 0x2E]) == .unsupportedProtocol(6))
    }

    @Test func viewsMustStayInsideTheirStorage() {
        let storage = StorageRef(key: "0", dtype: .f32, numel: 4, rootNumel: 4)
        let bad = { (m: String) in PickleError(reason: .badValue(m), file: "f", offset: 0) }
        #expect(throws: PickleError.self) { try TorchRebuild.tensor(storage, dtype: .f32, .int(1), .tuple([.int(4)]), .tuple([.int(1)]), bad) }
        #expect(throws: PickleError.self) { try TorchRebuild.tensor(storage, dtype: .f32, .int(0), .tuple([.int(2), .int(2)]), .tuple([.int(3), .int(1)]), bad) }
        #expect(throws: PickleError.self) { try TorchRebuild.tensor(storage, dtype: .f32, .int(-1), .tuple([.int(1)]), .tuple([.int(1)]), bad) }
        #expect((try? TorchRebuild.tensor(storage, dtype: .f32, .int(0), .tuple([.int(2), .int(2)]), .tuple([.int(1), .int(2)]), bad)) != nil)
    }
}

extension PickleValue {
    var intValue: Int? { if case .int(let i) = self { return i } else { return nil } }
}

@Suite struct NpyHeaderTests {
    func parse(_ header: String, hints: DTypeHints = DTypeHints()) throws -> NpyHeader {
        var h = Array(header.utf8)
        let bytes: [UInt8] = NpyHeader.magic + [1, 0, UInt8(h.count & 255), UInt8(h.count >> 8)] + h
        h = bytes
        return try h.withUnsafeBytes { try NpyHeader.parse($0, name: "a", hints: hints, file: "a.npy") }
    }

    @Test func readsWhatNumpyWrites() throws {
        let h = try parse("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }          \n")
        #expect(h.dtype == .f32 && !h.bigEndian && !h.fortranOrder && h.shape == [2, 3] && h.dataOffset == 10 + 70)
        #expect(try parse("{\"shape\": (), \"fortran_order\": True, \"descr\": \">i8\"}").bigEndian)
        #expect(try parse("{'descr': '|b1', 'fortran_order': False, 'shape': (5,)}").shape == [5])
    }

    @Test func refusesWhatItCannotRepresent() {
        for bad in ["{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", "{'descr': '<f4', 'fortran_order': False, 'shape': [2]}",
                    "{'descr': '|O', 'fortran_order': False, 'shape': (2,)}", "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}",
                    "{'descr': '<V2', 'fortran_order': False, 'shape': (2,)}", "{'descr': '<c16', 'fortran_order': False, 'shape': (2,)}",
                    "{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "__import__('os')"] {
            #expect(throws: NumPyError.self, "\(bad)") { try parse(bad) }
        }
    }

    @Test func hintsNameVoidTypes() throws {
        var hints = DTypeHints()
        hints.rules = [("a", .bf16)]
        #expect(try parse("{'descr': '<V2', 'fortran_order': False, 'shape': (2,)}", hints: hints).dtype == .bf16)
        hints.rules = [("a", .f32)]
        #expect(throws: NumPyError.self) { try parse("{'descr': '<V2', 'fortran_order': False, 'shape': (2,)}", hints: hints) }
    }
}

@Suite struct ZipArchiveTests {
    /// One STORED member "d/x" holding "hello", as a minimal archive.
    static func archive(centralSize: UInt32? = nil) -> [UInt8] {
        var w = ByteWriter()
        let name = Array("d/x".utf8), data = Array("hello".utf8)
        w.u32(0x0403_4B50); w.u16(20); w.u16(0); w.u16(0); w.u32(0); w.u32(CRC32.checksum(data))
        w.u32(5); w.u32(5); w.u16(UInt16(name.count)); w.u16(0); w.raw(name); w.raw(data)
        let cd = w.bytes.count
        w.u32(0x0201_4B50); w.u16(20); w.u16(20); w.u16(0); w.u16(0); w.u32(0); w.u32(CRC32.checksum(data))
        w.u32(5); w.u32(centralSize ?? 5); w.u16(UInt16(name.count)); w.u16(0); w.u16(0); w.u16(0); w.u16(0); w.u32(0); w.u32(0); w.raw(name)
        let cdEnd = w.bytes.count
        w.u32(0x0605_4B50); w.u16(0); w.u16(0); w.u16(1); w.u16(1); w.u32(UInt32(cdEnd - cd)); w.u32(UInt32(cd)); w.u16(0)
        return w.bytes
    }

    func open(_ bytes: [UInt8]) throws -> ZipArchive {
        let dir = temporaryDirectory()
        writeFile(dir + "/a.zip", bytes)
        let fd = try FileDescriptor.openForReading(dir + "/a.zip")
        return try ZipArchive(try MappedFile(fd, size: bytes.count))
    }

    @Test func readsAStoredMember() throws {
        let z = try open(Self.archive())
        #expect(z.entries.map(\.name) == ["d/x"])
        #expect(try z.readBytes(z.entry("d/x")!, limit: 100) == Array("hello".utf8))
    }

    @Test func badArchives() {
        let good = Self.archive()
        func reason(_ b: [UInt8]) -> ZipError.Reason? {
            do { _ = try open(b); return nil } catch let e as ZipError { return e.reason } catch { return nil }
        }
        #expect(reason(Array(good.prefix(good.count - 5))) == .noEndRecord)
        #expect(reason([UInt8](repeating: 0, count: 100)) == .noEndRecord)
        #expect(reason(Self.archive(centralSize: 1 << 30)) == .sizeMismatch(declared: 1 << 30, actual: 5))
        var lying = good
        lying[good.count - 3] = 0xFF  // the high byte of the central directory's offset
        guard case .centralDirectoryOutOfBounds(let offset, 49) = reason(lying), offset >= 0xFF00_0000 else {
            Issue.record("expected the central directory to be out of bounds")
            return
        }
    }
}

/// Found by scripts/fuzz.sh torch (Tests/fuzz/regressions/torch/): both trapped instead of
/// throwing.
@Suite struct ZipArchiveHostileTests {
    func reason(_ b: [UInt8]) -> ZipError.Reason? {
        let dir = temporaryDirectory()
        writeFile(dir + "/a.zip", b)
        do {
            let fd = try FileDescriptor.openForReading(dir + "/a.zip")
            _ = try ZipArchive(try MappedFile(fd, size: b.count))
            return nil
        } catch let e as ZipError { return e.reason } catch { return nil }
    }

    @Test func zip64LocatorInAnArchiveShorterThanItsEndRecord() {
        // 48 bytes: a zip64 locator right before the end record, in a file too short to hold
        // the 56-byte zip64 end record (UInt64(size - 56) trapped).
        var w = ByteWriter()
        w.u32(0x0403_4B50); w.u16(0)
        w.u32(0x0706_4B50); w.u32(0); w.u64(0); w.u32(1)
        w.u32(0x0605_4B50); w.u16(0); w.u16(0); w.u16(0); w.u16(0); w.u32(0); w.u32(0); w.u16(0)
        #expect(w.bytes.count == 48)
        #expect(reason(w.bytes) == .badZip64EndRecord)
    }

    @Test func zip64LocalHeaderOffsetNearIntMax() {
        // A central entry whose zip64 extra sets the local header offset to Int.max
        // (localOffset + 30 overflowed).
        var w = ByteWriter()
        let name = Array("x".utf8)
        let cd = w.bytes.count
        w.u32(0x0201_4B50); w.u16(45); w.u16(45); w.u16(0); w.u16(0); w.u32(0); w.u32(0)
        w.u32(0); w.u32(0); w.u16(UInt16(name.count)); w.u16(12); w.u16(0); w.u16(0); w.u16(0); w.u32(0)
        w.u32(0xFFFF_FFFF); w.raw(name)
        w.u16(1); w.u16(8); w.u64(UInt64(Int.max))
        let cdEnd = w.bytes.count
        w.u32(0x0605_4B50); w.u16(0); w.u16(0); w.u16(1); w.u16(1); w.u32(UInt32(cdEnd - cd)); w.u32(UInt32(cd)); w.u16(0)
        guard case .memberOutOfBounds(let offset, 30)? = reason(w.bytes), offset == Int.max else {
            Issue.record("expected the member to be out of bounds")
            return
        }
    }
}

@Suite struct ZipWriterTests {
    @Test func zip64SizesAndOffsetsReadBack() throws {
        let dir = temporaryDirectory()
        let out = try AtomicOutput(path: dir + "/big.zip", overwrite: false)
        let z = ZipWriter(out.descriptor)
        try z.add("a/small", Array("hi".utf8))
        try z.begin("a/huge", size: 5 << 30)  // over 4 GiB: zip64 sizes
        z.skipForTesting(5 << 30)
        try z.end()
        try z.add("a/after", Array("tail".utf8))  // its local header sits past 4 GiB: zip64 offset
        try z.finish()
        try out.commit()
        let fd = try FileDescriptor.openForReading(dir + "/big.zip")
        let archive = try ZipArchive(try MappedFile(fd, size: try fd.regularFileSize()!))
        #expect(archive.entries.map(\.name) == ["a/small", "a/huge", "a/after"])
        let huge = archive.entry("a/huge")!, after = archive.entry("a/after")!
        #expect(huge.size == 5 << 30 && huge.dataOffset % 64 == 0)
        #expect(after.localHeaderOffset > 0xFFFF_FFFF && after.dataOffset % 64 == 0)
        #expect(try archive.readBytes(after, limit: 10) == Array("tail".utf8))
        #expect(try archive.readBytes(archive.entry("a/small")!, limit: 10) == Array("hi".utf8))
        _ = unlink(dir + "/big.zip")
    }
}
