import Testing
@testable import Shared

/// Every truncation and many single-byte corruptions of small valid inputs: each parser must
/// either read the input or refuse it with its own error, never trap, and never let a bare
/// `ByteCursorError` (an unmapped short read) escape.
@Suite struct HostileBytesTests {
    /// `input` cut at every length, and with each byte replaced by a few values.
    static func variants(_ input: [UInt8]) -> [[UInt8]] {
        var out = (0..<input.count).map { Array(input[0..<$0]) }
        for i in input.indices {
            for v: UInt8 in [0x00, 0xFF, input[i] ^ 0x01, input[i] ^ 0x80] where v != input[i] {
                var b = input
                b[i] = v
                out.append(b)
            }
        }
        return out
    }

    /// Runs `body` on every variant; each must succeed or throw an error `allowed` accepts.
    func survive(_ input: [UInt8], _ allowed: (any Error) -> Bool, _ body: ([UInt8]) throws -> Void) {
        #expect(throws: Never.self, "the unchanged input reads") { try body(input) }
        for (n, v) in Self.variants(input).enumerated() {
            do { try body(v) } catch {
                #expect(allowed(error), "variant \(n): \(type(of: error)): \(error)")
            }
        }
    }

    @Test func zipCentralDirectory() {
        let dir = temporaryDirectory()
        survive(ZipBadInputTests.Archive().bytes, { $0 is ZipError }) { bytes in
            writeFile(dir + "/a.zip", bytes)
            _ = try ZipArchive(try MappedFile(try FileDescriptor.openForReading(dir + "/a.zip"), size: bytes.count))
        }
    }

    @Test func npyHeader() {
        let header = Array("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".utf8)
        var w = ByteWriter()
        w.raw(NpyHeader.magic); w.u8(1); w.u8(0); w.u16(UInt16(header.count)); w.raw(header)
        survive(w.bytes, { $0 is NumPyError }) { bytes in
            _ = try bytes.withUnsafeBytes { try NpyHeader.parse($0, name: "a", hints: DTypeHints(), file: "a.npy") }
        }
    }

    @Test func flaxMsgpack() {
        let t = FlaxMsgpackBadInputTests()
        let shape = [0x81] + t.string("0") + [0x03]
        let chunks = [0x81] + t.string("0") + t.array([3], "int8", [1, 2, 3])
        // {"a": float32[2], "b": a chunked int8[3]}
        let chunkedMap = Array(t.chunked(shape: shape, chunks: chunks).dropFirst(1 + t.string("w").count))
        let input = [0x82] + t.string("a") + t.array([2], "float32", [UInt8](repeating: 0, count: 8)) + t.string("b") + chunkedMap
        let dir = temporaryDirectory()
        survive(input, { $0 is MsgpackError }) { bytes in
            writeFile(dir + "/a.msgpack", bytes)
            _ = try FlaxMsgpackReader.open(path: dir + "/a.msgpack", producer: "t")
        }
    }

    @Test func ocdbtManifestAndNode() {
        let t = OCDBTBadInputTests()
        let node = t.node(table: t.table([]), keys: ["a", "b"], rest: t.inline([[1], [2, 3]]))
        // Corrupt the bodies before the envelope's crc is computed, so the parser sees them.
        survive(node, { $0 is OrbaxError }) { body in
            _ = try OCDBTStore(directory: t.store(root: body))
        }
        let n = OCDBTBadInputTests.envelope(OCDBTStore.btreeNodeMagic, node)
        let manifest = t.manifest(table: t.table(["d"]), length: UInt64(n.count))
        survive(manifest, { $0 is OrbaxError || $0 is IOError }) { body in
            _ = try OCDBTStore(directory: t.store(body, data: n))
        }
    }

    @Test func streamFrames() throws {
        let stream = try streamBytes(MemorySource([tensor("w", .f32, [2], [UInt8](repeating: 0, count: 8))]))
        survive(stream, { $0 is StreamError }) { bytes in _ = try readStream(bytes) }
    }
}
