import CCurl
import Glibc

/// What one GET brought back.
struct HTTPReply {
    /// The last response's status (after redirects); 0 if none arrived.
    var status: Int
    /// Body bytes written to the caller's buffer (2xx replies only).
    var received: Int
    /// The body was longer than the buffer (the transfer was cut there).
    var overflow: Bool
    /// libcurl's result: 0 when a whole reply arrived, whatever its status.
    var curlCode: Int32
    var curlError: String
    /// The last response's header fields, names lowercased (the last of repeated names wins).
    var headers: [String: String]
    /// Some header lines did not fit (16 KiB): the reply cannot be checked.
    var headersTruncated = false
}

/// GET requests through libcurl (see `ckpt_curl.h`: loaded at run time). Each request borrows
/// an easy handle from a pool and returns it, so connections are reused across requests and
/// several threads can each have one in flight.
enum HTTPClient {
    private static let pool = Mutex()
    nonisolated(unsafe) private static var idle: [UnsafeMutableRawPointer] = []

    /// Loads libcurl; the error names `url`, the first thing that needed it.
    static func load(for url: String) throws(RemoteError) {
        var message = [CChar](repeating: 0, count: 256)
        guard ckpt_curl_load(&message, message.count) == 0 else {
            let text = String(decoding: message.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw RemoteError(.clientUnavailable(detail: text), url: url)
        }
    }

    /// The loaded libcurl's version line (docs and `--version`).
    static var version: String { String(cString: ckpt_curl_version()) }

    /// Whether the loaded libcurl keeps a custom Authorization header from a redirect to
    /// another host (7.58) or another port or scheme (7.83, CVE-2022-27776).
    static var keepsCredentialsHome: Bool {
        guard let v = version.split(separator: " ").first?.split(separator: "/").last else { return false }
        let parts = v.split(separator: ".").compactMap { Int($0.prefix(while: \.isNumber)) }
        guard parts.count >= 2 else { return false }
        return parts[0] > 7 || (parts[0] == 7 && parts[1] >= 83)
    }

    /// GETs `url` with `headers` (and `Range: bytes=lower-upper` when given) into `buffer`.
    static func get(_ url: String, headers: [String], range: ClosedRange<Int>?, into buffer: UnsafeMutableRawBufferPointer,
                    connectTimeout: Int = 30, lowSpeedTime: Int = 60) -> HTTPReply {
        let handle = pool.withLock { idle.popLast() } ?? ckpt_http_handle_new()
        guard let handle else {
            return HTTPReply(status: 0, received: 0, overflow: false, curlCode: -1, curlError: "libcurl could not make a handle", headers: [:])
        }
        var lines = headers
        if let range { lines.append("Range: bytes=\(range.lowerBound)-\(range.upperBound)") }
        var result = ckpt_http_result()
        let cStrings = lines.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        let code = cStrings.map { UnsafePointer($0) }.withUnsafeBufferPointer { list in
            ckpt_http_get(handle, url, list.baseAddress, Int32(list.count), buffer.baseAddress, buffer.count,
                          connectTimeout, lowSpeedTime, &result)
        }
        // A handle whose transfer failed may hold a broken connection: libcurl drops it itself.
        pool.withLock { idle.append(handle) }
        let headerText = withUnsafePointer(to: &result) { r in
            String(decoding: UnsafeRawBufferPointer(start: ckpt_http_result_headers(r), count: Int(r.pointee.headers_length)), as: UTF8.self)
        }
        let curlError = withUnsafeBytes(of: result.curl_error) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        return HTTPReply(status: result.status, received: result.received, overflow: result.overflow != 0,
                         curlCode: code, curlError: curlError, headers: parseHeaders(headerText),
                         headersTruncated: result.headers_truncated != 0)
    }

    /// `Name: value` lines into a dictionary with lowercased names (the status line is skipped).
    static func parseHeaders(_ text: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {  // "\r\n" is one Character
            guard let colon = line.firstIndex(of: ":"), !line.hasPrefix("HTTP/") else { continue }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters(in: " \t")
            fields[name] = value
        }
        return fields
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = self
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
