// safetensors format, as specified by https://github.com/huggingface/safetensors (README
// "Format") and implemented by its crate's `SafeTensors::read_metadata`/`Metadata::validate`:
//
//     u64 LE header length N | N bytes of UTF-8 JSON | data buffer
//
// JSON: {"__metadata__": {str: str}?, NAME: {"dtype": D, "shape": [..], "data_offsets": [b, e]}, ...}
// Offsets are relative to the data buffer; sorted by offset, tensors must tile it exactly.

/// A parsed and validated safetensors header.
public struct SafetensorsHeader {
    public struct Entry: Equatable {
        public var descriptor: TensorDescriptor
        /// Byte range in the data buffer.
        public var begin: Int
        public var end: Int
    }

    /// The crate's `MAX_HEADER_SIZE`.
    public static let maxHeaderLength = 100_000_000

    /// `__metadata__`, or nil when absent (or null).
    public var metadata: JSONObject?
    /// Tensors in data-offset order.
    public var entries: [Entry]
    /// N: the JSON's length in bytes.
    public var headerLength: Int
    /// Where the data buffer starts in the file.
    public var dataStart: Int { 8 + headerLength }

    /// Reads and validates the header of a mapped (or remote) file: the length first, then
    /// only the bytes it declares, once checked against the file.
    public static func read(from file: MappedFile) throws -> SafetensorsHeader {
        let fileSize = file.size
        guard fileSize >= 8 else { throw SafetensorsError(.headerTooSmall(fileSize: fileSize), file: file.path) }
        let n = try ByteCursor(file, offset: 0, count: 8).getInteger(at: 0, endianness: .little, as: UInt64.self)
        guard n <= UInt64(maxHeaderLength) else { throw SafetensorsError(.headerTooLarge(length: n), file: file.path) }
        guard 8 + Int(n) <= fileSize else {
            throw SafetensorsError(.invalidHeaderLength(length: n, fileSize: fileSize), file: file.path)
        }
        let json = [UInt8](try file.bytes(at: 8, count: Int(n)))
        return try parse(json: json, fileSize: fileSize, file: file.path)
    }

    /// Validates header JSON `json` (N bytes) for a file of `fileSize` bytes.
    public static func parse(json: [UInt8], fileSize: Int, file: String) throws(SafetensorsError) -> SafetensorsHeader {
        func fail(_ r: SafetensorsError.Reason, _ tensor: String? = nil) -> SafetensorsError {
            SafetensorsError(r, file: file, tensor: tensor)
        }
        guard String(validating: json, as: UTF8.self) != nil else { throw fail(.headerNotUTF8) }
        let root: JSONValue
        do { root = try JSONParser.parse(json) } catch { throw fail(.invalidHeader(detail: error.description)) }
        guard let object = root.objectValue else { throw fail(.invalidHeader(detail: "the header is not a JSON object")) }

        var metadata: JSONObject?
        var entries: [Entry] = []
        entries.reserveCapacity(object.count)
        for (name, value) in object {
            if name == "__metadata__" {
                switch value {
                case .null: metadata = nil
                case .object(let m):
                    for (k, v) in m where v.stringValue == nil {
                        throw fail(.invalidHeader(detail: "__metadata__ value for \"\(k)\" is not a string"))
                    }
                    metadata = m
                default: throw fail(.invalidHeader(detail: "__metadata__ is not an object"))
                }
                continue
            }
            guard let info = value.objectValue else { throw fail(.invalidHeader(detail: "entry is not an object"), name) }
            guard let dtypeText = info["dtype"]?.stringValue else { throw fail(.invalidHeader(detail: "missing or non-string dtype"), name) }
            guard let dtype = DType(rawValue: dtypeText) else {
                let known = ["F4", "F6_E2M3", "F6_E3M2"]
                throw fail(known.contains(dtypeText) ? .unsupportedDType(dtype: dtypeText) : .invalidHeader(detail: "unknown dtype \"\(dtypeText)\""), name)
            }
            guard let shapeValues = info["shape"]?.arrayValue else { throw fail(.invalidHeader(detail: "missing shape"), name) }
            var shape: [Int] = []
            for d in shapeValues {
                guard let v = d.nonNegativeIntValue else { throw fail(.invalidHeader(detail: "shape holds a value that is not a non-negative integer"), name) }
                shape.append(v)
            }
            guard let offs = info["data_offsets"]?.arrayValue, offs.count == 2,
                  let begin = offs[0].nonNegativeIntValue, let end = offs[1].nonNegativeIntValue else {
                throw fail(.invalidHeader(detail: "data_offsets must be two non-negative integers"), name)
            }
            let descriptor: TensorDescriptor
            do { descriptor = try TensorDescriptor(name: name, dtype: dtype, shape: shape) } catch { throw fail(.validationOverflow, name) }
            entries.append(Entry(descriptor: descriptor, begin: begin, end: end))
        }

        // Metadata::validate: sorted by offsets, the tensors must tile the buffer from 0.
        entries.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        var start = 0
        for e in entries {
            guard e.begin == start, e.end >= e.begin else {
                throw fail(.invalidOffset(expectedStart: start, begin: e.begin, end: e.end), e.descriptor.name)
            }
            guard e.end - e.begin == e.descriptor.byteCount else {
                throw fail(.tensorInvalidInfo(dtype: e.descriptor.dtype.rawValue, shape: e.descriptor.shape, bytes: e.end - e.begin),
                           e.descriptor.name)
            }
            start = e.end
        }
        let available = fileSize - 8 - json.count
        if start > available {
            throw fail(.dataBeyondFile(dataEnd: start, available: available), entries.last?.descriptor.name)
        }
        if start < available { throw fail(.trailingBytes(count: available - start)) }
        return SafetensorsHeader(metadata: metadata, entries: entries, headerLength: json.count)
    }
}

/// Where a writer puts each tensor: the layout the safetensors crate's `serialize`
/// produces for the same tensors, so our files are byte-identical to its.
public struct SafetensorsLayout {
    /// Length prefix, JSON and space padding: everything before the data.
    public let headerBytes: [UInt8]
    /// Tensors in file order, with their absolute byte offset in the file.
    public let placements: [(descriptor: TensorDescriptor, fileOffset: Int)]
    public let fileSize: Int

    /// The crate's order: dtype descending (so data stays aligned), then name bytewise.
    public static func fileOrder(_ a: TensorDescriptor, _ b: TensorDescriptor) -> Bool {
        if a.dtype != b.dtype { return a.dtype.safetensorsRank > b.dtype.safetensorsRank }
        return a.name.utf8.lexicographicallyPrecedes(b.name.utf8)
    }

    public init(tensors: [TensorDescriptor], metadata: JSONObject?) {
        let ordered = tensors.sorted(by: SafetensorsLayout.fileOrder)
        var json = JSONObject()
        if let metadata { json["__metadata__"] = .object(metadata) }
        var offset = 0
        var relative: [(TensorDescriptor, Int)] = []
        for d in ordered {
            json[d.name] = .object(JSONObject([
                ("dtype", .string(d.dtype.rawValue)),
                ("shape", .array(d.shape.map { .int($0) })),
                ("data_offsets", .array([.int(offset), .int(offset + d.byteCount)])),
            ]))
            relative.append((d, offset))
            offset += d.byteCount
        }
        var text = JSONWriter.compact(.object(json))
        text.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - text.count % 8) % 8))
        var w = ByteWriter(capacity: text.count + 8)
        w.u64(UInt64(text.count))
        w.raw(text)
        headerBytes = w.bytes
        placements = relative.map { ($0.0, $0.1 + w.bytes.count) }
        fileSize = w.bytes.count + offset
    }
}
