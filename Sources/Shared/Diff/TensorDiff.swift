/// One tensor of A against the same-named tensor of B: how far apart they are, element by
/// element, computed in float64 (every stored type widens to it exactly, integers up to 2^53).
public struct TensorDiff: Sendable {
    public enum Status: String, Sendable {
        case equal, different
        case dtype = "dtype differs"
        case shape = "shape differs"
    }

    public var name: String
    public var a: TensorDescriptor
    public var b: TensorDescriptor
    public var status: Status = .equal
    public var maxAbs = 0.0
    public var meanAbs = 0.0
    public var maxRel = 0.0
    /// Cosine similarity of the two tensors as vectors (1 for two zero tensors).
    public var cosine = 1.0
    public var nanA = 0, nanB = 0, infA = 0, infB = 0
    /// Elements outside the tolerance (NaN against a number counts; NaN against NaN does not).
    public var mismatched = 0
    /// The first element outside the tolerance: flat index and both values.
    public var firstMismatch: (index: Int, a: Double, b: Double)?

    /// Compares `count` elements; equal when every |a − b| ≤ atol + rtol·|b| (numpy's
    /// `allclose`, with NaN equal to NaN and ±Inf equal only to itself) and the types match.
    public static func compare(name: String, a: TensorDescriptor, _ pa: UnsafeRawPointer, b: TensorDescriptor, _ pb: UnsafeRawPointer,
                               rtol: Double, atol: Double) -> TensorDiff {
        if a.dtype == .c64 && b.dtype == .c64, let fa = try? TensorDescriptor(name: a.name, dtype: .f32, shape: a.shape + [2]),
           let fb = try? TensorDescriptor(name: b.name, dtype: .f32, shape: b.shape + [2]) {
            // Complex: real and imaginary parts as floats.
            var d = compare(name: name, a: fa, pa, b: fb, pb, rtol: rtol, atol: atol)
            (d.a, d.b) = (a, b)
            return d
        }
        var d = TensorDiff(name: name, a: a, b: b)
        guard a.shape == b.shape else {
            d.status = .shape
            return d
        }
        let count = a.elementCount
        var sumAbs = 0.0, dot = 0.0, na = 0.0, nb = 0.0
        for i in 0..<count {
            let x = TensorDiff.load(pa, i, a.dtype), y = TensorDiff.load(pb, i, b.dtype)
            if x.isNaN { d.nanA += 1 } else if x.isInfinite { d.infA += 1 }
            if y.isNaN { d.nanB += 1 } else if y.isInfinite { d.infB += 1 }
            let same: Bool
            if x.isNaN || y.isNaN {
                same = x.isNaN && y.isNaN
            } else if x.isInfinite || y.isInfinite {
                same = x == y
            } else {
                let diff = abs(x - y)
                sumAbs += diff
                d.maxAbs = max(d.maxAbs, diff)
                if diff > 0 { d.maxRel = max(d.maxRel, diff / max(abs(y), Double.leastNormalMagnitude)) }
                dot += x * y
                na += x * x
                nb += y * y
                same = diff <= atol + rtol * abs(y)
            }
            if !same {
                d.mismatched += 1
                if d.firstMismatch == nil { d.firstMismatch = (i, x, y) }
            }
        }
        d.meanAbs = count == 0 ? 0 : sumAbs / Double(count)
        d.cosine = na == 0 && nb == 0 ? 1 : (na == 0 || nb == 0 ? 0 : dot / (na.squareRoot() * nb.squareRoot()))
        d.status = d.mismatched > 0 ? .different : (a.dtype != b.dtype ? .dtype : .equal)
        return d
    }

    /// Element `i` as a Double: floats through `SliceCast`, integers and bool directly.
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ i: Int, _ d: DType) -> Double {
        switch d {
        case .f64, .f32, .bf16, .f16, .f8e4m3, .f8e5m2: return SliceCast.load(p, i, d)
        case .bool, .u8: return Double(p.load(fromByteOffset: i, as: UInt8.self))
        case .i8: return Double(p.load(fromByteOffset: i, as: Int8.self))
        case .i16: return Double(p.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))
        case .u16: return Double(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
        case .i32: return Double(p.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
        case .u32: return Double(p.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
        case .i64: return Double(p.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
        case .u64: return Double(p.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
        case .c64:  // compare() views complex tensors as float pairs; this is not reached for them
            return Double(p.loadUnaligned(fromByteOffset: 8 * i, as: Float.self))
        case .f8e8m0, .f8e4m3fnuz, .f8e5m2fnuz:
            return Double(p.load(fromByteOffset: i, as: UInt8.self))  // compared by bit pattern
        }
    }
}
