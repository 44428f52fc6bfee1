// ZIP writing (PKWARE APPNOTE.TXT 6.3), as torch.save's miniz writer lays it out
// (caffe2/serialize/inline_container.cc): every member STORED, its data aligned to 64 bytes by an
// extra field 'FB' of padding, zip64 records whenever a size or offset needs them, and the
// zip64 end records always present. Times and dates are zero so output is deterministic.

/// Writes a zip archive member by member into a regular file. Each member's size is known
/// when it starts; its CRC is patched into the local header once the data is written.
public final class ZipWriter {
    public let descriptor: FileDescriptor
    private(set) var position = 0
    private struct Central {
        var name: [UInt8]
        var crc: UInt32
        var size: Int
        var headerOffset: Int
    }
    private var central: [Central] = []
    private var current: (name: [UInt8], size: Int, headerOffset: Int, written: Int, crc: UInt32)?

    public init(_ descriptor: FileDescriptor) { self.descriptor = descriptor }

    private static let max32 = 0xFFFF_FFFF

    /// Starts a STORED member of `size` bytes whose data will start on a 64-byte boundary.
    public func begin(_ name: String, size: Int) throws {
        precondition(current == nil)
        let n = Array(name.utf8)
        let offset = position
        var zip64: [UInt8] = []
        if size >= ZipWriter.max32 || offset >= ZipWriter.max32 {
            var z = ByteWriter()
            z.u16(1)
            let large = size >= ZipWriter.max32
            z.u16(UInt16((large ? 16 : 0) + (offset >= ZipWriter.max32 ? 8 : 0)))
            if large { z.u64(UInt64(size)); z.u64(UInt64(size)) }
            if offset >= ZipWriter.max32 { z.u64(UInt64(offset)) }
            zip64 = z.bytes
        }
        let start = offset + 30 + n.count + zip64.count + 4
        let pad = (64 - start % 64) % 64
        var w = ByteWriter(capacity: 30 + n.count + zip64.count + 4 + pad)
        w.u32(0x0403_4B50)
        w.u16(zip64.isEmpty ? 20 : 45)  // version needed
        w.u16(0x0800)  // UTF-8 names
        w.u16(0)  // STORED
        w.u16(0); w.u16(0)  // time, date
        w.u32(0)  // CRC, patched by end()
        w.u32(UInt32(min(size, ZipWriter.max32)))
        w.u32(UInt32(min(size, ZipWriter.max32)))
        w.u16(UInt16(n.count))
        w.u16(UInt16(zip64.count + 4 + pad))
        w.raw(n)
        w.raw(zip64)
        w.u16(0x4246)  // 'FB': padding so the data is aligned
        w.u16(UInt16(pad))
        w.raw([UInt8](repeating: 0x5A, count: pad))
        try put(w.bytes)
        current = (n, size, offset, 0, 0)
    }

    /// Appends data to the current member.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard var c = current, c.written + bytes.count <= c.size else {
            throw IOError(.write, path: descriptor.path, errno: 22, detail: "zip member written past its declared size")
        }
        try descriptor.pwriteAll(bytes, at: position)
        position += bytes.count
        c.written += bytes.count
        c.crc = CRC32.update(c.crc, bytes)
        current = c
    }

    public func end() throws {
        guard let c = current, c.written == c.size else {
            throw IOError(.write, path: descriptor.path, errno: 22, detail: "zip member shorter than its declared size")
        }
        try withUnsafeBytes(of: c.crc.littleEndian) { try descriptor.pwriteAll($0, at: c.headerOffset + 14) }
        central.append(Central(name: c.name, crc: c.crc, size: c.size, headerOffset: c.headerOffset))
        current = nil
    }

    /// A whole small member at once.
    public func add(_ name: String, _ bytes: [UInt8]) throws {
        try begin(name, size: bytes.count)
        try bytes.withUnsafeBytes { try write($0) }
        try end()
    }

    /// Tests only: counts `count` bytes of the current member as written without writing them
    /// (a sparse file), so the zip64 paths can be checked without 4 GiB of I/O. The member's
    /// CRC is then wrong.
    func skipForTesting(_ count: Int) {
        guard var c = current else { return }
        c.written += count
        position += count
        current = c
    }

    /// Writes the central directory and the end records.
    public func finish() throws {
        precondition(current == nil)
        let cdOffset = position
        var w = ByteWriter(capacity: central.count * 80 + 120)
        for e in central {
            var extra = ByteWriter()
            let large = e.size >= ZipWriter.max32, far = e.headerOffset >= ZipWriter.max32
            if large || far {
                extra.u16(1)
                extra.u16(UInt16((large ? 16 : 0) + (far ? 8 : 0)))
                if large { extra.u64(UInt64(e.size)); extra.u64(UInt64(e.size)) }
                if far { extra.u64(UInt64(e.headerOffset)) }
            }
            w.u32(0x0201_4B50)
            w.u16(extra.bytes.isEmpty ? 20 : 45); w.u16(extra.bytes.isEmpty ? 20 : 45)
            w.u16(0x0800); w.u16(0); w.u16(0); w.u16(0)
            w.u32(e.crc)
            w.u32(UInt32(min(e.size, ZipWriter.max32))); w.u32(UInt32(min(e.size, ZipWriter.max32)))
            w.u16(UInt16(e.name.count)); w.u16(UInt16(extra.bytes.count)); w.u16(0)
            w.u16(0); w.u16(0); w.u32(0)
            w.u32(UInt32(min(e.headerOffset, ZipWriter.max32)))
            w.raw(e.name)
            w.raw(extra.bytes)
        }
        let cdSize = w.bytes.count
        let zip64End = cdOffset + cdSize
        // zip64 end record and locator, always (as miniz writes them), then the classic end record.
        w.u32(0x0606_4B50); w.u64(44); w.u16(0x031E); w.u16(45); w.u32(0); w.u32(0)
        w.u64(UInt64(central.count)); w.u64(UInt64(central.count)); w.u64(UInt64(cdSize)); w.u64(UInt64(cdOffset))
        w.u32(0x0706_4B50); w.u32(0); w.u64(UInt64(zip64End)); w.u32(1)
        w.u32(0x0605_4B50); w.u16(0); w.u16(0)
        w.u16(UInt16(min(central.count, 0xFFFF))); w.u16(UInt16(min(central.count, 0xFFFF)))
        w.u32(UInt32(min(cdSize, ZipWriter.max32))); w.u32(UInt32(min(cdOffset, ZipWriter.max32))); w.u16(0)
        try put(w.bytes)
    }

    private func put(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try descriptor.pwriteAll($0, at: position) }
        position += bytes.count
    }
}
