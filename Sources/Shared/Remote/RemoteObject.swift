import Glibc

/// One remote file, pinned when opened: its size, and the ETag / Last-Modified its first
/// reply carried. Every later reply must carry the same (a changed object mid-read is an
/// error, not a mixed checkpoint). Reads ask for byte ranges (RFC 9110 `Range`) and check that
/// the reply is that range of this object; a dropped connection, a 5xx or a 429 is resumed from
/// the last byte received, a few times with backoff (`Retry-After` honoured).
public final class RemoteObject: @unchecked Sendable {
    public let location: RemoteLocation
    public let size: Int
    let etag: String?
    let lastModified: String?
    /// The first bytes of the file, fetched by the request that opened it (format detection
    /// and headers need them first).
    public let head: [UInt8]

    /// How much the opening request asks for.
    static let headSize = 64 << 10
    /// Attempts per range that make no progress before giving up.
    static let attempts = 5

    private static let processCounter = Mutex()
    nonisolated(unsafe) private static var processFetched = 0
    /// Bytes received so far by this process, from every remote file (for `--progress`).
    public static var totalFetched: Int { processCounter.withLock { processFetched } }
    private static func count(_ n: Int) { processCounter.withLock { processFetched += n } }

    /// The object as `reply` (to the opening request) shows it: `size` bytes, its version, and
    /// the first `head` bytes.
    private init(location: RemoteLocation, size: Int, pinnedBy reply: HTTPReply, head: [UInt8]) {
        self.location = location
        self.size = size
        etag = reply.headers["etag"]
        lastModified = reply.headers["last-modified"]
        self.head = head
        RemoteObject.count(head.count)
    }

    /// Opens `location`, or returns nil if it does not exist (404): probing for the files a
    /// folder may hold, which cannot be listed.
    public static func openIfPresent(_ location: RemoteLocation) throws(RemoteError) -> RemoteObject? {
        do { return try open(location) } catch where error.reason == .notFound { return nil }
    }

    /// Opens `location`: one request for its first bytes, which also tells its size and pins
    /// its version.
    public static func open(_ location: RemoteLocation) throws(RemoteError) -> RemoteObject {
        // A file opened again (a probe, then its reader) is the same pinned object: its head
        // is not fetched twice.
        if let known = recent.withLock({ opened.first(where: { $0.location.url == location.url }) }) { return known }
        let object = try openUncached(location)
        recent.withLock {
            opened.append(object)
            if opened.count > 32 { opened.removeFirst() }
        }
        return object
    }

    private static let recent = Mutex()
    nonisolated(unsafe) private static var opened: [RemoteObject] = []

    private static func openUncached(_ location: RemoteLocation) throws(RemoteError) -> RemoteObject {
        try HTTPClient.load(for: location.display)
        if location.credentialSent && !HTTPClient.keepsCredentialsHome {
            throw RemoteError(.clientUnavailable(detail: "\(HTTPClient.version) could send \(location.credentialName ?? "the token") to a redirect's other host (fixed in libcurl 7.83): upgrade libcurl, or unset it for public files"), url: location.display)
        }
        var head = [UInt8](repeating: 0, count: headSize)
        var attempt = 0
        while true {
            attempt += 1
            let reply = head.withUnsafeMutableBytes { HTTPClient.get(location.url, headers: location.headers, range: 0...(headSize - 1), into: $0) }
            if reply.headersTruncated { throw RemoteError(.badReply(detail: "reply headers longer than 16 KiB"), url: location.display) }
            if reply.curlCode == 0 || reply.overflow {
                switch reply.status {
                case 206:
                    guard let r = ContentRange(reply.headers["content-range"]), r.first == 0, let total = r.total,
                          r.last < total, r.last - r.first + 1 == reply.received else {
                        throw RemoteError(.badReply(detail: "206 for bytes 0-\(headSize - 1) with Content-Range \(reply.headers["content-range"] ?? "missing") and \(reply.received) bytes"), url: location.display)
                    }
                    return RemoteObject(location: location, size: total, pinnedBy: reply, head: Array(head.prefix(reply.received)))
                case 200:
                    // The server ignored Range: fine if the whole file fit in what was asked for.
                    guard !reply.overflow else {
                        throw RemoteError(.badReply(detail: "the server does not serve byte ranges (200 to a Range request)"), url: location.display)
                    }
                    if let length = reply.headers["content-length"].flatMap({ Int($0) }), length != reply.received {
                        throw RemoteError(.badReply(detail: "Content-Length \(length), \(reply.received) bytes received"), url: location.display)
                    }
                    return RemoteObject(location: location, size: reply.received, pinnedBy: reply, head: Array(head.prefix(reply.received)))
                case 416:
                    // An empty file has no byte 0: "bytes */0".
                    guard let r = reply.headers["content-range"], r.hasSuffix("/0") else {
                        throw RemoteError(.badReply(detail: "416 to bytes 0-\(headSize - 1)"), url: location.display)
                    }
                    return RemoteObject(location: location, size: 0, pinnedBy: reply, head: [])
                default:
                    break
                }
            }
            usleep(UInt32(try retryDelay(reply, attempt: attempt, location: location) * 1_000_000))
        }
    }

    /// How many seconds to wait before trying again after `reply`, the `attempt`-th failure in a
    /// row; throws when not to try again.
    private static func retryDelay(_ reply: HTTPReply, attempt: Int, location: RemoteLocation) throws(RemoteError) -> Double {
        let url = location.display
        if reply.curlCode == 0 {
            switch reply.status {
            case 404, 410: throw RemoteError(.notFound, url: url)
            case 401, 403: throw RemoteError(.denied(status: reply.status, credential: location.credentialName, sent: location.credentialSent), url: url)
            case 408, 429, 500...599: break
            default: throw RemoteError(.status(reply.status), url: url)
            }
        }
        guard attempt < attempts else {
            let detail = reply.curlCode != 0 ? reply.curlError : "HTTP \(reply.status)"
            throw RemoteError(.transfer(detail: detail, attempts: attempt), url: url)
        }
        // Retry-After in whole seconds, at most a minute (an HTTP date, or anything else, is "a while").
        if let after = reply.headers["retry-after"] {
            guard !after.isEmpty, after.allSatisfy({ $0.isASCII && $0.isNumber }), let s = Int(after.prefix(6)) else { return 5 }
            return Double(min(s, 60))
        }
        return min(0.25 * Double(1 << (attempt - 1)), 8)
    }

    /// Fills `buffer` with bytes `[offset, offset + buffer.count)` of the object.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(RemoteError) {
        precondition(offset >= 0 && buffer.count <= size - offset, "remote range out of bounds")
        var done = 0
        var failures = 0  // in a row: a reply that brings bytes starts the count afresh
        while done < buffer.count {
            let first = offset + done, last = offset + buffer.count - 1
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let reply = HTTPClient.get(location.url, headers: location.headers, range: first...last, into: rest)
            if reply.status == 206 || reply.status == 200 {
                try check(reply, first: first, last: last)
                RemoteObject.count(reply.received)
                done += reply.received
                if reply.curlCode == 0 && done < buffer.count {
                    throw RemoteError(.badReply(detail: "short reply: bytes \(first)-\(last) asked, \(reply.received) received"), url: location.display)
                }
                if reply.received > 0 {  // a cut connection that brought bytes: resume at once
                    failures = 0
                    continue
                }
            }
            failures += 1
            usleep(UInt32(try RemoteObject.retryDelay(reply, attempt: failures, location: location) * 1_000_000))
        }
    }

    /// A 2xx reply to a request for `[first, last]` must be that range of this version.
    private func check(_ reply: HTTPReply, first: Int, last: Int) throws(RemoteError) {
        let url = location.display
        if reply.headersTruncated { throw RemoteError(.badReply(detail: "reply headers longer than 16 KiB"), url: url) }
        if let pinned = etag, let now = reply.headers["etag"], now != pinned {
            throw RemoteError(.changed(detail: "ETag \(pinned), now \(now)"), url: url)
        }
        if etag == nil, let pinned = lastModified, let now = reply.headers["last-modified"], now != pinned {
            throw RemoteError(.changed(detail: "Last-Modified \(pinned), now \(now)"), url: url)
        }
        if reply.status == 200 {
            guard first == 0, last == size - 1, !reply.overflow else {
                throw RemoteError(.badReply(detail: "200 (the whole file) to a request for bytes \(first)-\(last)"), url: url)
            }
            return
        }
        guard let r = ContentRange(reply.headers["content-range"]), r.first == first, r.last == last, r.total == size else {
            throw RemoteError(.badReply(detail: "asked for bytes \(first)-\(last)/\(size), Content-Range is \(reply.headers["content-range"] ?? "missing")"), url: url)
        }
        if reply.overflow { throw RemoteError(.badReply(detail: "more than bytes \(first)-\(last) arrived"), url: url) }
    }

    /// The whole object, for small files (indexes, metadata); refuses one over `limit`.
    public func readAll(limit: Int) throws(RemoteError) -> [UInt8] {
        guard size <= limit else { throw RemoteError(.badReply(detail: "\(size) bytes, more than the \(limit) expected of this file"), url: location.display) }
        if size <= head.count { return head }
        var out = head + [UInt8](repeating: 0, count: size - head.count)
        let n = head.count
        let result = out.withUnsafeMutableBytes { b -> Result<Void, RemoteError> in
            Result { () throws(RemoteError) in try read(into: UnsafeMutableRawBufferPointer(rebasing: b[n...]), at: n) }
        }
        try result.get()
        return out
    }
}

/// `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
struct ContentRange: Equatable {
    var first: Int
    var last: Int
    var total: Int?

    init?(_ text: String?) {
        guard let text, text.hasPrefix("bytes ") else { return nil }
        let parts = text.dropFirst(6).split(separator: "/", maxSplits: 1)
        guard parts.count == 2 else { return nil }
        func number(_ s: Substring) -> Int? { !s.isEmpty && s.allSatisfy({ $0.isASCII && $0.isNumber }) ? Int(s) : nil }
        let range = parts[0].split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        guard range.count == 2, let a = number(range[0]), let b = number(range[1]), b >= a else { return nil }
        first = a
        last = b
        if parts[1] == "*" { total = nil } else if let t = number(parts[1]), t > b { total = t } else { return nil }
    }
}
