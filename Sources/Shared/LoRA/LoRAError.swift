/// Why a LoRA merge is refused, one case per rule, with the tensors (base, then adapter
/// parts) or the config file it concerns.
public struct LoRAError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        // Planning a module (LoRAScheme)
        case biasOnB
        case notFloat(tensor: String, dtype: String)
        case missingFactor(a: String, b: String)
        case noEquation(module: String, base: String)
        case rankDiffersFromConfig(rank: Int, configured: Int)
        case noEinsumAlpha
        case peftNeedsConfig
        case convShapesMismatch(weight: [Int], a: [Int], b: [Int])
        case weightRankUnsupported(rank: Int)
        case doraNotLinear
        case rankDiffersFromAdapterConfig(rank: Int, configured: Int, module: String)
        case doraMagnitudeMismatch(magnitude: [Int], weight: [Int])
        case genericNeedsScale
        case genericNeedsMatrix
        case notALoRAPair(weight: [Int], a: [Int], b: [Int])
        case ambiguousSquareShapes
        // Shapes against a layout (LowRankMerge)
        case layoutRanksMismatch(weight: [Int], a: [Int], b: [Int])
        case axisSizeMismatch(factor: String, axis: String, size: Int, expected: Int, weight: [Int], a: [Int], b: [Int])
        case zeroRank
        case rankIsWeightAxis
        case weightAxisFromNeither(axis: String)
        case adapterAxisNotInWeight(axis: String)
        // Merging values
        case mergedNonFinite(count: Int)
        case doraMagnitudeSize(values: Int, weight: [Int])
        case baseEndedInsideRow
        case adapterNonFinite(count: Int)
        // Einsum equations and configs (EinsumLoRA)
        case equationMalformed(equation: String)
        case equationLabelsRepeat(equation: String)
        case equationAxesDoNotFit(equation: String, axes: [Int], weightAxes: Int)
        case equationRankAxisNotOutput(equation: String, axis: String)
        case equationWeightRankMismatch(equation: String, named: Int, weightRank: Int)
        case configRankNotPositive(config: String)
        case configAlphaNotNumber(config: String)
        case configUnknown(config: String, presets: [String])
        case configWithoutAlpha(config: String)
        // adapter_config.json (PEFT)
        case configNotObject
        case configNotJSON(detail: String)
        case notLoRAAdapter(peftType: String)
        case rankPatternNotInteger(key: String)
        case rankPatternNotPositive(key: String)
        case alphaPatternNotNumber(key: String)
        case rankNotPositive
        case patternNotRegex(pattern: String)
        case noAdapterModel
        // The stream (LoRAMergePlanner)
        case severalSchemes(schemes: [String])
        case notAPartOfScheme
        case cannotWriteAs(dtype: String)
        case arrivedAfterBase
        case duplicatePart(part: String, module: String)
        case duplicateBase(module: String)
        case leftovers(adapters: [String], bases: [String])
        /// Several of the above, found in one dry run, by their descriptions.
        case several(problems: [String])
    }

    public var reason: Reason
    /// The file (adapter config, adapter folder) the rule concerns, if any.
    public var file: String?
    public var tensors: [String]

    public init(_ reason: Reason, file: String? = nil, tensors: [String] = []) {
        self.reason = reason
        self.file = file
        self.tensors = tensors
    }

    public var exitStatus: SysExit { .dataError }

    public var description: String {
        var s = file.map { "\($0): " } ?? ""
        if !tensors.isEmpty { s += tensors.joined(separator: ", ") + ": " }
        return s + reasonText
    }

    private var reasonText: String {
        switch reason {
        case .biasOnB: return "lora_B has a bias (lora_bias=True): merging it is not supported, and it is not dropped silently"
        case .notFloat(let t, let d): return "\(t) is \(d); merges need float tensors (F32, BF16, F16, F64)"
        case .missingFactor(let a, let b): return "the adapter needs both \(a) and \(b)"
        case .noEquation(let module, let base): return "no einsum equation is known for \(module): pass --equation '\(base)=lhs,rhs->out'"
        case .rankDiffersFromConfig(let r, let c): return "the adapter has rank \(r), the LoRA config says \(c)"
        case .noEinsumAlpha:
            return "no LoRA alpha is known for this einsum: pass --config gemma_2b_lora, --config gemma_300m_lora or --config 'GLOB=rank=R,alpha=A'"
        case .peftNeedsConfig: return "PEFT adapters need their adapter_config.json for the scale: pass --adapter DIR or --adapter-config FILE"
        case .convShapesMismatch(let w, let a, let b): return "conv LoRA shapes do not fit: weight \(w), A \(a), B \(b)"
        case .weightRankUnsupported(let r): return "a \(r)-D weight cannot take a LoRA adapter"
        case .doraNotLinear: return "DoRA is merged for Linear layers only; refusing rather than merging it as plain LoRA"
        case .rankDiffersFromAdapterConfig(let r, let c, let m): return "the adapter has rank \(r), adapter_config.json says \(c) for \(m)"
        case .doraMagnitudeMismatch(let m, let w): return "DoRA magnitude \(m) does not fit weight \(w)"
        case .genericNeedsScale: return "generic LoRA needs --scale"
        case .genericNeedsMatrix: return "generic LoRA needs a weight of 2 or more axes, or --equation"
        case .notALoRAPair(let w, let a, let b): return "shapes do not form a LoRA pair: weight \(w), A \(a), B \(b)"
        case .ambiguousSquareShapes: return "square shapes are ambiguous (A·B or B·A): pass --equation"
        case .layoutRanksMismatch(let w, let a, let b): return "ranks do not fit the LoRA layout: weight \(w), A \(a), B \(b)"
        case .axisSizeMismatch(let factor, let axis, let n, let m, let w, let a, let b):
            return "\(factor) has \(axis) of size \(n), expected \(m) (weight \(w), A \(a), B \(b))"
        case .zeroRank: return "the adapter has rank 0"
        case .rankIsWeightAxis: return "the rank label is an axis of the weight"
        case .weightAxisFromNeither(let l): return "weight axis \(l) comes from neither A nor B"
        case .adapterAxisNotInWeight(let l): return "adapter axis \(l) is not an axis of the weight"
        case .mergedNonFinite(let n): return "the merged weight has \(n) non-finite values: the adapter or base is broken"
        case .doraMagnitudeSize(let n, let w): return "DoRA magnitude of \(n) values does not fit weight \(w) (only 2-D Linear DoRA is merged)"
        case .baseEndedInsideRow: return "the base ended inside a row of the merge"
        case .adapterNonFinite(let n): return "the adapter holds \(n) non-finite values (NaN or Inf)"
        case .equationMalformed(let e): return "einsum equation '\(e)' is not of the form lhs,rhs->out"
        case .equationLabelsRepeat(let e): return "einsum equation '\(e)': the weight's labels must be distinct"
        case .equationAxesDoNotFit(let e, let axes, let n): return "einsum equation '\(e)': LoRA axes (\(axes.map(String.init).joined(separator: ", "))) do not fit a weight of \(n) axes"
        case .equationRankAxisNotOutput(let e, let b):
            return "einsum equation '\(e)': LoRA axis \(b) must be an output axis not in the input; the adapter cannot be merged into one weight"
        case .equationWeightRankMismatch(let e, let n, let r): return "einsum equation '\(e)' names \(n) weight axes, the weight has \(r)"
        case .configRankNotPositive(let t): return "LoRA config '\(t)': rank must be a positive integer"
        case .configAlphaNotNumber(let t): return "LoRA config '\(t)': alpha must be a number"
        case .configUnknown(let t, let presets): return "LoRA config '\(t)': expected a preset (\(presets.joined(separator: ", "))) or rank=R,alpha=A[,rslora]"
        case .configWithoutAlpha(let t): return "LoRA config '\(t)' has no alpha"
        case .configNotObject: return "not a JSON object"
        case .configNotJSON(let detail): return "not JSON: \(detail)"
        case .notLoRAAdapter(let type): return "peft_type is \(type); only LORA adapters are merged"
        case .rankPatternNotInteger(let k): return "rank_pattern[\(k)] is not an integer"
        case .rankPatternNotPositive(let k): return "rank_pattern[\(k)] must be positive"
        case .alphaPatternNotNumber(let k): return "alpha_pattern[\(k)] is not a number"
        case .rankNotPositive: return "r must be positive"
        case .patternNotRegex(let p): return "adapter_config.json: pattern '\(p)' is not a regular expression this tool understands"
        case .noAdapterModel: return "holds neither adapter_model.safetensors nor adapter_model.bin"
        case .severalSchemes(let s): return "adapter names of several schemes (\(s.joined(separator: ", "))): pass --scheme"
        case .notAPartOfScheme: return "the adapter file holds a tensor that is not a LoRA part of this scheme"
        case .cannotWriteAs(let d): return "cannot write a merged weight as \(d)"
        case .arrivedAfterBase:
            return "arrived after its base was passed on; without a stream manifest adapters must come before their base (ckpt-read writes a manifest)"
        case .duplicatePart(let part, let module): return "two tensors are the \(part) of \(module)"
        case .duplicateBase(let module): return "two weights are the base of \(module)"
        case .leftovers(let adapters, let bases):
            var lines: [String] = []
            if !adapters.isEmpty { lines.append("adapter tensors without a base: \(adapters.joined(separator: ", "))") }
            if !bases.isEmpty { lines.append("bases whose adapters never completed: \(bases.joined(separator: ", "))") }
            return lines.joined(separator: "; ")
        case .several(let problems): return problems.joined(separator: "; ")
        }
    }
}
