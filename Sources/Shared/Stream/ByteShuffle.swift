/// The byte shuffle of codec 2: `n` bytes read as elements of `width` bytes are regrouped
/// by byte position (all first bytes, then all second bytes, ...); the `n % width` tail
/// bytes stay at the end as they are. Float weights have a few skewed exponent bytes and
/// noisy mantissa bytes: grouped, the skewed ones compress well (HDF5/Blosc's "shuffle").
///
///     width 2:  a0 a1 b0 b1 c0 c1 t  ->  a0 b0 c0 a1 b1 c1 t
public enum ByteShuffle {
    public static func shuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        let m = src.count / width
        transpose(src, into: dst, rows: m, columns: width)
    }

    public static func unshuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, width: Int) {
        let m = src.count / width
        transpose(src, into: dst, rows: width, columns: m)
    }

    /// Transposes the leading `rows × columns` bytes (row-major) and copies the tail as is.
    /// Shuffling is the transpose of an elements × width matrix; unshuffling, of width × elements.
    static func transpose(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, rows: Int, columns: Int) {
        precondition(dst.count >= src.count && rows * columns <= src.count)
        let s = src.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let d = dst.baseAddress!.assumingMemoryBound(to: UInt8.self)
        for c in 0..<columns {
            let out = d + c * rows
            var p = s + c
            for r in 0..<rows {
                out[r] = p.pointee
                p += columns
            }
        }
        let body = rows * columns
        if src.count > body { (d + body).update(from: s + body, count: src.count - body) }
    }

    /// The width the writer shuffles a dtype by: its element size, except complex64 which
    /// is two float32s. 1 means no shuffle.
    public static func width(for dtype: DType) -> Int { dtype == .c64 ? 4 : dtype.size }
}
