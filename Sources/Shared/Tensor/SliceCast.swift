/// Element type conversions of `cast` and the arithmetic of `scale`/`add`/`mul`, bit for bit
/// as numpy and ml_dtypes do them: every narrowing rounds once, to nearest with ties to even,
/// from the exact source value (float64 sources are not rounded through float32 first).
public enum SliceCast {
    static let floats: Set<DType> = [.f64, .f32, .bf16, .f16, .f8e4m3, .f8e5m2]

    public static func supported(to d: DType) -> Bool { floats.contains(d) }
    public static func supported(from d: DType) -> Bool { floats.contains(d) }

    /// An IEEE-like small float: exponent and mantissa widths; `finite` types (float8_e4m3fn)
    /// have no infinities, and their only NaN is S.1111.111.
    struct SmallFloat {
        let exponentBits: Int
        let mantissaBits: Int
        let finite: Bool
        var bias: Int { (1 << (exponentBits - 1)) - 1 }

        static let bf16 = SmallFloat(exponentBits: 8, mantissaBits: 7, finite: false)
        static let e5m2 = SmallFloat(exponentBits: 5, mantissaBits: 2, finite: false)
        static let e4m3fn = SmallFloat(exponentBits: 4, mantissaBits: 3, finite: true)

        var nan: UInt32 { finite ? (1 << (exponentBits + mantissaBits)) - 1 : ((1 << exponentBits) - 1) << mantissaBits | 1 << (mantissaBits - 1) }
        var infinity: UInt32 { finite ? nan : ((1 << exponentBits) - 1) << mantissaBits }
        var signBit: UInt32 { 1 << (exponentBits + mantissaBits) }

        /// Rounds `x` to the nearest representable value, ties to even; overflow gives
        /// infinity (or NaN for finite types), as ml_dtypes' non-saturating conversion does.
        func encode(_ x: Double) -> UInt32 {
            let sign: UInt32 = x.sign == .minus ? signBit : 0
            if x.isNaN { return sign | nan }
            if x.isInfinite { return sign | infinity }
            let a = abs(x)
            if a == 0 { return sign }
            let e = Int(a.exponent)  // a = 1.f × 2^e
            let emin = 1 - bias
            var q = max(e, emin) - mantissaBits  // the spacing of representable values near a: 2^q
            var r = (a * Double(sign: .plus, exponent: -q, significand: 1)).rounded(.toNearestOrEven)
            if r >= Double(1 << (mantissaBits + 1)) {
                r /= 2  // rounded up into the next binade: exact
                q += 1
            }
            let n = UInt32(r)
            if n < 1 << mantissaBits { return sign | n }  // subnormal (or zero)
            let exponentField = q + mantissaBits + bias
            let mantissa = n - (1 << mantissaBits)
            let maxField = (1 << exponentBits) - 1
            if finite {
                if exponentField > maxField || (exponentField == maxField && mantissa == (1 << mantissaBits) - 1) { return sign | nan }
            } else if exponentField >= maxField {
                return sign | infinity
            }
            return sign | UInt32(exponentField) << mantissaBits | mantissa
        }

        func decode(_ bits: UInt32) -> Double {
            let sign = bits & signBit != 0 ? -1.0 : 1.0
            let field = Int(bits >> mantissaBits) & ((1 << exponentBits) - 1)
            let mantissa = Double(bits & ((1 << mantissaBits) - 1))
            let maxField = (1 << exponentBits) - 1
            if finite {
                if field == maxField && Int(mantissa) == (1 << mantissaBits) - 1 { return .nan }
            } else if field == maxField {
                return mantissa == 0 ? sign * .infinity : .nan
            }
            if field == 0 { return sign * mantissa * Double(sign: .plus, exponent: 1 - bias - mantissaBits, significand: 1) }
            return sign * (1 + mantissa / Double(1 << mantissaBits)) * Double(sign: .plus, exponent: field - bias, significand: 1)
        }
    }

    /// Element `i` of `source` as a Double (exact for every supported type).
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ i: Int, _ d: DType) -> Double {
        switch d {
        case .f64: return p.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)
        case .f32: return Double(p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self))
        case .bf16: return Double(Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16))
        case .f16: return Double(Float16(bitPattern: p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
        case .f8e4m3: return SmallFloat.e4m3fn.decode(UInt32(p.load(fromByteOffset: i, as: UInt8.self)))
        case .f8e5m2: return SmallFloat.e5m2.decode(UInt32(p.load(fromByteOffset: i, as: UInt8.self)))
        default: preconditionFailure("SliceCast: \(d) is not a supported float type")
        }
    }

    /// Stores `x` rounded to `d` as element `i` of `out`. A float32 value (`exact32`) takes the
    /// float32 paths (NaN payloads kept as ml_dtypes keeps them).
    @inline(__always)
    static func store(_ x: Double, _ out: UnsafeMutableRawPointer, _ i: Int, _ d: DType) {
        switch d {
        case .f64: out.storeBytes(of: x, toByteOffset: 8 * i, as: Double.self)
        case .f32: out.storeBytes(of: Float(x), toByteOffset: 4 * i, as: Float.self)
        case .bf16:
            let f = Float(x)
            let bits: UInt16 = Double(f) == x || x.isNaN ? FloatConversion.bfloat16Bits(f) : UInt16(SmallFloat.bf16.encode(x))
            out.storeBytes(of: bits, toByteOffset: 2 * i, as: UInt16.self)
        case .f16: out.storeBytes(of: Float16(x).bitPattern, toByteOffset: 2 * i, as: UInt16.self)
        case .f8e4m3: out.storeBytes(of: UInt8(SmallFloat.e4m3fn.encode(x)), toByteOffset: i, as: UInt8.self)
        case .f8e5m2: out.storeBytes(of: UInt8(SmallFloat.e5m2.encode(x)), toByteOffset: i, as: UInt8.self)
        default: preconditionFailure("SliceCast: \(d) is not a supported float type")
        }
    }

    /// `count` elements of `from` at `source` as `to` into `out`.
    public static func convert(_ source: UnsafeRawPointer, from: DType, count: Int, into out: UnsafeMutableRawPointer, to: DType) {
        if from == to {
            out.copyMemory(from: source, byteCount: count * from.size)
            return
        }
        if FloatConversion.canWiden(from) && from != .f64 && FloatConversion.canNarrow(to: to) && to != .f64 {
            // float32 in the middle is exact for these sources: use the fast conversions.
            var buffer = [Float](repeating: 0, count: min(count, 1 << 16))
            var i = 0
            while i < count {
                let n = min(buffer.count, count - i)
                buffer.withUnsafeMutableBufferPointer { b in
                    FloatConversion.widen(source + i * from.size, from, count: n, into: b.baseAddress!)
                    FloatConversion.narrow(b.baseAddress!, count: n, to: to, into: out + i * to.size)
                }
                i += n
            }
            return
        }
        for i in 0..<count { store(load(source, i, from), out, i, to) }
    }

    /// `x · scale + offset` element by element, computed as numpy computes a tensor of this
    /// type with a Python float: in float32 for float32 and narrower types (ml_dtypes and
    /// numpy's half compute in float32), in float64 for float64; rounded once.
    public static func affine(_ p: UnsafeMutableRawPointer, _ d: DType, count: Int, scale: Double, offset: Double) {
        if d == .f64 {
            for i in 0..<count { store(load(p, i, d) * scale + offset, p, i, d) }
            return
        }
        let s = Float(scale), o = Float(offset)
        for i in 0..<count {
            // numpy: (x * s) then (+ o) as separate float32 operations; one of them is the identity.
            let x = Float(load(p, i, d))
            let y = scale != 1 ? x * s : x + o
            store(Double(y), p, i, d)
        }
    }

    /// `a · b` element by element into `a` (same element count), in float32 unless either is
    /// float64; rounded to `a`'s type. Returns how many products are not finite.
    public static func multiply(_ a: UnsafeMutableRawPointer, _ ad: DType, by b: UnsafeRawPointer, _ bd: DType, count: Int) -> Int {
        let wide = ad == .f64 || bd == .f64
        var bad = 0
        for i in 0..<count {
            let x = load(a, i, ad), y = load(b, i, bd)
            let p = wide ? x * y : Double(Float(x) * Float(y))
            if !p.isFinite { bad += 1 }
            store(p, a, i, ad)
        }
        return bad
    }
}
