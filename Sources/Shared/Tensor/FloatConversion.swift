import CLowRank

/// Conversions between the stored float types and float32, the type merges compute in.
/// Narrowing rounds to nearest, ties to even, as numpy and ml_dtypes do; NaN stays NaN
/// (quieted, sign and top payload bits kept, as ml_dtypes does for bfloat16).
public enum FloatConversion {
    /// The float types that widen to float32 exactly (float64 is rounded to nearest).
    public static func canWiden(_ dtype: DType) -> Bool { [.f32, .bf16, .f16, .f64].contains(dtype) }

    /// Types a float32 result can be written as.
    public static func canNarrow(to dtype: DType) -> Bool { [.f32, .bf16, .f16, .f64].contains(dtype) }

    /// `count` elements of `dtype` (little-endian) at `source` as float32 into `out`.
    public static func widen(_ source: UnsafeRawPointer, _ dtype: DType, count: Int, into out: UnsafeMutablePointer<Float>) {
        switch dtype {
        case .f32:
            out.update(from: source.assumingMemoryBound(to: Float.self), count: count)
        case .bf16:
            ckpt_bf16_to_f32(source.assumingMemoryBound(to: UInt16.self), out, count)
        case .f16:
            let s = source.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count { out[i] = Float(Float16(bitPattern: s[i])) }
        case .f64:
            let s = source.assumingMemoryBound(to: Double.self)
            for i in 0..<count { out[i] = Float(s[i]) }
        default:
            preconditionFailure("widen: \(dtype) is not a float type; callers check canWiden")
        }
    }

    /// float32 → bfloat16 bits, round to nearest even.
    @inline(__always)
    public static func bfloat16Bits(_ x: Float) -> UInt16 {
        let b = x.bitPattern
        if x.isNaN { return UInt16(truncatingIfNeeded: b >> 16) | 0x0040 }
        let rounded = b &+ 0x7FFF &+ ((b >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    /// `count` float32 values as `dtype` into `out`.
    public static func narrow(_ source: UnsafePointer<Float>, count: Int, to dtype: DType, into out: UnsafeMutableRawPointer) {
        switch dtype {
        case .f32:
            out.assumingMemoryBound(to: Float.self).update(from: source, count: count)
        case .bf16:
            var ignored = ckpt_round_stats()
            ckpt_f32_to_bf16(source, out.assumingMemoryBound(to: UInt16.self), count, &ignored)
        case .f16:
            let d = out.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count { d[i] = Float16(source[i]).bitPattern }
        case .f64:
            let d = out.assumingMemoryBound(to: Double.self)
            for i in 0..<count { d[i] = Double(source[i]) }
        default:
            preconditionFailure("narrow: \(dtype) is not a float type; callers check canNarrow")
        }
    }
}
