/// The parts of a PEFT `adapter_config.json` (LoraConfig) that decide a merge
/// (peft/src/peft/tuners/lora/config.py, layer.py `update_layer`).
public struct PEFTAdapterConfig: Sendable {
    public var r: Int
    public var alpha: Double
    public var useRSLoRA = false
    public var fanInFanOut = false
    public var useDoRA = false
    public var loraBias = false
    /// Per-module overrides: regex → value, in the file's order (PEFT takes the first match).
    public var rankPattern: [(pattern: String, value: Int)] = []
    public var alphaPattern: [(pattern: String, value: Double)] = []

    public init(r: Int, alpha: Double) {
        self.r = r
        self.alpha = alpha
    }

    public init(json: JSONValue, file: String) throws(LoRAError) {
        guard let o = json.objectValue else { throw LoRAError(.configNotObject, file: file) }
        if let type = o["peft_type"]?.stringValue, type != "LORA" {
            throw LoRAError(.notLoRAAdapter(peftType: type), file: file)
        }
        func number(_ key: String) -> Double? {
            if case .number(let text)? = o[key] { return Double(text) }
            return nil
        }
        func flag(_ key: String) -> Bool {
            if case .bool(let b)? = o[key] { return b }
            return false
        }
        // Int(_:) traps on a Double outside Int's range (a hostile "r": 1e300): check first.
        // Anything below 1 (NaN too) is refused below as before.
        let rank = number("r") ?? 8
        r = rank >= 1 && rank < 0x1p62 ? Int(rank) : 0
        alpha = number("lora_alpha") ?? 8
        useRSLoRA = flag("use_rslora")
        fanInFanOut = flag("fan_in_fan_out")
        useDoRA = flag("use_dora")
        loraBias = flag("lora_bias")
        for (k, v) in o["rank_pattern"]?.objectValue ?? JSONObject() {
            guard case .number(let t) = v, let n = Int(t) else { throw LoRAError(.rankPatternNotInteger(key: k), file: file) }
            // A rank below 1 would scale by infinity or NaN (r below 1 is refused the same way).
            guard n > 0 else { throw LoRAError(.rankPatternNotPositive(key: k), file: file) }
            rankPattern.append((k, n))
        }
        for (k, v) in o["alpha_pattern"]?.objectValue ?? JSONObject() {
            guard case .number(let t) = v, let n = Double(t) else { throw LoRAError(.alphaPatternNotNumber(key: k), file: file) }
            alphaPattern.append((k, n))
        }
        guard r > 0 else { throw LoRAError(.rankNotPositive, file: file) }
    }

    /// PEFT's `get_pattern_key`: the first pattern with `re.match(rf"(.*\.)?({key})$", module)`.
    static func firstMatch<T>(_ patterns: [(pattern: String, value: T)], module: String) throws(LoRAError) -> T? {
        for (pattern, value) in patterns {
            let regex: Regex<AnyRegexOutput>
            do { regex = try Regex("(.*\\.)?(\(pattern))") } catch {
                throw LoRAError(.patternNotRegex(pattern: pattern))
            }
            if (try? regex.wholeMatch(in: module)) != nil { return value }
        }
        return nil
    }

    /// Rank and alpha for `module` (its name in the base model, e.g. `encoder.block.0.layer.0.SelfAttention.q`).
    public func rankAndAlpha(module: String) throws(LoRAError) -> (rank: Int, alpha: Double) {
        (try PEFTAdapterConfig.firstMatch(rankPattern, module: module) ?? r,
         try PEFTAdapterConfig.firstMatch(alphaPattern, module: module) ?? alpha)
    }

    public func scale(module: String) throws(LoRAError) -> (scale: Double, rank: Int, alpha: Double) {
        let (rank, alpha) = try rankAndAlpha(module: module)
        return (useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank), rank, alpha)
    }
}
