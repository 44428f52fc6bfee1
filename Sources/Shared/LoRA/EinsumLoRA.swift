/// Einsum LoRA, as openpi's `lora.Einsum` runs it (src/openpi/models/lora.py): the base is
/// `einsum(eqn, x, w)` and the adapter adds `einsum(eqn_b, einsum(eqn_a, x, A), B) · scale`,
/// where A is `w`'s shape with the rank at `axes.1` and B has it at `axes.0`:
///
///     eqn = lhs,rhs->out   a, b = rhs[axes.0], rhs[axes.1]
///     eqn_a = lhs, rhs[b→L] -> out[b→L]        eqn_b = out[b→L], rhs[a→L] -> out
///
/// The merged delta follows from the equations, not from a per-module formula: an axis of
/// rhs other than a and b that is not in `out` is contracted inside *each* einsum, so B is
/// summed over it on its own (attn_vec `BTNH,NHD->BTD` sums B over the heads N).
public enum EinsumLoRA {
    /// The label of a leading stacked-layer axis (nn.scan) that the equation does not name.
    static let layerLabel: Character = "\u{1}"

    /// The merge layout for a weight of `weightRank` axes used with `equation`; one more axis
    /// than rhs names is a leading layer axis, shared by the weight and both factors.
    public static func layout(equation: String, weightRank: Int, axes: (Int, Int) = (-2, -1)) throws(LoRAError) -> LowRankLayout {
        let eq = equation.filter { !$0.isWhitespace }
        let sides = eq.split(separator: "->", omittingEmptySubsequences: false)
        let inputs = sides.first?.split(separator: ",", omittingEmptySubsequences: false) ?? []
        guard sides.count == 2, inputs.count == 2 else {
            throw LoRAError(.equationMalformed(equation: equation))
        }
        let lhs = Array(inputs[0]), rhs = Array(inputs[1]), out = Array(sides[1])
        guard !rhs.isEmpty, Set(rhs).count == rhs.count, !rhs.contains(layerLabel), !rhs.contains(LowRankLayout.rank) else {
            throw LoRAError(.equationLabelsRepeat(equation: equation))
        }
        let n = rhs.count
        let ia = axes.0 < 0 ? n + axes.0 : axes.0, ib = axes.1 < 0 ? n + axes.1 : axes.1
        guard (0..<n).contains(ia), (0..<n).contains(ib), ia != ib else {
            throw LoRAError(.equationAxesDoNotFit(equation: equation, axes: [axes.0, axes.1], weightAxes: n))
        }
        let a = rhs[ia], b = rhs[ib]
        guard out.contains(b), !lhs.contains(b) else {
            // The rank replaces b in the first einsum, so b must be an output axis the input does
            // not have; otherwise no single weight reproduces the two einsums.
            throw LoRAError(.equationRankAxisNotOutput(equation: equation, axis: String(b)))
        }
        let layer = weightRank == n + 1
        guard layer || weightRank == n else {
            throw LoRAError(.equationWeightRankMismatch(equation: equation, named: n, weightRank: weightRank))
        }
        let prefix: [Character] = layer ? [layerLabel] : []
        let r = LowRankLayout.rank
        return LowRankLayout(weight: prefix + rhs,
                             a: prefix + rhs.map { $0 == b ? r : $0 },
                             b: prefix + rhs.map { $0 == a ? r : $0 },
                             summedInB: Set(rhs.filter { $0 != a && $0 != b && !out.contains($0) }))
    }

    /// openpi's Gemma einsums (gemma.py), by module name; `_1` suffixes are the action expert's copies.
    public static func openpiEquation(module: String) -> String? {
        var m = Substring(module)
        if let u = m.lastIndex(of: "_"), m.index(after: u) < m.endIndex, m[m.index(after: u)...].allSatisfy(\.isNumber) {
            m = m[..<u]
        }
        switch m {
        case "q_einsum": return "BTD,NDH->BTNH"
        case "kv_einsum": return "BSD,2KDH->2BSKH"
        case "qkv_einsum": return "BSD,3KDH->3BSKH"
        case "attn_vec_einsum": return "BTNH,NHD->BTD"
        // FeedForward._dot: jnp.dot(x, w[c]) per c of gating_einsum, jnp.dot(h, linear).
        case "gating_einsum": return "BTD,CDF->CBTF"
        case "linear": return "BTF,FD->BTD"
        default: return nil
        }
    }
}

/// An einsum LoRA's configuration (openpi's `LoRAConfig`): scale alpha/rank, or
/// alpha/sqrt(rank) with rslora.
public struct EinsumLoRAConfig: Equatable, Sendable {
    public var rank: Int?
    public var alpha: Double
    public var rslora: Bool

    public init(rank: Int?, alpha: Double, rslora: Bool = false) {
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
    }

    public func scale(rank observed: Int) -> Double {
        rslora ? alpha / Double(observed).squareRoot() : alpha / Double(observed)
    }

    /// openpi's shipped variants (gemma.get_config).
    public static let presets: [String: EinsumLoRAConfig] = [
        "gemma_2b_lora": EinsumLoRAConfig(rank: 16, alpha: 16),
        "gemma_300m_lora": EinsumLoRAConfig(rank: 32, alpha: 32),
    ]

    /// `gemma_2b_lora`, or `rank=16,alpha=32[,rslora]` (rank may be left out: then it is read
    /// from the adapter's shapes).
    public static func parse(_ text: String) throws(LoRAError) -> EinsumLoRAConfig {
        if let p = presets[text] { return p }
        var config = EinsumLoRAConfig(rank: nil, alpha: .nan)
        for item in text.split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1).map { String($0).trimmingCharacters(in: " ") }
            switch (kv.first, kv.count) {
            case ("rslora", 1): config.rslora = true
            case ("rank", 2): config.rank = Int(kv[1])
                if config.rank == nil || config.rank! <= 0 { throw LoRAError(.configRankNotPositive(config: text)) }
            case ("alpha", 2):
                guard let a = Double(kv[1]), a.isFinite else { throw LoRAError(.configAlphaNotNumber(config: text)) }
                config.alpha = a
            default:
                throw LoRAError(.configUnknown(config: text, presets: presets.keys.sorted()))
            }
        }
        guard !config.alpha.isNaN else { throw LoRAError(.configWithoutAlpha(config: text)) }
        return config
    }
}
