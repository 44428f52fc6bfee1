import Glibc

/// Writes `OUT/weights.eqx` (and `OUT/metadata.json`) for the model a template describes
/// (`ckpt-write --format eqx --like TEMPLATE OUT`): each leaf's blob, in leaf order, from the
/// stream tensor of that leaf's path (shape and dtype checked), from the template for scalar
/// leaves and for leaves matching `keep` (buffers a source does not store, e.g. RoPE
/// frequencies), and zeros for leaves matching `zeros` (parts the source model does not have,
/// e.g. a qkv bias of a model built without one). A stream tensor no leaf takes, or an array
/// leaf nothing fills, is an error.
///
/// With a manifest every blob's place is known before any data arrives (NPY headers of numpy's
/// exact padding, written first), and each chunk goes straight to its place; without one the
/// data is spooled. A template `metadata.json` is carried over with `weights_sha256` (equimo's
/// versioned form) set to the digest of the file written.
public final class EqxWriter: TensorSink {
    public let folder: String
    public let template: EqxTemplate
    public let keep: [String]
    public let zeros: [String]
    public let overwrite: Bool
    private let log: (String) -> Void

    private var weights: AtomicOutput?
    private var metadataOutput: AtomicOutput?
    private var createdFolder = false
    private var spool: Spool?
    private var manifest: [TensorDescriptor]?
    /// Per tensor (manifest order): where its data goes in weights.eqx.
    private var places: [Int] = []
    private var index = -1
    private var written = 0
    private var spoolOffset = 0
    private var size = 0

    public init(folder: String, template: EqxTemplate, keep: [String] = [], zeros: [String] = [], overwrite: Bool,
                log: @escaping (String) -> Void) {
        self.folder = folder
        self.template = template
        self.keep = keep
        self.zeros = zeros
        self.overwrite = overwrite
        self.log = log
    }

    private var weightsPath: String { folder + "/weights.eqx" }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        var st = stat()
        if stat(folder, &st) != 0 {
            guard mkdir(folder, 0o755) == 0 else { throw IOError(.mkdir, path: folder, errno: errno) }
            createdFolder = true
        }
        self.manifest = manifest
        spool = try Spool.layOutOrSpool(manifest, beside: weightsPath, log: log, layOut: layOut)
    }

    /// Places every leaf's blob, writes the headers and the template's blobs, and records where
    /// each tensor's data goes.
    private func layOut(_ tensors: [TensorDescriptor]) throws {
        var byName: [String: Int] = [:]
        for (i, d) in tensors.enumerated() {
            guard byName.updateValue(i, forKey: d.name) == nil else { throw StreamError(.duplicateTensor, source: weightsPath, tensor: d.name) }
        }
        let leafPaths = Set(template.leaves.map(\.path))
        if let stray = tensors.first(where: { !leafPaths.contains($0.name) }) {
            throw EqxError(.noLeafTakes(tensor: stray.name), file: template.folder)
        }
        var skeleton: [(offset: Int, bytes: UnsafeRawBufferPointer?, header: [UInt8])] = []
        var missing: [String] = []
        var position = 0
        places = [Int](repeating: 0, count: tensors.count)
        for leaf in template.leaves {
            if let i = byName[leaf.path] {
                let d = tensors[i]
                guard d.dtype == leaf.dtype, d.shape == leaf.shape else {
                    throw EqxError(.leafMismatch(leaf: leaf.path, expected: "\(leaf.dtype.rawValue)\(leaf.shape)", got: "\(d.dtype.rawValue)\(d.shape)"),
                                   file: template.folder, tensor: d.name)
                }
                guard NumPyWriter.descr[d.dtype] != nil else { throw EqxError(.dtypeNotNumPy(dtype: d.dtype.rawValue), file: template.folder, tensor: d.name) }
                let header = NumPyWriter.header(d)
                skeleton.append((position, nil, header))
                places[i] = position + header.count
                position += header.count + d.byteCount
            } else if zeros.contains(where: { globMatches($0, leaf.path) }) {
                // The header only: the file is sized with ftruncate, so the data reads as zeros.
                let d = try TensorDescriptor(name: leaf.path, dtype: leaf.dtype, shape: leaf.shape)
                let header = NumPyWriter.header(d)
                skeleton.append((position, nil, header))
                position += header.count + d.byteCount
            } else if leaf.isScalar || keep.contains(where: { globMatches($0, leaf.path) }) {
                skeleton.append((position, try template.weights.bytes(at: leaf.blob.lowerBound, count: leaf.blob.count), []))
                position += leaf.blob.count
            } else {
                missing.append(leaf.path)
            }
        }
        guard missing.isEmpty else { throw EqxError(.missingFromStream(leaves: missing), file: template.folder) }
        let out = try AtomicOutput(path: weightsPath, overwrite: overwrite)
        weights = out
        try withExtendedLifetime(template.weights) {
            for (offset, blob, header) in skeleton {
                if let blob { try out.descriptor.pwriteAll(blob, at: offset) } else {
                    try header.withUnsafeBytes { try out.descriptor.pwriteAll($0, at: offset) }
                }
            }
        }
        if ftruncate(out.descriptor.rawValue, off_t(position)) != 0 {
            throw IOError(.write, path: out.temporaryPath, errno: errno, detail: "reserving \(position) bytes")
        }
        size = position
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        index += 1
        written = 0
        if let spool {
            spoolOffset = try spool.add(d, file: weightsPath)
        } else {
            try Spool.checkNext(d, at: index, of: manifest, file: weightsPath)
        }
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        if let spool {
            try spool.output.descriptor.pwriteAll(chunk, at: spoolOffset + written)
        } else {
            guard written + chunk.count <= manifest![index].byteCount else {
                throw StreamError(.tensorLengthMismatch(declared: UInt64(manifest![index].byteCount), received: UInt64(written + chunk.count)),
                                  source: weightsPath, tensor: manifest![index].name)
            }
            try weights!.descriptor.pwriteAll(chunk, at: places[index] + written)
        }
        written += chunk.count
    }

    public func endTensor() throws {}

    public func finish() throws {
        if let spool {
            try layOut(spool.tensors.map(\.descriptor))
            for i in spool.tensors.indices {
                try spool.copy(i, to: [(weights!.descriptor, places[i], spool.tensors[i].descriptor.byteCount)])
            }
            spool.remove()
            self.spool = nil
        } else {
            try Spool.checkComplete(index + 1, of: manifest, file: weightsPath)
        }
        if case .object(var meta)? = template.metadata {
            if meta["weights_sha256"] != nil { meta["weights_sha256"] = .string(try digest(weights!)) }
            let out = try AtomicOutput(path: folder + "/metadata.json", overwrite: overwrite)
            metadataOutput = out
            try JSONWriter.pythonIndented(.object(meta), sortKeys: false).withUnsafeBytes { try out.descriptor.writeAll($0) }
        }
        try weights!.commit()
        try metadataOutput?.commit()
    }

    /// SHA-256 of what was written, read back from the temporary file.
    private func digest(_ out: AtomicOutput) throws -> String {
        var sha = SHA256()
        let buffer = try AlignedBuffer(capacity: 8 << 20)
        var at = 0
        while at < size {
            let n = min(buffer.capacity, size - at)
            try out.descriptor.pread(into: UnsafeMutableRawBufferPointer(start: buffer.pointer, count: n), at: at)
            sha.update(UnsafeRawBufferPointer(start: buffer.pointer, count: n))
            at += n
        }
        return sha.hexDigest()
    }

    public func abort() {
        spool?.remove()
        weights?.abort()
        metadataOutput?.abort()
        if createdFolder { rmdir(folder) }
    }
}
