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

    /// The smallest data.pkl torch accepts (as torch/serialization.py pickles a state dict), built by hand.
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

    @Test func everyTruncationAndCorruptionIsAnErrorNotATrap() throws {
        let whole = Self.handMade
        for n in 0..<whole.count {
            // A cut anywhere: an error (mostly .truncated), never a value and never a trap.
            do { _ = try load(Array(whole.prefix(n))); Issue.record("a pickle cut at \(n) loaded") } catch is PickleError {}
        }
        for i in whole.indices {
            for flip: UInt8 in [0x01, 0x80, 0xFF] {
                var b = whole
                b[i] ^= flip
                do { _ = try load(b) } catch is PickleError {}  // read or refused, nothing else
            }
        }
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

    @Test func expandedViewsAreBoundedByTheirSize() {
        let storage = StorageRef(key: "0", dtype: .f32, numel: 16, rootNumel: 16)
        let bad = { (m: String) in PickleError(reason: .badValue(m), file: "f", offset: 0) }
        // torch.arange(16.).expand(4, 16): small, rebuilt.
        #expect((try? TorchRebuild.tensor(storage, dtype: .f32, .int(0), .tuple([.int(4), .int(16)]), .tuple([.int(0), .int(1)]), bad)) != nil)
        // [2**20, 2**20] over 16 floats by stride 0: 4 TiB, refused before anything is allocated.
        do {
            _ = try TorchRebuild.tensor(storage, dtype: .f32, .int(0), .tuple([.int(1 << 20), .int(1 << 20)]), .tuple([.int(0), .int(0)]), bad)
            Issue.record("a 4 TiB broadcast view was accepted")
        } catch let e as PickleError {
            guard case .badValue(let m) = e.reason else { Issue.record("wrong reason \(e.reason)"); return }
            #expect(m.contains("expands") && m.contains("1024 MiB"))
        } catch { Issue.record("unexpected \(error)") }
    }

    // MARK: older protocols and Python 2

    @Test func decimalLongsEqualTheirBinaryForm() {
        // torch's magic number, as protocol 0 writes it and as LONG1 carries it.
        guard case .bigInt(let b) = Unpickler.decimalLong("119547037146038801333356") else { Issue.record("not a big integer"); return }
        #expect(b == TorchReader.legacyMagic)
        #expect(Unpickler.decimalLong("0")?.intValue == 0)
        #expect(Unpickler.decimalLong("-1")?.intValue == -1)
        #expect(Unpickler.decimalLong("9223372036854775807")?.intValue == Int.max)
        #expect(Unpickler.decimalLong("-9223372036854775808")?.intValue == Int.min)
        if case .bigInt(let b) = Unpickler.decimalLong("-9223372036854775809") { #expect(b == [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0xFF]) } else {
            Issue.record("-2**63-1 must be a big integer")
        }
        #expect(Unpickler.decimalLong("12a") == nil)
        #expect(Unpickler.decimalLong("") == nil)
    }

    @Test func legacyMagicIsRecognisedAtEveryProtocol() {
        let magic10 = TorchReader.legacyMagic
        let p0 = Array("L119547037146038801333356L\n.".utf8)
        let p2 = [0x80, 0x02, 0x8A, 0x0A] + magic10 + [0x2E]
        let p4 = [0x80, 0x04, 0x95, 0x0D, 0, 0, 0, 0, 0, 0, 0, 0x8A, 0x0A] + magic10 + [0x2E]
        for p in [p0, p2, p4] { #expect(p.withUnsafeBytes { TorchReader.startsWithLegacyMagic($0) }) }
        let other = Array("L119547037146038801333357L\n.".utf8)
        #expect(!other.withUnsafeBytes { TorchReader.startsWithLegacyMagic($0) })
        let msgpackMap: [UInt8] = [0x81, 0xA1, 0x61, 0x01]
        #expect(!msgpackMap.withUnsafeBytes { TorchReader.startsWithLegacyMagic($0) })
    }

    @Test func protocol0TextArguments() throws {
        func esc(_ s: String) -> String? { Unpickler.rawUnicodeEscape(Array(s.utf8)) }
        #expect(esc("a.weight") == "a.weight")
        #expect(esc(#"caf\u00e9 \u005c"#) == "café \\")
        #expect(esc(#"\U0001F600"#) == "\u{1F600}")
        #expect(esc(#"\u12"#) == nil)
        #expect(Unpickler.rawUnicodeEscape([0x61, 0xE9]) == "aé")  // Latin-1 bytes
        func quoted(_ s: String) -> [UInt8]? { Unpickler.quotedString(Array(s.utf8)) }
        #expect(quoted("'ab'") == [0x61, 0x62])
        #expect(quoted("'\\x00\\n\\'\\\\'") == [0x00, 0x0A, 0x27, 0x5C])
        #expect(quoted("'\\101\\q'") == [0x41, 0x5C, 0x71])
        #expect(quoted("'ab") == nil)
        // A protocol 0 dict: (dp0\nVa\np1\nI1\ns.
        guard case .dict(let d) = try load(Array("(dp0\nVa\np1\nI1\ns.".utf8)) else { Issue.record("not a dict"); return }
        #expect(d.entries.count == 1 && d.entries[0].value.intValue == 1)
        #expect(try load(Array("F0.5\n.".utf8)).floatValue == 0.5)
        #expect(try load([0x47, 0x3F, 0xE0, 0, 0, 0, 0, 0, 0, 0x2E]).floatValue == 0.5)  // BINFLOAT is big-endian
    }

    @Test func protocol0PersistentIDsAreParsedNotEvaluated() throws {
        func parse(_ s: String) -> PickleValue? { PersistentIDText.parse(s) }
        let v = parse("('storage', <class 'torch.FloatStorage'>, '0', 'cuda:1', 12)")
        guard case .tuple(let t)? = v, t.count == 5, case .global(let g) = t[1] else { Issue.record("not parsed"); return }
        #expect(g == PickleGlobal(module: "torch", name: "FloatStorage"))
        #expect(t[4].intValue == 12)
        guard case .tuple(let legacy)? = parse("('storage', <class 'torch.cuda.HalfStorage'>, '94', 'cuda:0', 6, ('95', 2, 4))"),
              legacy.count == 6, case .tuple(let view) = legacy[5] else { Issue.record("legacy view not parsed"); return }
        #expect(view.count == 3 && view[1].intValue == 2)
        #expect(parse("('storage', <class 'os.system'>, '0', 'cpu', 1)") == nil)  // names still go through the allowlist
        #expect(parse("('storage', <class 'torch.FloatStorage'>, '0', 'cpu', 1) junk") == nil)
        #expect(parse("__import__('os').system('x')") == nil)
        #expect(parse("((((((('a',),),),),),),)") == nil)  // deeper than any id
        // Through the reader's storage resolution: the same StorageRef as the binary form.
        let ref = try TorchReader.storageRef(.string("('storage', <class 'torch.FloatStorage'>, '7', 'cuda:0', 12, None)"), legacy: true, file: "f", at: 0)
        guard case .storage(let s) = ref else { Issue.record("not a storage"); return }
        #expect(s == StorageRef(key: "7", dtype: .f32, numel: 12, rootNumel: 12))
    }

    @Test func python2Reductions() throws {
        // OrderedDict([['a', 1], ('b', 2)]) with __builtin__.set, as Python 2 pickled them.
        let p: [UInt8] = [0x80, 0x02] + Self.g("collections\nOrderedDict\n") + [0x5D, 0x28, 0x5D, 0x28, 0x55, 0x01, 0x61, 0x4B, 0x01, 0x65,
            0x55, 0x01, 0x62, 0x4B, 0x02, 0x86, 0x65, 0x85, 0x52] + Self.g("__builtin__\nset\n") + [0x5D, 0x85, 0x52, 0x86, 0x2E]
        guard case .tuple(let t) = try load(p), case .dict(let d) = t[0] else { Issue.record("not (dict, set)"); return }
        #expect(d.entries.count == 2)
        #expect(TorchReader.key(d.entries[0].key) == "a" && d.entries[0].value.intValue == 1)
        #expect(TorchReader.key(d.entries[1].key) == "b" && d.entries[1].value.intValue == 2)
        #expect(reason([0x80, 0x02] + Self.g("__builtin__\neval\n") + [0x2E]) == .forbiddenGlobal("builtins.eval"))
    }

    // MARK: hostile nesting

    @Test func deepNestingIsRefusedNotACrash() {
        let n = 50_000
        // EMPTY_LIST pushed n times, then APPEND n-1 times: a list nested n deep without MARK.
        #expect(reason([0x80, 0x02] + [UInt8](repeating: 0x5D, count: n) + [UInt8](repeating: 0x61, count: n - 1) + [0x2E])
                == .tooDeep(limit: Unpickler.maxDepth))
        // TUPLE1 applied n times: one byte per level.
        #expect(reason([0x80, 0x02, 0x4E] + [UInt8](repeating: 0x85, count: n) + [0x2E]) == .tooDeep(limit: Unpickler.maxDepth))
        // MARK ... LIST n deep.
        #expect(reason([UInt8](repeating: 0x28, count: n) + [UInt8](repeating: 0x6C, count: n) + [0x2E]) == .tooDeep(limit: Unpickler.maxDepth))
        // Dicts: EMPTY_DICT, key, EMPTY_DICT, key, ... then SETITEM all the way up.
        var dicts: [UInt8] = [0x80, 0x02]
        for _ in 0..<n { dicts += [0x7D, 0x4B, 0x00] }
        dicts += [0x7D] + [UInt8](repeating: 0x73, count: n) + [0x2E]
        #expect(reason(dicts) == .tooDeep(limit: Unpickler.maxDepth))
        // Just under the limit is fine.
        let ok = [0x80, 0x02, 0x4E] + [UInt8](repeating: 0x85, count: Unpickler.maxDepth) + [0x2E]
        #expect(reason(ok) == nil)
    }

    @Test func staleDepthsAndSelfReferenceAreCaughtAtTheEnd() {
        // Lists L0..Ln memoized, then each appended into the one before *after* that one was
        // itself nested: every recorded depth stays 2, the real depth is n.
        let n = 1_000
        var p: [UInt8] = [0x80, 0x02]
        for i in 0..<n { p += [0x5D, 0x72] + withUnsafeBytes(of: UInt32(i).littleEndian, Array.init) + [0x30] }  // EMPTY_LIST LONG_BINPUT i POP
        for i in 0..<(n - 1) {
            p += [0x6A] + withUnsafeBytes(of: UInt32(i).littleEndian, Array.init)       // LONG_BINGET i
            p += [0x6A] + withUnsafeBytes(of: UInt32(i + 1).littleEndian, Array.init)   // LONG_BINGET i+1
            p += [0x61, 0x30]                                                           // APPEND POP
        }
        p += [0x6A, 0, 0, 0, 0, 0x2E]
        #expect(reason(p) == .tooDeep(limit: Unpickler.maxDepth))
        // A list that contains itself: ] q0 h0 a .
        #expect(reason([0x80, 0x02, 0x5D, 0x71, 0x00, 0x68, 0x00, 0x61, 0x2E]) == .tooDeep(limit: Unpickler.maxDepth))
    }

    @Test func sharedReferencesCannotExpandWithoutBound() {
        // L_i = [L_{i-1}, L_{i-1}] for 60 levels: 2**59 paths from a few hundred bytes.
        var p: [UInt8] = [0x80, 0x02, 0x5D, 0x71, 0x00]  // EMPTY_LIST BINPUT 0
        for i in 1..<60 {
            // EMPTY_LIST BINPUT i MARK BINGET i-1 BINGET i-1 APPENDS
            p += [0x5D, 0x71, UInt8(i), 0x28, 0x68, UInt8(i - 1), 0x68, UInt8(i - 1), 0x65]
        }
        p += [0x2E]
        guard case .tooLarge(let m)? = reason(p) else { Issue.record("a 2**59-path object was accepted"); return }
        #expect(m.contains("shared references"))
    }
}

extension PickleValue {
    var floatValue: Double? { if case .float(let f) = self { return f } else { return nil } }
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
