/// Builds the bytes of each frame kind. Stateless; `StreamWriter` decides the order.
///
/// A frame on the wire (offsets from the frame's start, which is 64-aligned):
///
///     0        4      5       6          8                16
///     +--------+------+-------+----------+----------------+---------------+--------+
///     | FFFFFFFF | kind | flags | reserved | body length u64 | body ...      | 0-pad  |
///     +--------+------+-------+----------+----------------+---------------+--------+
public enum FrameEncoder {
    public static func preamble() -> [UInt8] {
        var w = ByteWriter(capacity: StreamFormat.preambleSize)
        w.raw(StreamFormat.magic)
        w.u16(StreamFormat.majorVersion)
        w.u16(StreamFormat.minorVersion)
        w.u32(0)
        w.zeros(StreamFormat.preambleSize - 16)
        return w.bytes
    }

    /// The 16-byte frame header.
    public static func frameHeader(_ kind: StreamFormat.Kind, bodyLength: Int) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u32(StreamFormat.marker)
        w.u8(kind.rawValue)
        w.u8(0)
        w.u16(0)
        w.u64(UInt64(bodyLength))
        return w.bytes
    }

    /// A whole frame with a small body, padded.
    public static func frame(_ kind: StreamFormat.Kind, body: [UInt8]) -> [UInt8] {
        var out = frameHeader(kind, bodyLength: body.count)
        out.append(contentsOf: body)
        out.append(contentsOf: repeatElement(0, count: StreamFormat.padding(after: out.count)))
        return out
    }

    public static func header(_ h: StreamHeader) -> [UInt8] {
        var json = JSONObject([
            ("producer", .string(h.producer)),
            ("source_format", .string(h.sourceFormat)),
            ("metadata", .object(h.metadata)),
        ])
        for (k, v) in h.extensions where json[k] == nil { json[k] = v }
        return frame(.header, body: JSONWriter.compact(.object(json)))
    }

    static func descriptor(_ d: TensorDescriptor, into w: inout ByteWriter) {
        w.string32(d.name)
        w.string8(d.dtype.rawValue)
        w.u8(UInt8(d.shape.count))
        for dim in d.shape { w.u64(UInt64(dim)) }
    }

    public static func manifest(_ entries: [TensorDescriptor]) -> [UInt8] {
        var w = ByteWriter(capacity: 64 * entries.count + 8)
        w.u64(UInt64(entries.count))
        for d in entries { descriptor(d, into: &w) }
        return frame(.manifest, body: w.bytes)
    }

    public static func tensor(_ t: TensorHeader) -> [UInt8] {
        var w = ByteWriter(capacity: 128)
        descriptor(t.descriptor, into: &w)
        w.u64(UInt64(t.descriptor.byteCount))
        let attrs = t.attributes.isEmpty ? [] : JSONWriter.compact(.object(t.attributes))
        w.u32(UInt32(attrs.count))
        w.raw(attrs)
        return frame(.tensor, body: w.bytes)
    }

    /// Frame header plus chunk header: exactly 64 bytes, after which `storedLength`
    /// bytes of data follow, then padding to 64.
    public static func chunkPrefix(offset: Int, rawLength: Int, codec: StreamFormat.Codec,
                                   crc: UInt32, storedLength: Int, shuffleWidth: Int = 0) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.raw(frameHeader(.chunk, bodyLength: StreamFormat.chunkHeaderSize + storedLength))
        w.u64(UInt64(offset))
        w.u64(UInt64(rawLength))
        w.u32(codec.rawValue)
        w.u32(crc)
        w.u8(UInt8(shuffleWidth))
        w.zeros(23)
        return w.bytes
    }

    public static func tensorEnd(byteLength: Int, crc: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u64(UInt64(byteLength))
        w.u32(crc)
        w.u32(0)
        return frame(.tensorEnd, body: w.bytes)
    }

    public static func end(tensorCount: Int, totalBytes: Int) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u64(UInt64(tensorCount))
        w.u64(UInt64(totalBytes))
        return frame(.end, body: w.bytes)
    }
}
