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
        case unsupportedMethod(method: UInt16)
        case encrypted
        case multiDisk
        case inflateFailed(detail: String)
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
        path = file.path
        entries = try ZipArchive.readCentralDirectory(file)
        var names: [String: Int] = [:]
        for (i, e) in entries.enumerated() where names[e.name] == nil { names[e.name] = i }
        byName = names
    }

    public func entry(_ name: String) -> Entry? { byName[name].map { entries[$0] } }

    /// A STORED member's bytes, in place (valid while the archive lives).
    public func storedBytes(_ e: Entry) throws(RemoteError) -> UnsafeRawBufferPointer {
        precondition(e.method == 0)
        return try file.bytes(at: e.dataOffset, count: e.size)
    }

    /// A member's whole content: copied if stored, inflated if deflated (sizes checked).
    public func read(_ e: Entry, limit: Int = Int.max) throws -> AlignedBuffer {
        guard e.size <= limit else { throw ZipError(.sizeMismatch(declared: e.size, actual: limit), file: path, member: e.name) }
        let out = try AlignedBuffer(capacity: max(e.size, 1))
        out.count = e.size
        switch e.method {
        case 0:
            if e.size > 0 { out.pointer.copyMemory(from: try storedBytes(e).baseAddress!, byteCount: e.size) }
        case 8:
            let input = try file.bytes(at: e.dataOffset, count: e.compressedSize)
            do {
                try ZlibCodec.inflateRaw(input, into: UnsafeMutableRawBufferPointer(start: out.pointer, count: e.size))
            } catch {
                throw ZipError(.inflateFailed(detail: error.description), file: path, member: e.name)
            }
        default:
            throw ZipError(.unsupportedMethod(method: e.method), file: path, member: e.name)
        }
        return out
    }

    public func readBytes(_ e: Entry, limit: Int) throws -> [UInt8] {
        try read(e, limit: limit).copyBytes()
    }

    // MARK: - Parsing

    /// Runs `body`; any short read in it becomes `reason` (for `member`). A remote file's
    /// failed fetch stays what it is.
    private static func reading<T>(_ path: String, _ reason: ZipError.Reason, member: String? = nil,
                                   _ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as ZipError { throw e } catch let e as RemoteError { throw e } catch {
            throw ZipError(reason, file: path, member: member)
        }
    }

    /// Throws `ZipError`, or `RemoteError` when a remote file's bytes cannot be fetched. Reads
    /// only the regions it parses (the end records, the central directory, each local header),
    /// so a remote archive is not fetched whole.
    static func readCentralDirectory(_ file: MappedFile) throws -> [Entry] {
        let path = file.path
        let size = file.size
        /// The bytes `[offset, offset + count)` clipped to the file, in file coordinates.
        func region(_ offset: Int, _ count: Int) throws -> ByteCursor {
            let start = min(max(offset, 0), size)
            return try ByteCursor(file, offset: start, count: min(max(count, 0), size - start))
        }
        func fail(_ r: ZipError.Reason, _ member: String? = nil) -> ZipError { ZipError(r, file: path, member: member) }
        func u16(_ c: inout ByteCursor) throws -> Int { Int(try c.readInteger(endianness: .little, as: UInt16.self)) }
        func u32(_ c: inout ByteCursor) throws -> Int { Int(try c.readInteger(endianness: .little, as: UInt32.self)) }
        func u64(_ c: inout ByteCursor) throws -> UInt64 { try c.readInteger(endianness: .little, as: UInt64.self) }

        // The end record is 22 bytes plus a comment of up to 65535 bytes, at the very end.
        guard size >= 22 else { throw fail(.noEndRecord) }
        let tailStart = max(0, size - 22 - 65535 - 20)  // the end record, its comment, a zip64 locator
        let bytes = try region(tailStart, size - tailStart)
        let eocd = try reading(path, .noEndRecord) { () throws -> Int in
            var at = size - 22
            while at >= max(0, size - 22 - 65535) {
                if try bytes.getInteger(at: at, endianness: .little, as: UInt32.self) == 0x0605_4B50,
                   at + 22 + Int(try bytes.getInteger(at: at + 20, endianness: .little, as: UInt16.self)) == size {
                    return at
                }
                at -= 1
            }
            throw fail(.noEndRecord)
        }
        var end = try reading(path, .noEndRecord) { try bytes.getSlice(at: eocd + 4, count: 18) }
        let (disk, cdDisk, count16, cdSize32, cdOffset32) = try reading(path, .noEndRecord) {
            let disk = try u16(&end), cdDisk = try u16(&end)
            try end.skip(2)  // entries on this disk
            return (disk, cdDisk, try u16(&end), try u32(&end), try u32(&end))
        }
        guard disk == 0, cdDisk == 0 else { throw fail(.multiDisk) }
        var count = count16, cdSize = cdSize32, cdOffset = cdOffset32

        // zip64: a locator right before the end record points at the zip64 end record.
        if eocd >= 20, try reading(path, .noEndRecord, { try bytes.getInteger(at: eocd - 20, endianness: .little, as: UInt32.self) }) == 0x0706_4B50 {
            let z64 = try reading(path, .badZip64EndRecord) { try bytes.getInteger(at: eocd - 12, endianness: .little, as: UInt64.self) }
            guard z64 <= UInt64(size) else { throw fail(.badZip64EndRecord) }
            (count, cdSize, cdOffset) = try reading(path, .badZip64EndRecord) { () throws -> (Int, Int, Int) in
                var r = try region(Int(z64), 56).getSlice(at: Int(z64), count: 56)
                guard try u32(&r) == 0x0606_4B50 else { throw fail(.badZip64EndRecord) }
                try r.skip(28)  // record size, versions, disk numbers, entries on this disk
                let c = try u64(&r), s = try u64(&r), o = try u64(&r)
                guard c <= UInt64(size), s <= UInt64(size), o <= UInt64(size) else { throw fail(.badZip64EndRecord) }
                return (Int(c), Int(s), Int(o))
            }
        }
        guard cdOffset + cdSize <= size, cdOffset >= 0 else { throw fail(.centralDirectoryOutOfBounds(offset: cdOffset, size: cdSize)) }
        // Each entry takes at least 46 bytes: refuse counts the directory cannot hold.
        guard count <= cdSize / 46 else { throw fail(.badCentralEntry(index: cdSize / 46)) }

        var cd = try reading(path, .centralDirectoryOutOfBounds(offset: cdOffset, size: cdSize)) { try region(cdOffset, cdSize).getSlice(at: cdOffset, count: cdSize) }
        var entries: [Entry] = []
        entries.reserveCapacity(count)
        for index in 0..<count {
            let bad = ZipError.Reason.badCentralEntry(index: index)
            // The fixed 46 bytes, then the name, extra field and comment they announce.
            var (flags, method, crc, csize, usize, localOffset) = (0, 0, 0, 0, 0, 0)
            var nameBytes: [UInt8] = []
            var extra = cd
            try reading(path, bad) {
                guard try u32(&cd) == 0x0201_4B50 else { throw fail(bad) }
                try cd.skip(4)  // versions made by and needed
                flags = try u16(&cd)
                method = try u16(&cd)
                try cd.skip(4)  // time, date
                crc = try u32(&cd)
                csize = try u32(&cd)
                usize = try u32(&cd)
                let nameLength = try u16(&cd), extraLength = try u16(&cd), commentLength = try u16(&cd)
                try cd.skip(8)  // disk, internal and external attributes
                localOffset = try u32(&cd)
                nameBytes = try cd.readBytes(nameLength)
                extra = try cd.readSlice(extraLength)
                try cd.skip(commentLength)
            }
            let name = String(decoding: nameBytes, as: UTF8.self)
            if flags & 1 != 0 { throw fail(.encrypted, name) }
            // zip64 extra: the 64-bit values appear only for fields set to 0xFFFFFFFF, in order.
            try reading(path, bad, member: name) {
                while extra.remaining >= 4 {
                    let id = try u16(&extra), length = try u16(&extra)
                    var field = try extra.readSlice(length)
                    guard id == 1 else { continue }
                    func next() throws -> Int {
                        let v = try u64(&field)
                        guard v <= UInt64(Int.max) else { throw fail(bad, name) }
                        return Int(v)
                    }
                    if usize == 0xFFFF_FFFF { usize = try next() }
                    if csize == 0xFFFF_FFFF { csize = try next() }
                    if localOffset == 0xFFFF_FFFF { localOffset = try next() }
                }
            }
            guard method == 0 || method == 8 else { throw fail(.unsupportedMethod(method: UInt16(method)), name) }
            if method == 0 && csize != usize { throw fail(.sizeMismatch(declared: usize, actual: csize), name) }
            // The data starts after the local header, whose name and extra lengths may differ
            // from the central directory's (torch pads there).
            var local = try reading(path, .memberOutOfBounds(offset: localOffset, size: 30), member: name) {
                try region(localOffset, 30).getSlice(at: localOffset, count: 30)
            }
            let (signature, localNameLength, localExtraLength) = try reading(path, .badLocalHeader, member: name) {
                let signature = try u32(&local)
                try local.skip(22)
                return (signature, try u16(&local), try u16(&local))
            }
            guard signature == 0x0403_4B50 else { throw fail(.badLocalHeader, name) }
            let dataOffset = localOffset + 30 + localNameLength + localExtraLength
            guard dataOffset <= size, csize <= size - dataOffset else {
                throw fail(.memberOutOfBounds(offset: dataOffset, size: csize), name)
            }
            entries.append(Entry(name: name, method: UInt16(method), crc32: UInt32(crc), compressedSize: csize, size: usize,
                                 localHeaderOffset: localOffset, dataOffset: dataOffset))
        }
        return entries
    }
}
