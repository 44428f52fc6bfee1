import CLowRank

/// The byte shuffle of codec 2: `n` bytes read as elements of `width` bytes are regrouped
/// by byte position (all first bytes, then all second bytes, ...); the `n % width` tail
/// bytes stay at the end as they are. Float weights have a few skewed exponent bytes and
/// noisy mantissa bytes: grouped, the skewed ones compress well (HDF5/Blosc's "shuffle").
///
///     width 2:  a0 a1 b0 b1 c0 c1 t  ->  a0 b0 c0 a1 b1 c1 t
public enum ByteShuffle {
    public static func shuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        let m = src.count / width
        reorder(src, into: dst, elements: m, width: width, ckpt_byte_shuffle)
    }

    public static func unshuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        let m = src.count / width
        reorder(src, into: dst, elements: m, width: width, ckpt_byte_unshuffle)
    }

    /// Regroups the leading `elements × width` bytes with `kernel` (SSE2 for widths 2 and 4)
    /// and copies the tail as is.
    private static func reorder(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, elements m: Int, width: Int,
                                _ kernel: (UnsafePointer<UInt8>?, UnsafeMutablePointer<UInt8>?, Int, Int) -> Void) {
        precondition(dst.count >= src.count && m * width <= src.count)
        guard src.count > 0 else { return }
        let s = src.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let d = dst.baseAddress!.assumingMemoryBound(to: UInt8.self)
        kernel(s, d, m, width)
        let body = m * width
        if src.count > body { (d + body).update(from: s + body, count: src.count - body) }
    }

    /// The width the writer shuffles a dtype by: its element size, except complex64 which
    /// is two float32s. 1 means no shuffle.
    public static func width(for dtype: DType) -> Int { dtype == .c64 ? 4 : dtype.size }
}
