import Testing
@testable import Shared

@Suite struct RulePatternTests {
    @Test func capturesSegmentsRestIntegersAndSets() throws {
        let p = try RulePattern("{p*}.layers.{i:int}.{s=q,k,v}_proj.{w}")
        let m = try #require(p.match("model.enc.layers.12.k_proj.weight"))
        #expect(m == ["p": "model.enc", "i": "12", "s": "k", "w": "weight"])
        #expect(p.match("model.layers.x.k_proj.weight") == nil)     // not an integer
        #expect(p.match("model.layers.1.o_proj.weight") == nil)     // not in the set
        #expect(p.match("model.layers.1.k_proj.a.b") == nil)        // {w} is one segment
        #expect(try RulePattern("{_=params/,}{p*}/kernel").match("params/a/b/kernel") == ["_": "params/", "p": "a/b"])
        #expect(try RulePattern("{_=params/,}{p*}/kernel").match("a/kernel") == ["_": "", "p": "a"])
    }

    @Test func longestCaptureFirstAndBacktracking() throws {
        // {a*} takes as much as it can, leaving {b*} the least that still matches.
        #expect(try RulePattern("{a*}.{b*}.w").match("x.y.z.w") == ["a": "x.y", "b": "z"])
        // A set word that fails later is undone and the next word tried.
        #expect(try RulePattern("{s=ab,a}{t=bc,c}").match("abc") == ["s": "ab", "t": "c"])
        #expect(try RulePattern("{s=ab,a}{t=bc}").match("abc") == ["s": "a", "t": "bc"])
        #expect(try RulePattern("{s=a,ab}b{t*}").match("abbx") == ["s": "a", "t": "bx"])
        #expect(try RulePattern("{s=ab,a}{t=x}").match("abc") == nil)
        // Unicode names compare as UTF-8 bytes and come back whole.
        #expect(try RulePattern("{p*}/κ").match("α/β/κ") == ["p": "α/β"])
    }

    @Test(.timeLimit(.minutes(1))) func manyRestCapturesDoNotBacktrackExponentially() throws {
        // 12 {x*} captures against 200 characters that never end in the literal: plain
        // backtracking tries ~C(200, 12) splits (10^19); remembered failures make it ~12 * 200^2.
        var text = ""
        for i in 0..<12 { text += "{c\(i)*}." }
        let p = try RulePattern(text + "end")
        let name = String(repeating: "a.", count: 100)
        #expect(p.match(name) == nil)
        #expect(p.match(String(repeating: "a.", count: 12) + "end")?["c11"] == "a")
    }

    @Test func targetsRejoinRestCapturesWithTheirSeparator() throws {
        let t = try RulePattern("{p}/kernel")
        #expect(t.substitute(["p": "enc.layer.0"], rejoin: ["p"]) == "enc/layer/0/kernel")
        #expect(t.substitute(["p": "enc.layer.0"]) == "enc.layer.0/kernel")
        #expect(t.substitute([:]) == nil)
    }

    @Test func badPatterns() {
        for bad in ["a{b", "a}b", "{}", "{a}{b}", "{x=}", "{a b}", "{x}.{x}"] {
            #expect(throws: RulePattern.ParseError.self, "\(bad)") { try RulePattern(bad) }
        }
    }
}

@Suite struct RearrangeTests {
    @Test func bindsSplitsMergesAndTransposes() throws {
        let r = try Rearrange("L N D H -> L (N H) D")
        let b = try r.bind([2, 3, 4, 5])
        #expect(b.outputShape == [2, 15, 4])
        #expect(b.axes.map(\.name) == ["L", "N", "H", "D"])
        #expect(b.axes.map(\.stride) == [60, 20, 1, 5])
        let split = try Rearrange("(s o) i -> s o i", sizes: ["s": 3]).bind([12, 5])
        #expect(split.outputShape == [3, 4, 5])
        #expect(try Rearrange("1 n d -> n d").bind([1, 7, 2]).outputShape == [7, 2])
    }

    @Test func refusesWhatDoesNotFit() throws {
        #expect(throws: Rearrange.Failure.self) { try Rearrange("a b -> b") }
        #expect(throws: Rearrange.Failure.self) { try Rearrange("a a -> a a") }
        #expect(throws: Rearrange.Failure.self) { try Rearrange("(a (b)) -> a b") }
        #expect(throws: Rearrange.Failure.self) { try Rearrange("a b -> b a").bind([2, 3, 4]) }
        #expect(throws: Rearrange.Failure.self) { try Rearrange("(a b) -> a b", sizes: ["a": 4]).bind([6]) }
        #expect(throws: Rearrange.Failure.self) { try Rearrange("(a b) -> a b").bind([6]) }  // two unknowns
        #expect(throws: Rearrange.Failure.self) { try Rearrange("1 a -> a").bind([2, 3]) }
    }
}

@Suite struct RuleFileTests {
    @Test func defaultsAndSetValuesFillNames() throws {
        let text = """
            default h=8
            default n=2
            a -> b | rearrange "(n h) d -> n d h" h=${h}
            c -> d | rearrange "(n h) -> n h" n=${n}
            """
        let rules = try SliceRuleParser.parse(text, file: "t.rules")
        #expect(rules[0].ops == [.rearrange(try Rearrange("(n h) d -> n d h", sizes: ["h": 8]))])
        // --set wins over the file's default.
        let set = try SliceRuleParser.parse(text, file: "t.rules", values: ["h": "256"])
        #expect(set[0].ops == [.rearrange(try Rearrange("(n h) d -> n d h", sizes: ["h": 256]))])
        #expect(set[1].ops == [.rearrange(try Rearrange("(n h) -> n h", sizes: ["n": 2]))])
        func reason(_ t: String) -> RuleError.Reason? {
            do { _ = try SliceRuleParser.parse(t, file: "t.rules"); return nil } catch let e as RuleError { return e.reason } catch { return nil }
        }
        #expect(reason(#"a -> b | rearrange "(n h) -> n h" h=${missing}"#) == .undefinedName(name: "missing"))
        #expect(reason("default h") == .malformedDefault)
        #expect(reason("default a-b=1") == .malformedDefault)
    }

    @Test func parsesRulesOpsCommentsAndKeywords() throws {
        let rules = try SliceRuleParser.parse("""
            # a comment
            drop {p*}.num_batches_tracked
            keep tokens   # trailing comment
            {p*}.weight -> {p}/kernel | where rank=2 | rearrange "o i -> i o" | cast BF16
            x -> y | index [:, 0, 1:3] | scale 0.5 | add -1 | mul? {p}.mask
            """, file: "t.rules")
        #expect(rules.count == 4)
        #expect(rules[0].action == .drop && rules[1].action == .keep)
        #expect(rules[2].line == 4 && rules[2].ops.count == 3)
        #expect(rules[2].ops[2] == .cast(.bf16))
        #expect(rules[3].ops[0] == .index([.all, .at(0), .range(1, 3)]))
        #expect(rules[3].ops[3] == .mul(try RulePattern("{p}.mask"), optional: true))
        let w = try TensorDescriptor(name: "a.b.weight", dtype: .f32, shape: [2, 3])
        #expect(rules[2].matches(w) == ["p": "a.b"])
        #expect(rules[2].matches(try TensorDescriptor(name: "a.weight", dtype: .f32, shape: [2])) == nil)  // where rank=2
    }

    /// Fuzz finding 11 (Tests/fuzz/regressions/rules/): a line of a tab and a space trapped
    /// ("Index out of range": it split into no words) instead of being blank.
    @Test func linesOfTabsAndSpacesAreBlank() throws {
        let rules = try SliceRuleParser.parse("\t \n \t\na -> b\t\n\t# comment\n\t\t", file: "t.rules")
        #expect(rules.count == 1 && rules[0].line == 3)
        #expect(throws: RuleError(.malformedLine, file: "t.rules", line: 2)) { try SliceRuleParser.parse("\t \n\t\u{FFFD}#", file: "t.rules") }
    }

    @Test func errorsNameFileAndLine() {
        let cases: [(String, String)] = [
            ("x -> y | frobnicate", "t.rules:1: unknown operation 'frobnicate'"),
            ("\n\nx y", "t.rules:3: expected 'SOURCE -> TARGET"),
            ("x -> y | cast F7", "t.rules:1: cast takes"),
            ("x -> y.{L} | scale 2", "t.rules:1: target {L} is neither captured"),
            ("l.{i:int}.w -> w | rearrange \"a i -> i a\"", "t.rules:1: stacking along i: the first rearrange must start with those axes"),
            ("x -> y | rearrange i o -> o i", "t.rules:1: rearrange takes a quoted expression"),
        ]
        for (text, message) in cases {
            do {
                _ = try SliceRuleParser.parse(text, file: "t.rules")
                Issue.record("no error for \(text)")
            } catch {
                #expect("\(error)".hasPrefix(message), "\(error)")
            }
        }
    }
}

@Suite struct SlicePlanTests {
    private func d(_ name: String, _ shape: [Int], _ dtype: DType = .f32) -> TensorDescriptor {
        try! TensorDescriptor(name: name, dtype: dtype, shape: shape)
    }

    @Test func ordersOutputsWhereTheirLastInputArrives() throws {
        let rules = try SliceRuleParser.parse("""
            l.{i:int}.w -> stacked | rearrange "i a -> i a"
            other -> other2
            """, file: "t.rules")
        let plan = try SlicePlan(rules: rules, inputs: [d("l.1.w", [2]), d("other", [3]), d("l.0.w", [2])], keepUnmatched: false)
        #expect(plan.outputs.map(\.name) == ["other2", "stacked"])
        #expect(plan.outputs[1].shape == [2, 2])
        #expect(plan.groups[0].inputs.map(\.name) == ["l.0.w", "l.1.w"])  // stacking order, not arrival order
    }

    @Test func everyProblemAtOnce() throws {
        let rules = try SliceRuleParser.parse("a -> z\nb -> z\nc -> c2 | rearrange \"x y -> y x\"", file: "t.rules")
        do {
            _ = try SlicePlan(rules: rules, inputs: [d("a", [1]), d("b", [1]), d("c", [3]), d("stray", [1])], keepUnmatched: false)
            Issue.record("no error")
        } catch {
            let text = "\(error)"
            #expect(text.contains("no rule matches 1 input tensors"))
            #expect(text.contains("stray"))
            #expect(text.contains("t.rules:3: rearrange"))
            #expect(text.contains("two rules write z: t.rules:1 and t.rules:2"))
        }
    }
}

@Suite struct SliceCastTests {
    @Test func float8RoundsToNearestEvenWithOverflow() {
        let e4m3 = SliceCast.SmallFloat.e4m3fn, e5m2 = SliceCast.SmallFloat.e5m2
        // 448 is e4m3fn's largest; 464 is the tie between 448 and (unrepresentable) 480.
        #expect(e4m3.encode(448) == 0x7E && e4m3.encode(464) == 0x7E && e4m3.encode(465) == 0x7F)
        #expect(e4m3.encode(.infinity) == 0x7F && e4m3.encode(-.nan) == 0xFF)
        #expect(e4m3.encode(0.001953125) == 0x01)   // 2^-9, the smallest subnormal
        #expect(e4m3.encode(0.0009765625) == 0x00)  // 2^-10: a tie, to even (zero)
        #expect(e5m2.encode(57344) == 0x7B && e5m2.encode(61440) == 0x7C)  // max, then a tie that overflows to Inf
        #expect(e5m2.decode(0x7B) == 57344 && e4m3.decode(0x7E) == 448)
        #expect(SliceCast.SmallFloat.bf16.encode(1 + 1.0 / 256) == 0x3F80)  // a tie, to even
    }
}

@Suite struct SliceSourceTests {
    @Test func castStreamsWholeElementsAcrossOddChunks() throws {
        let values: [Float] = (0..<11).map { Float($0) * 1.5 - 3 }
        let input = values.withUnsafeBytes { [UInt8]($0) }
        // 3-byte chunks cut every float32 apart: elements must be reassembled before casting.
        let source = MemorySource([tensor("x", .f32, [11], input)], chunk: 3)
        let rules = try SliceRuleParser.parse("x -> y | cast BF16", file: "t.rules")
        let sink = CollectingSink()
        try pump(from: try SliceSource(upstream: source, rules: rules, keepUnmatched: false), to: sink)
        #expect(sink.tensors.map(\.0.descriptor.name) == ["y"])
        let expected = values.map { FloatConversion.bfloat16Bits($0) }.withUnsafeBytes { [UInt8]($0) }
        #expect(sink.tensors[0].1 == expected)
    }

    /// Unstacking one leading-axis slice at a time, the next slice read and built on another
    /// thread while this one is handed out, its parts shared without copies: every output
    /// equals the transpose made here, for chunks that cut slices and elements apart and for
    /// a stream upstream (whose whole chunks go straight into the slice).
    @Test func unstacksSliceBySliceAheadAcrossChunkBoundaries() throws {
        let (layers, parts, rows, cols) = (3, 2, 3, 5)
        let values = (0..<(layers * parts * rows * cols)).map { Float($0) }
        let input = values.withUnsafeBytes { [UInt8]($0) }
        let rules = try SliceRuleParser.parse(#"w -> out.{L}.{s=a,b} | rearrange "L s i o -> L s o i""#, file: "t.rules")
        var expected: [String: [Float]] = [:]
        for l in 0..<layers {
            for (p, name) in ["a", "b"].enumerated() {
                let base = (l * parts + p) * rows * cols
                expected["out.\(l).\(name)"] = (0..<cols).flatMap { o in (0..<rows).map { i in values[base + i * cols + o] } }
            }
        }
        func upstreams() throws -> [TensorSource] {
            let t = tensor("w", .f32, [layers, parts, rows, cols], input)
            let dir = temporaryDirectory()
            // 60-byte stream chunks: a slice (120 bytes) is two of them; 50-byte ones are read
            // into the slice whole or cut at its end, by turns; 7-byte ones cut elements.
            var streams: [TensorSource] = []
            for size in [60, 50] {
                writeFile(dir + "/in\(size).ckpts", try streamBytes(MemorySource([t]), chunkSize: size))
                streams.append(try StreamReader(try FileDescriptor.openForReading(dir + "/in\(size).ckpts")))
            }
            return [MemorySource([t], chunk: 7), MemorySource([t], chunk: 1000)] + streams
        }
        for upstream in try upstreams() {
            let sink = CollectingSink()
            try pump(from: try SliceSource(upstream: upstream, rules: rules, keepUnmatched: false), to: sink)
            #expect(sink.tensors.count == layers * parts)
            for (h, bytes) in sink.tensors {
                #expect(h.descriptor.shape == [cols, rows])
                #expect(bytes == expected[h.descriptor.name]?.withUnsafeBytes { [UInt8]($0) }, "\(h.descriptor.name)")
            }
        }
    }

    /// A tensor whose axis to unstack is empty makes no outputs (and no crash), slice by slice
    /// or held whole; the tensors after it still arrive.
    @Test func unstackingAnEmptyAxisMakesNothing() throws {
        let after = tensor("b", .f32, [2], ([5, 6] as [Float]).withUnsafeBytes { [UInt8]($0) })
        for (rule, shape) in [(#"w -> out.{L} | rearrange "L i o -> L o i""#, [0, 2, 3]),
                              (#"w -> out.{a} | rearrange "i a -> a i""#, [2, 0])] {
            let rules = try SliceRuleParser.parse(rule + "\nb -> b", file: "t.rules")
            let source = MemorySource([tensor("w", .f32, shape, []), after], chunk: 4)
            let sink = CollectingSink()
            try pump(from: try SliceSource(upstream: source, rules: rules, keepUnmatched: false), to: sink)
            #expect(sink.tensors.map(\.0.descriptor.name) == ["b"], "\(rule)")
        }
    }

    @Test func insertZerosMakesTheFusedBiasOfAMissingPart() throws {
        // q and v biases (no k bias, as DINOv3) -> one fused [q, 0, v].
        let q: [Float] = [1, 2, 3], v: [Float] = [7, 8, 9]
        let source = MemorySource([tensor("a.q_bias", .f32, [3], q.withUnsafeBytes { [UInt8]($0) }),
                                   tensor("a.v_bias", .f32, [3], v.withUnsafeBytes { [UInt8]($0) })], chunk: 5)
        let rules = try SliceRuleParser.parse(#"a.{s=q,v}_bias -> a.qkv.bias | insert-zeros 0 1 | rearrange "s o -> (s o)""#, file: "t.rules")
        let sink = CollectingSink()
        try pump(from: try SliceSource(upstream: source, rules: rules, keepUnmatched: false), to: sink)
        #expect(sink.tensors.map(\.0.descriptor.shape) == [[9]])
        #expect(sink.tensors[0].1 == ([1, 2, 3, 0, 0, 0, 7, 8, 9] as [Float]).withUnsafeBytes { [UInt8]($0) })
        // Along an inner axis, and at the end.
        let m = MemorySource([tensor("m", .f32, [2, 2], ([1, 2, 3, 4] as [Float]).withUnsafeBytes { [UInt8]($0) })], chunk: 16)
        let sink2 = CollectingSink()
        try pump(from: try SliceSource(upstream: m, rules: try SliceRuleParser.parse("m -> n | insert-zeros 1 2", file: "t.rules"), keepUnmatched: false), to: sink2)
        #expect(sink2.tensors[0].1 == ([1, 2, 0, 3, 4, 0] as [Float]).withUnsafeBytes { [UInt8]($0) })
        // Out of range is a plan error naming the rule.
        let bad = try SliceRuleParser.parse("m -> n | insert-zeros 1 3", file: "t.rules")
        #expect(throws: RuleError.self) {
            try SliceSource(upstream: MemorySource([tensor("m", .f32, [2, 2], [UInt8](repeating: 0, count: 16))], chunk: 16), rules: bad, keepUnmatched: false)
        }
    }
}
