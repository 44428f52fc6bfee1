/// What is wrong with a msgpack (flax) checkpoint, one case per rule, with the file, the
/// byte offset of the value at fault and the tensor (tree path) it belongs to.
public struct MsgpackError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        // msgpack itself
        case truncated(needed: Int, available: Int)
        /// An array or map declares more items than the bytes left could hold.
        case countExceedsInput(count: UInt64)
        case stringNotUTF8
        case unknownType(byte: UInt8)
        case nestingTooDeep(limit: Int)
        case trailingBytes(count: Int)
        case notARegularFile
        // flax's tree
        case duplicateLeaf
        case mapKeyNotStringOrInteger
        case unknownExtType(type: Int8)
        case malformedComplex
        // an ext 1/3 array payload: (shape, dtype name, bin)
        case malformedArrayPayload
        case shapeNotIntegers
        case dtypeNotString
        case unsupportedDType(name: String)
        case dataNotTrailingBin
        case invalidShape(shape: [Int], detail: String)
        case dataSizeMismatch(dtype: String, shape: [Int], needed: Int, holds: Int)
        // a `__msgpack_chunked_array__` map
        case chunkedMarkerNotTrue
        case chunkedNoShapeMap
        case chunkedShapeEntryMalformed(index: Int)
        case chunkedNoChunksMap
        case chunkedChunkNotArray(index: Int)
        case chunkedChunkNotOneDimensional(index: Int)
        case chunkedNoChunks
        case chunkedSizeMismatch(dtype: String, shape: [Int])
    }

    public var reason: Reason
    public var file: String
    public var offset: Int
    public var tensor: String?

    public init(_ reason: Reason, file: String, offset: Int, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.offset = offset
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        "\(file): byte \(offset)" + (tensor.map { ": \($0)" } ?? "") + ": \(reasonText)"
    }

    private var reasonText: String {
        switch reason {
        case .truncated(let needed, _): return "truncated: needs \(needed) more bytes"
        case .countExceedsInput(let count): return "declares \(count) items, more than the bytes left"
        case .stringNotUTF8: return "string is not valid UTF-8"
        case .unknownType(let b): return "byte 0x\(String(b, radix: 16)) is not a msgpack type"
        case .nestingTooDeep(let limit): return "nesting deeper than \(limit)"
        case .trailingBytes(let n): return "\(n) bytes after the msgpack value"
        case .notARegularFile: return "not a regular file"
        case .duplicateLeaf: return "two leaves have this name"
        case .mapKeyNotStringOrInteger: return "map key is not a string or integer"
        case .unknownExtType(let t): return "ext type \(t) is not a flax type"
        case .malformedComplex: return "complex leaf is not (real, imag)"
        case .malformedArrayPayload: return "array payload is not (shape, dtype, data)"
        case .shapeNotIntegers: return "shape holds a non-integer"
        case .dtypeNotString: return "dtype is not a string"
        case .unsupportedDType(let name): return "dtype \(name) is not supported"
        case .dataNotTrailingBin: return "data is not a bin at the end of the payload"
        case .invalidShape(let shape, let detail): return "shape \(shape): \(detail)"
        case .dataSizeMismatch(let dtype, let shape, let needed, let holds):
            return "\(dtype)\(shape) needs \(needed) bytes, the payload holds \(holds)"
        case .chunkedMarkerNotTrue: return "chunked array: marker is not true"
        case .chunkedNoShapeMap: return "chunked array: no shape map"
        case .chunkedShapeEntryMalformed(let i): return "chunked array: shape entry \(i) is malformed"
        case .chunkedNoChunksMap: return "chunked array: no chunks map"
        case .chunkedChunkNotArray(let i): return "chunked array: chunk \(i) is not an array"
        case .chunkedChunkNotOneDimensional(let i): return "chunked array: chunk \(i) is not 1-d of the array's dtype"
        case .chunkedNoChunks: return "chunked array: no chunks"
        case .chunkedSizeMismatch(let dtype, let shape): return "chunked array: chunks do not add up to \(dtype)\(shape)"
        }
    }
}
