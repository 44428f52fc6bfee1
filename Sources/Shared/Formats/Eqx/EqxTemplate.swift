// Equinox's leaf serialisation (equinox/_serialisation.py, `tree_serialise_leaves`): one NPY
// blob per leaf, in the model's pytree leaf order, with no names; arrays and Python/NumPy
// scalars (dropout rates, `inference` flags) are saved, other leaves are not. So a file can
// only be written against the model it is for: a template of that model gives the order, the
// shapes and dtypes, and the non-array leaves. equimo (`equimo.serialization.load_weights`)
// reads `weights.eqx` beside its `metadata.json`.

/// What an eqx error is about, one case per rule.
public struct EqxError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        case leavesNotJSON(detail: String)
        case leafMalformed(index: Int)
        case blobCount(leaves: Int, blobs: Int)
        case blobDisagrees(leaf: String, detail: String)
        case trailingBytes(count: Int)
        case missingFromStream(leaves: [String])
        case noLeafTakes(tensor: String)
        case leafMismatch(leaf: String, expected: String, got: String)
        case dtypeNotNumPy(dtype: String)
        case metadataNotJSON(detail: String)
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
        let at = tensor.map { "\(file): tensor \($0)" } ?? file
        switch reason {
        case .leavesNotJSON(let d): return "\(at): leaves.json is not a JSON list of {path, shape, dtype}: \(d)"
        case .leafMalformed(let i): return "\(at): leaves.json entry \(i) is not {path, shape, dtype} with a known dtype"
        case .blobCount(let leaves, let blobs): return "\(at): leaves.json lists \(leaves) leaves, weights.eqx holds \(blobs) arrays"
        case .blobDisagrees(let leaf, let d): return "\(at): leaf \(leaf): weights.eqx disagrees with leaves.json (\(d))"
        case .trailingBytes(let n): return "\(at): \(n) bytes after the last array of weights.eqx"
        case .missingFromStream(let leaves):
            return "\(at): \(leaves.count) array leaves are not in the stream (give them, or --keep GLOB to copy them from the template): "
                + leaves.prefix(20).joined(separator: ", ") + (leaves.count > 20 ? ", ..." : "")
        case .noLeafTakes(let t): return "\(at): no leaf of the template is named \(t) (every tensor must land in a leaf)"
        case .leafMismatch(let leaf, let expected, let got): return "\(at): leaf \(leaf) is \(expected) in the template, the stream has \(got)"
        case .dtypeNotNumPy(let d): return "\(at): \(d) has no NumPy dtype an eqx file can hold"
        case .metadataNotJSON(let d): return "\(at): metadata.json is not JSON: \(d)"
        }
    }
}

/// A template model's leaves: `leaves.json` (path, shape, dtype in leaf order) checked against
/// its `weights.eqx` (where each leaf's blob is).
public struct EqxTemplate {
    public struct Leaf: Equatable {
        public var path: String
        public var dtype: DType
        public var shape: [Int]
        /// The leaf's whole NPY blob in the template's weights.eqx.
        public var blob: Range<Int>
        /// Rank 0: a scalar (a dropout rate, a flag), copied from the template unless the stream has it.
        public var isScalar: Bool { shape.isEmpty }
    }

    public let folder: String
    public let leaves: [Leaf]
    public let weights: MappedFile
    /// `metadata.json`, when the template has one.
    public let metadata: JSONValue?

    public init(folder: String) throws {
        self.folder = folder
        let leavesPath = folder + "/leaves.json"
        let list: [JSONValue]
        do {
            guard let a = try JSONParser.parse(try readWholeFile(leavesPath, limit: 1 << 28)).arrayValue else {
                throw EqxError(.leavesNotJSON(detail: "not a list"), file: leavesPath)
            }
            list = a
        } catch let e as JSONParser.Error { throw EqxError(.leavesNotJSON(detail: e.description), file: leavesPath) }
        let weightsPath = folder + "/weights.eqx"
        guard let weights = try MappedFile.open(weightsPath) else { throw EqxError(.blobCount(leaves: list.count, blobs: 0), file: weightsPath) }
        self.weights = weights
        var leaves: [Leaf] = []
        var offset = 0
        for (i, entry) in list.enumerated() {
            guard let o = entry.objectValue, let path = o["path"]?.stringValue, let shapeValues = o["shape"]?.arrayValue,
                  let dtypeName = o["dtype"]?.stringValue, let dtype = FlaxMsgpack.dtypesByName[dtypeName] else {
                throw EqxError(.leafMalformed(index: i), file: leavesPath)
            }
            let shape = try shapeValues.map { v -> Int in
                guard let n = v.nonNegativeIntValue else { throw EqxError(.leafMalformed(index: i), file: leavesPath) }
                return n
            }
            guard offset < weights.size else { throw EqxError(.blobCount(leaves: list.count, blobs: i), file: weightsPath) }
            var hints = DTypeHints()
            hints.rules = [("*", dtype)]  // bfloat16 and float8 are saved as opaque <V2 / |V1
            let rest = try weights.bytes(at: offset, count: weights.size - offset)
            let header = try NpyHeader.parse(rest, name: path, hints: hints, file: weightsPath)
            let d: TensorDescriptor
            do { d = try TensorDescriptor(name: path, dtype: header.dtype, shape: header.shape) } catch {
                throw EqxError(.blobDisagrees(leaf: path, detail: "\(error)"), file: weightsPath)
            }
            guard header.dtype == dtype, header.shape == shape, !header.bigEndian, !header.fortranOrder else {
                throw EqxError(.blobDisagrees(leaf: path, detail: "\(header.dtype.rawValue)\(header.shape) stored"), file: weightsPath)
            }
            guard d.byteCount <= weights.size - offset - header.dataOffset else {
                throw EqxError(.blobCount(leaves: list.count, blobs: i), file: weightsPath)
            }
            let end = offset + header.dataOffset + d.byteCount
            leaves.append(Leaf(path: path, dtype: dtype, shape: shape, blob: offset..<end))
            offset = end
        }
        guard offset == weights.size else { throw EqxError(.trailingBytes(count: weights.size - offset), file: weightsPath) }
        self.leaves = leaves
        let metadataPath = folder + "/metadata.json"
        if let bytes = try? readWholeFile(metadataPath, limit: 1 << 26) {
            do { metadata = try JSONParser.parse(bytes) } catch {
                throw EqxError(.metadataNotJSON(detail: error.description), file: metadataPath)
            }
        } else {
            metadata = nil
        }
    }
}
