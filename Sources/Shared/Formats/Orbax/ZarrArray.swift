import Dispatch

// Zarr arrays as orbax writes them through tensorstore: v2 (`.zarray`, zarr spec v2) and v3
// (`zarr.json`, zarr spec v3 with the `sharding_indexed` codec). Chunks are row-major,
// full-size at the edges (padding cropped here), and decoded one at a time.

/// What is wrong with a zarr array, one case per rule (carried by `OrbaxError.Reason.zarr`).
public enum ZarrProblem: Equatable, Sendable, CustomStringConvertible {
    // Metadata (.zarray, zarr.json)
    case metadataNotJSON(detail: String)
    case metadataNotObject
    case fieldMissing(key: String)
    case fieldNotIntegers(key: String)
    case structuredDType
    /// Zarr that orbax never writes and this reader does not read (the phrase names it).
    case unsupported(String)
    case compressorWithoutID
    case codecWithoutName
    case chunksDoNotFitShape
    case chunkShapeRankMismatch
    case innerChunksDoNotFitShape(inner: [Int])
    case chunkTooLarge(chunks: [Int], dtype: DType)
    // The declared chunk grid against the store
    case gridUncountable(grid: [Int])
    case gridLargerThanStore(shape: [Int], chunks: [Int], count: Int, stored: Int)
    case missingChunk(key: String)
    // Chunk contents
    case chunkSize(key: String?, holds: Int, needs: Int)
    case zstdDeclaredSize(key: String?, declared: Int, needs: Int)
    case zstdWithoutSizeTooSmall(key: String, stored: Int, needs: Int)
    case cannotInflate(key: String, stored: Int, needs: Int)
    case storedCannotHold(stored: Int, dtype: DType, shape: [Int], bytes: Int)
    case doesNotDecompress(detail: String)
    case endsEarly(produced: Int, expected: Int)

    public var description: String {
        switch self {
        case .metadataNotJSON(let detail): return "metadata is not JSON: \(detail)"
        case .metadataNotObject: return "metadata is not an object"
        case .fieldMissing(let key): return "\(key) is missing"
        case .fieldNotIntegers(let key): return "\(key) holds a non-integer"
        case .structuredDType: return "dtype is not a plain string (structured dtypes are not supported)"
        case .unsupported(let what): return what
        case .compressorWithoutID: return "compressor has no id"
        case .codecWithoutName: return "codec without a name"
        case .chunksDoNotFitShape: return "chunks do not fit the shape"
        case .chunkShapeRankMismatch: return "chunk shape does not fit the shape"
        case .innerChunksDoNotFitShape(let inner): return "inner chunk shape \(inner) does not fit the shape"
        case .chunkTooLarge(let chunks, let dtype): return "chunk shape \(chunks) of \(dtype.rawValue) is too large to address"
        case .gridUncountable(let grid): return "chunk grid \(grid) has more chunks than can be counted"
        case .gridLargerThanStore(let shape, let chunks, let count, let stored):
            return "shape \(shape) in chunks of \(chunks) makes \(count) chunks, the store holds \(stored) (orbax never leaves chunks out)"
        case .missingChunk(let key): return "chunk \(key) is missing (orbax never leaves chunks out)"
        case .chunkSize(let key?, let holds, let needs): return "chunk \(key) holds \(holds) bytes, the chunk shape needs \(needs)"
        case .chunkSize(nil, let holds, let needs): return "chunk holds \(holds) bytes, expected \(needs)"
        case .zstdDeclaredSize(let key?, let declared, let needs): return "zstd chunk \(key) declares \(declared) bytes, the chunk shape needs \(needs)"
        case .zstdDeclaredSize(nil, let declared, let needs): return "zstd chunk declares \(declared) bytes, the chunk shape needs \(needs)"
        case .zstdWithoutSizeTooSmall(let key, let stored, let needs):
            return "zstd chunk \(key) (\(stored) bytes, no size recorded) cannot hold the \(needs) its shape declares"
        case .cannotInflate(let key, let stored, let needs): return "chunk \(key) (\(stored) bytes) cannot inflate to the \(needs) its shape declares"
        case .storedCannotHold(let stored, let dtype, let shape, let bytes):
            return "\(stored) stored bytes cannot hold \(dtype.rawValue)\(shape) (\(bytes) bytes)"
        case .doesNotDecompress(let detail): return "chunk does not decompress: \(detail)"
        case .endsEarly(let produced, let expected): return "chunk does not decompress: the data ends after \(produced) of \(expected) bytes"
        }
    }
}

/// A zarr array's metadata and how to turn its chunks into the array's row-major bytes.
public struct ZarrArray: Sendable {
    public enum Codec: Equatable, Sendable {
        case zstd, zlib, gzip
    }

    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var chunks: [Int]
    /// Chunk-level compression (v2 `compressor`, v3 inner codec), nil for none.
    public var codec: Codec?
    public var zarrFormat: Int
    /// v3 sharding: inner chunk shape; each stored value is a shard of inner chunks plus index.
    public var innerChunks: [Int]?

    public var descriptor: TensorDescriptor { get throws { try TensorDescriptor(name: name, dtype: dtype, shape: shape) } }

    static func fail(_ name: String, _ p: ZarrProblem, file: String) -> OrbaxError { OrbaxError(.zarr(p), file: file, tensor: name) }

    /// Parses `.zarray` (v2) or `zarr.json` (v3).
    public static func parse(_ json: [UInt8], name: String, file: String) throws -> ZarrArray {
        func fail(_ p: ZarrProblem) -> OrbaxError { ZarrArray.fail(name, p, file: file) }
        let v: JSONValue
        do { v = try JSONParser.parse(json) } catch { throw fail(.metadataNotJSON(detail: error.description)) }
        guard let o = v.objectValue else { throw fail(.metadataNotObject) }
        func ints(_ key: String, _ from: JSONObject) throws -> [Int] {
            guard let a = from[key]?.arrayValue else { throw fail(.fieldMissing(key: key)) }
            return try a.map { guard let i = $0.nonNegativeIntValue else { throw fail(.fieldNotIntegers(key: key)) }; return i }
        }
        let format = o["zarr_format"]?.nonNegativeIntValue ?? 0
        switch format {
        case 2:
            guard let dt = o["dtype"]?.stringValue else { throw fail(.structuredDType) }
            let dtype = try dtype2(dt, fail)
            if let order = o["order"]?.stringValue, order != "C" { throw fail(.unsupported("order \(order) is not supported (only C)")) }
            if let f = o["filters"], f != .null { throw fail(.unsupported("filters are not supported")) }
            var codec: Codec?
            if let c = o["compressor"], c != .null {
                guard let id = c.objectValue?["id"]?.stringValue else { throw fail(.compressorWithoutID) }
                switch id {
                case "zstd": codec = .zstd
                case "zlib": codec = .zlib
                case "gzip": codec = .gzip
                default: throw fail(.unsupported("compressor \(id) is not supported (zstd, zlib, gzip)"))
                }
            }
            if let sep = o["dimension_separator"]?.stringValue, sep != "." { throw fail(.unsupported("dimension_separator \(sep) is not supported")) }
            let shape = try ints("shape", o), chunks = try ints("chunks", o)
            guard shape.count == chunks.count, !chunks.contains(0) || shape.contains(0) else { throw fail(.chunksDoNotFitShape) }
            let a = ZarrArray(name: name, dtype: dtype, shape: shape, chunks: chunks, codec: codec, zarrFormat: 2, innerChunks: nil)
            try a.checkChunkSizes(fail)
            return a
        case 3:
            guard let dt = o["data_type"]?.stringValue, let dtype = dtype3[dt] else { throw fail(.unsupported("data_type \(o["data_type"].map { "\($0)" } ?? "?") is not supported")) }
            let shape = try ints("shape", o)
            guard let grid = o["chunk_grid"]?.objectValue, grid["name"]?.stringValue == "regular",
                  let conf = grid["configuration"]?.objectValue else { throw fail(.unsupported("only regular chunk grids are supported")) }
            let chunks = try ints("chunk_shape", conf)
            if let enc = o["chunk_key_encoding"]?.objectValue, enc["name"]?.stringValue != "default" { throw fail(.unsupported("chunk_key_encoding must be default")) }
            if let sep = o["chunk_key_encoding"]?.objectValue?["configuration"]?.objectValue?["separator"]?.stringValue, sep != "/" {
                throw fail(.unsupported("chunk key separator \(sep) is not supported"))
            }
            guard let codecs = o["codecs"]?.arrayValue else { throw fail(.fieldMissing(key: "codecs")) }
            var a = ZarrArray(name: name, dtype: dtype, shape: shape, chunks: chunks, codec: nil, zarrFormat: 3, innerChunks: nil)
            var pipeline = codecs
            if codecs.count == 1, let s = codecs[0].objectValue, s["name"]?.stringValue == "sharding_indexed" {
                guard let c = s["configuration"]?.objectValue, let inner = c["codecs"]?.arrayValue else { throw fail(.fieldMissing(key: "sharding_indexed codecs")) }
                if let loc = c["index_location"]?.stringValue, loc != "end" { throw fail(.unsupported("shard index at the \(loc) is not supported")) }
                let index = c["index_codecs"]?.arrayValue?.compactMap { $0.objectValue?["name"]?.stringValue } ?? []
                guard index == ["bytes", "crc32c"] else { throw fail(.unsupported("shard index codecs \(index) are not supported (bytes, crc32c)")) }
                a.innerChunks = try ints("chunk_shape", c)
                pipeline = inner
            }
            for codec in pipeline {
                guard let co = codec.objectValue, let n = co["name"]?.stringValue else { throw fail(.codecWithoutName) }
                switch n {
                case "bytes":
                    if let e = co["configuration"]?.objectValue?["endian"]?.stringValue, e != "little", dtype.size > 1 {
                        throw fail(.unsupported("big-endian bytes codec is not supported"))
                    }
                case "zstd": a.codec = .zstd
                case "gzip": a.codec = .gzip
                case "crc32c": throw fail(.unsupported("crc32c on chunk data is not supported"))
                default: throw fail(.unsupported("codec \(n) is not supported"))
                }
            }
            guard shape.count == chunks.count else { throw fail(.chunkShapeRankMismatch) }
            if let inner = a.innerChunks, inner.count != shape.count || inner.contains(0) { throw fail(.innerChunksDoNotFitShape(inner: inner)) }
            try a.checkChunkSizes(fail)
            return a
        default:
            throw fail(.unsupported("zarr_format \(format) is not supported"))
        }
    }

    static let dtype3: [String: DType] = [
        "bool": .bool, "int8": .i8, "int16": .i16, "int32": .i32, "int64": .i64, "uint8": .u8, "uint16": .u16, "uint32": .u32,
        "uint64": .u64, "float16": .f16, "float32": .f32, "float64": .f64, "bfloat16": .bf16, "complex64": .c64,
        "float8_e4m3fn": .f8e4m3, "float8_e5m2": .f8e5m2,
    ]

    static func dtype2(_ s: String, _ fail: (ZarrProblem) -> OrbaxError) throws -> DType {
        switch s {
        case "|b1": return .bool
        case "|i1": return .i8
        case "|u1": return .u8
        case "<i2": return .i16
        case "<u2": return .u16
        case "<i4": return .i32
        case "<u4": return .u32
        case "<i8": return .i64
        case "<u8": return .u64
        case "<f2": return .f16
        case "<f4": return .f32
        case "<f8": return .f64
        case "<c8": return .c64
        case "bfloat16": return .bf16
        case "float8_e4m3fn": return .f8e4m3
        case "float8_e5m2": return .f8e5m2
        default: throw fail(.unsupported("dtype \(s) is not supported"))
        }
    }

    /// The chunk grid's size along each axis.
    var grid: [Int] { zip(shape, chunks).map { $0.1 == 0 ? 0 : $0.0 / $0.1 + ($0.0 % $0.1 == 0 ? 0 : 1) } }  // no overflow near Int.max

    /// Whether `key` (relative to the array) names one of its chunks: `i.j.k` in v2, `c/i/j/k` in v3.
    func isChunkKey<S: StringProtocol>(_ key: S) -> Bool {
        let rank = shape.count
        func indices(_ parts: [S.SubSequence]) -> Bool {
            parts.count == rank && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } }
        }
        if zarrFormat == 2 { return rank == 0 ? key == "0" : indices(key.split(separator: ".", omittingEmptySubsequences: false)) }
        if rank == 0 { return key == "c" }
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        return parts.first == "c" && indices(Array(parts.dropFirst()))
    }

    /// The store key of the chunk at grid index `index`.
    func chunkKey(_ index: [Int]) -> String {
        if zarrFormat == 2 { return index.isEmpty ? "0" : index.map(String.init).joined(separator: ".") }
        return index.isEmpty ? "c" : "c/" + index.map(String.init).joined(separator: "/")
    }

    /// The product of `xs`, nil when it overflows.
    static func product(_ xs: [Int]) -> Int? {
        var n = 1
        for x in xs {
            let (m, overflow) = n.multipliedReportingOverflow(by: x)
            if overflow { return nil }
            n = m
        }
        return n
    }

    /// A chunk's (and inner chunk's) size in bytes must be a number before anything is sized from it.
    func checkChunkSizes(_ fail: (ZarrProblem) -> OrbaxError) throws {
        for c in [chunks] + (innerChunks.map { [$0] } ?? []) {
            guard let n = ZarrArray.product(c), !n.multipliedReportingOverflow(by: dtype.size).overflow else {
                throw fail(.chunkTooLarge(chunks: c, dtype: dtype))
            }
        }
    }

    /// How many chunks the declared grid holds; nil when that overflows.
    var chunkCount: Int? { ZarrArray.product(grid) }

    /// Checks the declared grid against the chunks the store holds before anything walks it:
    /// metadata of a few bytes can declare 10^11 chunks, and orbax never leaves one out, so a
    /// grid larger than the stored chunks is refused here, in time proportional to what exists.
    func checkGrid(stored: Int, file: String) throws {
        guard let n = chunkCount else { throw ZarrArray.fail(name, .gridUncountable(grid: grid), file: file) }
        guard n <= stored else {
            throw ZarrArray.fail(name, .gridLargerThanStore(shape: shape, chunks: chunks, count: n, stored: stored), file: file)
        }
    }

    /// Every chunk index in C order, generated as it goes (call `checkGrid` first).
    func forEachChunkIndex(_ body: ([Int]) throws -> Void) rethrows {
        try StridedCopy.forEachIndex(grid, body)
    }

    /// Decompresses a stored value (streaming zstd straight from the mapped file when it can).
    func decode(_ value: KVValue, count: Int, file: String) throws -> AlignedBuffer {
        if codec == .zstd, case .file(let f, let o, let n) = value {
            let out = try AlignedBuffer.reusable(capacity: max(count, 1))  // decompression fills all of it
            out.count = count
            do {
                try ZstdCodec.decompress(f, offset: o, count: n, into: UnsafeMutableRawBufferPointer(start: out.pointer, count: count))
            } catch let e as RemoteError { throw e } catch { throw ZarrArray.fail(name, .doesNotDecompress(detail: "\(error)"), file: file) }
            return out
        }
        return try value.withBytes { try decode($0, count: count, file: file) }
    }

    /// Decompresses a stored value that holds `count` raw bytes.
    func decode(_ stored: UnsafeRawBufferPointer, count: Int, file: String) throws -> AlignedBuffer {
        let out = try AlignedBuffer.reusable(capacity: max(count, 1))  // every codec fills all `count` bytes or fails
        out.count = count
        let target = UnsafeMutableRawBufferPointer(start: out.pointer, count: count)
        do {
            switch codec {
            case nil:
                guard stored.count == count else { throw ZarrArray.fail(name, .chunkSize(key: nil, holds: stored.count, needs: count), file: file) }
                if count > 0 { out.pointer.copyMemory(from: stored.baseAddress!, byteCount: count) }
            case .zstd:
                if let declared = ZstdCodec.declaredSize(stored), declared != count {
                    throw ZarrArray.fail(name, .zstdDeclaredSize(key: nil, declared: declared, needs: count), file: file)
                }
                try ZstdCodec.decompress(stored, into: target)
            case .zlib: try ZlibCodec.decompress(stored, into: target)
            case .gzip: try ZlibCodec.inflate(stored, into: target, windowBits: 31)
            }
        } catch let e as OrbaxError { throw e } catch {
            throw ZarrArray.fail(name, .doesNotDecompress(detail: "\(error)"), file: file)
        }
        return out
    }

    /// Checks, before anything is allocated for the array, that its stored chunks can hold what
    /// the metadata declares: every chunk present, exact sizes where they are known (no
    /// compression, zstd frame headers), and at most deflate's 1032:1 ratio otherwise. A forged
    /// shape therefore fails here instead of asking for terabytes.
    func validate(file: String, get: (String) throws -> KVValue?) throws {
        let chunkBytes = (innerChunks == nil ? chunks.reduce(1, *) : 1) * dtype.size
        var stored = 0
        try forEachChunkIndex { index in
            let key = chunkKey(index)
            guard let v = try get(key) else { throw ZarrArray.fail(name, .missingChunk(key: key), file: file) }
            stored += v.count
            guard innerChunks == nil else { return }
            switch codec {
            case nil:
                guard v.count == chunkBytes else { throw ZarrArray.fail(name, .chunkSize(key: key, holds: v.count, needs: chunkBytes), file: file) }
            case .zstd:
                let declared = try v.withPrefix(ZstdCodec.frameHeaderMax) { ZstdCodec.declaredSize($0) }
                if let declared, declared != chunkBytes {
                    throw ZarrArray.fail(name, .zstdDeclaredSize(key: key, declared: declared, needs: chunkBytes), file: file)
                }
                // tensorstore always records the size; a frame without it gets deflate's bound.
                guard declared != nil || v.count * 1032 + 1024 >= chunkBytes else {
                    throw ZarrArray.fail(name, .zstdWithoutSizeTooSmall(key: key, stored: v.count, needs: chunkBytes), file: file)
                }
            case .zlib, .gzip:
                guard v.count * 1032 + 1024 >= chunkBytes else {
                    throw ZarrArray.fail(name, .cannotInflate(key: key, stored: v.count, needs: chunkBytes), file: file)
                }
            }
        }
        let d = try descriptor
        guard stored * 1032 + 1024 * max(1, chunkCount ?? 1) >= d.byteCount else {
            throw ZarrArray.fail(name, .storedCannotHold(stored: stored, dtype: dtype, shape: shape, bytes: d.byteCount), file: file)
        }
    }

    /// Assembles the whole array in row-major order from its chunks (`get` returns a stored value).
    func assemble(file: String, get: (String) throws -> KVValue?) throws -> AlignedBuffer {
        try validate(file: file, get: get)
        let d = try descriptor
        // One chunk the size of the array (orbax's usual case): the decoded chunk is the array.
        if innerChunks == nil && chunks == shape && !shape.contains(0), let stored = try get(chunkKey(shape.map { _ in 0 })) {
            defer { stored.release() }
            return try decode(stored, count: d.byteCount, file: file)
        }
        // Chunks cover every element of a plain array; a shard's empty inner chunks are left as
        // the fill value (zeros), so sharded arrays need fresh (zeroed) pages.
        let out = innerChunks == nil ? try AlignedBuffer.reusable(capacity: max(d.byteCount, 1)) : try AlignedBuffer(capacity: max(d.byteCount, 1))
        out.count = d.byteCount
        try fill(out, rows: 0..<max(grid.first ?? 1, 1), file: file, get: get)
        return out
    }

    /// The elements along the first axis that chunk rows `rows` cover.
    func elementRows(_ rows: Range<Int>) -> Range<Int> { (rows.lowerBound * chunks[0])..<min(rows.upperBound * chunks[0], shape[0]) }

    /// Decodes the chunks whose first index is in `rows` (chunk rows, not elements) into `out`,
    /// which holds exactly the elements they cover along the first axis (all of the others): a
    /// row-major band of the array. Values are looked up first (a missing chunk fails before any
    /// work); chunks are then decoded on all cores, each into its own region. Memory: the band
    /// plus one chunk per core.
    func fill(_ out: AlignedBuffer, rows: Range<Int>, file: String, get: (String) throws -> KVValue?) throws {
        let chunkElements = chunks.reduce(1, *)
        let band = shape.isEmpty ? 0..<1 : elementRows(rows)
        let first = band.lowerBound
        var bandShape = shape
        if !shape.isEmpty { bandShape[0] = band.count }
        var work: [(key: String, origin: [Int], value: KVValue)] = []
        try forEachChunkIndex { index in
            guard shape.isEmpty || rows.contains(index[0]) else { return }
            let key = chunkKey(index)
            guard let stored = try get(key) else {
                throw ZarrArray.fail(name, .missingChunk(key: key), file: file)
            }
            var origin = zip(index, chunks).map { $0 * $1 }
            if !origin.isEmpty { origin[0] -= first }
            work.append((key, origin, stored))
        }
        final class FirstFailure: @unchecked Sendable {
            let lock = Mutex()
            var error: Error?
        }
        let failures = FirstFailure()
        let this = self
        let jobs = work
        let outShape = bandShape
        DispatchQueue.concurrentPerform(iterations: jobs.count) { i in
            let (key, origin, stored) = jobs[i]
            do {
                if let inner = this.innerChunks {
                    try stored.withBytes { shard in
                        try this.copyShard(shard, origin: origin, inner: inner, into: out, outShape: outShape, file: file, key: key)
                    }
                } else {
                    let chunk = try this.decode(stored, count: chunkElements * this.dtype.size, file: file)
                    this.place(chunk, chunkShape: this.chunks, at: origin, into: out, outShape: outShape)
                }
                // Keep resident memory at one band: the compressed bytes are no longer needed.
                stored.release()
            } catch {
                failures.lock.withLock { if failures.error == nil { failures.error = error } }
            }
        }
        if let failure = failures.error { throw failure }
    }

    /// A v3 shard: inner chunks, then (offset u64, nbytes u64) per inner chunk and a crc32c.
    private func copyShard(_ shard: UnsafeRawBufferPointer, origin: [Int], inner: [Int], into out: AlignedBuffer, outShape: [Int], file: String, key: String) throws {
        let perAxis = zip(chunks, inner).map { $1 == 0 ? 0 : $0 / $1 + ($0 % $1 == 0 ? 0 : 1) }
        // The index has 16 bytes per inner chunk: a shard shorter than that cannot be what the
        // metadata says (counted without overflow before anything is sized from it).
        var n = 1
        for a in perAxis {
            let (m, overflow) = n.multipliedReportingOverflow(by: a)
            guard !overflow, shard.count >= 4, m <= (shard.count - 4) / 16 else {
                throw OrbaxError(.shardShorterThanIndex(key: key), file: file, tensor: name)
            }
            n = m
        }
        let innerBytes = inner.reduce(1, *) * dtype.size  // no overflow: checked when the metadata was read
        // Read through a cursor: the index's offsets and lengths come from the file.
        let bytes = ByteCursor(unsafeBytes: shard)
        guard shard.count >= 4, n <= (shard.count - 4) / 16 else { throw OrbaxError(.shardShorterThanIndex(key: key), file: file, tensor: name) }
        let indexStart = shard.count - 16 * n - 4
        let stored = try bytes.getInteger(at: shard.count - 4, endianness: .little, as: UInt32.self)
        let computed = try bytes.withUnsafeBytes(at: indexStart, count: 16 * n) { CRC32C.checksum($0) }
        guard computed == stored else { throw OrbaxError(.shardIndexChecksumMismatch(key: key), file: file, tensor: name) }
        var index = try bytes.getSlice(at: indexStart, count: 16 * n)
        var positions: [[Int]] = [[]]
        for a in perAxis { positions = positions.flatMap { p in (0..<a).map { p + [$0] } } }
        for (i, pos) in positions.enumerated() {
            let offset = try index.readInteger(endianness: .little, as: UInt64.self)
            let count = try index.readInteger(endianness: .little, as: UInt64.self)
            let at = zip(origin, zip(pos, inner)).map { $0 + $1.0 * $1.1 }
            if offset == UInt64.max && count == UInt64.max {
                // Empty: the fill value (zeros), written out since small buffers are not zeroed.
                let zeros = try AlignedBuffer(capacity: max(innerBytes, 1))
                zeros.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: innerBytes)
                zeros.count = innerBytes
                place(zeros, chunkShape: inner, at: at, into: out, outShape: outShape)
                continue
            }
            guard offset <= UInt64(indexStart), count <= UInt64(indexStart) - offset else {
                throw OrbaxError(.innerChunkOutsideShard(key: key, index: i), file: file, tensor: name)
            }
            let chunk = try bytes.withUnsafeBytes(at: Int(offset), count: Int(count)) { try decode($0, count: innerBytes, file: file) }
            place(chunk, chunkShape: inner, at: at, into: out, outShape: outShape)
        }
    }

    /// Copies the part of a full-size chunk that lies inside `out` (of `outShape`: the array,
    /// or a band of it along the first axis), row by row.
    private func place(_ chunk: AlignedBuffer, chunkShape: [Int], at origin: [Int], into out: AlignedBuffer, outShape shape: [Int]) {
        let rank = shape.count
        let e = dtype.size
        if rank == 0 {
            out.pointer.copyMemory(from: chunk.pointer, byteCount: e)
            return
        }
        let extent = (0..<rank).map { max(0, min(chunkShape[$0], shape[$0] - origin[$0])) }
        guard !extent.contains(0) else { return }
        var outStride = [Int](repeating: 1, count: rank), inStride = [Int](repeating: 1, count: rank)
        for a in stride(from: rank - 2, through: 0, by: -1) {
            outStride[a] = outStride[a + 1] * shape[a + 1]
            inStride[a] = inStride[a + 1] * chunkShape[a + 1]
        }
        let run = extent[rank - 1] * e
        StridedCopy.forEachRow(extent) { idx in
            var src = 0, dst = origin[rank - 1]
            for a in 0..<(rank - 1) {
                src += idx[a] * inStride[a]
                dst += (origin[a] + idx[a]) * outStride[a]
            }
            (out.pointer + dst * e).copyMemory(from: chunk.pointer + src * e, byteCount: run)
        }
    }
}

/// An array stored as one zstd chunk in a data file, decoded as the stream goes
/// (`TensorData.streamed`): the decoder's window and one stream chunk are all it holds.
final class ZarrStreamedChunk: ChunkProducer {
    private let decoder: ZstdCodec.FileDecoder
    private let name: String
    private let file: String

    init(_ mapped: MappedFile, offset: Int, count: Int, array: ZarrArray, file: String) throws {
        name = array.name
        self.file = file
        do {
            decoder = try ZstdCodec.FileDecoder(mapped, offset: offset, count: count, expected: try array.descriptor.byteCount)
        } catch let e as ZstdCodec.Failure {
            throw ZarrArray.fail(name, .doesNotDecompress(detail: "\(e)"), file: file)
        }
    }

    func produce(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n: Int
        do { n = try decoder.read(into: buffer) } catch let e as RemoteError { throw e } catch { throw ZarrArray.fail(name, .doesNotDecompress(detail: "\(error)"), file: file) }
        if n < buffer.count {
            throw ZarrArray.fail(name, .endsEarly(produced: decoder.produced, expected: decoder.expected), file: file)
        }
        return n
    }

    func finish() throws {
        do { try decoder.finish() } catch let e as RemoteError { throw e } catch { throw ZarrArray.fail(name, .doesNotDecompress(detail: "\(error)"), file: file) }
    }
}

/// One stored chunk read in order, piece by piece: zstd in a data file decoded as it goes,
/// uncompressed bytes read in place, anything else (inline values, zlib, gzip) decoded whole.
private final class ChunkReader {
    private var decoder: ZstdCodec.FileDecoder?
    private var decoded: AlignedBuffer?
    private var mapped: (MappedFile, offset: Int)?
    private let value: KVValue
    private let bytes: Int
    private var position = 0

    init(_ value: KVValue, bytes: Int, array: ZarrArray, file: String) throws {
        self.value = value
        self.bytes = bytes
        switch (array.codec, value) {
        case (.zstd, .file(let f, let o, let n)):
            do { decoder = try ZstdCodec.FileDecoder(f, offset: o, count: n, expected: bytes) } catch {
                throw ZarrArray.fail(array.name, .doesNotDecompress(detail: "\(error)"), file: file)
            }
        case (nil, .file(let f, let o, let n)) where n == bytes:
            mapped = (f, o)
        default:
            decoded = try array.decode(value, count: bytes, file: file)
        }
    }

    /// A zstd chunk's padding is decoded into this and dropped (made once, on the first skip).
    private var scratch: AlignedBuffer?

    /// The error for a chunk whose data ended before `bytes`: how far it got.
    func endedEarly(_ array: ZarrArray, file: String) -> OrbaxError {
        ZarrArray.fail(array.name, .endsEarly(produced: decoder?.produced ?? position, expected: bytes), file: file)
    }

    /// Moves past the chunk's next `count` bytes (an edge chunk's padding): decoded and dropped
    /// for zstd, not copied at all otherwise. False if it has fewer left.
    func skip(_ count: Int) throws -> Bool {
        guard count <= bytes - position else { return false }
        if let decoder {
            if scratch == nil { scratch = try AlignedBuffer(capacity: 1 << 16) }
            var left = count
            while left > 0 {
                let n = min(left, scratch!.capacity)
                guard try decoder.read(into: UnsafeMutableRawBufferPointer(start: scratch!.pointer, count: n)) == n else { return false }
                left -= n
            }
        } else if let (f, o) = mapped {
            f.dropConsumed(valueStart: o, done: o + position, upTo: o + position + count)
        }
        position += count
        return true
    }

    /// Fills `out` with the chunk's next bytes; false if it has fewer left.
    func read(into out: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard out.count <= bytes - position else { return false }
        if let decoder {
            guard try decoder.read(into: out) == out.count else { return false }
        } else if let (f, o) = mapped {
            if out.count > 0 { out.baseAddress!.copyMemory(from: try f.bytes(at: o + position, count: out.count).baseAddress!, byteCount: out.count) }
            f.dropConsumed(valueStart: o, done: o + position, upTo: o + position + out.count)
        } else if let decoded {
            if out.count > 0 { out.baseAddress!.copyMemory(from: decoded.pointer + position, byteCount: out.count) }
        }
        position += out.count
        return true
    }

    /// Checks that the chunk ended exactly where its shape says.
    func finish() throws {
        try decoder?.finish()
        decoded = nil
        value.release()
    }
}

/// An array split into chunks along one axis only (every chunk spans all the other axes), or
/// into several chunk rows along its first axis: produced in order as the stream goes
/// (`TensorData.streamed`) without ever holding the array. Orbax splits an array over ~2 GB
/// along one axis (a full-size pi0's stacked `gating_einsum`, 2.4 GB of bf16, is two chunks
/// along its last axis); assembled whole, it took 2.4 GB in `ckpt-read`, and another while the
/// next array was decoded ahead.
///
/// Split along axis `b`, the array in row-major order is, for each index of the axes before
/// `b`, one piece of every chunk in turn (its extent along `b` times the axes after): the
/// chunks are read side by side, each in its own order, a piece at a time (zstd chunks decoded
/// as they go: a decoder window each). The edge chunk's padding (zarr stores it at full size)
/// is read past. Other splits with several chunk rows along the first axis are decoded a band
/// of chunk rows at a time (all cores at once) and the band emitted.
final class ZarrSplitArray: ChunkProducer {
    private let array: ZarrArray
    private let file: String
    private let get: (String) throws -> KVValue?
    /// The split axis when the chunks are read side by side.
    private let axis: Int?
    /// Side by side: bytes of one row of the axes after the split one, each chunk's valid
    /// extent along it, and the outer index being emitted.
    private let innerBytes: Int
    private var readers: [ChunkReader] = []
    private var outer = 0
    private let outerCount: Int
    private var piece = 0
    private var pieceLeft = 0
    /// Band mode: the next chunk row, the current band and how far it was emitted.
    private var nextBand = 0
    private var band: AlignedBuffer?
    private var bandPosition = 0

    /// Most chunks read side by side (each holds a zstd window, up to a few MiB).
    static let maxSideBySide = 64

    /// The axis to read side by side along: the only one split, at most `maxSideBySide` ways,
    /// every other chunk extent equal to the array's.
    static func sideBySideAxis(_ a: ZarrArray) -> Int? {
        guard a.innerChunks == nil, !a.shape.contains(0) else { return nil }
        let grid = a.grid
        let split = grid.indices.filter { grid[$0] > 1 }
        guard split.count == 1, let b = split.first, grid[b] <= maxSideBySide,
              a.shape.indices.allSatisfy({ $0 == b || a.chunks[$0] == a.shape[$0] }) else { return nil }
        return b
    }

    /// Whether the array streams (side by side, or in bands of chunk rows).
    static func streams(_ a: ZarrArray) -> Bool {
        sideBySideAxis(a) != nil || (a.innerChunks == nil && a.shape.count > 1 && a.grid[0] > 1 && !a.shape.contains(0))
    }

    init(_ array: ZarrArray, file: String, get: @escaping (String) throws -> KVValue?) {
        self.array = array
        self.file = file
        self.get = get
        axis = ZarrSplitArray.sideBySideAxis(array)
        let b = axis ?? 0
        innerBytes = array.shape.dropFirst(b + 1).reduce(1, *) * array.dtype.size
        outerCount = array.shape.prefix(b).reduce(1, *)
    }

    private func fail(_ error: Error) -> Error {
        error is OrbaxError ? error : ZarrArray.fail(array.name, .doesNotDecompress(detail: "\(error)"), file: file)
    }

    /// Opens every chunk along the split axis (side by side).
    private func openReaders(_ b: Int) throws {
        let chunkBytes = array.chunks.reduce(1, *) * array.dtype.size
        for j in 0..<array.grid[b] {
            var index = [Int](repeating: 0, count: array.shape.count)
            index[b] = j
            let key = array.chunkKey(index)
            guard let value = try get(key) else { throw ZarrArray.fail(array.name, .missingChunk(key: key), file: file) }
            readers.append(try ChunkReader(value, bytes: chunkBytes, array: array, file: file))
        }
    }

    private func validExtent(_ j: Int, _ b: Int) -> Int { min(array.chunks[b], array.shape[b] - j * array.chunks[b]) }

    func produce(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard let b = axis else { return try produceBands(into: buffer) }
        do {
            if readers.isEmpty { try openReaders(b) }
            var filled = 0
            while filled < buffer.count && outer < outerCount {
                if pieceLeft == 0 { pieceLeft = validExtent(piece, b) * innerBytes }
                let n = min(buffer.count - filled, pieceLeft)
                guard try readers[piece].read(into: UnsafeMutableRawBufferPointer(start: buffer.baseAddress! + filled, count: n)) else {
                    throw readers[piece].endedEarly(array, file: file)
                }
                filled += n
                pieceLeft -= n
                if pieceLeft == 0 {
                    // The edge chunk's rows beyond the array, after each of its pieces.
                    guard try readers[piece].skip((array.chunks[b] - validExtent(piece, b)) * innerBytes) else {
                        throw readers[piece].endedEarly(array, file: file)
                    }
                    piece += 1
                    if piece == readers.count { piece = 0; outer += 1 }
                }
            }
            return filled
        } catch { throw fail(error) }
    }

    /// Band mode: the chunk rows along the first axis decoded one band at a time.
    private func produceBands(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let rowBytes = array.shape.dropFirst().reduce(1, *) * array.dtype.size
        var filled = 0
        while filled < buffer.count {
            if band == nil || bandPosition == band!.count {
                guard nextBand < array.grid[0] else { break }
                // One band buffer, reused: each band overwrites all of it.
                let bytes = array.elementRows(nextBand..<(nextBand + 1)).count * rowBytes
                if band == nil || band!.capacity < bytes { band = try AlignedBuffer.reusable(capacity: max(bytes, 1)) }
                band!.count = bytes
                try array.fill(band!, rows: nextBand..<(nextBand + 1), file: file, get: get)
                nextBand += 1
                bandPosition = 0
            }
            let n = min(buffer.count - filled, band!.count - bandPosition)
            (buffer.baseAddress! + filled).copyMemory(from: band!.pointer + bandPosition, byteCount: n)
            filled += n
            bandPosition += n
        }
        return filled
    }

    /// Every chunk must end exactly where its shape says (padding included).
    func finish() throws {
        do { for r in readers { try r.finish() } } catch { throw fail(error) }
        readers = []
        band = nil
    }
}
