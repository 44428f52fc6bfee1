/// The safetensors validation rules (as in the safetensors crate's `SafeTensorError`),
/// one case each, with the file and tensor they concern.
public struct SafetensorsError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case headerTooSmall(fileSize: Int)
        case headerTooLarge(length: UInt64)
        case invalidHeaderLength(length: UInt64, fileSize: Int)
        case headerNotUTF8
        case invalidHeader(detail: String)
        case unsupportedDType(dtype: String)
        case invalidOffset(expectedStart: Int, begin: Int, end: Int)
        case tensorInvalidInfo(dtype: String, shape: [Int], bytes: Int)
        case validationOverflow
        case dataBeyondFile(dataEnd: Int, available: Int)
        case trailingBytes(count: Int)
        case duplicateTensor(otherFile: String)
        case index(detail: String)
    }

    public var reason: Reason
    public var file: String
    public var tensor: String?

    public init(_ reason: Reason, file: String, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        let prefix = tensor.map { "\(file): tensor \($0)" } ?? file
        switch reason {
        case .headerTooSmall(let size): return "\(prefix): not a safetensors file: \(size) bytes is too small for the 8-byte header length (HeaderTooSmall)"
        case .headerTooLarge(let n): return "\(prefix): header length \(n) exceeds the 100000000-byte limit (HeaderTooLarge)"
        case .invalidHeaderLength(let n, let size): return "\(prefix): header length \(n) runs past the end of the \(size)-byte file (InvalidHeaderLength)"
        case .headerNotUTF8: return "\(prefix): header is not valid UTF-8 (InvalidHeader)"
        case .invalidHeader(let why): return "\(prefix): invalid header: \(why) (InvalidHeaderDeserialization)"
        case .unsupportedDType(let d): return "\(prefix): dtype \(d) is not supported"
        case .invalidOffset(let expected, let begin, let end):
            return "\(prefix): data_offsets [\(begin), \(end)] should start at \(expected): tensors must be contiguous, without holes or overlaps (InvalidOffset)"
        case .tensorInvalidInfo(let dtype, let shape, let bytes):
            return "\(prefix): data_offsets cover \(bytes) bytes, which does not match \(dtype)\(shape) (TensorInvalidInfo)"
        case .validationOverflow: return "\(prefix): shape × dtype size overflows (ValidationOverflow)"
        case .dataBeyondFile(let end, let available):
            return "\(prefix): tensor data ends at byte \(end) of the data section, but the file holds only \(available) (MetadataIncompleteBuffer)"
        case .trailingBytes(let n): return "\(prefix): \(n) bytes after the last tensor's data (MetadataIncompleteBuffer)"
        case .duplicateTensor(let other): return "\(prefix): tensor also appears in \(other)"
        case .index(let why): return "\(prefix): \(why)"
        }
    }
}
