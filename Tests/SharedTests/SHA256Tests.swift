import Testing
@testable import Shared

@Suite struct SHA256Tests {
    func hex(_ bytes: [UInt8], pieces: Int = 1) -> String {
        var s = SHA256()
        let step = max(1, bytes.count / pieces)
        var i = 0
        while i < bytes.count {
            s.update(Array(bytes[i..<min(bytes.count, i + step)]))
            i += step
        }
        return s.hexDigest()
    }

    /// FIPS 180-4 examples (and the empty string), whole and fed in uneven pieces.
    @Test func knownDigests() {
        #expect(hex([]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let two = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        #expect(hex(two) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(hex(two, pieces: 7) == hex(two))
        let million = [UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000)
        #expect(hex(million, pieces: 13) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }
}
