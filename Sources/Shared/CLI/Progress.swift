import Glibc

/// Progress on stderr: bytes, tensors, rate and ETA, redrawn at most 4 times a second.
/// Shown when stderr is a terminal, or when forced with `--progress`.
public final class Progress {
    private let label: String
    private var totalBytes: Int?
    private var bytes = 0
    private var tensors = 0
    private var started = 0.0
    private var lastDraw = 0.0
    private var drawn = false

    public init(label: String) { self.label = label }

    public static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    public func start(totalBytes: Int?) {
        self.totalBytes = totalBytes
        started = Progress.now()
    }

    public func advance(bytes n: Int) {
        bytes += n
        let t = Progress.now()
        if t - lastDraw >= 0.25 { draw(at: t) }
    }

    public func finishTensor() { tensors += 1 }

    public func done() {
        guard started > 0 else { return }
        draw(at: Progress.now())
        if drawn { StandardError.write("\n") }
        started = 0
    }

    private func draw(at t: Double) {
        lastDraw = t
        drawn = true
        let elapsed = max(t - started, 1e-6)
        let rate = Double(bytes) / elapsed
        var line = "\(label): \(formatBytes(bytes))"
        if let total = totalBytes, total > 0 {
            line += " / \(formatBytes(total)) (\(Int(100 * Double(bytes) / Double(total)))%)"
        }
        line += ", \(tensors) tensors, \(formatBytes(Int(rate)))/s"
        let fetched = RemoteObject.totalFetched
        if fetched > 0 { line += ", \(formatBytes(fetched)) fetched" }
        if let total = totalBytes, rate > 0, bytes < total {
            line += ", ETA \(Int((Double(total - bytes) / rate).rounded(.up)))s"
        }
        StandardError.write("\r\u{1B}[K" + line)
    }
}

/// `1536` → `1.5 KiB`: binary units, one decimal.
public func formatBytes(_ n: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(n)
    var u = 0
    while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
    if u == 0 { return "\(n) B" }
    let tenths = Int((v * 10).rounded())
    return "\(tenths / 10).\(tenths % 10) \(units[u])"
}
