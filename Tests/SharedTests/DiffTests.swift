import Testing
@testable import Shared

@Suite struct TensorDiffTests {
    private func diff(_ a: [Float], _ b: [Float], rtol: Double = 0, atol: Double = 0, bType: DType = .f32) throws -> TensorDiff {
        let da = try TensorDescriptor(name: "t", dtype: .f32, shape: [a.count])
        let db = try TensorDescriptor(name: "t", dtype: bType, shape: [b.count])
        let bBytes: [UInt8] = bType == .f64 ? b.map(Double.init).withUnsafeBytes { [UInt8]($0) } : b.withUnsafeBytes { [UInt8]($0) }
        return a.withUnsafeBytes { pa in
            bBytes.withUnsafeBytes { pb in TensorDiff.compare(name: "t", a: da, pa.baseAddress!, b: db, pb.baseAddress!, rtol: rtol, atol: atol) }
        }
    }

    @Test func statisticsAndTolerance() throws {
        let d = try diff([1, 2, 4], [1, 2, 5])
        #expect(d.status == .different && d.mismatched == 1 && d.maxAbs == 1 && d.maxRel == 0.2)
        #expect(abs(d.meanAbs - 1.0 / 3) < 1e-12)
        #expect(abs(d.cosine - 25.0 / (21.0.squareRoot() * 30.0.squareRoot())) < 1e-12)
        #expect(d.firstMismatch?.index == 2)
        #expect(try diff([1, 2, 4], [1, 2, 5], rtol: 0.2).status == .equal)  // |4-5| <= 0.2*5
        #expect(try diff([1, 2, 4], [1, 2, 5], atol: 0.99).status == .different)
    }

    @Test func nanAndInfinityRules() throws {
        #expect(try diff([.nan, .infinity], [.nan, .infinity]).status == .equal)
        let d = try diff([.nan, -.infinity, 0], [1, .infinity, 0])
        #expect(d.mismatched == 2 && d.nanA == 1 && d.infA == 1 && d.infB == 1)
        #expect(try diff([0, 0], [0, 0]).cosine == 1)
    }

    @Test func typesAndShapes() throws {
        #expect(try diff([1, 2], [1, 2], bType: .f64).status == .dtype)
        #expect(try diff([1, 2], [1, 2, 3]).status == .shape)
    }
}
