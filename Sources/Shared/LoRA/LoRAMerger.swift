import Glibc

/// `lora-merge` as a tensor source over another: every adapter pair is folded into its
/// base, adapter tensors are consumed, everything else passes through chunk by chunk.
/// With a manifest upstream, every problem is found before any data is read, and the
/// output manifest (merged bases where their last part arrives) goes out first.
public final class LoRAMerger: TensorSource {
    public struct Options {
        /// nil: chosen from the adapter names (PEFT with an adapter file).
        public var scheme: LoRASchemeKind?
        public var schemes: [LoRASchemeKind: LoRAScheme]
        /// Type of merged tensors (nil: the base's).
        public var outputType: DType?
        public var allowUnmerged = false
        /// Adapter tensors read from an adapter file, with their bytes.
        public var external: [(TensorDescriptor, [UInt8])] = []

        public init(scheme: LoRASchemeKind?, schemes: [LoRASchemeKind: LoRAScheme]) {
            self.scheme = scheme
            self.schemes = schemes
        }
    }

    /// What was done, for the closing line on stderr.
    public struct Summary {
        public var modules: [LoRASchemeKind: Int] = [:]
        public var scales: [String: Int] = [:]
        public var passed = 0
        public var adaptersConsumed = 0
        public var narrowed = 0
        public var narrowedType: DType?
        public var drift = MergeDrift()
        public var flops: Double = 0
        public var mergeSeconds: Double = 0
        public var unmerged: [String] = []
    }

    public let header: StreamHeader
    public private(set) var manifest: [TensorDescriptor]?
    public private(set) var summary = Summary()
    public var scheme: LoRAScheme? { planner.scheme }
    private let upstream: TensorSource
    private var planner: LoRAMergePlanner
    private let options: Options
    private var adapters: [String: (TensorDescriptor, [UInt8])] = [:]
    private var heldBases: [String: (TensorHeader, AlignedBuffer)] = [:]
    private enum Current { case none, upstream, buffer(AlignedBuffer) }
    private var current = Current.none
    private var position = 0
    private var tail: [(TensorHeader, AlignedBuffer)]?
    private let chunkSize = StreamFormat.defaultChunkSize

    public init(upstream: TensorSource, options: Options) throws {
        self.upstream = upstream
        self.options = options
        header = upstream.header
        planner = try LoRAMergePlanner(scheme: options.scheme.flatMap { options.schemes[$0] }, candidates: options.schemes,
                                       outputType: options.outputType, manifest: upstream.manifest,
                                       external: options.external.map(\.0))
        for (d, bytes) in options.external {
            try LoRAMerger.checkFinite(d, bytes)
            adapters[d.name] = (d, bytes)
        }
        if let input = upstream.manifest { manifest = try plan(input) }
    }

    /// Runs the planner over the manifest: the output manifest, or every problem at once.
    private func plan(_ input: [TensorDescriptor]) throws -> [TensorDescriptor] {
        var dry = planner
        var out: [TensorDescriptor] = []
        var problems: [String] = []
        for d in input {
            do {
                switch try dry.consume(d) {
                case .passThrough(let name):
                    var r = d
                    r.name = name
                    out.append(r)
                case .merge(_, _, _, let output, _): out.append(output)
                case .buffer, .hold: break
                }
            } catch {
                problems.append(error.description)
            }
        }
        let left = dry.leftovers()
        if options.allowUnmerged {
            out += left.bases.map { var r = $0; r.name = dry.scheme?.outputName($0.name) ?? $0.name; return r } + left.adapters
        } else if let e = LoRAMergePlanner.leftoverError(left) {
            problems.append(e.description)
        }
        guard problems.isEmpty else { throw LoRAError(problems.joined(separator: "; ")) }
        return out
    }

    private static func checkFinite(_ d: TensorDescriptor, _ bytes: [UInt8]) throws(LoRAError) {
        guard FloatConversion.canWiden(d.dtype) else { return }  // the plan reports the type
        var values = [Float](repeating: 0, count: d.elementCount)
        bytes.withUnsafeBytes { b in values.withUnsafeMutableBufferPointer { FloatConversion.widen(b.baseAddress!, d.dtype, count: d.elementCount, into: $0.baseAddress!) } }
        let bad = values.lazy.filter { !$0.isFinite }.count
        if bad > 0 { throw LoRAError("the adapter holds \(bad) non-finite values (NaN or Inf)", tensors: [d.name]) }
    }

    private func floats(_ name: String) -> [Float] {
        let (d, bytes) = adapters[name]!
        var values = [Float](repeating: 0, count: d.elementCount)
        bytes.withUnsafeBytes { b in values.withUnsafeMutableBufferPointer { FloatConversion.widen(b.baseAddress!, d.dtype, count: d.elementCount, into: $0.baseAddress!) } }
        return values
    }

    /// The whole current upstream tensor.
    private func readWhole(_ d: TensorDescriptor) throws -> AlignedBuffer {
        let buffer = AlignedBuffer(capacity: max(d.byteCount, 1))
        var n = 0
        while let chunk = try upstream.nextChunk() {
            guard n + chunk.count <= d.byteCount else { break }
            (buffer.pointer + n).copyMemory(from: chunk.baseAddress!, byteCount: chunk.count)
            n += chunk.count
        }
        guard n == d.byteCount else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(d.byteCount), received: UInt64(n)), source: "lora-merge", tensor: d.name)
        }
        buffer.count = n
        return buffer
    }

    public func nextTensor() throws -> TensorHeader? {
        current = .none
        position = 0
        if tail != nil { return emitTail() }
        while let t = try upstream.nextTensor() {
            switch try planner.consume(t.descriptor) {
            case .passThrough(let name):
                var h = t
                h.descriptor.name = name
                current = .upstream
                summary.passed += 1
                return h
            case .buffer:
                let data = try readWhole(t.descriptor)
                let bytes = data.copyBytes()
                try LoRAMerger.checkFinite(t.descriptor, bytes)
                adapters[t.descriptor.name] = (t.descriptor, bytes)
            case .hold(let module):
                heldBases[module] = (t, try readWhole(t.descriptor))
            case .merge(let module, let base, let parts, let output, let plan):
                let baseData: (TensorHeader, AlignedBuffer)
                if base.name == t.descriptor.name {
                    baseData = (t, try readWhole(t.descriptor))
                } else {
                    let data = try readWhole(t.descriptor)
                    let bytes = data.copyBytes()
                    try LoRAMerger.checkFinite(t.descriptor, bytes)
                    adapters[t.descriptor.name] = (t.descriptor, bytes)
                    baseData = heldBases.removeValue(forKey: module)!
                }
                let merged = try merge(base: base, data: baseData.1, parts: parts, output: output, plan: plan)
                current = .buffer(merged)
                return TensorHeader(output, attributes: baseData.0.attributes)
            }
        }
        // End of stream: what never met its partner.
        let left = planner.leftovers()
        if let e = LoRAMergePlanner.leftoverError(left) {
            guard options.allowUnmerged else { throw e }
            var rest: [(TensorHeader, AlignedBuffer)] = []
            for b in left.bases {
                let module = heldBases.first { $0.value.0.descriptor.name == b.name }!.key
                var (h, data) = heldBases.removeValue(forKey: module)!
                h.descriptor.name = planner.scheme?.outputName(b.name) ?? b.name
                rest.append((h, data))
            }
            for a in left.adapters {
                let (d, bytes) = adapters[a.name]!
                let buffer = AlignedBuffer(capacity: max(bytes.count, 1))
                bytes.withUnsafeBytes { buffer.pointer.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
                buffer.count = bytes.count
                rest.append((TensorHeader(d), buffer))
            }
            summary.unmerged = rest.map(\.0.descriptor.name)
            tail = rest
            return emitTail()
        }
        return nil
    }

    private func emitTail() -> TensorHeader? {
        guard let next = tail?.first else { return nil }
        tail!.removeFirst()
        current = .buffer(next.1)
        return next.0
    }

    private func merge(base: TensorDescriptor, data: AlignedBuffer, parts: [LoRAPart: TensorDescriptor],
                       output: TensorDescriptor, plan: LoRAModulePlan) throws -> AlignedBuffer {
        var start = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        let a = floats((parts[.a] ?? parts[.embeddingA])!.name)
        let b = floats((parts[.b] ?? parts[.embeddingB])!.name)
        let (left, right) = plan.merge.factors(a: a, b: b, scale: plan.scale)
        let out = output.dtype == base.dtype ? data : AlignedBuffer(capacity: max(output.byteCount, 1))
        out.count = output.byteCount
        let magnitude = parts[.magnitude].map { (floats($0.name), plan.magnitudeAxis!) }
        let drift = try withExtendedLifetime(data) {
            try plan.merge.apply(base: UnsafeRawPointer(data.pointer), baseType: base.dtype, left: left, right: right,
                                 output: out.pointer, outputType: output.dtype, magnitude: magnitude, name: base.name)
        }
        for p in parts.values { adapters[p.name] = nil }
        var end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &end)
        summary.mergeSeconds += Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
        summary.modules[planner.scheme!.kind, default: 0] += 1
        summary.scales[plan.scaleNote, default: 0] += 1
        summary.adaptersConsumed += parts.count
        summary.flops += plan.merge.flops
        if output.dtype != .f32 && output.dtype != .f64 {
            summary.narrowed += 1
            summary.narrowedType = output.dtype
            summary.drift.add(drift)
        }
        return out
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        switch current {
        case .none: return nil
        case .upstream: return try upstream.nextChunk()
        case .buffer(let b):
            guard position < b.count else { return nil }
            let n = min(chunkSize, b.count - position)
            defer { position += n }
            return UnsafeRawBufferPointer(start: b.pointer + position, count: n)
        }
    }
}
