/// Element types, named as safetensors names them (the stream uses the same names).
///
/// Sub-byte types (safetensors' F4, F6_*) are not supported: their byte length is not
/// `count × size`, and nothing in this project's formats needs them yet.
public enum DType: String, CaseIterable, Sendable, Hashable {
    case bool = "BOOL"
    case u8 = "U8"
    case i8 = "I8"
    case f8e5m2 = "F8_E5M2"
    case f8e4m3 = "F8_E4M3"          // torch float8_e4m3fn
    case f8e8m0 = "F8_E8M0"          // torch float8_e8m0fnu
    case f8e4m3fnuz = "F8_E4M3FNUZ"
    case f8e5m2fnuz = "F8_E5M2FNUZ"
    case i16 = "I16"
    case u16 = "U16"
    case f16 = "F16"
    case bf16 = "BF16"
    case i32 = "I32"
    case u32 = "U32"
    case f32 = "F32"
    case c64 = "C64"
    case f64 = "F64"
    case i64 = "I64"
    case u64 = "U64"

    /// Bytes per element.
    public var size: Int {
        switch self {
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3, .f8e8m0, .f8e4m3fnuz, .f8e5m2fnuz: return 1
        case .i16, .u16, .f16, .bf16: return 2
        case .i32, .u32, .f32: return 4
        case .c64, .f64, .i64, .u64: return 8
        }
    }

    /// Position in the safetensors crate's `Dtype` enum, whose derived order the writer
    /// sorts by (descending) so that every tensor's data starts aligned to its element.
    /// `allCases` is declared in that order.
    public var safetensorsRank: Int { DType.allCases.firstIndex(of: self)! }

    public var isFloatingPoint: Bool {
        switch self {
        case .f8e5m2, .f8e4m3, .f8e8m0, .f8e4m3fnuz, .f8e5m2fnuz, .f16, .bf16, .f32, .f64, .c64: return true
        default: return false
        }
    }
}

extension DType {
    /// A type as users write it: the stream's names (`F32`, `BF16`, any case) or numpy's
    /// (`float32`, `bfloat16`, `float16`, `float64`).
    public init?(userName: String) {
        let aliases: [String: DType] = ["float32": .f32, "float": .f32, "bfloat16": .bf16, "float16": .f16, "half": .f16, "float64": .f64, "double": .f64]
        if let d = DType(rawValue: userName.uppercased()) ?? aliases[userName.lowercased()] { self = d } else { return nil }
    }
}
