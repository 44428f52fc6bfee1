/// What each allowed global means when a pickle calls it (REDUCE / NEWOBJ): torch's
/// `_rebuild_*` functions become `TensorRef`s, containers become containers. Nothing else
/// can be called.
enum TorchRebuild {
    static func call(_ g: PickleGlobal, _ args: [PickleValue], file: String, at: Int) throws -> PickleValue {
        func bad(_ why: String) -> PickleError { PickleError(reason: .badValue("\(g)(): \(why)"), file: file, offset: at) }
        switch (g.module, g.name) {
        case ("collections", "OrderedDict"):
            // Python 3 reduces to OrderedDict() and SETITEMS; Python 2 (torch <= 1.4 era files)
            // passes the items as a list of [key, value] lists.
            let d = PickleDict()
            switch args.first {
            case nil: break
            case .list(let l)?:
                for item in l.items {
                    switch item {
                    case .tuple(let kv) where kv.count == 2: d.entries.append((kv[0], kv[1]))
                    case .list(let kv) where kv.items.count == 2: d.entries.append((kv.items[0], kv.items[1]))
                    default: throw bad("expected [key, value] pairs, got a \(item.typeName)")
                    }
                }
            case .dict(let other)?: d.entries = other.entries
            case .tuple(let items)? where items.isEmpty: break
            case let other?: throw bad("expected a list of [key, value] pairs, got a \(other.typeName)")
            }
            return .dict(d)
        case ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"):
            guard args.count >= 4, case .storage(let storage) = args[0] else { throw bad("expected (storage, offset, size, stride, ...)") }
            if args.count >= 7 { try checkMetadata(args[6], bad) }
            return .tensor(try tensor(storage, dtype: storage.dtype, args[1], args[2], args[3], bad))
        case ("torch._utils", "_rebuild_tensor_v3"):
            guard args.count >= 7, case .storage(let storage) = args[0], case .global(let dt) = args[6],
                  dt.module == "torch", let dtype = PickleGlobal.torchDTypes[dt.name] else {
                throw bad("expected (storage, offset, size, stride, requires_grad, hooks, dtype, ...)")
            }
            if args.count >= 8 { try checkMetadata(args[7], bad) }
            // An untyped storage counts bytes: view it in elements of the tensor's dtype.
            var s = storage
            if s.dtype != dtype {
                guard s.dtype == .u8, s.numel % dtype.size == 0 else { throw bad("storage of \(s.dtype.rawValue) viewed as \(dtype.rawValue)") }
                s.numel /= dtype.size
                s.rootNumel /= dtype.size
                s.dtype = dtype
            }
            return .tensor(try tensor(s, dtype: dtype, args[1], args[2], args[3], bad))
        case ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"), ("torch.nn.parameter", "Parameter"):
            guard let t = args.first, case .tensor = t else { throw bad("expected a tensor") }
            return t
        case ("torch._tensor", "_rebuild_from_type_v2"):
            guard args.count >= 3, case .global(let f) = args[0], case .tuple(let inner) = args[2] else {
                throw bad("expected (function, type, args, state)")
            }
            if case .global(let type) = args[1], type != PickleGlobal(module: "torch.nn.parameter", name: "Parameter"),
               type != PickleGlobal(module: "torch", name: "Tensor") {
                throw bad("tensor subclass \(type) is not supported")
            }
            return try call(f, inner, file: file, at: at)
        case ("torch", "Size"):
            guard let first = args.first, case .tuple = first else { throw bad("expected a tuple") }
            return first
        case ("torch", "device"):
            guard let first = args.first, case .string = first else { throw bad("expected a device name") }
            return first
        case ("_codecs", "encode"):
            // How Python 3 pickles bytes for protocol 2: encode(str, 'latin1').
            guard args.count == 2, case .string(let s) = args[0], case .string(let enc) = args[1],
                  enc == "latin1" || enc == "latin-1" else { throw bad("expected (str, 'latin1')") }
            var out: [UInt8] = []
            for u in s.unicodeScalars {
                guard u.value <= 255 else { throw bad("character beyond latin-1") }
                out.append(UInt8(u.value))
            }
            return .bytes(out)
        case ("builtins", "set"):
            guard let first = args.first, case .list = first else { return .list(PickleList()) }
            return first
        case ("builtins", "bytearray"):
            guard let first = args.first else { return .bytes([]) }
            return first
        default:
            throw bad("cannot be called")
        }
    }

    /// The optional metadata dict of `_rebuild_tensor_v2/v3`: torch's lazy conjugate and
    /// negative bits mean the stored bytes are not the tensor's values.
    static func checkMetadata(_ v: PickleValue, _ bad: (String) -> PickleError) throws {
        guard case .dict(let d) = v else { return }
        for (k, value) in d.entries {
            if case .string(let key) = k, key == "conj" || key == "neg", case .bool(true) = value {
                throw bad("tensor has torch's lazy \(key) bit set: call .resolve_\(key)() before saving")
            }
        }
    }

    static func ints(_ v: PickleValue, _ what: String, _ bad: (String) -> PickleError) throws -> [Int] {
        guard case .tuple(let items) = v else { throw bad("\(what) is not a tuple") }
        return try items.map {
            guard case .int(let i) = $0 else { throw bad("\(what) holds a non-integer") }
            return i
        }
    }

    /// The largest expanded view rebuilt in memory (torch.load returns such views as they are;
    /// written out they take their full size).
    static let maxExpandedView = 1 << 30

    /// Checks a strided view against its storage: non-negative sizes and strides, no overflow,
    /// and every element it addresses inside the storage.
    static func tensor(_ storage: StorageRef, dtype: DType, _ offset: PickleValue, _ size: PickleValue, _ stride: PickleValue,
                       _ bad: (String) -> PickleError) throws -> TensorRef {
        guard case .int(let off) = offset, off >= 0 else { throw bad("storage offset is not a non-negative integer") }
        let shape = try ints(size, "size", bad)
        let strides = try ints(stride, "stride", bad)
        guard shape.count == strides.count else { throw bad("size and stride differ in length") }
        guard shape.allSatisfy({ $0 >= 0 }), strides.allSatisfy({ $0 >= 0 }) else { throw bad("negative size or stride") }
        do { _ = try TensorDescriptor(name: "", dtype: dtype, shape: shape) } catch { throw bad("shape \(shape): \(error.reason)") }
        if !shape.contains(0) {
            var last = off
            for (n, s) in zip(shape, strides) {
                let (m, o1) = (n - 1).multipliedReportingOverflow(by: s)
                let (sum, o2) = last.addingReportingOverflow(m)
                guard !o1, !o2 else { throw bad("strides overflow") }
                last = sum
            }
            guard last < storage.numel else {
                throw bad("view reaches element \(last) of a storage of \(storage.numel) (offset \(off), size \(shape), stride \(strides))")
            }
            // A view with more elements than its storage reads some of them more than once
            // (broadcast by stride 0, or overlapping): it is expanded when read, so its size is
            // bounded here rather than by the file.
            let count = shape.reduce(1) { $0.multipliedReportingOverflow(by: $1).partialValue }
            if count > storage.numel, count * dtype.size > maxExpandedView {
                throw bad("view of \(storage.numel) stored elements expands to \(shape) by stride \(strides) (\(count * dtype.size) bytes): "
                          + "expanded (broadcast or overlapping) views over \(maxExpandedView >> 20) MiB are refused; save tensor.contiguous()")
            }
        }
        return TensorRef(storage: storage, dtype: dtype, storageOffset: off, shape: shape, stride: strides)
    }
}
