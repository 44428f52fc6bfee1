/// Parses sizes as Hugging Face does (`5GB` = 5·10⁹), plus binary units (`5GiB` = 5·2³⁰).
public func parseByteSize(_ text: String) -> Int? {
    let t = text.trimmingCharacters(in: " ")
    let digits = t.prefix { $0.isNumber || $0 == "." }
    guard let value = Double(digits), value >= 0 else { return nil }
    let unit = t.dropFirst(digits.count).trimmingCharacters(in: " ").uppercased()
    let scale: Double
    switch unit {
    case "", "B": scale = 1
    case "KB": scale = 1e3
    case "MB": scale = 1e6
    case "GB": scale = 1e9
    case "TB": scale = 1e12
    case "KIB": scale = 1024
    case "MIB": scale = 1024 * 1024
    case "GIB": scale = 1024 * 1024 * 1024
    case "TIB": scale = 1024 * 1024 * 1024 * 1024
    default: return nil
    }
    let bytes = value * scale
    guard bytes < 9e18 else { return nil }
    return Int(bytes)
}

extension StringProtocol {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s = s.dropFirst() }
        while s.last == set { s = s.dropLast() }
        return String(s)
    }
}
