import Testing
@testable import Shared

@Suite struct PartitionTests {
    func f32(_ name: String, _ n: Int) -> TensorDescriptor { try! TensorDescriptor(name: name, dtype: .f32, shape: [n]) }

    @Test func partSpecsAreCountedFromZero() {
        #expect(PartSpec(argument: "0/1") == PartSpec(index: 0, count: 1))
        #expect(PartSpec(argument: "3/4") == PartSpec(index: 3, count: 4))
        for bad in ["4/4", "1/0", "-1/4", "1", "1/2/3", "a/2", "1/", "/2", " 1/2", "+1/2"] { #expect(PartSpec(argument: bad) == nil, "\(bad)") }
        #expect(PartSpec.problem("4/4").contains("counted from 0"))
    }

    @Test func largestFirstToTheLeastLoadedPart() {
        // Sizes 10, 9, 8, 7, 1 (×4 bytes) into 2 parts: 10 → p0, 9 → p1, 8 → p1 (9 < 10),
        // 7 → p0 (10 < 17), 1 → p0 (17 = 17: the lower index).
        let m = [f32("a", 1), f32("b", 10), f32("c", 8), f32("d", 9), f32("e", 7)]
        let p = Partition(m, groups: TensorGroups(count: m.count), count: 2)
        #expect(p.partOf == [0, 0, 1, 1, 0])
        #expect(p.bytes == [72, 68])
        #expect(p.tensors(in: 0, of: m).map(\.name) == ["a", "b", "e"])  // in the input's order
        #expect(p.tensors(in: 1, of: m).map(\.name) == ["c", "d"])
    }

    @Test func tiesGoByFirstNameThenPartIndex() {
        // Four equal tensors: sorted by name (b, c, x, y), each to the least loaded part,
        // lowest index first.
        let m = [f32("y", 4), f32("b", 4), f32("x", 4), f32("c", 4)]
        let p = Partition(m, groups: TensorGroups(count: m.count), count: 3)
        #expect(p.partOf == [0, 0, 2, 1])  // b → 0, c → 1, x → 2, y → 0
        #expect(p.bytes == [32, 16, 16])
    }

    @Test func deterministicWhateverTheOrderOfComputation() {
        // The same manifest gives the same assignment and digest every time.
        let m = (0..<200).map { f32("t\($0)", ($0 * 7919) % 97 + 1) }
        let a = Partition(m, groups: TensorGroups(count: m.count), count: 7)
        let b = Partition(m, groups: TensorGroups(count: m.count), count: 7)
        #expect(a.partOf == b.partOf && a.digest == b.digest)
        #expect(Partition(m, groups: TensorGroups(count: m.count), count: 6).digest != a.digest)
        // Balanced: greedy LPT is within the largest item of the mean.
        let mean = a.bytes.reduce(0, +) / 7
        #expect(a.bytes.allSatisfy { abs($0 - mean) <= 97 * 4 })
        // Every tensor in exactly one part.
        #expect((0..<7).reduce(0) { $0 + a.tensors(in: $1, of: m).count } == m.count)
    }

    @Test func groupsAreNeverSplit() {
        let m = (0..<12).map { f32("t\($0)", 10 + $0) }
        var g = TensorGroups(count: m.count)
        g.union([0, 5, 11])
        g.union(3, 4)
        g.union(4, 9)  // transitive: 3, 4, 9
        #expect(g.groups().first == [0, 5, 11])
        for n in 1...6 {
            let p = Partition(m, groups: g, count: n)
            #expect(p.partOf[0] == p.partOf[5] && p.partOf[5] == p.partOf[11])
            #expect(p.partOf[3] == p.partOf[4] && p.partOf[4] == p.partOf[9])
        }
    }

    @Test func morePartsThanGroupsLeavesPartsEmpty() {
        let m = [f32("a", 2), f32("b", 3)]
        var g = TensorGroups(count: 2)
        g.union(0, 1)
        let p = Partition(m, groups: g, count: 4)
        #expect(p.partOf == [0, 0])
        #expect(p.bytes == [20, 0, 0, 0])
        #expect(p.tensors(in: 3, of: m).isEmpty)
        #expect(Partition([], groups: TensorGroups(count: 0), count: 3).bytes == [0, 0, 0])
    }

    @Test func loraPairsFollowLoraMerge() {
        // openpi einsum LoRA (`/w` with `/lora_a`, `/lora_b`) and its FFN form (`_lora_a`).
        let names = ["llm/attn/q_einsum/w", "llm/attn/q_einsum/lora_a", "llm/attn/q_einsum/lora_b", "llm/mlp/gating_einsum",
                     "llm/mlp/gating_einsum_lora_a", "llm/mlp/gating_einsum_lora_b", "llm/norm/scale"]
        let (modules, out) = LoRAScheme.mergePairing(names)
        #expect(modules.sorted { $0[0] < $1[0] } == [[0, 1, 2], [3, 4, 5]])
        #expect(out == ["llm/attn/q_einsum/w", nil, nil, "llm/mlp/gating_einsum", nil, nil, "llm/norm/scale"])
        // PEFT: the base's wrapped name pairs with its adapters; the merge's output name is the plain one.
        let peft = ["base_model.model.l.q.base_layer.weight", "base_model.model.l.q.lora_A.weight", "base_model.model.l.q.lora_B.weight",
                    "base_model.model.l.k.weight"]
        let (pm, po) = LoRAScheme.mergePairing(peft)
        #expect(pm == [[0, 1, 2]])
        #expect(po == ["l.q.weight", nil, nil, "l.k.weight"])
        #expect(LoRAScheme.mergePairing(["a.weight", "b.weight"]).modules.isEmpty)
    }

    @Test func ruleStacksStayTogether() throws {
        let rules = try SliceRuleParser.parse("""
            layers.{L:int}.w -> stacked/w | rearrange "L o -> L o"
            {x*} -> {x}
            """, file: "t.rules")
        let m = (0..<4).map { f32("layers.\($0).w", 8) } + [f32("emb", 30), f32("other", 1)]
        var g = TensorGroups(count: m.count)
        try PartitionGrouping.rules(rules, manifest: m, into: &g)
        let groups = g.groups()
        #expect(groups.contains([0, 1, 2, 3]))
        let p = Partition(m, groups: g, count: 3)
        #expect(Set((0..<4).map { p.partOf[$0] }).count == 1)
        // Without the rules the stack would be spread over the parts.
        let loose = Partition(m, groups: TensorGroups(count: m.count), count: 3)
        #expect(Set((0..<4).map { loose.partOf[$0] }).count > 1)
    }

    @Test func rulesSeeNamesAfterTheMerge() throws {
        // A PEFT base renamed by the merge is stacked by rules written for the merged names.
        let rules = try SliceRuleParser.parse("l.{i:int}.weight -> w | rearrange \"i o -> i o\"", file: "t.rules")
        let m = [f32("base_model.model.l.0.base_layer.weight", 4), f32("base_model.model.l.0.lora_A.weight", 4),
                 f32("base_model.model.l.0.lora_B.weight", 4), f32("base_model.model.l.1.weight", 4)]
        var g = TensorGroups(count: m.count)
        let names = PartitionGrouping.lora(m, into: &g)
        try PartitionGrouping.rules(rules, manifest: m, names: names, into: &g)
        #expect(g.groups() == [[0, 1, 2, 3]])
    }

    @Test func partHeaderRoundTrips() {
        let h = PartHeader(index: 1, count: 3, input: "ab", plan: "cd", tensors: 7)
        #expect(PartHeader(json: h.json) == h)
        #expect(PartHeader(json: .object(JSONObject([("index", .int(3)), ("count", .int(3)), ("input", .string("x")), ("tensors", .int(0))]))) == nil)
        // The digest names the manifest: names, types, shapes and order.
        let a = [f32("a", 1), f32("b", 2)]
        #expect(Partition.manifestDigest(a) == Partition.manifestDigest(a))
        #expect(Partition.manifestDigest(a) != Partition.manifestDigest(a.reversed()))
    }

    @Test func recordNamesParse() {
        #expect(PartRecords.parseRecordName("part-2-of-5.json") == PartSpec(index: 2, count: 5))
        #expect(PartRecords.parseRecordName(".part-2-of-5.json.ckpt-1-1.tmp") == nil)
        #expect(PartRecords.parseRecordName("part-5-of-5.json") == nil)
        #expect(PartRecords.shardName(PartSpec(index: 0, count: 3)) == "model-00001-of-00003.safetensors")
    }
}
