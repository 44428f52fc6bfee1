// Flax's msgpack checkpoints (flax/serialization.py: `to_bytes`, `msgpack_restore`): a
// nested msgpack map whose array leaves are ext type 1 (ndarray) or 3 (numpy scalar), each
// a packed `(shape tuple, dtype name, raw C-order bytes)`; arrays over 2**30 bytes are maps
// `{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": ext, ...}}`.
// Lists were turned into maps with keys "0", "1", ... by `to_state_dict`.

public enum FlaxMsgpack {
    public static let chunkedArrayKey = "__msgpack_chunked_array__"
    /// flax's `MAX_CHUNK_SIZE`: arrays with more bytes than this are written in chunks.
    public static let maxChunkSize = 1 << 30

    /// numpy dtype names (`dtype.name`) as flax writes them.
    public static let dtypeNames: [DType: String] = [
        .f64: "float64", .f32: "float32", .f16: "float16", .bf16: "bfloat16", .i64: "int64", .i32: "int32", .i16: "int16",
        .i8: "int8", .u64: "uint64", .u32: "uint32", .u16: "uint16", .u8: "uint8", .bool: "bool", .c64: "complex64",
        .f8e4m3: "float8_e4m3fn", .f8e5m2: "float8_e5m2", .f8e8m0: "float8_e8m0fnu", .f8e4m3fnuz: "float8_e4m3fnuz",
        .f8e5m2fnuz: "float8_e5m2fnuz",
    ]
    static let dtypesByName: [String: DType] = Dictionary(uniqueKeysWithValues: dtypeNames.map { ($1, $0) })
}

public enum FlaxMsgpackReader {
    /// - Parameter separator: joins the map keys of a path into a tensor name (`/`, as JAX trees).
    public static func open(path: String, selection: TensorSelection = .all, separator: String = "/",
                            producer: String) throws -> PlannedSource {
        guard let file = try MappedFile.open(path) else { throw MsgpackError(.notARegularFile, file: path, offset: 0) }
        let size = file.size
        var cursor = MsgpackCursor(try ByteCursor(file), file: path)
        var plan: [(TensorHeader, TensorData)] = []
        var metadata = JSONObject()
        var names = Set<String>()

        func add(_ name: String, _ d: TensorDescriptor, _ data: TensorData) throws {
            guard names.insert(name).inserted else { throw MsgpackError(.duplicateLeaf, file: path, offset: cursor.position, tensor: name) }
            if selection.includes(name) { plan.append((TensorHeader(d), data)) }
        }

        /// An ext 1/3 payload: (shape, dtype name, bin). Returns the descriptor and the data's place.
        func array(_ offset: Int, _ count: Int, name: String) throws -> (TensorDescriptor, Int) {
            var c = try cursor.payload(offset: offset, count: count)
            func bad(_ r: MsgpackError.Reason) -> MsgpackError { MsgpackError(r, file: path, offset: offset, tensor: name) }
            guard case .array(3) = try c.next(), case .array(let rank) = try c.next(), rank <= 64 else {
                throw bad(.malformedArrayPayload)
            }
            var shape: [Int] = []
            for _ in 0..<rank {
                guard case .uint(let d) = try c.next(), d <= UInt64(Int.max) else { throw bad(.shapeNotIntegers) }
                shape.append(Int(d))
            }
            guard case .string(let dtypeName) = try c.next() else { throw bad(.dtypeNotString) }
            guard let dtype = FlaxMsgpack.dtypesByName[dtypeName] else { throw bad(.unsupportedDType(name: dtypeName)) }
            guard case .bin(let at, let n) = try c.next(), c.position == offset + count else { throw bad(.dataNotTrailingBin) }
            let d: TensorDescriptor
            do { d = try TensorDescriptor(name: name, dtype: dtype, shape: shape) } catch { throw bad(.invalidShape(shape: shape, detail: error.reason)) }
            guard d.byteCount == n else { throw bad(.dataSizeMismatch(dtype: dtypeName, shape: shape, needed: d.byteCount, holds: n)) }
            return (d, at)
        }

        func walk(_ name: String, depth: Int) throws {
            guard depth < 256 else { throw MsgpackError(.nestingTooDeep(limit: 256), file: path, offset: cursor.position) }
            let at = cursor.position
            let token = try cursor.next()
            switch token {
            case .map(let n):
                // A chunked array starts with its marker key.
                var peek = cursor
                if n == 3, case .string(FlaxMsgpack.chunkedArrayKey) = try peek.next() {
                    try chunked(name, at: at)
                    return
                }
                for _ in 0..<n {
                    let key: String
                    switch try cursor.next() {
                    case .string(let s): key = s
                    case .uint(let u): key = String(u)
                    case .int(let i): key = String(i)
                    default: throw MsgpackError(.mapKeyNotStringOrInteger, file: path, offset: cursor.position, tensor: name)
                    }
                    try walk(name.isEmpty ? key : name + separator + key, depth: depth + 1)
                }
            case .ext(let type, let offset, let count) where type == 1 || type == 3:
                let (d, dataAt) = try array(offset, count, name: name)
                try add(name, d, .mapped(file, offset: dataAt))
            case .ext(2, let offset, let count):
                var c = try cursor.payload(offset: offset, count: count)
                guard case .array(2) = try c.next(), case .double(let re) = try c.next(), case .double(let im) = try c.next() else {
                    throw MsgpackError(.malformedComplex, file: path, offset: offset, tensor: name)
                }
                try leaf(name, .string("(\(re)+\(im)j)"))
            case .ext(let type, _, _):
                throw MsgpackError(.unknownExtType(type: type), file: path, offset: at, tensor: name)
            case .array(let n):
                // flax writes lists as maps; tolerate plain arrays of leaves by index.
                for i in 0..<n { try walk(name.isEmpty ? String(i) : name + separator + String(i), depth: depth + 1) }
            case .nil_: try leaf(name, .null)
            case .bool(let b): try leaf(name, .bool(b))
            case .int(let i): try leaf(name, .number(String(i)))
            case .uint(let u): try leaf(name, .number(String(u)))
            case .double(let d): try leaf(name, d.isFinite ? .number("\(d)") : .string("\(d)"))
            case .string(let s): try leaf(name, .string(s))
            case .bin(_, let n): try leaf(name, .string("<\(n) bytes>"))
            }
        }

        func leaf(_ name: String, _ v: JSONValue) throws {
            guard names.insert(name).inserted else { throw MsgpackError(.duplicateLeaf, file: path, offset: cursor.position, tensor: name) }
            metadata[name] = v
        }

        /// `{"__msgpack_chunked_array__": true, "shape": {...}, "chunks": {...}}`
        func chunked(_ name: String, at: Int) throws {
            func bad(_ r: MsgpackError.Reason) -> MsgpackError { MsgpackError(r, file: path, offset: at, tensor: name) }
            guard case .string = try cursor.next(), case .bool(true) = try cursor.next() else { throw bad(.chunkedMarkerNotTrue) }
            guard case .string("shape") = try cursor.next(), case .map(let rank) = try cursor.next(), rank <= 64 else { throw bad(.chunkedNoShapeMap) }
            var shape: [Int] = []
            for i in 0..<rank {
                guard case .string(String(i)) = try cursor.next(), case .uint(let d) = try cursor.next(), d <= UInt64(Int.max) else {
                    throw bad(.chunkedShapeEntryMalformed(index: i))
                }
                shape.append(Int(d))
            }
            guard case .string("chunks") = try cursor.next(), case .map(let n) = try cursor.next() else { throw bad(.chunkedNoChunksMap) }
            var pieces: [(offset: Int, count: Int)] = []
            var dtype: DType?
            for i in 0..<n {
                guard case .string(String(i)) = try cursor.next(), case .ext(let type, let offset, let count) = try cursor.next(), type == 1 else {
                    throw bad(.chunkedChunkNotArray(index: i))
                }
                let (d, dataAt) = try array(offset, count, name: name)
                guard d.shape.count == 1, dtype == nil || dtype == d.dtype else { throw bad(.chunkedChunkNotOneDimensional(index: i)) }
                dtype = d.dtype
                pieces.append((dataAt, d.byteCount))
            }
            guard let dtype else { throw bad(.chunkedNoChunks) }
            let d: TensorDescriptor
            do { d = try TensorDescriptor(name: name, dtype: dtype, shape: shape) } catch { throw bad(.invalidShape(shape: shape, detail: error.reason)) }
            guard pieces.reduce(0, { $0 + $1.count }) == d.byteCount else { throw bad(.chunkedSizeMismatch(dtype: dtype.rawValue, shape: shape)) }
            try add(name, d, .segments(file, pieces))
        }

        try walk("", depth: 0)
        guard cursor.position == size else {
            throw MsgpackError(.trailingBytes(count: size - cursor.position), file: path, offset: cursor.position)
        }
        return PlannedSource(header: StreamHeader(producer: producer, sourceFormat: "flax-msgpack", metadata: metadata), plan: plan)
    }
}
