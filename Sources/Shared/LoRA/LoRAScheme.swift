/// The adapter tensors a scheme knows.
public enum LoRAPart: String, Sendable, CaseIterable {
    case a = "lora A", b = "lora B", embeddingA = "lora_embedding_A", embeddingB = "lora_embedding_B"
    case magnitude = "DoRA magnitude", biasB = "lora_B bias"
}

/// What a tensor is to a scheme: part of a module's adapter, or a weight adapters may name.
public enum LoRARole: Equatable, Sendable {
    case adapter(module: String, part: LoRAPart)
    case base(module: String)
}

/// A planned merge: the product, its scale and how it was chosen (for the summary).
public struct LoRAModulePlan: Sendable {
    public var merge: LowRankMerge
    public var scale: Double
    public var scaleNote: String
    /// DoRA: the output axis of the 2-D weight the magnitude vector runs along.
    public var magnitudeAxis: Int?
}

/// The three naming conventions of issue 5 (see docs/lora-merge.md).
public enum LoRASchemeKind: String, CaseIterable, Sendable {
    case peft, openpi, generic
}

public struct LoRAScheme: Sendable {
    public var kind: LoRASchemeKind
    /// openpi: einsum LoRA configs by weight-name glob (first match; nil glob matches all).
    public var einsumConfigs: [(glob: String?, config: EinsumLoRAConfig)] = []
    /// openpi and generic: explicit einsum equations by weight-name glob (first match).
    public var equations: [(glob: String?, equation: String)] = []
    /// peft: the adapter's configuration.
    public var peft: PEFTAdapterConfig?
    /// generic: name suffixes and scale.
    public var aSuffix = "", bSuffix = "", baseSuffix = ""
    public var genericScale: Double?

    public init(kind: LoRASchemeKind) { self.kind = kind }

    static let peftPrefix = "base_model.model."

    /// PEFT saves without the adapter name (`lora_A.weight`); a wrapped model's own state dict
    /// has it (`lora_A.default.weight`).
    private static func peftAdapterRole(_ name: String) -> LoRARole? {
        let n = name.hasPrefix(peftPrefix) ? String(name.dropFirst(peftPrefix.count)) : name
        let segments = n.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        let table: [(String, LoRAPart)] = [("lora_A", .a), ("lora_B", .b), ("lora_embedding_A", .embeddingA),
                                           ("lora_embedding_B", .embeddingB), ("lora_magnitude_vector", .magnitude)]
        for (i, s) in segments.enumerated() where i > 0 {
            guard let part = table.first(where: { $0.0 == s })?.1 else { continue }
            let rest = segments[(i + 1)...]
            let module = segments[..<i].joined(separator: ".")
            switch part {
            case .a, .b:
                if rest.last == "bias" && part == .b && rest.count <= 2 { return .adapter(module: module, part: .biasB) }
                if rest.last == "weight" && rest.count <= 2 { return .adapter(module: module, part: part) }
            case .embeddingA, .embeddingB, .magnitude:
                if rest.count <= 2 && (rest.isEmpty || rest.count == 1 || rest.last == "weight") { return .adapter(module: module, part: part) }
            case .biasB: break
            }
        }
        return nil
    }

    /// The role of a tensor name under this scheme; nil: not something adapters touch.
    public func role(of name: String) -> LoRARole? {
        switch kind {
        case .peft:
            if let r = LoRAScheme.peftAdapterRole(name) { return r }
            let n = outputName(name)
            return n.hasSuffix(".weight") ? .base(module: String(n.dropLast(".weight".count))) : nil
        case .openpi:
            for (suffix, part) in [("/lora_a", LoRAPart.a), ("/lora_b", .b), ("_lora_a", .a), ("_lora_b", .b)] where name.hasSuffix(suffix) {
                return .adapter(module: String(name.dropLast(suffix.count)), part: part)
            }
            return .base(module: name.hasSuffix("/w") ? String(name.dropLast(2)) : name)
        case .generic:
            if name.hasSuffix(aSuffix) { return .adapter(module: String(name.dropLast(aSuffix.count)), part: .a) }
            if name.hasSuffix(bSuffix) { return .adapter(module: String(name.dropLast(bSuffix.count)), part: .b) }
            return name.hasSuffix(baseSuffix) ? .base(module: String(name.dropLast(baseSuffix.count))) : nil
        }
    }

    /// The name a tensor leaves under: PEFT's wrapping (`base_model.model.`, `.base_layer`)
    /// is removed, as `merge_and_unload` does; other schemes keep names.
    public func outputName(_ name: String) -> String {
        guard kind == .peft else { return name }
        var n = name.hasPrefix(LoRAScheme.peftPrefix) ? String(name.dropFirst(LoRAScheme.peftPrefix.count)) : name
        while let r = n.firstRange(of: ".base_layer.") { n.replaceSubrange(r, with: ".") }
        return n
    }

    /// Which scheme a name's adapter naming belongs to, if any (for --scheme auto).
    public static func detect(_ name: String) -> LoRASchemeKind? {
        if peftAdapterRole(name) != nil { return .peft }
        for suffix in ["/lora_a", "/lora_b", "_lora_a", "_lora_b"] where name.hasSuffix(suffix) { return .openpi }
        return nil
    }

    private static func firstMatch<T>(_ list: [(glob: String?, value: T)], _ name: String) -> T? {
        list.first { $0.glob.map { globMatches($0, name) } ?? true }?.value
    }

    /// Plans the merge of one module from its tensors' descriptors.
    public func plan(module: String, base: TensorDescriptor, parts: [LoRAPart: TensorDescriptor]) throws(LoRAError) -> LoRAModulePlan {
        let names = [base.name] + LoRAPart.allCases.compactMap { parts[$0]?.name }
        func fail(_ r: LoRAError.Reason) -> LoRAError { LoRAError(r, tensors: names) }
        if parts[.biasB] != nil { throw fail(.biasOnB) }
        for d in [base] + parts.values where !FloatConversion.canWiden(d.dtype) {
            throw fail(.notFloat(tensor: d.name, dtype: d.dtype.rawValue))
        }
        let (aPart, bPart): (LoRAPart, LoRAPart) = parts[.embeddingA] != nil || parts[.embeddingB] != nil ? (.embeddingA, .embeddingB) : (.a, .b)
        guard let a = parts[aPart], let b = parts[bPart] else {
            throw fail(.missingFactor(a: aPart.rawValue, b: bPart.rawValue))
        }
        let r = LowRankLayout.rank
        switch kind {
        case .openpi:
            let short = module.split(separator: "/").last.map(String.init) ?? module
            let ffn = a.name.hasSuffix("_lora_a")
            guard let equation = LoRAScheme.firstMatch(equations.map { ($0.glob, $0.equation) }, base.name) ?? EinsumLoRA.openpiEquation(module: short) else {
                throw fail(.noEquation(module: short, base: base.name))
            }
            let layout = try EinsumLoRA.layout(equation: equation, weightRank: base.shape.count)
            let merge = try LowRankMerge(layout: layout, weight: base.shape, a: a.shape, b: b.shape, names: names)
            let config = LoRAScheme.firstMatch(einsumConfigs.map { ($0.glob, $0.config) }, base.name)
            if let expected = config?.rank, expected != merge.rank {
                throw fail(.rankDiffersFromConfig(rank: merge.rank, configured: expected))
            }
            if ffn {
                // openpi's FeedForward._dot adds dot(dot(x, A), B) with no scaling at all.
                return LoRAModulePlan(merge: merge, scale: 1, scaleNote: "1 (openpi FeedForward: unscaled)")
            }
            guard let config else {
                throw fail(.noEinsumAlpha)
            }
            let s = config.scale(rank: merge.rank)
            return LoRAModulePlan(merge: merge, scale: s, scaleNote: "\(format(s)) (alpha \(format(config.alpha)) / \(config.rslora ? "sqrt " : "")rank \(merge.rank))")
        case .peft:
            guard let peft else {
                throw fail(.peftNeedsConfig)
            }
            let (s, rank, alpha) = try peft.scale(module: module)
            let note = "\(format(s)) (lora_alpha \(format(alpha)) / \(peft.useRSLoRA ? "sqrt " : "")r \(rank))"
            var weight = base.shape, aShape = a.shape, bShape = b.shape
            let layout: LowRankLayout
            var magnitudeAxis: Int?
            if aPart == .embeddingA {
                // nn.Embedding weight [num, dim]; lora_embedding_A [r, num], B [dim, r]; ΔW = (B·A)ᵀ.
                layout = LowRankLayout(weight: ["n", "e"], a: [r, "n"], b: ["e", r])
            } else if weight.count == 2 {
                // Linear [out, in]: ΔW = B·A; fan_in_fan_out (GPT-2 Conv1D) stores [in, out]: ΔW = (B·A)ᵀ.
                layout = LowRankLayout(weight: peft.fanInFanOut ? ["i", "o"] : ["o", "i"], a: [r, "i"], b: ["o", r])
                if parts[.magnitude] != nil { magnitudeAxis = peft.fanInFanOut ? 1 : 0 }
            } else if weight.count >= 3 {
                // ConvNd [out, in, k...]: lora_A is a conv [r, in, k...], lora_B a 1x1 conv [out, r, 1...].
                guard aShape.count == weight.count, bShape.count == weight.count, bShape.dropFirst(2).allSatisfy({ $0 == 1 }),
                      Array(aShape.dropFirst()) == Array(weight.dropFirst()) else {
                    throw fail(.convShapesMismatch(weight: weight, a: aShape, b: bShape))
                }
                let q = weight.dropFirst().reduce(1, *)
                weight = [weight[0], q]
                aShape = [aShape[0], q]
                bShape = [bShape[0], bShape[1]]
                layout = LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r])
            } else {
                throw fail(.weightRankUnsupported(rank: weight.count))
            }
            if parts[.magnitude] != nil && magnitudeAxis == nil {
                throw fail(.doraNotLinear)
            }
            let merge = try LowRankMerge(layout: layout, weight: weight, a: aShape, b: bShape, names: names)
            guard merge.rank == rank else {
                throw fail(.rankDiffersFromAdapterConfig(rank: merge.rank, configured: rank, module: module))
            }
            if let m = parts[.magnitude], m.shape.reduce(1, *) != weight[magnitudeAxis!] {
                throw fail(.doraMagnitudeMismatch(magnitude: m.shape, weight: base.shape))
            }
            return LoRAModulePlan(merge: merge, scale: s, scaleNote: note, magnitudeAxis: magnitudeAxis)
        case .generic:
            guard let s = genericScale else { throw fail(.genericNeedsScale) }
            if let equation = LoRAScheme.firstMatch(equations.map { ($0.glob, $0.equation) }, base.name) {
                let layout = try EinsumLoRA.layout(equation: equation, weightRank: base.shape.count)
                return LoRAModulePlan(merge: try LowRankMerge(layout: layout, weight: base.shape, a: a.shape, b: b.shape, names: names),
                                      scale: s, scaleNote: format(s))
            }
            // Matrices, with any leading batch axes: torch style (A [r, in], B [out, r]: ΔW = B·A)
            // or JAX style (A [in, r], B [r, out]: ΔW = A·B); the shapes decide.
            guard base.shape.count >= 2 else { throw fail(.genericNeedsMatrix) }
            let lead = (0..<(base.shape.count - 2)).map { Character(UnicodeScalar(UInt8(65 + $0))) }
            let torch = LowRankLayout(weight: lead + ["m", "n"], a: lead + [r, "n"], b: lead + ["m", r])
            let jax = LowRankLayout(weight: lead + ["m", "n"], a: lead + ["m", r], b: lead + [r, "n"])
            let fits = [torch, jax].compactMap { try? LowRankMerge(layout: $0, weight: base.shape, a: a.shape, b: b.shape, names: names) }
            guard fits.count == 1 else {
                throw fail(fits.isEmpty ? .notALoRAPair(weight: base.shape, a: a.shape, b: b.shape) : .ambiguousSquareShapes)
            }
            return LoRAModulePlan(merge: fits[0], scale: s, scaleNote: format(s))
        }
    }
}

/// A scale for messages: integers without a fraction, others with up to 6 significant digits.
func format(_ x: Double) -> String {
    if x == x.rounded(), abs(x) < 1e15 { return String(Int(x)) }
    var s = String(x)
    if s.count > 10, let v = Double(s) { s = String(Float(v)) }
    return s
}

extension LoRAScheme {
    /// How `lora-merge --scheme auto` will pair the tensors named `names`, from the names alone
    /// (`ckpt-read --part` keeps each pair in one part; the merge itself needs both in one
    /// stream). The scheme is detected as `LoRAMergePlanner` detects it, and pairs are found
    /// by the same `role(of:)` the merge uses.
    ///
    /// Returns, for every module that has an adapter, the indices of its base and adapter
    /// tensors; and every tensor's name after the merge (nil for an adapter, which the merge
    /// consumes). No scheme (no adapter names, or a mix that lora-merge refuses): no modules,
    /// names unchanged.
    public static func mergePairing(_ names: [String]) -> (modules: [[Int]], outputNames: [String?]) {
        let kinds = Set(names.compactMap(LoRAScheme.detect))
        guard kinds.count == 1, let kind = kinds.first else { return ([], names) }
        let scheme = LoRAScheme(kind: kind)
        var members: [String: [Int]] = [:]
        var adapted = Set<String>()
        var outputNames: [String?] = []
        for (i, name) in names.enumerated() {
            switch scheme.role(of: name) {
            case .adapter(let module, _)?:
                adapted.insert(module)
                members[module, default: []].append(i)
                outputNames.append(nil)
            case .base(let module)?:
                members[module, default: []].append(i)
                outputNames.append(scheme.outputName(name))
            case nil:
                outputNames.append(scheme.outputName(name))
            }
        }
        let modules = adapted.sorted().compactMap { members[$0] }
        return (modules, outputNames)
    }
}
