/// Everything that can be wrong with a ckpt stream, one case per rule, each reported with
/// the stream's name, the byte offset of the frame at fault and the tensor it belongs to.
public struct StreamError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        /// Not one byte arrived (the stage before failed before it wrote anything).
        case empty
        case badMagic
        case unsupportedVersion(major: UInt16, minor: UInt16)
        case nonZeroReserved(field: String)
        /// The bytes after a frame up to the next multiple of 64 are not zero.
        case badPadding(kind: String)
        /// The input ended before the end frame.
        case truncated(inside: String)
        case badMarker(found: UInt32)
        case unknownCriticalFrame(kind: UInt8)
        case unexpectedFrame(got: String, expected: String)
        case frameTooLarge(kind: String, length: UInt64, limit: Int)
        case malformedFrame(kind: String, reason: String)
        case unknownDType(name: String)
        case badShape(detail: String)
        case badJSON(detail: String)
        case chunkOutOfOrder(expectedOffset: UInt64, got: UInt64)
        case chunkBeyondTensor(offset: UInt64, length: UInt64, tensorLength: UInt64)
        case unknownCodec(codec: UInt32)
        case decompressionFailed(detail: String)
        case chunkCRCMismatch(chunkOffset: UInt64, expected: UInt32, actual: UInt32)
        case tensorCRCMismatch(expected: UInt32, actual: UInt32)
        case tensorLengthMismatch(declared: UInt64, received: UInt64)
        case manifestMismatch(detail: String)
        /// Two tensors of one stream have the same name (a stream without a manifest can).
        case duplicateTensor
        case endMismatch(detail: String)
        case trailingData
    }

    public var reason: Reason
    public var source: String
    public var offset: Int?
    public var tensor: String?

    public init(_ reason: Reason, source: String, offset: Int? = nil, tensor: String? = nil) {
        self.reason = reason
        self.source = source
        self.offset = offset
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        var where_ = source
        if let offset { where_ += ": byte \(offset)" }
        if let tensor { where_ += ": tensor \(tensor)" }
        return "\(where_): \(reasonText)"
    }

    private var reasonText: String {
        switch reason {
        case .empty: return "the input is empty: no stream arrived (did the stage before this one fail?)"
        case .badMagic: return "not a ckpt stream (bad magic)"
        case .unsupportedVersion(let major, let minor):
            return "ckpt stream version \(major).\(minor) is not supported (this build reads 1.x)"
        case .nonZeroReserved(let field): return "reserved field \(field) is not zero"
        case .badPadding(let kind):
            return "the \(kind) frame is not followed by zero padding (frames are padded with zeros to a multiple of 64 bytes)"
        case .truncated(let inside): return "truncated stream: input ended inside \(inside) (no end frame)"
        case .badMarker(let m): return "frame does not start with the FFFFFFFF marker (found \(hex(m)))"
        case .unknownCriticalFrame(let k): return "unknown critical frame kind \(hex(k))"
        case .unexpectedFrame(let got, let expected): return "unexpected \(got) frame, expected \(expected)"
        case .frameTooLarge(let kind, let length, let limit):
            return "\(kind) frame declares \(length) bytes, more than the limit of \(limit)"
        case .malformedFrame(let kind, let reason): return "malformed \(kind) frame: \(reason)"
        case .unknownDType(let d): return "unknown dtype \"\(d)\""
        case .badShape(let s): return "invalid shape: \(s)"
        case .badJSON(let s): return "invalid JSON: \(s)"
        case .chunkOutOfOrder(let e, let g): return "chunk at tensor offset \(g), expected \(e) (chunk lost or reordered)"
        case .chunkBeyondTensor(let o, let l, let t):
            return "chunk [\(o), \(o + l)) extends beyond the tensor's \(t) bytes"
        case .unknownCodec(let c): return "unknown chunk codec \(c)"
        case .decompressionFailed(let m): return "decompression failed: \(m)"
        case .chunkCRCMismatch(let o, let e, let a):
            return "crc32 mismatch in chunk at tensor offset \(o): stored \(hex(e)), computed \(hex(a)) (data corrupted)"
        case .tensorCRCMismatch(let e, let a):
            return "crc32 mismatch: tensor-end frame says \(hex(e)), data gives \(hex(a))"
        case .tensorLengthMismatch(let d, let r): return "tensor declares \(d) bytes but \(r) arrived"
        case .manifestMismatch(let s): return "stream contradicts its manifest: \(s)"
        case .duplicateTensor: return "tensor name appears twice in the stream"
        case .endMismatch(let s): return "end frame does not match the stream: \(s)"
        case .trailingData: return "data after the end frame"
        }
    }
}

/// `v` in hexadecimal, two digits per byte of its type (a one-byte field prints as 0x10).
func hex<T: FixedWidthInteger & UnsignedInteger>(_ v: T) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, T.bitWidth / 4 - s.count)) + s
}
