/// What is wrong with an Orbax checkpoint, one case per rule: its metadata, its OCDBT store
/// (tensorstore's key-value B+tree) or its zarr arrays, with the file, byte offset and array
/// concerned.
public struct OrbaxError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        // The checkpoint folder and _METADATA
        case missingMetadata
        case notACheckpoint
        case noSuchStep(step: Int, steps: [Int])
        case metadataNotJSON(detail: String)
        case noTreeMetadata
        case malformedTreeEntry
        case keyNotString
        case unsupportedValueType(param: String, valueType: String)
        case nothingUnderRoot(root: String)
        case duplicateLeaf(name: String)
        case noZarrMetadata
        case zarrFormatMismatch(key: String, format: Int)
        case chunkSizeMismatch(holds: Int, expected: Int)

        // OCDBT envelope (format 4.2)
        case tooShortForHeader
        case badMagic(found: UInt32, expected: UInt32)
        case lengthMismatch(declared: UInt64, actual: Int)
        case checksumMismatch(stored: UInt32, computed: UInt32)
        case unsupportedFormatVersion(version: UInt64)
        case unknownCompression(method: UInt64)
        case decompressionFailed(detail: String)
        // OCDBT fields
        case truncated(needed: Int, available: Int)
        case varintTooLong
        case varintOverflow
        case valueOutOfRange(value: UInt64, max: UInt64)
        case numberedManifest(kind: Int)
        case badVersionTreeArity(log2: Int)
        case noVersions
        case dataFilePrefixTooLong
        case basePathTooLong
        case dataFilePathEscapes(path: String)
        case referenceOutsideFile(offset: UInt64, length: UInt64, fileSize: Int)
        case treeTooDeep(limit: Int)
        case heightMismatch(node: Int, parent: Int)
        case emptyNode
        case keyPrefixTooLong
        case keysNotIncreasing
        case inlineValueTooLarge(length: Int)
        /// A version, child node or value refers to a data file, and the table lists none.
        case referenceWithoutDataFiles
        case unknownValueKind(kind: Int)
        case subtreePrefixTooLong

        // zarr v3 shard index
        case shardShorterThanIndex(key: String)
        case shardIndexChecksumMismatch(key: String)
        case innerChunkOutsideShard(key: String, index: Int)
        /// A zarr array's rules (`ZarrProblem`).
        case zarr(ZarrProblem)

        // Writing
        case noZarrDType(dtype: String)
        case reservedKey
        case paramNameClash(param: String)
    }

    public var reason: Reason
    public var file: String
    public var offset: Int?
    public var tensor: String?

    public init(_ reason: Reason, file: String, offset: Int? = nil, tensor: String? = nil) {
        self.reason = reason
        self.file = file
        self.offset = offset
        self.tensor = tensor
    }

    /// A short read in OCDBT bytes, at `offset` of `file`.
    init(_ e: ByteCursorError, file: String, offset: Int) {
        let r: Reason
        switch e.reason {
        case .truncated(let needed, let available): r = .truncated(needed: needed, available: available)
        case .varintTooLong: r = .varintTooLong
        case .varintOverflow: r = .varintOverflow
        case .indexOutOfRange: r = .truncated(needed: 1, available: 0)
        }
        self.init(r, file: file, offset: offset)
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        var s = file
        if let offset { s += ": byte \(offset)" }
        if let tensor { s += ": array \(tensor)" }
        return s + ": " + reasonText
    }

    private var reasonText: String {
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        switch reason {
        case .missingMetadata: return "missing _METADATA: orbax needs it to restore, and so do we (it names the arrays)"
        case .notACheckpoint: return "not an Orbax checkpoint (no _METADATA, no step folders)"
        case .noSuchStep(let step, let steps): return "no step \(step) (steps: \(steps.map(String.init).joined(separator: ", ")))"
        case .metadataNotJSON(let detail): return "_METADATA is not JSON: \(detail)"
        case .noTreeMetadata: return "no tree_metadata"
        case .malformedTreeEntry: return "malformed tree_metadata entry"
        case .keyNotString: return "key_metadata without a string key"
        case .unsupportedValueType(let param, let type): return "leaf \(param) has value_type \(type), which is not supported"
        case .nothingUnderRoot(let root): return "no array is under --root \(root)"
        case .duplicateLeaf(let name): return "two leaves are named \(name)"
        case .noZarrMetadata: return "no zarr metadata (.zarray or zarr.json) for this array"
        case .zarrFormatMismatch(let key, let format): return "zarr: \(key) declares zarr_format \(format)"
        case .chunkSizeMismatch(let holds, let expected): return "zarr: chunk holds \(holds) bytes, expected \(expected)"

        case .tooShortForHeader: return "OCDBT: too short for an OCDBT header"
        case .badMagic(let found, let expected): return "OCDBT: bad magic \(hex(found)), expected \(hex(expected))"
        case .lengthMismatch(let declared, let actual): return "OCDBT: declares \(declared) bytes, has \(actual)"
        case .checksumMismatch(let stored, let computed): return "OCDBT: crc32c mismatch (stored \(hex(stored)), computed \(hex(computed)))"
        case .unsupportedFormatVersion(let v): return "OCDBT: unsupported format version \(v)"
        case .unknownCompression(let m): return "OCDBT: unknown compression \(m)"
        case .decompressionFailed(let detail): return "OCDBT: zstd: \(detail)"
        case .truncated(let needed, _): return "OCDBT: truncated: needs \(needed) bytes"
        case .varintTooLong: return "OCDBT: varint too long"
        case .varintOverflow: return "OCDBT: varint overflows 64 bits"
        case .valueOutOfRange(let v, let max): return "OCDBT: value \(v) out of range (at most \(max))"
        case .numberedManifest(let kind): return "OCDBT: numbered manifests (manifest_kind \(kind)) are not supported"
        case .badVersionTreeArity(let log2): return "OCDBT: version_tree_arity_log2 \(log2)"
        case .noVersions: return "OCDBT: no versions"
        case .dataFilePrefixTooLong: return "OCDBT: data file path prefix longer than the previous path"
        case .basePathTooLong: return "OCDBT: base path longer than the path"
        case .dataFilePathEscapes(let path): return "OCDBT: data file path \(path) leaves the checkpoint"
        case .referenceOutsideFile(let offset, let length, let size): return "OCDBT reference [\(offset), +\(length)) lies outside the \(size)-byte file"
        case .treeTooDeep(let limit): return "OCDBT: B+tree deeper than \(limit)"
        case .heightMismatch(let node, let parent): return "OCDBT: node height \(node), its parent says \(parent)"
        case .emptyNode: return "OCDBT: empty node"
        case .keyPrefixTooLong: return "OCDBT: key prefix longer than the previous key"
        case .keysNotIncreasing: return "OCDBT: keys not strictly increasing"
        case .inlineValueTooLarge(let n): return "OCDBT: inline value of \(n) bytes is over 1 MiB"
        case .referenceWithoutDataFiles: return "OCDBT: reference to a data file, with no data files"
        case .unknownValueKind(let k): return "OCDBT: unknown value kind \(k)"
        case .subtreePrefixTooLong: return "OCDBT: subtree prefix longer than its key"

        case .shardShorterThanIndex(let key): return "zarr: shard \(key) is shorter than its index"
        case .shardIndexChecksumMismatch(let key): return "zarr: shard \(key): index crc32c mismatch"
        case .innerChunkOutsideShard(let key, let i): return "zarr: shard \(key): inner chunk \(i) lies outside the shard"
        case .zarr(let problem): return "zarr: \(problem)"

        case .noZarrDType(let dtype): return "dtype \(dtype) has no zarr v2 name orbax reads"
        case .reservedKey: return "name has an empty or reserved key"
        case .paramNameClash(let param): return "two tensors map to orbax param name \(param) (orbax joins keys with '.')"
        }
    }
}
