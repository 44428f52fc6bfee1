import Testing
@testable import Shared

/// One refused rule file, plan or stream per rule, checking the reason and its location.
@Suite struct RuleErrorTests {
    func failure(_ body: () throws -> Any) -> RuleError? {
        do { _ = try body(); return nil } catch let e as RuleError { return e } catch {
            Issue.record("not a RuleError: \(error)")
            return nil
        }
    }

    func parse(_ text: String) -> RuleError? { failure { try SliceRuleParser.parse(text, file: "t.rules") } }
    func reason(_ text: String) -> RuleError.Reason? { parse(text)?.reason }

    func d(_ name: String, _ shape: [Int], _ dtype: DType = .f32) -> TensorDescriptor {
        try! TensorDescriptor(name: name, dtype: dtype, shape: shape)
    }

    func plan(_ rules: String, _ inputs: [TensorDescriptor]) -> RuleError? {
        failure { try SlicePlan(rules: try SliceRuleParser.parse(rules, file: "t.rules"), inputs: inputs, keepUnmatched: false) }
    }

    @Test func fileRules() {
        let dir = temporaryDirectory()
        writeFile(dir + "/a.rules", Array("include a.rules\n".utf8))
        #expect(failure { try SliceRuleParser.parse(file: dir + "/a.rules") }?.reason == .includeCycle(chain: [dir + "/a.rules", dir + "/a.rules"]))
        guard case .unreadable = failure({ try SliceRuleParser.parse(file: dir + "/missing.rules") })?.reason else {
            Issue.record("expected unreadable")
            return
        }
        writeFile(dir + "/b.rules", [0xFF])
        #expect(failure { try SliceRuleParser.parse(file: dir + "/b.rules") } == RuleError(.notUTF8, file: dir + "/b.rules"))
    }

    @Test func lineRules() {
        #expect(parse("\n\nx y") == RuleError(.malformedLine, file: "t.rules", line: 3))
        #expect(reason("include") == .includeWithoutFile)
        #expect(reason("drop a -> b") == .takesOnePattern(keyword: "drop"))
        guard case .invalidPattern = reason("drop a{") else { Issue.record("expected invalidPattern"); return }
        guard case .invalidPattern = reason("x -> y | mul {") else { Issue.record("expected invalidPattern"); return }
        #expect(reason("x -> y.{L} | scale 2") == .targetCaptureUnbound(capture: "L"))
        #expect(reason("l.{i:int}.w -> w | rearrange \"a i -> i a\"") == .stackedAxesNotLeading(captures: ["i"]))
    }

    @Test func operationRules() {
        #expect(reason("x -> y | rearrange i o -> o i") == .rearrangeNotQuoted)
        #expect(reason("x -> y | rearrange \"(a b) -> a b\" a=x") == .rearrangeSizeMalformed(item: "a=x"))
        guard case .invalidRearrange = reason("x -> y | rearrange \"a b\"") else { Issue.record("expected invalidRearrange"); return }
        #expect(reason("x -> y | index 0") == .indexNotBracketed(operation: "index"))
        #expect(reason("x -> y | select [a]") == .indexItemMalformed(item: "a"))
        #expect(reason("x -> y | cast F7") == .castTargetUnsupported(argument: "F7"))
        #expect(reason("x -> y | scale x") == .numberExpected(operation: "scale", argument: "x"))
        #expect(reason("x -> y | where rank=x") == .whereRankNotInteger)
        #expect(reason("x -> y | where dtype=Q") == .whereDTypeUnknown)
        #expect(reason("x -> y | where foo") == .whereConditionUnknown(condition: "foo"))
        #expect(reason("x -> y | where") == .whereEmpty)
        #expect(parse("x -> y | frobnicate") == RuleError(.unknownOperation(name: "frobnicate"), file: "t.rules", line: 1))
    }

    @Test func stackingRules() {
        #expect(plan("l.{i:int} -> s", [d("l.0", [2]), d("l.2", [2])])?.reason == .stackIndicesNotConsecutive(capture: "i", indices: [0, 2]))
        #expect(plan("l.{i=a,b} -> s", [d("l.a", [2])])?.reason == .stackWordsMissing(capture: "i", missing: ["b"]))
        #expect(plan("l.{i} -> s", [d("l.x", [2]), d("l.y", [2])])?.reason == .stackWithoutOrder(capture: "i"))
        #expect(plan("{a:int}.{b:int} -> s", [d("0.0", [2]), d("1.1", [2])])?.reason == .stackCountMismatch(captures: ["a", "b"], inputs: 2, places: 4))
        let differ = plan("l.{i:int} -> s", [d("l.0", [2]), d("l.1", [3])])
        #expect(differ == RuleError(.stackPartsDiffer(tensor: "l.1", dtype: "F32", shape: [3], first: "l.0", firstDType: "F32", firstShape: [2]),
                                    file: "t.rules", line: 1))
    }

    @Test func operationPlanRules() {
        guard case .rearrangeDoesNotFit = plan("x -> y | rearrange \"a b -> b a\"", [d("x", [3])])?.reason else {
            Issue.record("expected rearrangeDoesNotFit")
            return
        }
        #expect(plan("x -> y | cast BF16", [d("x", [3], .i32)])?.reason == .castNotFloat(dtype: "I32"))
        guard case .operationNotFloat(_, "I32") = plan("x -> y | scale 2", [d("x", [3], .i32)])?.reason else {
            Issue.record("expected operationNotFloat")
            return
        }
        #expect(plan("x -> y | index [0, 0]", [d("x", [3])])?.reason == .indexTooManyItems(items: 2, shape: [3]))
        #expect(plan("x -> y | index [5]", [d("x", [3])])?.reason == .indexOutOfRange(index: 5, axis: 0, size: 3, shape: [3]))
        #expect(plan("x -> y.{k} | rearrange \"(k a) -> k a\" k=2 | index [0]", [d("x", [4])])?.reason
            == .unstackAxisMissing(capture: "k", axes: ["a"]))
        #expect(plan("x -> y.{k=p,q,r} | rearrange \"(k a) -> k a\" k=2", [d("x", [4])])?.reason
            == .unstackNamesMismatch(capture: "k", names: 3, size: 2))
    }

    @Test func mulRules() {
        #expect(plan("x -> y | mul m", [d("x", [2]), d("m", [3])])?.reason
            == .mulOperandMismatch(operand: "m", operandDType: "F32", operandShape: [3], dtype: "F32", shape: [2]))
        #expect(plan("x -> y | mul m", [d("x", [2])])?.reason
            == .several(errors: [RuleError(.mulOperandNotInInput(operand: "m"), tensor: "x"), RuleError(.mulOperandMissing, file: "t.rules", line: 1)]))
        let unbound = plan("x -> y | mul {p}.m", [d("x", [2])])
        #expect(unbound?.reason == .several(errors: [RuleError(.mulCaptureMissing(pattern: "{p}.m"), file: "t.rules", line: 1),
                                                    RuleError(.mulOperandMissing, file: "t.rules", line: 1)]))
    }

    @Test func planRules() {
        let e = plan("a -> z\nb -> z\nc -> c2 | rearrange \"x y -> y x\"", [d("a", [1]), d("b", [1]), d("c", [3]), d("stray", [1])])
        guard case .several(let errors) = e?.reason else {
            Issue.record("expected several")
            return
        }
        #expect(errors.count == 3)
        #expect(errors[0] == RuleError(.unmatched(tensors: ["stray"])))
        #expect(errors[2] == RuleError(.twoRulesWrite(output: "z", first: "t.rules:1", second: "t.rules:2")))
        #expect(e?.description.contains("; t.rules:3: rearrange") == true)
    }

    @Test func streamRules() throws {
        func run(_ rules: String, _ tensors: [(TensorHeader, [UInt8])], manifest: Bool) -> RuleError? {
            failure {
                let source = try SliceSource(upstream: MemorySource(tensors, withManifest: manifest),
                                             rules: try SliceRuleParser.parse(rules, file: "t.rules"), keepUnmatched: false)
                try pump(from: source, to: CollectingSink())
                return ()
            }
        }
        func f32(_ name: String, _ values: [Float]) -> (TensorHeader, [UInt8]) {
            tensor(name, .f32, [values.count], values.withUnsafeBytes { [UInt8]($0) })
        }
        #expect(run("l.{i:int} -> s", [f32("l.0", [1]), f32("l.1", [2])], manifest: false)
            == RuleError(.needsManifest(stacks: true), file: "t.rules", line: 1, tensor: "l.0"))
        #expect(run("a -> z\nb -> z", [f32("a", [1]), f32("b", [2])], manifest: false)?.reason == .twoInputsWrite(output: "z", first: "a", second: "b"))
        #expect(run("a -> z", [f32("a", [1]), f32("stray", [2])], manifest: false)?.reason == .unmatched(tensors: ["stray"]))
        #expect(run("x -> y | mul m", [f32("x", [1, 2]), f32("m", [.nan, 1])], manifest: true)
            == RuleError(.productsNotFinite(operand: "m", count: 1, input: "x"), file: "t.rules", line: 1))
    }
}
