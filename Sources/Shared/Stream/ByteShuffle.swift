/// The byte shuffle of codec 2: `n` bytes read as elements of `width` bytes are regrouped
/// by byte position (all first bytes, then all second bytes, ...); the `n % width` tail
/// bytes stay at the end as they are. Float weights have a few skewed exponent bytes and
/// noisy mantissa bytes: grouped, the skewed ones compress well (HDF5/Blosc's "shuffle").
///
///     width 2:  a0 a1 b0 b1 c0 c1 t  ->  a0 b0 c0 a1 b1 c1 t
public enum ByteShuffle {
    public static func shuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        precondition(dst.count >= src.count && width >= 1)
        let s = src.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let d = dst.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let m = src.count / width
        for j in 0..<width {
            let plane = d + j * m
            var p = s + j
            for i in 0..<m {
                plane[i] = p.pointee
                p += width
            }
        }
        let tail = src.count - m * width
        if tail > 0 { (d + m * width).update(from: s + m * width, count: tail) }
    }

    public static func unshuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        precondition(dst.count >= src.count && width >= 1)
        let s = src.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let d = dst.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let m = src.count / width
        for j in 0..<width {
            let plane = s + j * m
            var p = d + j
            for i in 0..<m {
                p.pointee = plane[i]
                p += width
            }
        }
        let tail = src.count - m * width
        if tail > 0 { (d + m * width).update(from: s + m * width, count: tail) }
    }

    /// The width the writer shuffles a dtype by: its element size, except complex64 which
    /// is two float32s. 1 means no shuffle.
    public static func width(for dtype: DType) -> Int { dtype == .c64 ? 4 : dtype.size }
}
