/// The order decisions of `lora-merge`, on descriptors only, so the same code plans the
/// output manifest up front and drives the merge as the tensors arrive.
///
/// Policy (and memory bound): adapter tensors are buffered when they arrive (they are
/// small); a base whose adapters are all here is merged the moment it arrives; a base whose
/// adapters are still to come (the manifest says so, or some of them arrived already) is held
/// until the last one arrives, and then emitted, so at most the bases of modules whose
/// adapters straddle them are held: one, in every layout seen (openpi writes
/// `linear, linear_lora_a, linear_lora_b`). Without a manifest, a base that arrives before any
/// of its adapters is passed on unmerged; an adapter arriving later is then an error.
struct LoRAMergePlanner {
    enum Action {
        /// Emit this tensor unchanged, under `name`.
        case passThrough(name: String)
        /// Keep this adapter tensor for `module`.
        case buffer(module: String, part: LoRAPart)
        /// Keep this base until its adapters arrive.
        case hold(module: String)
        /// This tensor (base or adapter) completes `module`: merge and emit it.
        case merge(module: String, base: TensorDescriptor, parts: [LoRAPart: TensorDescriptor], output: TensorDescriptor, plan: LoRAModulePlan)
    }

    private(set) var scheme: LoRAScheme?
    /// Schemes to pick from when `scheme` is nil (auto).
    let candidates: [LoRASchemeKind: LoRAScheme]
    let outputType: DType?
    /// Adapter parts each module will get (from the manifest and an adapter file); nil: unknown.
    private var expected: [String: Set<LoRAPart>]?
    private(set) var parts: [String: [LoRAPart: TensorDescriptor]] = [:]
    private(set) var held: [String: TensorDescriptor] = [:]
    private var passedBases: [String: String] = [:]
    private(set) var merged: Set<String> = []

    init(scheme: LoRAScheme?, candidates: [LoRASchemeKind: LoRAScheme], outputType: DType?,
         manifest: [TensorDescriptor]?, external: [TensorDescriptor]) throws(LoRAError) {
        self.scheme = scheme
        self.candidates = candidates
        self.outputType = outputType
        if self.scheme == nil {
            let names = (manifest ?? []).map(\.name) + external.map(\.name)
            let kinds = Set(names.compactMap(LoRAScheme.detect))
            if kinds.count > 1 {
                throw LoRAError(.severalSchemes(schemes: kinds.map(\.rawValue).sorted()))
            }
            if let k = kinds.first { self.scheme = candidates[k] }
        }
        for d in external {
            guard case .adapter(let module, let part)? = self.scheme?.role(of: d.name) else {
                throw LoRAError(.notAPartOfScheme, tensors: [d.name])
            }
            parts[module, default: [:]][part] = d
        }
        if let manifest {
            var e: [String: Set<LoRAPart>] = parts.mapValues { Set($0.keys) }
            for d in manifest {
                if case .adapter(let module, let part)? = self.scheme?.role(of: d.name) { e[module, default: []].insert(part) }
            }
            expected = e
        } else if !external.isEmpty {
            expected = parts.mapValues { Set($0.keys) }
        }
    }

    private func hasAdapters(_ module: String) -> Bool {
        !(expected?[module]?.isEmpty ?? true) || !(parts[module]?.isEmpty ?? true)
    }

    private func complete(_ module: String) -> Bool {
        let have = Set(parts[module]?.keys.map { $0 } ?? [])
        if let e = expected?[module] { return e.isSubset(of: have) }
        return have.isSuperset(of: [.a, .b]) || have.isSuperset(of: [.embeddingA, .embeddingB])
    }

    private mutating func mergeAction(_ module: String, base: TensorDescriptor) throws(LoRAError) -> Action {
        let s = scheme!
        let ps = parts[module] ?? [:]
        // Settled either way: a module whose plan fails is reported once, not again as leftovers.
        held[module] = nil
        merged.insert(module)
        let plan = try s.plan(module: module, base: base, parts: ps)
        let dtype = outputType ?? base.dtype
        guard FloatConversion.canNarrow(to: dtype) else {
            throw LoRAError(.cannotWriteAs(dtype: dtype.rawValue), tensors: [base.name])
        }
        let out = try! TensorDescriptor(name: s.outputName(base.name), dtype: dtype, shape: base.shape)
        return .merge(module: module, base: base, parts: ps, output: out, plan: plan)
    }

    /// Decides what to do with the next tensor of the stream.
    mutating func consume(_ d: TensorDescriptor) throws(LoRAError) -> Action {
        if scheme == nil, let k = LoRAScheme.detect(d.name) { scheme = candidates[k] }
        guard let s = scheme, let role = s.role(of: d.name) else { return .passThrough(name: scheme?.outputName(d.name) ?? d.name) }
        switch role {
        case .adapter(let module, let part):
            if merged.contains(module) || passedBases[module] != nil {
                let base = passedBases[module].map { [$0] } ?? []
                throw LoRAError(.arrivedAfterBase, tensors: [d.name] + base)
            }
            if parts[module]?[part] != nil { throw LoRAError(.duplicatePart(part: part.rawValue, module: module), tensors: [d.name]) }
            parts[module, default: [:]][part] = d
            if let base = held[module], complete(module) { return try mergeAction(module, base: base) }
            return .buffer(module: module, part: part)
        case .base(let module):
            guard hasAdapters(module) else {
                passedBases[module] = d.name
                return .passThrough(name: s.outputName(d.name))
            }
            if held[module] != nil || merged.contains(module) {
                throw LoRAError(.duplicateBase(module: module), tensors: [d.name])
            }
            if complete(module) { return try mergeAction(module, base: d) }
            held[module] = d
            return .hold(module: module)
        }
    }

    /// At the end of the stream: every adapter must have met its base, every held base its
    /// adapters. Returns what is left (empty when all merged).
    func leftovers() -> (adapters: [TensorDescriptor], bases: [TensorDescriptor]) {
        var adapters: [TensorDescriptor] = []
        for (module, ps) in parts.sorted(by: { $0.key < $1.key }) where !merged.contains(module) && held[module] == nil {
            adapters += LoRAPart.allCases.compactMap { ps[$0] }
        }
        let bases = held.sorted { $0.key < $1.key }.map(\.value)
        return (adapters, bases)
    }

    /// The error for leftovers, listing every offender.
    static func leftoverError(_ l: (adapters: [TensorDescriptor], bases: [TensorDescriptor])) -> LoRAError? {
        guard !l.adapters.isEmpty || !l.bases.isEmpty else { return nil }
        return LoRAError(.leftovers(adapters: l.adapters.map(\.name), bases: l.bases.map(\.name)))
    }
}
