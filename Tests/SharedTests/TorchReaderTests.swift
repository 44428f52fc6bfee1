import Testing
@testable import Shared

/// The legacy format's checks, each on a hand-made file that breaks one rule.
@Suite struct TorchLegacyTests {
    static let magic: [UInt8] = [0x80, 0x02, 0x8A, 0x0A] + TorchReader.legacyMagic + [0x2E]
    static func version(_ v: UInt16) -> [UInt8] { [0x80, 0x02, 0x4D, UInt8(v & 0xFF), UInt8(v >> 8), 0x2E] }
    static let sysInfo: [UInt8] = [0x80, 0x02, 0x7D, 0x2E]
    static func keys(_ k: String) -> [UInt8] { [0x80, 0x02, 0x5D] + UnpicklerTests.str(k) + [0x61, 0x2E] }
    static func storage(count: Int64, bytes: Int) -> [UInt8] {
        withUnsafeBytes(of: count.littleEndian, Array.init) + (0..<bytes).map { UInt8($0 % 251) }
    }

    /// magic, protocol version, sys_info, {"w": FloatStorage "0" of 6 as [2, 3]}, ["0"], storage.
    static func file(version v: UInt16 = 1001, key: String = "0", count: Int64 = 6, bytes: Int = 24, extra: [UInt8] = []) -> [UInt8] {
        magic + version(v) + sysInfo + UnpicklerTests.handMade + keys(key) + storage(count: count, bytes: bytes) + extra
    }

    func reason(_ bytes: [UInt8]) -> TorchError.Reason? {
        let path = temporaryDirectory() + "/legacy.pt"
        writeFile(path, bytes)
        do { _ = try TorchReader.open(path: path, producer: "t"); return nil } catch let e as TorchError { return e.reason } catch {
            Issue.record("not a TorchError: \(error)")
            return nil
        }
    }

    @Test func theHandMadeFileReads() throws {
        let path = temporaryDirectory() + "/legacy.pt"
        writeFile(path, Self.file())
        let source = try TorchReader.open(path: path, producer: "t")
        #expect(source.plan.map(\.0.descriptor.name) == ["w"])
        #expect(source.plan[0].0.descriptor.shape == [2, 3])
    }

    @Test func eachRuleHasItsReason() {
        #expect(reason(Self.file(version: 1002)) == .badLegacyProtocolVersion)
        #expect(reason(Self.file(count: 7, bytes: 28)) == .storageCountMismatch(key: "0", declared: 7, pickled: 6))
        #expect(reason(Self.file(extra: [0])) == .trailingBytes(count: 1))
        #expect(reason(Self.file(bytes: 20)) == .storagePastEnd(key: "0", elements: 6))
        #expect(reason(Self.file(key: "1")) == .unusedStorage(key: "1"))
        #expect(reason(Array(Self.file().prefix(Self.file().count - 30))) == .endsBeforeStorage(key: "0"))
        #expect(reason(Array("not a checkpoint at all".utf8)) == .notATorchFile)
    }
}
