import Testing
@testable import Shared

/// One broken .npy/.npz rule per input: the reader must refuse it with that rule's reason.
@Suite struct NumPyBadInputTests {
    /// A .npy file: magic, version, little-endian header length, header text, data.
    func npy(_ header: String, major: UInt8 = 1, data: [UInt8] = []) -> [UInt8] {
        let h = Array(header.utf8)
        var w = ByteWriter()
        w.raw(NpyHeader.magic); w.u8(major); w.u8(0)
        if major == 1 { w.u16(UInt16(h.count)) } else { w.u32(UInt32(h.count)) }
        w.raw(h); w.raw(data)
        return w.bytes
    }

    func headerFailure(_ bytes: [UInt8], hints: DTypeHints = DTypeHints()) -> NumPyError.Reason? {
        do { _ = try bytes.withUnsafeBytes { try NpyHeader.parse($0, name: "a", hints: hints, file: "a.npy") }; return nil } catch let e as NumPyError {
            #expect(e.tensor == "a" && e.file == "a.npy")
            return e.reason
        } catch {
            Issue.record("not a NumPyError: \(error)")
            return nil
        }
    }

    func headerFailure(_ header: String, hints: DTypeHints = DTypeHints()) -> NumPyError.Reason? { headerFailure(npy(header), hints: hints) }

    func openFailure(_ bytes: [UInt8], name: String = "a.npy") -> NumPyError? {
        let path = temporaryDirectory() + "/" + name
        writeFile(path, bytes)
        do { _ = try NumPyReader.open(path: path, producer: "t"); return nil } catch let e as NumPyError { return e } catch {
            Issue.record("not a NumPyError: \(error)")
            return nil
        }
    }

    func npz(_ members: [(String, [UInt8])]) throws -> [UInt8] {
        let path = temporaryDirectory() + "/a.npz"
        let out = try AtomicOutput(path: path, overwrite: false)
        let z = ZipWriter(out.descriptor)
        for (name, bytes) in members { try z.add(name, bytes) }
        try z.finish()
        try out.commit()
        return readFile(path)
    }

    let good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"

    @Test func framing() {
        #expect(headerFailure(npy(good)) == nil)
        #expect(headerFailure(npy(good, major: 2)) == nil)
        #expect(headerFailure([0x93, 0x4E, 0x55]) == .badMagic)
        #expect(headerFailure(Array("NUMPY_____".utf8)) == .badMagic)
        #expect(headerFailure(npy(good, major: 4)) == .unsupportedVersion(major: 4, minor: 0))
        #expect(headerFailure(Array(npy(good).prefix(9))) == .headerTruncated)
        #expect(headerFailure(Array(npy(good, major: 2).prefix(11))) == .headerTruncated)
        #expect(headerFailure(Array(npy(good).dropLast())) == .headerLengthPastData(length: good.utf8.count))
    }

    @Test func headerDict() {
        #expect(headerFailure("__import__('os')") == .headerNotLiteral(text: "__import__('os')"))
        #expect(headerFailure("('descr', 1)") == .headerNotDict)
        #expect(headerFailure("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}")
            == .wrongHeaderKeys(keys: ["descr", "fortran_order", "shape", "x"]))
        #expect(headerFailure("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}") == .fortranOrderNotBool)
        #expect(headerFailure("{'descr': '<f4', 'fortran_order': False, 'shape': [2]}") == .shapeNotTuple)
        #expect(headerFailure("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}") == .shapeNotNonNegativeInts)
    }

    @Test func dtypes() {
        #expect(headerFailure("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}") == .structuredDType)
        #expect(headerFailure("{'descr': 'f4', 'fortran_order': False, 'shape': (2,)}") == .noByteOrder(descr: "f4"))
        #expect(headerFailure("{'descr': '<V2', 'fortran_order': False, 'shape': (2,)}") == .opaqueVoidNeedsHint(descr: "<V2"))
        var hints = DTypeHints()
        hints.rules = [("a", .f32)]
        #expect(headerFailure("{'descr': '<V2', 'fortran_order': False, 'shape': (2,)}", hints: hints) == .hintDoesNotFit(hint: "F32", descr: "<V2"))
        #expect(headerFailure("{'descr': '|O', 'fortran_order': False, 'shape': (2,)}") == .objectArray)
        #expect(headerFailure("{'descr': '<c16', 'fortran_order': False, 'shape': (2,)}") == .unsupportedDType(descr: "<c16"))
        #expect(NumPyError(.opaqueVoidNeedsHint(descr: "<V2"), file: "f", tensor: "w").description
            == "f: array w: stores opaque <V2 (how numpy saves ml_dtypes bfloat16/float8): say what it holds with --dtype-hint 'w=BF16'")
    }

    @Test func data() throws {
        #expect(openFailure(npy(good, data: [UInt8](repeating: 0, count: 8))) == nil)
        let short = openFailure(npy(good, data: [UInt8](repeating: 0, count: 7)))
        #expect(short?.reason == .dataTooShort(available: 7, dtype: "F32", shape: [2], needed: 8) && short?.tensor == "a")
        #expect(openFailure(npy(good, data: [UInt8](repeating: 0, count: 9)))?.reason == .trailingBytes(count: 1))
        let dir = temporaryDirectory()
        #expect { _ = try NumPyReader.open(path: dir, producer: "t") } throws: { ($0 as? NumPyError)?.reason == .notARegularFile }
    }

    @Test func archives() throws {
        let a = npy(good, data: [UInt8](repeating: 0, count: 8))
        #expect(openFailure(try npz([("a.npy", a), ("b.npy", a)]), name: "x.npz") == nil)
        #expect(openFailure(try npz([("a.npy", a), ("b.txt", a)]), name: "x.npz")?.reason == .memberNotNpy(member: "b.txt"))
        let twice = openFailure(try npz([("a.npy", a), ("a.npy", a)]), name: "x.npz")
        #expect(twice?.reason == .duplicateArray && twice?.tensor == "a")
        #expect(openFailure(try npz([("a.npy", Array(a.dropLast()))]), name: "x.npz")?.reason
            == .dataTooShort(available: 7, dtype: "F32", shape: [2], needed: 8))
    }
}
