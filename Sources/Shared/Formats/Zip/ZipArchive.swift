// ZIP container reading, per PKWARE's APPNOTE.TXT 6.3 (sections 4.3.7 local file header,
// 4.3.12 central directory header, 4.3.14–4.3.16 zip64 end records, 4.5.3 zip64 extra
// field). Only what checkpoints use: STORED and DEFLATED members, zip64, no encryption,
// no multi-disk archives. torch.save and numpy.savez both write this.

/// Reading errors, one case per broken rule, with the archive's path and the member.
public struct ZipError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case noEndRecord
        case badZip64EndRecord
        case centralDirectoryOutOfBounds(offset: Int, size: Int)
        case badCentralEntry(index: Int)
        case badLocalHeader
        case memberOutOfBounds(offset: Int, size: Int)
        case unsupportedMethod(UInt16)
        case encrypted
        case multiDisk
        case inflateFailed(String)
        case sizeMismatch(declared: Int, actual: Int)
        case missingMember
    }
    public var reason: Reason
    public var file: String
    public var member: String?

    public init(_ reason: Reason, file: String, member: String? = nil) {
        self.reason = reason
        self.file = file
        self.member = member
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        let prefix = member.map { "\(file): zip member \($0)" } ?? file
        switch reason {
        case .noEndRecord: return "\(prefix): not a zip archive, or truncated (no end-of-central-directory record)"
        case .badZip64EndRecord: return "\(prefix): zip64 end-of-central-directory record is missing or malformed"
        case .centralDirectoryOutOfBounds(let o, let s): return "\(prefix): central directory [\(o), +\(s)) lies outside the file (truncated?)"
        case .badCentralEntry(let i): return "\(prefix): central directory entry \(i) is malformed"
        case .badLocalHeader: return "\(prefix): local file header is missing or malformed"
        case .memberOutOfBounds(let o, let s): return "\(prefix): data [\(o), +\(s)) lies outside the file (truncated?)"
        case .unsupportedMethod(let m): return "\(prefix): compression method \(m) is not supported (only stored and deflated)"
        case .encrypted: return "\(prefix): encrypted members are not supported"
        case .multiDisk: return "\(prefix): multi-disk archives are not supported"
        case .inflateFailed(let m): return "\(prefix): deflated data is corrupt: \(m)"
        case .sizeMismatch(let d, let a): return "\(prefix): declared \(d) bytes, inflates to \(a)"
        case .missingMember: return "\(prefix): not found in the archive"
        }
    }
}

/// A zip archive opened over a mapped file: the central directory is parsed and checked
/// up front; members are read in place (stored) or inflated (deflated).
public final class ZipArchive {
    public struct Entry: Equatable, Sendable {
        public var name: String
        public var method: UInt16
        public var crc32: UInt32
        public var compressedSize: Int
        public var size: Int
        public var localHeaderOffset: Int
        /// Offset of the member's data in the file (after the local header).
        public var dataOffset: Int
    }

    public let file: MappedFile
    public let path: String
    public let entries: [Entry]
    private let byName: [String: Int]

    public init(_ file: MappedFile) throws {
        self.file = file
        path = file.descriptor.path
        entries = try ZipArchive.readCentralDirectory(file)
        var names: [String: Int] = [:]
        for (i, e) in entries.enumerated() where names[e.name] == nil { names[e.name] = i }
        byName = names
    }

    public func entry(_ name: String) -> Entry? { byName[name].map { entries[$0] } }

    /// A STORED member's bytes, in place (valid while the archive lives).
    public func storedBytes(_ e: Entry) -> UnsafeRawBufferPointer {
        precondition(e.method == 0)
        return file.bytes(at: e.dataOffset, count: e.size)
    }

    /// A member's whole content: copied if stored, inflated if deflated (sizes checked).
    public func read(_ e: Entry, limit: Int = Int.max) throws -> AlignedBuffer {
        guard e.size <= limit else { throw ZipError(.sizeMismatch(declared: e.size, actual: limit), file: path, member: e.name) }
        let out = AlignedBuffer(capacity: max(e.size, 1))
        out.count = e.size
        switch e.method {
        case 0:
            if e.size > 0 { out.pointer.copyMemory(from: storedBytes(e).baseAddress!, byteCount: e.size) }
        case 8:
            let input = file.bytes(at: e.dataOffset, count: e.compressedSize)
            do {
                try ZlibCodec.inflateRaw(input, into: UnsafeMutableRawBufferPointer(start: out.pointer, count: e.size))
            } catch {
                throw ZipError(.inflateFailed(error.description), file: path, member: e.name)
            }
        default:
            throw ZipError(.unsupportedMethod(e.method), file: path, member: e.name)
        }
        return out
    }

    public func readBytes(_ e: Entry, limit: Int) throws -> [UInt8] {
        try read(e, limit: limit).copyBytes()
    }

    // MARK: - Parsing

    static func u16(_ p: UnsafeRawBufferPointer, _ o: Int) -> Int { Int(p[o]) | Int(p[o + 1]) << 8 }
    static func u32(_ p: UnsafeRawBufferPointer, _ o: Int) -> Int { u16(p, o) | u16(p, o + 2) << 16 }
    static func u64(_ p: UnsafeRawBufferPointer, _ o: Int) -> UInt64 { UInt64(u32(p, o)) | UInt64(u32(p, o + 4)) << 32 }

    static func readCentralDirectory(_ file: MappedFile) throws -> [Entry] {
        let path = file.descriptor.path
        let size = file.size
        func fail(_ r: ZipError.Reason, _ member: String? = nil) -> ZipError { ZipError(r, file: path, member: member) }
        // The end record is 22 bytes plus a comment of up to 65535 bytes, at the very end.
        guard size >= 22 else { throw fail(.noEndRecord) }
        let tailStart = max(0, size - 22 - 65535)
        let tail = file.bytes(at: tailStart, count: size - tailStart)
        var eocd = -1
        var i = tail.count - 22
        while i >= 0 {
            if tail[i] == 0x50 && tail[i + 1] == 0x4B && tail[i + 2] == 0x05 && tail[i + 3] == 0x06
                && i + 22 + u16(tail, i + 20) == tail.count {
                eocd = i
                break
            }
            i -= 1
        }
        guard eocd >= 0 else { throw fail(.noEndRecord) }
        guard u16(tail, eocd + 4) == 0, u16(tail, eocd + 6) == 0 else { throw fail(.multiDisk) }
        var count = u16(tail, eocd + 10)
        var cdSize = u32(tail, eocd + 12)
        var cdOffset = u32(tail, eocd + 16)
        let absoluteEOCD = tailStart + eocd

        // zip64: a locator right before the end record points at the zip64 end record.
        if absoluteEOCD >= 20 {
            let loc = file.bytes(at: absoluteEOCD - 20, count: 20)
            if u32(loc, 0) == 0x0706_4B50 {
                let z64 = u64(loc, 8)
                guard size >= 56, z64 <= UInt64(size - 56) else { throw fail(.badZip64EndRecord) }
                let r = file.bytes(at: Int(z64), count: 56)
                guard u32(r, 0) == 0x0606_4B50 else { throw fail(.badZip64EndRecord) }
                let c = u64(r, 32), s = u64(r, 40), o = u64(r, 48)
                guard c <= UInt64(size), s <= UInt64(size), o <= UInt64(size) else { throw fail(.badZip64EndRecord) }
                count = Int(c)
                cdSize = Int(s)
                cdOffset = Int(o)
            }
        }
        guard cdOffset + cdSize <= size, cdOffset >= 0 else { throw fail(.centralDirectoryOutOfBounds(offset: cdOffset, size: cdSize)) }
        // Each entry takes at least 46 bytes: refuse counts the directory cannot hold.
        guard count <= cdSize / 46 else { throw fail(.badCentralEntry(index: cdSize / 46)) }

        let cd = file.bytes(at: cdOffset, count: cdSize)
        var entries: [Entry] = []
        entries.reserveCapacity(count)
        var p = 0
        for index in 0..<count {
            guard p + 46 <= cd.count, u32(cd, p) == 0x0201_4B50 else { throw fail(.badCentralEntry(index: index)) }
            let flags = u16(cd, p + 8), method = u16(cd, p + 10)
            let crc = UInt32(u32(cd, p + 16))
            var csize = u32(cd, p + 20), usize = u32(cd, p + 24)
            let nameLen = u16(cd, p + 28), extraLen = u16(cd, p + 30), commentLen = u16(cd, p + 32)
            var localOffset = u32(cd, p + 42)
            guard p + 46 + nameLen + extraLen + commentLen <= cd.count else { throw fail(.badCentralEntry(index: index)) }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: cd[(p + 46)..<(p + 46 + nameLen)]), as: UTF8.self)
            if flags & 1 != 0 { throw fail(.encrypted, name) }
            // zip64 extra: the 64-bit values appear only for fields set to 0xFFFFFFFF, in order.
            var e = p + 46 + nameLen
            let extraEnd = e + extraLen
            while e + 4 <= extraEnd {
                let id = u16(cd, e), len = u16(cd, e + 2)
                guard e + 4 + len <= extraEnd else { throw fail(.badCentralEntry(index: index), name) }
                if id == 1 {
                    var q = e + 4
                    func next() throws -> Int {
                        guard q + 8 <= e + 4 + len else { throw fail(.badCentralEntry(index: index), name) }
                        let v = u64(cd, q)
                        q += 8
                        guard v <= UInt64(Int.max) else { throw fail(.badCentralEntry(index: index), name) }
                        return Int(v)
                    }
                    if usize == 0xFFFF_FFFF { usize = try next() }
                    if csize == 0xFFFF_FFFF { csize = try next() }
                    if localOffset == 0xFFFF_FFFF { localOffset = try next() }
                }
                e += 4 + len
            }
            guard method == 0 || method == 8 else { throw fail(.unsupportedMethod(UInt16(method)), name) }
            if method == 0 && csize != usize { throw fail(.sizeMismatch(declared: usize, actual: csize), name) }
            // The data starts after the local header, whose name and extra lengths may differ
            // from the central directory's (torch pads there).
            guard localOffset <= size - 30 else { throw fail(.memberOutOfBounds(offset: localOffset, size: 30), name) }
            let lh = file.bytes(at: localOffset, count: 30)
            guard u32(lh, 0) == 0x0403_4B50 else { throw fail(.badLocalHeader, name) }
            let dataOffset = localOffset + 30 + u16(lh, 26) + u16(lh, 28)
            guard dataOffset <= size, csize <= size - dataOffset else {
                throw fail(.memberOutOfBounds(offset: dataOffset, size: csize), name)
            }
            entries.append(Entry(name: name, method: UInt16(method), crc32: crc, compressedSize: csize, size: usize,
                                 localHeaderOffset: localOffset, dataOffset: dataOffset))
            p += 46 + nameLen + extraLen + commentLen
        }
        return entries
    }
}
