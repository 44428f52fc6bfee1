import Dispatch
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
        /// Bases that came before their adapters and were held in memory until they came, and
        /// the most bytes held at once.
        public var held = 0
        public var heldPeakBytes = 0
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
    /// What `nextChunk` serves: upstream chunks, a buffer, or a buffer a merge is still filling.
    private enum Current {
        case none, upstream, buffer(AlignedBuffer)
        /// `held`: the base's buffer when it was held in memory (recycled once merged).
        case streaming(AheadStreamingMerge, narrowed: Bool, held: AlignedBuffer?)
    }
    private var current = Current.none
    private var position = 0
    private var tail: [(TensorHeader, AlignedBuffer)]?
    /// The last emitted buffer, reused for the next tensor: fresh pages cost a fault each.
    private var spare: AlignedBuffer?
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
        guard problems.isEmpty else { throw LoRAError(.several(problems: problems)) }
        return out
    }

    /// An adapter's values as float32 (its type was checked by the plan).
    private static func widened(_ d: TensorDescriptor, _ bytes: [UInt8]) -> [Float] {
        var values = [Float](repeating: 0, count: d.elementCount)
        bytes.withUnsafeBytes { b in values.withUnsafeMutableBufferPointer { FloatConversion.widen(b.baseAddress!, d.dtype, count: d.elementCount, into: $0.baseAddress!) } }
        return values
    }

    private static func checkFinite(_ d: TensorDescriptor, _ bytes: [UInt8]) throws(LoRAError) {
        guard FloatConversion.canWiden(d.dtype) else { return }  // the plan reports the type
        let bad = widened(d, bytes).lazy.filter { !$0.isFinite }.count
        if bad > 0 { throw LoRAError(.adapterNonFinite(count: bad), tensors: [d.name]) }
    }

    private func floats(_ name: String) -> [Float] {
        let (d, bytes) = adapters[name]!
        return LoRAMerger.widened(d, bytes)
    }

    /// Reads the current upstream tensor, an adapter part, checks it and keeps it.
    private func keepAdapter(_ d: TensorDescriptor) throws {
        let data = try readWhole(d)
        let bytes = data.copyBytes()
        recycle(data)
        try LoRAMerger.checkFinite(d, bytes)
        adapters[d.name] = (d, bytes)
    }

    private func takeBuffer(_ size: Int) throws -> AlignedBuffer {
        if let s = spare, s.capacity >= size {
            spare = nil
            return s
        }
        return try AlignedBuffer(capacity: max(size, 1))
    }

    private func recycle(_ b: AlignedBuffer) {
        if b.capacity >= spare?.capacity ?? 0 { spare = b }
    }

    /// The whole current upstream tensor, in a recycled buffer.
    private func readWhole(_ d: TensorDescriptor) throws -> AlignedBuffer {
        let buffer = try takeBuffer(d.byteCount)
        try upstream.readTensor(d, into: buffer, stage: "lora-merge")
        return buffer
    }

    public func nextTensor() throws -> TensorHeader? {
        switch current {
        case .buffer(let b): recycle(b)
        case .streaming(let ahead, _, let held):
            ahead.settle()
            if let held { recycle(held) }
        default: break
        }
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
                try keepAdapter(t.descriptor)
            case .hold(let module):
                heldBases[module] = (t, try readWhole(t.descriptor))
                summary.held += 1
                summary.heldPeakBytes = max(summary.heldPeakBytes, heldBases.values.reduce(0) { $0 + $1.0.descriptor.byteCount })
            case .merge(let module, let base, let parts, let output, let plan):
                if base.name == t.descriptor.name, plan.merge.inOrder, parts[.magnitude] == nil {
                    // Its adapters are all here: merge the base row by row as it streams through.
                    current = .streaming(AheadStreamingMerge(try streamingMerge(base: base, parts: parts, output: output, plan: plan),
                                                             upstream: upstream),
                                         narrowed: output.dtype != .f32 && output.dtype != .f64, held: nil)
                    return TensorHeader(output, attributes: t.attributes)
                }
                let baseData: (TensorHeader, AlignedBuffer)
                if base.name == t.descriptor.name {
                    baseData = (t, try readWhole(t.descriptor))
                } else {
                    try keepAdapter(t.descriptor)
                    baseData = heldBases.removeValue(forKey: module)!
                }
                if plan.merge.inOrder, parts[.magnitude] == nil {
                    // A held base (its adapters came after it) streams through the same row-block
                    // merge, from memory: no second, whole-tensor output buffer.
                    let held = HeldTensorChunks(baseData.1)
                    current = .streaming(AheadStreamingMerge(try streamingMerge(base: base, parts: parts, output: output, plan: plan),
                                                             upstream: held),
                                         narrowed: output.dtype != .f32 && output.dtype != .f64, held: baseData.1)
                    return TensorHeader(output, attributes: baseData.0.attributes)
                }
                current = try merge(base: base, data: baseData.1, parts: parts, output: output, plan: plan)
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
                let buffer = try AlignedBuffer(capacity: max(bytes.count, 1))
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

    private func account(_ parts: [LoRAPart: TensorDescriptor], output: TensorDescriptor, plan: LoRAModulePlan) {
        for p in parts.values { adapters[p.name] = nil }
        summary.modules[planner.scheme!.kind, default: 0] += 1
        summary.scales[plan.scaleNote, default: 0] += 1
        summary.adaptersConsumed += parts.count
        summary.flops += plan.merge.flops
        if output.dtype != .f32 && output.dtype != .f64 {
            summary.narrowed += 1
            summary.narrowedType = output.dtype
        }
    }

    private func factors(_ parts: [LoRAPart: TensorDescriptor], plan: LoRAModulePlan) -> (left: [Float], right: [Float]) {
        let a = floats((parts[.a] ?? parts[.embeddingA])!.name)
        let b = floats((parts[.b] ?? parts[.embeddingB])!.name)
        return plan.merge.factors(a: a, b: b, scale: plan.scale)
    }

    private func streamingMerge(base: TensorDescriptor, parts: [LoRAPart: TensorDescriptor], output: TensorDescriptor,
                                plan: LoRAModulePlan) throws -> StreamingMerge {
        let (left, right) = factors(parts, plan: plan)
        account(parts, output: output, plan: plan)
        return try StreamingMerge(plan.merge, left: left, right: right, baseType: base.dtype, outputType: output.dtype, name: base.name)
    }

    /// Merges one module whole (DoRA, or a weight whose axes are not in batch-rows-columns
    /// order); its output is then served from the buffer.
    private func merge(base: TensorDescriptor, data: AlignedBuffer, parts: [LoRAPart: TensorDescriptor],
                       output: TensorDescriptor, plan: LoRAModulePlan) throws -> Current {
        let (left, right) = factors(parts, plan: plan)
        let out = output.dtype == base.dtype ? data : try takeBuffer(output.byteCount)
        out.count = output.byteCount
        let magnitude = parts[.magnitude].map { (floats($0.name), plan.magnitudeAxis!) }
        let started = DispatchTime.now()
        let drift = try withExtendedLifetime(data) {
            try plan.merge.apply(base: UnsafeRawPointer(data.pointer), baseType: base.dtype, left: left, right: right,
                                 output: out.pointer, outputType: output.dtype, magnitude: magnitude, name: base.name)
        }
        summary.mergeSeconds += Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        if out !== data { recycle(data) }
        account(parts, output: output, plan: plan)
        if output.dtype != .f32 && output.dtype != .f64 { summary.drift.add(drift) }
        return .buffer(out)
    }

    public func nextChunk() throws -> UnsafeRawBufferPointer? {
        switch current {
        case .none: return nil
        case .upstream: return try upstream.nextChunk()
        case .buffer(let b):
            return b.chunk(from: &position)
        case .streaming(let ahead, let narrowed, let held):
            if let merged = try ahead.next() { return merged }
            summary.mergeSeconds += ahead.merge.seconds
            if narrowed { summary.drift.add(ahead.merge.drift) }
            if let held { recycle(held) }
            current = .none
            return nil
        }
    }
}

/// A tensor held in memory, handed out as chunks (the upstream of a merge of a held base).
final class HeldTensorChunks: TensorSource {
    let header = StreamHeader(producer: "lora-merge", sourceFormat: "held")
    let manifest: [TensorDescriptor]? = nil
    private let buffer: AlignedBuffer
    private var position = 0
    init(_ buffer: AlignedBuffer) { self.buffer = buffer }
    func nextTensor() throws -> TensorHeader? { nil }
    func nextChunk() throws -> UnsafeRawBufferPointer? { buffer.chunk(from: &position) }
}
