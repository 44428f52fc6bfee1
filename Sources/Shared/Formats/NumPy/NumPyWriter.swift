/// Writes `.npz` (a STORED zip of `.npy` members, as numpy.savez) or `.npy` (exactly one
/// tensor). Headers are npy 1.0, padded like numpy pads them so data starts 64-aligned
/// within each member. bfloat16 and float8 have no numpy descr: they are written as raw
/// `<V2` / `|V1`, which is what numpy itself writes for ml_dtypes arrays; read them back with
/// `np.load(f)[name].view(ml_dtypes.bfloat16)` (or `ckpt-read --dtype-hint NAME=BF16`).
public final class NumPyWriter: TensorSink {
    public let path: String
    public let overwrite: Bool
    public let single: Bool
    private var output: AtomicOutput?
    private var zip: ZipWriter?
    private var position = 0
    private var count = 0
    private var names = Set<String>()

    public init(path: String, single: Bool, overwrite: Bool) {
        self.path = path
        self.single = single
        self.overwrite = overwrite
    }

    static let descr: [DType: String] = [
        .f64: "<f8", .f32: "<f4", .f16: "<f2", .i64: "<i8", .i32: "<i4", .i16: "<i2", .i8: "|i1", .u8: "|u1", .u16: "<u2",
        .u32: "<u4", .u64: "<u8", .bool: "|b1", .c64: "<c8", .bf16: "<V2",
        .f8e4m3: "|V1", .f8e5m2: "|V1", .f8e8m0: "|V1", .f8e4m3fnuz: "|V1", .f8e5m2fnuz: "|V1",
    ]

    /// numpy's `_write_array_header` for version 1.0: the dict, padded with spaces (and 21 −
    /// len(repr(first dim)) more for growth) so magic + length + header is a multiple of 64.
    public static func header(_ d: TensorDescriptor) -> [UInt8] {
        let shape = d.shape.isEmpty ? "()" : d.shape.count == 1 ? "(\(d.shape[0]),)" : "(" + d.shape.map(String.init).joined(separator: ", ") + ")"
        var text = "{'descr': '\(descr[d.dtype]!)', 'fortran_order': False, 'shape': \(shape), }"
        let growth = 21 - (d.shape.first.map { String($0).count } ?? 0)
        text += String(repeating: " ", count: max(0, growth))
        let padded = ((10 + text.utf8.count + 1 + 63) / 64) * 64
        text += String(repeating: " ", count: padded - 10 - text.utf8.count - 1) + "\n"
        var w = ByteWriter()
        w.raw(NpyHeader.magic)
        w.u8(1); w.u8(0)
        w.u16(UInt16(text.utf8.count))
        w.raw(Array(text.utf8))
        return w.bytes
    }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        if single, let manifest, manifest.count != 1 {
            throw UsageError("npy holds exactly one array; this stream has \(manifest.count) tensors (write .npz instead)")
        }
        let out = try AtomicOutput(path: path, overwrite: overwrite)
        output = out
        if !single { zip = ZipWriter(out.descriptor) }
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        count += 1
        if single && count > 1 { throw UsageError("npy holds exactly one array; the stream has more (write .npz instead)") }
        guard names.insert(d.name).inserted else { throw NumPyError(.duplicateArrayInStream, file: path, tensor: d.name) }
        let h = NumPyWriter.header(d)
        if let zip {
            try zip.begin(d.name + ".npy", size: h.count + d.byteCount)
            try h.withUnsafeBytes { try zip.write($0) }
        } else {
            try h.withUnsafeBytes { try output!.descriptor.pwriteAll($0, at: 0) }
            position = h.count
        }
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        if let zip { try zip.write(chunk) } else {
            try output!.descriptor.pwriteAll(chunk, at: position)
            position += chunk.count
        }
    }

    public func endTensor() throws { try zip?.end() }

    public func finish() throws {
        if single && count != 1 { throw UsageError("npy holds exactly one array; the stream had \(count)") }
        try zip?.finish()
        try output!.commit()
    }

    public func abort() { output?.abort() }
}
