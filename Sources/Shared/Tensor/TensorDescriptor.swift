/// What a tensor is, without its data: name, element type, shape, and the byte length
/// those imply (`product(shape) × dtype.size`, little-endian, row-major).
public struct TensorDescriptor: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public let byteCount: Int

    /// Fails if the element count or the byte length overflows 63 bits, or a dimension is negative.
    public init(name: String, dtype: DType, shape: [Int]) throws(ShapeError) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        byteCount = try TensorDescriptor.byteCount(dtype: dtype, shape: shape, name: name)
    }

    public var elementCount: Int { byteCount / dtype.size }

    public static func byteCount(dtype: DType, shape: [Int], name: String) throws(ShapeError) -> Int {
        var n = 1
        for d in shape {
            guard d >= 0 else { throw ShapeError(name: name, shape: shape, reason: "negative dimension \(d)") }
            let (m, o) = n.multipliedReportingOverflow(by: d)
            guard !o else { throw ShapeError(name: name, shape: shape, reason: "element count overflows") }
            n = m
        }
        let (b, o) = n.multipliedReportingOverflow(by: dtype.size)
        guard !o else { throw ShapeError(name: name, shape: shape, reason: "byte length overflows") }
        return b
    }

    public var shapeText: String { "[" + shape.map(String.init).joined(separator: ", ") + "]" }

    public var description: String { "\(name) \(dtype.rawValue)\(shapeText)" }
}

public struct ShapeError: CkptError, Equatable {
    public var name: String
    public var shape: [Int]
    public var reason: String
    public var exitStatus: SysExit { .dataError }
    public var description: String { "tensor \(name): shape \(shape): \(reason)" }
}
