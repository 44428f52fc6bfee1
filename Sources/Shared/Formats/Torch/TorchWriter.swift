/// Writes a torch.save-compatible zip (`--format torch`): storages first, one per tensor and
/// each streamed straight into its STORED, 64-aligned record, then `data.pkl` (built from
/// the names and descriptors, so memory stays at a chunk plus the list of tensors), then
/// `byteorder` and `version`. `torch.load(weights_only=True)` loads it, with and without
/// mmap=True. No `.format_version` record: torch would then assume miniz's exact record
/// order to compute offsets (torch/serialization.py), and ours differs.
public final class TorchWriter: TensorSink {
    public let path: String
    public let overwrite: Bool
    /// Nest the tensors under this key (`{"model": {...}}`), or nil for a flat dict.
    public let nest: String?
    private var output: AtomicOutput?
    private var zip: ZipWriter?
    private let prefix: String
    private var tensors: [TensorDescriptor] = []
    private var names = Set<String>()

    public init(path: String, nest: String? = nil, overwrite: Bool) {
        self.path = path
        self.nest = nest
        self.overwrite = overwrite
        // torch uses the file's base name without extension as the record folder.
        var base = splitPath(path).name
        if let dot = base.lastIndex(of: "."), dot != base.startIndex { base = String(base[..<dot]) }
        prefix = base.isEmpty ? "archive" : base
    }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        let out = try AtomicOutput(path: path, overwrite: overwrite)
        output = out
        zip = ZipWriter(out.descriptor)
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        guard names.insert(d.name).inserted else {
            throw StreamError(.duplicateTensor, source: path, tensor: d.name)
        }
        try zip!.begin("\(prefix)/data/\(tensors.count)", size: d.byteCount)
        tensors.append(d)
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws { try zip!.write(chunk) }

    public func endTensor() throws { try zip!.end() }

    public func finish() throws {
        let z = zip!
        try z.add("\(prefix)/data.pkl", TorchPickle.stateDict(tensors, nest: nest))
        try z.add("\(prefix)/byteorder", Array("little".utf8))
        try z.add("\(prefix)/version", Array("3\n".utf8))
        try z.finish()
        try output!.commit()
    }

    public func abort() { output?.abort() }
}

/// Emits `data.pkl` for a dict of tensors with the opcode subset torch's weights_only
/// unpickler accepts (protocol 2, no memo): each tensor is `_rebuild_tensor_v2` over a typed
/// storage, or `_rebuild_tensor_v3` over an UntypedStorage for dtypes without a legacy
/// storage class (float8, uint16/32/64).
public enum TorchPickle {
    static let legacyStorage: [DType: String] = [
        .f64: "DoubleStorage", .f32: "FloatStorage", .f16: "HalfStorage", .bf16: "BFloat16Storage", .i64: "LongStorage",
        .i32: "IntStorage", .i16: "ShortStorage", .i8: "CharStorage", .u8: "ByteStorage", .bool: "BoolStorage",
        .c64: "ComplexFloatStorage",
    ]
    static let torchName: [DType: String] = [
        .f8e4m3: "float8_e4m3fn", .f8e5m2: "float8_e5m2", .f8e8m0: "float8_e8m0fnu", .f8e4m3fnuz: "float8_e4m3fnuz",
        .f8e5m2fnuz: "float8_e5m2fnuz", .u16: "uint16", .u32: "uint32", .u64: "uint64",
    ]

    public static func stateDict(_ tensors: [TensorDescriptor], nest: String?) -> [UInt8] {
        var p: [UInt8] = [0x80, 0x02]
        func global(_ module: String, _ name: String) { p += [0x63] + Array("\(module)\n\(name)\n".utf8) }
        func string(_ s: String) {
            let u = Array(s.utf8)
            p += [0x58] + withUnsafeBytes(of: UInt32(u.count).littleEndian, Array.init) + u
        }
        func int(_ v: Int) {
            if v >= 0 && v < 256 { p += [0x4B, UInt8(v)] }
            else if v >= 0 && v < 65536 { p += [0x4D, UInt8(v & 255), UInt8(v >> 8)] }
            else if v >= Int(Int32.min) && v <= Int(Int32.max) { p += [0x4A] + withUnsafeBytes(of: Int32(v).littleEndian, Array.init) }
            else { p += [0x8A, 0x08] + withUnsafeBytes(of: Int64(v).littleEndian, Array.init) }
        }
        func tuple(_ values: [Int]) {
            p.append(0x28)
            for v in values { int(v) }
            p.append(0x74)
        }
        func orderedDict() { global("collections", "OrderedDict"); p += [0x29, 0x52] }

        if let nest {
            p.append(0x7D)  // {
            string(nest)
        }
        orderedDict()
        for (key, d) in tensors.enumerated() {
            string(d.name)
            let v3 = legacyStorage[d.dtype] == nil
            global("torch._utils", v3 ? "_rebuild_tensor_v3" : "_rebuild_tensor_v2")
            p.append(0x28)  // MARK: the argument tuple
            // Persistent id: ('storage', StorageClass, key, 'cpu', numel)
            p.append(0x28)
            string("storage")
            if v3 { global("torch.storage", "UntypedStorage") } else { global("torch", legacyStorage[d.dtype]!) }
            string(String(key))
            string("cpu")
            int(v3 ? d.byteCount : d.elementCount)
            p += [0x74, 0x51]  // TUPLE, BINPERSID
            int(0)  // storage offset
            tuple(d.shape)
            var stride: [Int] = []
            var s = 1
            for n in d.shape.reversed() { stride.insert(s, at: 0); s *= max(n, 1) }
            tuple(stride)
            p.append(0x89)  // requires_grad False
            orderedDict()  // backward hooks
            if v3 { global("torch", torchName[d.dtype]!) }
            p += [0x74, 0x52, 0x73]  // TUPLE, REDUCE, SETITEM
        }
        if nest != nil { p.append(0x73) }
        p.append(0x2E)
        return p
    }
}
