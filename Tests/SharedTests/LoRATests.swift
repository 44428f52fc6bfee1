import Testing
@testable import Shared

private struct Rand {
    var state: UInt64
    mutating func next() -> Float {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return Float(Int64(bitPattern: state >> 11) % 2001 - 1000) / 1000
    }
    mutating func array(_ n: Int) -> [Float] { (0..<n).map { _ in next() } }
}

private func bytes(_ a: [Float]) -> [UInt8] { a.withUnsafeBytes { [UInt8]($0) } }

@Suite struct FloatConversionTests {
    /// float32 bits → bfloat16 bits, as ml_dtypes rounds (nearest, ties to even; NaN quieted).
    static let golden: [(UInt32, UInt16)] = [
        (0x3F80_0000, 0x3F80), (0x3F80_8000, 0x3F80), (0x3F81_8000, 0x3F82), (0x3F80_8001, 0x3F81),
        (0xBF80_8000, 0xBF80), (0x7F7F_FFFF, 0x7F80), (0x7F80_0000, 0x7F80), (0xFF80_0000, 0xFF80),
        (0x7FC0_0001, 0x7FC0), (0x7F80_0001, 0x7FC0), (0xFF81_0000, 0xFFC1), (0x0000_8000, 0x0000),
        (0x0001_8000, 0x0002), (0x0000_0001, 0x0000), (0x8000_0000, 0x8000), (0x3FFF_FFFF, 0x4000),
    ]

    @Test func bfloat16RoundsToNearestEven() {
        for (f, b) in FloatConversionTests.golden {
            #expect(FloatConversion.bfloat16Bits(Float(bitPattern: f)) == b, "\(String(f, radix: 16))")
        }
        // The vectorised path (16 at a time, then a tail) gives the same bits.
        let once: [Float] = FloatConversionTests.golden.map { Float(bitPattern: $0.0) }
        let values: [Float] = once + once + once + [1.5, -2.25, 3e-39]
        var out = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { v in out.withUnsafeMutableBytes { FloatConversion.narrow(v.baseAddress!, count: values.count, to: .bf16, into: $0.baseAddress!) } }
        #expect(out == values.map { FloatConversion.bfloat16Bits($0) })
    }

    @Test func widenIsExactAndFloat16RoundsToNearestEven() {
        let bits: [UInt16] = [0x3F80, 0xC2F7, 0x0001, 0x7F80, 0xFF80]
        var out = [Float](repeating: 0, count: bits.count)
        bits.withUnsafeBytes { b in out.withUnsafeMutableBufferPointer { FloatConversion.widen(b.baseAddress!, .bf16, count: bits.count, into: $0.baseAddress!) } }
        #expect(out.map(\.bitPattern) == bits.map { UInt32($0) << 16 })
        // 1 + 2^-11 is halfway between two float16 values: ties to even (1.0).
        var h = [UInt16](repeating: 0, count: 2)
        [Float(1 + 1.0 / 2048), Float(1 + 3.0 / 2048)].withUnsafeBufferPointer { v in
            h.withUnsafeMutableBytes { FloatConversion.narrow(v.baseAddress!, count: 2, to: .f16, into: $0.baseAddress!) }
        }
        #expect(h == [0x3C00, 0x3C02])
    }
}

@Suite struct EinsumLoRATests {
    @Test func attnVecSumsBOverTheHeads() throws {
        let l = try EinsumLoRA.layout(equation: "BTNH,NHD->BTD", weightRank: 4)
        let r = LowRankLayout.rank, layer = EinsumLoRA.layerLabel
        #expect(l.weight == [layer, "N", "H", "D"])
        #expect(l.a == [layer, "N", "H", r])
        #expect(l.b == [layer, "N", r, "D"])
        #expect(l.summedInB == ["N"])
        let q = try EinsumLoRA.layout(equation: "BTD,NDH->BTNH", weightRank: 3)
        #expect(q.summedInB.isEmpty)  // N is an output axis: per head
    }

    @Test func refusesWhatNoSingleWeightCanDo() {
        // The LoRA axis b (H) is not an output axis.
        #expect { try EinsumLoRA.layout(equation: "BTNH,NH->BTN", weightRank: 2) } throws: { ($0 as? LoRAError)?.reason == .equationRankAxisNotOutput(equation: "BTNH,NH->BTN", axis: "H") }
        // b is also an input axis.
        #expect { try EinsumLoRA.layout(equation: "BTH,DH->BTH", weightRank: 2) } throws: { ($0 as? LoRAError)?.reason == .equationRankAxisNotOutput(equation: "BTH,DH->BTH", axis: "H") }
        #expect { try EinsumLoRA.layout(equation: "BTD,NDH->BTNH", weightRank: 5) } throws: { ($0 as? LoRAError)?.reason == .equationWeightRankMismatch(equation: "BTD,NDH->BTNH", named: 3, weightRank: 5) }
        #expect { try EinsumLoRA.layout(equation: "BTD,DD->BTD", weightRank: 2) } throws: { ($0 as? LoRAError)?.reason == .equationLabelsRepeat(equation: "BTD,DD->BTD") }
        #expect { try EinsumLoRA.layout(equation: "nonsense", weightRank: 2) } throws: { ($0 as? LoRAError)?.reason == .equationMalformed(equation: "nonsense") }
    }

    @Test func openpiModulesAndConfigs() throws {
        #expect(EinsumLoRA.openpiEquation(module: "attn_vec_einsum_1") == "BTNH,NHD->BTD")
        #expect(EinsumLoRA.openpiEquation(module: "kv_einsum") == "BSD,2KDH->2BSKH")
        #expect(EinsumLoRA.openpiEquation(module: "mystery") == nil)
        #expect(try EinsumLoRAConfig.parse("gemma_300m_lora") == EinsumLoRAConfig(rank: 32, alpha: 32))
        let c = try EinsumLoRAConfig.parse("rank=16,alpha=32,rslora")
        #expect(c.scale(rank: 16) == 8)
        #expect { try EinsumLoRAConfig.parse("rank=16") } throws: { ($0 as? LoRAError)?.reason == .configWithoutAlpha(config: "rank=16") }
        #expect { try EinsumLoRAConfig.parse("gemma_7b") } throws: { ($0 as? LoRAError)?.reason == .configUnknown(config: "gemma_7b", presets: EinsumLoRAConfig.presets.keys.sorted()) }
    }
}

@Suite struct LowRankMergeTests {
    /// ΔW by definition, index by index, in Double.
    static func naive(_ layout: LowRankLayout, sizes: [Character: Int], w: [Float], a: [Float], b: [Float], scale: Double) -> [Float] {
        func strides(_ labels: [Character]) -> [Character: Int] {
            var s: [Character: Int] = [:], n = 1
            for l in labels.reversed() { s[l] = n; n *= sizes[l]! }
            return s
        }
        let ws = strides(layout.weight), asd = strides(layout.a), bs = strides(layout.b)
        let r = LowRankLayout.rank
        var out = w
        let summed = Array(layout.summedInB)
        for i in 0..<w.count {
            var idx: [Character: Int] = [:]
            var rest = i
            for l in layout.weight.reversed() { idx[l] = rest % sizes[l]!; rest /= sizes[l]! }
            var acc = 0.0
            for k in 0..<sizes[r]! {
                idx[r] = k
                let av = Double(a[layout.a.reduce(0) { $0 + idx[$1]! * asd[$1]! }])
                // Σ over B's summed axes, each on its own.
                var bsum = 0.0
                let counts = summed.map { sizes[$0]! }
                var odo = [Int](repeating: 0, count: summed.count)
                repeat {
                    var j = idx
                    for (n, l) in summed.enumerated() { j[l] = odo[n] }
                    bsum += Double(b[layout.b.reduce(0) { $0 + j[$1]! * bs[$1]! }])
                    var d = summed.count - 1
                    while d >= 0 { odo[d] += 1; if odo[d] < counts[d] { break }; odo[d] = 0; d -= 1 }
                    if d < 0 { break }
                } while true
                acc += av * bsum
            }
            out[i] = Float(Double(w[i]) + scale * acc)
        }
        _ = ws
        return out
    }

    func check(_ layout: LowRankLayout, sizes: [Character: Int], scale: Double, seed: UInt64) throws {
        var rng = Rand(state: seed)
        let shape = { (ls: [Character]) in ls.map { sizes[$0]! } }
        let w = rng.array(shape(layout.weight).reduce(1, *)), a = rng.array(shape(layout.a).reduce(1, *)), b = rng.array(shape(layout.b).reduce(1, *))
        let m = try LowRankMerge(layout: layout, weight: shape(layout.weight), a: shape(layout.a), b: shape(layout.b), names: ["w", "a", "b"])
        let (left, right) = m.factors(a: a, b: b, scale: scale)
        var out = [Float](repeating: 0, count: w.count)
        let drift = try w.withUnsafeBytes { wb in
            try out.withUnsafeMutableBytes { ob in
                try m.apply(base: wb.baseAddress!, baseType: .f32, left: left, right: right, output: ob.baseAddress!, outputType: .f32, name: "w")
            }
        }
        #expect(drift.count == 0)
        let ref = LowRankMergeTests.naive(layout, sizes: sizes, w: w, a: a, b: b, scale: scale)
        let worst = zip(out, ref).map { abs($0 - $1) }.max()!
        #expect(worst < 1e-5, "max error \(worst)")
        // And streamed through in uneven chunks, the same bits.
        if m.inOrder {
            let s = try StreamingMerge(m, left: left, right: right, baseType: .f32, outputType: .f32, name: "w")
            var streamed: [UInt8] = []
            let raw = bytes(w)
            var at = 0, step = 1
            while at < raw.count {
                let n = min(step, raw.count - at)
                streamed += try raw.withUnsafeBytes { try s.take(UnsafeRawBufferPointer(rebasing: $0[at..<at + n])) }
                at += n
                step = step * 3 + 5
            }
            try s.finish()
            #expect(streamed == bytes(out))
        }
    }

    @Test func attnVecWithLayersMatchesTheDefinition() throws {
        let l = try EinsumLoRA.layout(equation: "BTNH,NHD->BTD", weightRank: 4)
        try check(l, sizes: [EinsumLoRA.layerLabel: 2, "N": 3, "H": 5, "D": 37, LowRankLayout.rank: 4], scale: 2.5, seed: 1)
    }

    @Test func kvAndOddSizesMatchTheDefinition() throws {
        let l = try EinsumLoRA.layout(equation: "BSD,2KDH->2BSKH", weightRank: 4)
        try check(l, sizes: ["2": 2, "K": 1, "D": 7, "H": 19, LowRankLayout.rank: 3], scale: 0.5, seed: 2)
        // PEFT Linear: rows from B, columns from A.
        let r = LowRankLayout.rank
        try check(LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r]), sizes: ["o": 9, "i": 33, r: 5], scale: 3, seed: 3)
    }

    @Test func aLayoutNotInBatchRowColumnOrderIsAddedInPlace() throws {
        let r = LowRankLayout.rank
        let l = LowRankLayout(weight: ["x", "n", "y"], a: ["x", "n", r], b: ["n", r, "y"])
        let m = try LowRankMerge(layout: l, weight: [4, 3, 6], a: [4, 3, 2], b: [3, 2, 6], names: [])
        #expect(!m.inOrder)
        try check(l, sizes: ["x": 4, "n": 3, "y": 6, r: 2], scale: 1.5, seed: 4)
    }

    @Test func shapeErrorsNameTheTensors() {
        let r = LowRankLayout.rank
        let l = LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r])
        #expect { try LowRankMerge(layout: l, weight: [4, 5], a: [2, 5], b: [4, 3], names: ["w", "a", "b"]) } throws: { ($0 as? LoRAError)?.reason == .axisSizeMismatch(factor: "lora B", axis: "rank", size: 3, expected: 2, weight: [4, 5], a: [2, 5], b: [4, 3]) }
        do {
            _ = try LowRankMerge(layout: l, weight: [4, 5], a: [2, 6], b: [4, 2], names: ["w", "a", "b"])
            Issue.record("no error")
        } catch {
            #expect(error.description.hasPrefix("w, a, b: lora A has axis i of size 6, expected 5"))
        }
    }

    @Test func nonFiniteResultsAreErrors() throws {
        let r = LowRankLayout.rank
        let m = try LowRankMerge(layout: LowRankLayout(weight: ["o", "i"], a: [r, "i"], b: ["o", r]), weight: [2, 2], a: [1, 2], b: [2, 1], names: [])
        let w: [Float] = [1, 2, .infinity, 4]
        var out = [Float](repeating: 0, count: 4)
        let (left, right) = m.factors(a: [1, 1], b: [1, 1], scale: 1)
        #expect {
            try w.withUnsafeBytes { wb in
                try out.withUnsafeMutableBytes { ob in
                    try m.apply(base: wb.baseAddress!, baseType: .f32, left: left, right: right, output: ob.baseAddress!, outputType: .bf16, name: "w")
                }
            }
        } throws: { ($0 as? LoRAError)?.reason == .mergedNonFinite(count: 1) }
    }
}

@Suite struct PEFTConfigTests {
    @Test func patternsMatchAsPEFTMatchesThem() throws {
        let json = try JSONParser.parse(#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":false,"rank_pattern":{"q":4,"layer\\.1\\..*":2},"alpha_pattern":{"v":3}}"#)
        let c = try PEFTAdapterConfig(json: json, file: "adapter_config.json")
        #expect(try c.rankAndAlpha(module: "enc.layer.0.q") == (4, 16))
        #expect(try c.rankAndAlpha(module: "enc.layer.1.v") == (2, 3))
        #expect(try c.rankAndAlpha(module: "enc.layer.0.qq") == (8, 16))  // the whole last part must match
        #expect(try c.rankAndAlpha(module: "q") == (4, 16))
        #expect(try c.scale(module: "enc.layer.0.k").scale == 2)
        #expect { try PEFTAdapterConfig(json: try JSONParser.parse(#"{"peft_type":"IA3"}"#), file: "x") } throws: { ($0 as? LoRAError)?.reason == .notLoRAAdapter(peftType: "IA3") }
    }

    /// Found by scripts/fuzz.sh peft (Tests/fuzz/regressions/peft/): Int(Double) trapped.
    @Test func rankOutOfIntRangeIsAnErrorNotACrash() {
        for r in ["1e300", "-92233720368547758098", "9223372036854775808", "-1e309", "0.5", "0"] {
            #expect(throws: LoRAError.self) { try PEFTAdapterConfig(json: try JSONParser.parse(#"{"r":\#(r),"lora_alpha":16}"#), file: "x") }
        }
        #expect((try? PEFTAdapterConfig(json: try JSONParser.parse(#"{"r":8.0}"#), file: "x"))?.r == 8)
    }

    @Test func peftNamesAndWrapping() {
        let s = LoRAScheme(kind: .peft)
        #expect(s.role(of: "base_model.model.enc.q.lora_A.weight") == .adapter(module: "enc.q", part: .a))
        #expect(s.role(of: "enc.q.lora_B.default.weight") == .adapter(module: "enc.q", part: .b))
        #expect(s.role(of: "emb.lora_embedding_A") == .adapter(module: "emb", part: .embeddingA))
        #expect(s.role(of: "fc.lora_magnitude_vector") == .adapter(module: "fc", part: .magnitude))
        #expect(s.role(of: "fc.lora_B.bias") == .adapter(module: "fc", part: .biasB))
        #expect(s.role(of: "base_model.model.fc.base_layer.weight") == .base(module: "fc"))
        #expect(s.role(of: "fc.bias") == nil)
        #expect(s.outputName("base_model.model.fc.base_layer.bias") == "fc.bias")
        #expect(LoRAScheme.detect("a/b/lora_a") == .openpi)
        #expect(LoRAScheme.detect("a.weight") == nil)
    }
}

@Suite struct LoRAMergerTests {
    private func openpiScheme() -> [LoRASchemeKind: LoRAScheme] {
        var s = LoRAScheme(kind: .openpi)
        s.einsumConfigs = [(nil, EinsumLoRAConfig(rank: nil, alpha: 2))]
        return [.openpi: s]
    }

    private func f32(_ name: String, _ shape: [Int], _ values: [Float]) -> (TensorHeader, [UInt8]) {
        tensor(name, .f32, shape, bytes(values))
    }

    @Test func aBaseBeforeItsAdaptersIsHeldAndTheManifestSaysWhere() throws {
        let tensors = [f32("m/linear", [2, 2], [1, 2, 3, 4]), f32("m/other", [1], [9]),
                       f32("m/linear_lora_a", [2, 1], [1, 1]), f32("m/linear_lora_b", [1, 2], [1, 0])]
        let merger = try LoRAMerger(upstream: MemorySource(tensors), options: .init(scheme: .openpi, schemes: openpiScheme()))
        #expect(merger.manifest?.map(\.name) == ["m/other", "m/linear"])
        let sink = CollectingSink()
        try pump(from: merger, to: sink)
        #expect(sink.tensors.map(\.0.descriptor.name) == ["m/other", "m/linear"])
        // FeedForward LoRA is unscaled: W + A·B = [[1+1, 2], [3+1, 4]].
        #expect(sink.tensors[1].1 == bytes([2, 2, 4, 4]))
        #expect(merger.summary.scales == ["1 (openpi FeedForward: unscaled)": 1])
    }

    @Test func withoutAManifestALateAdapterIsAnError() throws {
        let tensors = [f32("m/linear", [2, 2], [1, 2, 3, 4]), f32("m/linear_lora_a", [2, 1], [1, 1]), f32("m/linear_lora_b", [1, 2], [1, 0])]
        let merger = try LoRAMerger(upstream: MemorySource(tensors, withManifest: false), options: .init(scheme: .openpi, schemes: openpiScheme()))
        #expect(merger.manifest == nil)
        #expect { try pump(from: merger, to: CollectingSink()) } throws: { ($0 as? LoRAError)?.reason == .arrivedAfterBase }
    }

    @Test func leftoversAreListedTogether() throws {
        let tensors = [f32("x/lora_a", [2, 1], [1, 1]), f32("x/lora_b", [1, 2], [1, 0]), f32("y_lora_a", [2, 1], [1, 1])]
        do {
            _ = try LoRAMerger(upstream: MemorySource(tensors), options: .init(scheme: .openpi, schemes: openpiScheme()))
            Issue.record("no error")
        } catch let e as LoRAError {
            #expect(e.description == "adapter tensors without a base: x/lora_a, x/lora_b, y_lora_a")
        }
    }
}
