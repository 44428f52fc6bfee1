/// Walks the indices of a shape in row-major order (an odometer) while keeping the matching
/// offset in another layout: `step[d]` is how far that offset moves per step of axis `d`
/// (0: the axis does not exist there, as when summing over it).
struct StridedCursor {
    let shape: [Int]
    let step: [Int]
    private var index: [Int]
    private(set) var offset = 0

    init(shape: [Int], step: [Int]) {
        self.shape = shape
        self.step = step
        index = [Int](repeating: 0, count: shape.count)
    }

    /// Steps the odometer over the first `axes` axes (the caller walks the rest itself);
    /// false after the last index.
    @discardableResult
    mutating func advance(axes: Int) -> Bool {
        var d = axes - 1
        while d >= 0 {
            index[d] += 1
            offset += step[d]
            if index[d] < shape[d] { return true }
            offset -= step[d] * shape[d]
            index[d] = 0
            d -= 1
        }
        return false
    }
}
