/// Byte order of a multi-byte integer in the input.
public enum Endianness: Sendable {
    case little
    case big
}

/// What a short or malformed read ran into: where (the offset of the read's first byte) and
/// what was being read, so the parser above can turn it into its own error.
public struct ByteCursorError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        /// The read needed `needed` bytes; only `available` were left.
        case truncated(needed: Int, available: Int)
        /// A LEB128 varint kept its continuation bit set past `maxBytes` bytes.
        case varintTooLong(maxBytes: Int)
        /// A LEB128 varint's value does not fit in `bitWidth` bits.
        case varintOverflow(bitWidth: Int)
        /// An absolute index outside the cursor's bytes.
        case indexOutOfRange(index: Int, startIndex: Int, endIndex: Int)
    }

    public var reason: Reason
    /// Where the failed read started (in the coordinates of the cursor's bytes).
    public var offset: Int
    /// What was being read: `UInt32`, `12 bytes`, `varint`.
    public var reading: String

    public init(_ reason: Reason, offset: Int, reading: String) {
        self.reason = reason
        self.offset = offset
        self.reading = reading
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        switch reason {
        case .truncated(let needed, let available):
            return "byte \(offset): truncated: \(reading) needs \(needed) bytes, \(available) left"
        case .varintTooLong(let maxBytes): return "byte \(offset): \(reading) is longer than \(maxBytes) bytes"
        case .varintOverflow(let bitWidth): return "byte \(offset): \(reading) does not fit in \(bitWidth) bits"
        case .indexOutOfRange(let index, let start, let end): return "byte \(index) is outside [\(start), \(end)) (\(reading))"
        }
    }
}

/// A reader index over bytes that come from untrusted input, modelled on swift-nio's
/// `ByteBuffer`: every read checks the bytes it needs against what is left and throws a
/// `ByteCursorError` (offset, what was being read) instead of trapping or reading past the
/// end. A failed read leaves the reader index where it was.
///
///     +------------------+-------------------+
///     |   already read   |  readable bytes   |
///     +------------------+-------------------+
///     |                  |                   |
///  startIndex   <=   readerIndex   <=     endIndex
///
/// Indices are those of the underlying bytes: a slice (`readSlice`) keeps its parent's
/// coordinates, so offsets in errors and positions handed out (`readerIndex`) stay offsets
/// into the original file or array.
///
/// The bytes are an owned `[UInt8]`, a mapped file (kept alive by the cursor), or a raw
/// buffer the caller keeps alive for as long as the cursor is used (`init(unsafeBytes:)`).
public struct ByteCursor {
    private enum Storage {
        case array([UInt8])
        case memory(UnsafeRawBufferPointer, owner: AnyObject?)
    }

    private let storage: Storage
    public let startIndex: Int
    public let endIndex: Int
    public private(set) var readerIndex: Int

    private init(storage: Storage, startIndex: Int, endIndex: Int) {
        self.storage = storage
        self.startIndex = startIndex
        self.endIndex = endIndex
        readerIndex = startIndex
    }

    /// Reads `bytes` (owned: the cursor keeps the array).
    public init(_ bytes: [UInt8]) {
        self.init(storage: .array(bytes), startIndex: 0, endIndex: bytes.count)
    }

    /// Reads bytes `[offset, offset + count)` of a mapped file, in place; the cursor keeps
    /// the mapping alive. Indices are file offsets.
    public init(_ file: MappedFile, offset: Int = 0, count: Int? = nil) throws(RemoteError) {
        let count = count ?? file.size - offset
        // The caller's range, not input: every later check trusts these bounds.
        precondition(offset >= 0 && count >= 0 && count <= file.size - offset, "cursor range outside the mapped file")
        _ = try file.bytes(at: offset, count: count)  // a remote file fetches the range
        self.init(storage: .memory(file.unfetchedBytes, owner: file), startIndex: offset, endIndex: offset + count)
    }

    /// Reads memory the caller keeps valid for as long as the cursor (or a copy) is used,
    /// such as inside `withUnsafeBytes`.
    public init(unsafeBytes bytes: UnsafeRawBufferPointer) {
        self.init(storage: .memory(bytes, owner: nil), startIndex: 0, endIndex: bytes.count)
    }

    /// Bytes left to read.
    public var remaining: Int { endIndex - readerIndex }
    /// Bytes read so far, from `startIndex`.
    public var offset: Int { readerIndex - startIndex }
    public var isAtEnd: Bool { readerIndex == endIndex }

    // MARK: - Checked access to the storage

    private func check(_ index: Int, _ count: Int, reading: @autoclosure () -> String) throws(ByteCursorError) {
        guard index >= startIndex, index <= endIndex else {
            throw ByteCursorError(.indexOutOfRange(index: index, startIndex: startIndex, endIndex: endIndex), offset: index, reading: reading())
        }
        guard count >= 0, count <= endIndex - index else {
            throw ByteCursorError(.truncated(needed: count, available: endIndex - index), offset: index, reading: reading())
        }
    }

    /// Calls `body` with the checked range `[index, index + count)`.
    private func withRange<R>(_ index: Int, _ count: Int, reading: @autoclosure () -> String,
                              _ body: (UnsafeRawBufferPointer) -> R) throws(ByteCursorError) -> R {
        try check(index, count, reading: reading())
        switch storage {
        case .array(let a): return a.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[index..<(index + count)])) }
        case .memory(let b, let owner): return withExtendedLifetime(owner) { body(UnsafeRawBufferPointer(rebasing: b[index..<(index + count)])) }
        }
    }

    // MARK: - Absolute reads (the reader index does not move)

    /// The integer of type `T` at `index`, in byte order `endianness`.
    public func getInteger<T: FixedWidthInteger>(at index: Int, endianness: Endianness, as: T.Type = T.self) throws(ByteCursorError) -> T {
        try withRange(index, MemoryLayout<T>.size, reading: "\(T.self)") { b in
            let raw = b.loadUnaligned(as: T.self)
            return endianness == .little ? T(littleEndian: raw) : T(bigEndian: raw)
        }
    }

    /// A copy of bytes `[index, index + count)`.
    public func getBytes(at index: Int, count: Int) throws(ByteCursorError) -> [UInt8] {
        try withRange(index, count, reading: "\(count) bytes") { [UInt8]($0) }
    }

    /// Calls `body` with bytes `[index, index + count)`, valid only inside `body`.
    public func withUnsafeBytes<R>(at index: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try check(index, count, reading: "\(count) bytes")
        switch storage {
        case .array(let a): return try a.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[index..<(index + count)])) }
        case .memory(let b, let owner): return try withExtendedLifetime(owner) { try body(UnsafeRawBufferPointer(rebasing: b[index..<(index + count)])) }
        }
    }

    /// A cursor over `[index, index + count)` only, in the same coordinates.
    public func getSlice(at index: Int, count: Int) throws(ByteCursorError) -> ByteCursor {
        try check(index, count, reading: "\(count) bytes")
        return ByteCursor(storage: storage, startIndex: index, endIndex: index + count)
    }

    // MARK: - Reads that advance the reader index

    public mutating func readInteger<T: FixedWidthInteger>(endianness: Endianness, as: T.Type = T.self) throws(ByteCursorError) -> T {
        let v = try getInteger(at: readerIndex, endianness: endianness, as: T.self)
        readerIndex += MemoryLayout<T>.size
        return v
    }

    public mutating func readByte() throws(ByteCursorError) -> UInt8 {
        try readInteger(endianness: .little, as: UInt8.self)
    }

    public mutating func readBytes(_ count: Int) throws(ByteCursorError) -> [UInt8] {
        let v = try getBytes(at: readerIndex, count: count)
        readerIndex += count
        return v
    }

    /// The next `count` bytes as a cursor of their own (sharing the bytes, not copying them).
    public mutating func readSlice(_ count: Int) throws(ByteCursorError) -> ByteCursor {
        let s = try getSlice(at: readerIndex, count: count)
        readerIndex += count
        return s
    }

    /// The next `count` bytes as UTF-8 text, or nil (reader index unmoved) if they are not UTF-8.
    public mutating func readUTF8(_ count: Int) throws(ByteCursorError) -> String? {
        let s = try withRange(readerIndex, count, reading: "\(count)-byte string") { String(validating: $0, as: UTF8.self) }
        if s != nil { readerIndex += count }
        return s
    }

    public mutating func skip(_ count: Int) throws(ByteCursorError) {
        try check(readerIndex, count, reading: "\(count) bytes to skip")
        readerIndex += count
    }

    /// Moves the reader index to `index`, anywhere in `startIndex...endIndex`.
    public mutating func moveReaderIndex(to index: Int) throws(ByteCursorError) {
        try check(index, 0, reading: "reader index")
        readerIndex = index
    }

    /// An unsigned LEB128 varint (7 bits a byte, least significant first, high bit = more).
    /// Refuses more bytes than `T` can need (`varintTooLong`) and values with bits beyond
    /// `T.bitWidth` (`varintOverflow`); non-minimal encodings within that length are accepted,
    /// as protobuf and riegeli readers do.
    public mutating func readULEB128<T: FixedWidthInteger & UnsignedInteger>(as: T.Type = UInt64.self) throws(ByteCursorError) -> T {
        let start = readerIndex
        let maxBytes = (T.bitWidth + 6) / 7
        var value: T = 0
        var shift = 0
        for i in 0..<maxBytes {
            guard start + i < endIndex else {
                throw ByteCursorError(.truncated(needed: i + 1, available: i), offset: start, reading: "varint")
            }
            let byte = try getInteger(at: start + i, endianness: .little, as: UInt8.self)
            let payload = T(byte & 0x7F)
            let room = T.bitWidth - shift
            if room < 7 && payload >> room != 0 {
                throw ByteCursorError(.varintOverflow(bitWidth: T.bitWidth), offset: start, reading: "varint")
            }
            value |= payload << shift
            if byte & 0x80 == 0 {
                readerIndex = start + i + 1
                return value
            }
            shift += 7
        }
        throw ByteCursorError(.varintTooLong(maxBytes: maxBytes), offset: start, reading: "varint")
    }
}
