import Glibc

/// Writes text to fd 2 with one `write(2)` per message, so lines from concurrent stages
/// sharing a terminal do not interleave mid-line.
public enum StandardError {
    public static func write(_ text: String) {
        var bytes = Array(text.utf8)
        bytes.withUnsafeMutableBytes { b in
            var done = 0
            while done < b.count {
                let n = Glibc.write(2, b.baseAddress! + done, b.count - done)
                if n < 0 { if errno == EINTR { continue } else { return } }
                done += n
            }
        }
    }
}
