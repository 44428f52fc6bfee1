import Testing
@testable import Shared

/// One refused input per LoRA rule, checking the reason (and where it matters, the tensors).
@Suite struct LoRAErrorTests {
    func failure(_ body: () throws -> Any) -> LoRAError? {
        do { _ = try body(); return nil } catch let e as LoRAError { return e } catch {
            Issue.record("not a LoRAError: \(error)")
            return nil
        }
    }

    func d(_ name: String, _ shape: [Int], _ dtype: DType = .f32) -> TensorDescriptor {
        try! TensorDescriptor(name: name, dtype: dtype, shape: shape)
    }

    func peftScheme(r: Int = 2) -> LoRAScheme {
        var s = LoRAScheme(kind: .peft)
        s.peft = PEFTAdapterConfig(r: r, alpha: Double(r))
        return s
    }

    func plan(_ s: LoRAScheme, module: String = "m", base: TensorDescriptor, _ parts: [LoRAPart: TensorDescriptor]) -> LoRAError.Reason? {
        failure { try s.plan(module: module, base: base, parts: parts) }?.reason
    }

    @Test func planningRules() {
        let w = d("w", [4, 5]), a = d("a", [2, 5]), b = d("b", [4, 2])
        #expect(plan(peftScheme(), base: w, [.a: a, .b: b]) == nil)
        #expect(plan(peftScheme(), base: w, [.a: a, .b: b, .biasB: d("bb", [4])]) == .biasOnB)
        #expect(plan(peftScheme(), base: d("w", [4, 5], .i32), [.a: a, .b: b]) == .notFloat(tensor: "w", dtype: "I32"))
        #expect(plan(peftScheme(), base: w, [.a: a]) == .missingFactor(a: "lora A", b: "lora B"))
        #expect(plan(LoRAScheme(kind: .peft), base: w, [.a: a, .b: b]) == .peftNeedsConfig)
        #expect(plan(peftScheme(), base: d("w", [4, 3, 3, 3]), [.a: d("a", [2, 3, 3, 3]), .b: d("b", [4, 2, 3, 1])])
            == .convShapesMismatch(weight: [4, 3, 3, 3], a: [2, 3, 3, 3], b: [4, 2, 3, 1]))
        #expect(plan(peftScheme(), base: d("w", [4]), [.a: a, .b: b]) == .weightRankUnsupported(rank: 1))
        #expect(plan(peftScheme(), base: d("w", [4, 3, 3, 3]), [.a: d("a", [2, 3, 3, 3]), .b: d("b", [4, 2, 1, 1]), .magnitude: d("m", [4])])
            == .doraNotLinear)
        #expect(plan(peftScheme(r: 8), base: w, [.a: a, .b: b]) == .rankDiffersFromAdapterConfig(rank: 2, configured: 8, module: "m"))
        #expect(plan(peftScheme(), base: w, [.a: a, .b: b, .magnitude: d("m", [3])]) == .doraMagnitudeMismatch(magnitude: [3], weight: [4, 5]))
        let e = failure { try peftScheme().plan(module: "m", base: w, parts: [.a: a, .b: b, .biasB: d("bb", [4])]) }
        #expect(e?.tensors == ["w", "a", "b", "bb"])
    }

    @Test func openpiPlanningRules() {
        var s = LoRAScheme(kind: .openpi)
        let w = d("x/attn_vec_einsum/w", [2, 3, 4]), a = d("x/attn_vec_einsum/lora_a", [2, 3, 1]), b = d("x/attn_vec_einsum/lora_b", [2, 1, 4])
        #expect(plan(s, module: "x/attn_vec_einsum", base: w, [.a: a, .b: b]) == .noEinsumAlpha)
        #expect(plan(s, module: "x/mystery", base: w, [.a: a, .b: b]) == .noEquation(module: "mystery", base: "x/attn_vec_einsum/w"))
        s.einsumConfigs = [(nil, EinsumLoRAConfig(rank: 16, alpha: 2))]
        #expect(plan(s, module: "x/attn_vec_einsum", base: w, [.a: a, .b: b]) == .rankDiffersFromConfig(rank: 1, configured: 16))
    }

    @Test func genericPlanningRules() {
        var s = LoRAScheme(kind: .generic)
        let w = d("w", [4, 5])
        #expect(plan(s, base: w, [.a: d("a", [2, 5]), .b: d("b", [4, 2])]) == .genericNeedsScale)
        s.genericScale = 1
        #expect(plan(s, base: w, [.a: d("a", [2, 5]), .b: d("b", [4, 2])]) == nil)
        #expect(plan(s, base: d("w", [4]), [.a: d("a", [2, 5]), .b: d("b", [4, 2])]) == .genericNeedsMatrix)
        #expect(plan(s, base: w, [.a: d("a", [2, 6]), .b: d("b", [4, 2])]) == .notALoRAPair(weight: [4, 5], a: [2, 6], b: [4, 2]))
        #expect(plan(s, base: d("w", [2, 2]), [.a: d("a", [2, 2]), .b: d("b", [2, 2])]) == .ambiguousSquareShapes)
    }

    @Test func layoutRules() {
        let r = LowRankLayout.rank
        let l = LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r])
        func merge(_ l: LowRankLayout, _ w: [Int], _ a: [Int], _ b: [Int]) -> LoRAError.Reason? {
            failure { try LowRankMerge(layout: l, weight: w, a: a, b: b, names: ["w", "a", "b"]) }?.reason
        }
        #expect(merge(l, [4], [2, 5], [4, 2]) == .layoutRanksMismatch(weight: [4], a: [2, 5], b: [4, 2]))
        #expect(merge(l, [4, 5], [2, 6], [4, 2])
            == .axisSizeMismatch(factor: "lora A", axis: "axis i", size: 6, expected: 5, weight: [4, 5], a: [2, 6], b: [4, 2]))
        #expect(merge(l, [4, 5], [2, 5], [4, 3])
            == .axisSizeMismatch(factor: "lora B", axis: "rank", size: 3, expected: 2, weight: [4, 5], a: [2, 5], b: [4, 3]))
        #expect(merge(l, [4, 5], [0, 5], [4, 0]) == .zeroRank)
        #expect(merge(LowRankLayout(weight: ["o", r], a: [r, "i"], b: ["o", r]), [4, 2], [2, 5], [4, 2]) == .rankIsWeightAxis)
        #expect(merge(LowRankLayout(weight: ["o", "x"], a: [r, "i"], b: ["o", r]), [4, 3], [2, 5], [4, 2]) == .weightAxisFromNeither(axis: "x"))
        #expect(merge(LowRankLayout(weight: ["o", "i"], a: [r, "i", "z"], b: ["o", r]), [4, 5], [2, 5, 1], [4, 2]) == .adapterAxisNotInWeight(axis: "z"))
    }

    @Test func valueRules() throws {
        let r = LowRankLayout.rank
        let m = try LowRankMerge(layout: LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r]), weight: [2, 2], a: [1, 2], b: [2, 1], names: [])
        let w: [Float] = [1, 2, .infinity, 4]
        var out = [Float](repeating: 0, count: 4)
        let (left, right) = m.factors(a: [1, 1], b: [1, 1], scale: 1)
        let nonFinite = failure {
            try w.withUnsafeBytes { wb in
                try out.withUnsafeMutableBytes { ob in
                    try m.apply(base: wb.baseAddress!, baseType: .f32, left: left, right: right, output: ob.baseAddress!, outputType: .bf16, name: "w")
                }
            }
        }
        #expect(nonFinite?.reason == .mergedNonFinite(count: 1) && nonFinite?.tensors == ["w"])
        var merged: [Float] = [1, 2, 3, 4]
        #expect(failure { try LowRankMerge.scaleToMagnitude(&merged, shape: [2, 2], magnitude: [1], axis: 0, name: "w") }?.reason
            == .doraMagnitudeSize(values: 1, weight: [2, 2]))
        let streaming = try StreamingMerge(m, left: left, right: right, baseType: .f32, outputType: .f32, name: "w")
        #expect(failure { try streaming.finish() }?.reason == .baseEndedInsideRow)
    }

    @Test func einsumRules() {
        func layout(_ e: String, _ rank: Int) -> LoRAError.Reason? { failure { try EinsumLoRA.layout(equation: e, weightRank: rank) }?.reason }
        #expect(layout("nonsense", 2) == .equationMalformed(equation: "nonsense"))
        #expect(layout("BTD,DD->BTD", 2) == .equationLabelsRepeat(equation: "BTD,DD->BTD"))
        #expect(layout("BTD,D->BTD", 1) == .equationAxesDoNotFit(equation: "BTD,D->BTD", axes: [-2, -1], weightAxes: 1))
        #expect(layout("BTNH,NH->BTN", 2) == .equationRankAxisNotOutput(equation: "BTNH,NH->BTN", axis: "H"))
        #expect(layout("BTD,NDH->BTNH", 5) == .equationWeightRankMismatch(equation: "BTD,NDH->BTNH", named: 3, weightRank: 5))
        #expect(LoRAError(.equationAxesDoNotFit(equation: "e", axes: [-2, -1], weightAxes: 1)).description
            == "einsum equation 'e': LoRA axes (-2, -1) do not fit a weight of 1 axes")
    }

    @Test func configRules() {
        func parse(_ t: String) -> LoRAError.Reason? { failure { try EinsumLoRAConfig.parse(t) }?.reason }
        #expect(parse("rank=0,alpha=1") == .configRankNotPositive(config: "rank=0,alpha=1"))
        #expect(parse("rank=1,alpha=x") == .configAlphaNotNumber(config: "rank=1,alpha=x"))
        #expect(parse("gemma_7b") == .configUnknown(config: "gemma_7b", presets: EinsumLoRAConfig.presets.keys.sorted()))
        #expect(parse("rank=16") == .configWithoutAlpha(config: "rank=16"))
    }

    @Test func adapterConfigRules() throws {
        func config(_ json: String) -> LoRAError? { failure { try PEFTAdapterConfig(json: try JSONParser.parse(Array(json.utf8)), file: "c.json") } }
        #expect(config("[]")?.reason == .configNotObject)
        #expect(config("[]")?.description == "c.json: not a JSON object")
        #expect(config(#"{"peft_type":"IA3"}"#)?.reason == .notLoRAAdapter(peftType: "IA3"))
        #expect(config(#"{"rank_pattern":{"q":"x"}}"#)?.reason == .rankPatternNotInteger(key: "q"))
        #expect(config(#"{"rank_pattern":{"q":0}}"#)?.reason == .rankPatternNotPositive(key: "q"))
        #expect(config(#"{"rank_pattern":{"q":-4}}"#)?.reason == .rankPatternNotPositive(key: "q"))
        #expect(config(#"{"alpha_pattern":{"q":"x"}}"#)?.reason == .alphaPatternNotNumber(key: "q"))
        #expect(config(#"{"r":0}"#)?.reason == .rankNotPositive)
        let c = try PEFTAdapterConfig(json: try JSONParser.parse(Array(#"{"rank_pattern":{"(":2}}"#.utf8)), file: "c.json")
        #expect(failure { try c.rankAndAlpha(module: "x") }?.reason == .patternNotRegex(pattern: "("))
    }

    @Test func streamRules() throws {
        var openpi = LoRAScheme(kind: .openpi)
        openpi.einsumConfigs = [(nil, EinsumLoRAConfig(rank: nil, alpha: 2))]
        let candidates: [LoRASchemeKind: LoRAScheme] = [.openpi: openpi, .peft: peftScheme()]
        func planner(scheme: LoRAScheme? = openpi, outputType: DType? = nil, manifest: [TensorDescriptor]? = nil,
                     external: [TensorDescriptor] = []) throws -> LoRAMergePlanner {
            try LoRAMergePlanner(scheme: scheme, candidates: candidates, outputType: outputType, manifest: manifest, external: external)
        }
        #expect(failure { try planner(scheme: nil, manifest: [d("m/linear_lora_a", [2, 1]), d("fc.lora_A.weight", [1, 2])]) }?.reason
            == .severalSchemes(schemes: ["openpi", "peft"].sorted()))
        #expect(failure { try planner(external: [d("m/other", [2])]) }?.reason == .notAPartOfScheme)

        let base = d("m/linear", [2, 2]), a = d("m/linear_lora_a", [2, 1]), b = d("m/linear_lora_b", [1, 2])
        var p = try planner(outputType: .i32)
        _ = try p.consume(a)
        _ = try p.consume(b)
        #expect(failure { try p.consume(base) }?.reason == .cannotWriteAs(dtype: "I32"))

        p = try planner()
        _ = try p.consume(a)
        #expect(failure { try p.consume(a) }?.reason == .duplicatePart(part: "lora A", module: "m/linear"))

        p = try planner(manifest: [base, a, b])
        _ = try p.consume(base)
        #expect(failure { try p.consume(base) }?.reason == .duplicateBase(module: "m/linear"))

        p = try planner()
        _ = try p.consume(base)  // no manifest, no adapters yet: passed on
        let late = failure { try p.consume(a) }
        #expect(late?.reason == .arrivedAfterBase && late?.tensors == ["m/linear_lora_a", "m/linear"])

        #expect(LoRAMergePlanner.leftoverError((adapters: [a], bases: [base]))?.reason == .leftovers(adapters: ["m/linear_lora_a"], bases: ["m/linear"]))
        #expect(LoRAMergePlanner.leftoverError((adapters: [], bases: [])) == nil)
    }

    @Test func mergerRules() throws {
        var openpi = LoRAScheme(kind: .openpi)
        openpi.einsumConfigs = [(nil, EinsumLoRAConfig(rank: nil, alpha: 2))]
        let options = LoRAMerger.Options(scheme: .openpi, schemes: [.openpi: openpi])
        func f32(_ name: String, _ shape: [Int], _ values: [Float]) -> (TensorHeader, [UInt8]) {
            tensor(name, .f32, shape, values.withUnsafeBytes { [UInt8]($0) })
        }
        let left = [f32("x/lora_a", [2, 1], [1, 1]), f32("y_lora_a", [2, 1], [1, 1])]
        #expect(failure { try LoRAMerger(upstream: MemorySource(left), options: options) }?.reason
            == .several(problems: ["adapter tensors without a base: x/lora_a, y_lora_a"]))
        let nan = [f32("m/linear_lora_a", [2, 1], [.nan, 1]), f32("m/linear_lora_b", [1, 2], [1, 0]), f32("m/linear", [2, 2], [1, 2, 3, 4])]
        let merger = try LoRAMerger(upstream: MemorySource(nan), options: options)
        let e = failure { try pump(from: merger, to: CollectingSink()) }
        #expect(e?.reason == .adapterNonFinite(count: 1) && e?.tensors == ["m/linear_lora_a"])
    }
}
