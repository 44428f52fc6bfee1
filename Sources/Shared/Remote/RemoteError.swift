/// A remote read that failed: which URL, and why, mapped to the exit status a script can act
/// on (66: not there, 77: refused, 74: the transfer or the reply was wrong, 69: no libcurl).
public struct RemoteError: CkptError, Equatable {
    public enum Reason: Equatable, Sendable {
        /// libcurl could not be loaded; the text says what to install.
        case clientUnavailable(detail: String)
        /// 404 or 410.
        case notFound
        /// 401 or 403; `credential` names what to set (`HF_TOKEN`), or is nil when one was sent.
        case denied(status: Int, credential: String?, sent: Bool)
        /// Another status the reader cannot use.
        case status(Int)
        /// The connection failed and retries did not help.
        case transfer(detail: String, attempts: Int)
        /// A reply that does not hold what was asked for (range, length).
        case badReply(detail: String)
        /// The object's ETag or Last-Modified changed after the read began.
        case changed(detail: String)
        /// A URL this reader does not understand.
        case badURL(detail: String)
        /// What is there cannot be read from a URL (a format read whole, not by position).
        case unsupported(detail: String)
    }

    public var url: String
    public var reason: Reason

    public init(_ reason: Reason, url: String) {
        self.reason = reason
        self.url = url
    }

    public var exitStatus: SysExit {
        switch reason {
        case .clientUnavailable, .unsupported: return .unavailable
        case .notFound: return .noInput
        case .denied: return .noPermission
        case .badURL: return .usage
        case .status, .transfer, .badReply, .changed: return .ioError
        }
    }

    public var description: String {
        switch reason {
        case .clientUnavailable(let detail): return "\(url): cannot read URLs: \(detail)"
        case .notFound: return "\(url): not found (HTTP 404)"
        case .denied(let status, let credential, let sent):
            if sent { return "\(url): HTTP \(status): the server refused the credential sent (\(credential ?? "token")): check it has access" }
            if let credential { return "\(url): HTTP \(status): access denied; set \(credential) for a private or gated object" }
            return "\(url): HTTP \(status): access denied"
        case .status(let code): return "\(url): HTTP \(code)"
        case .transfer(let detail, let attempts): return "\(url): transfer failed after \(attempts) attempt\(attempts == 1 ? "" : "s"): \(detail)"
        case .badReply(let detail): return "\(url): bad reply: \(detail)"
        case .changed(let detail): return "\(url): the object changed while it was being read (\(detail))"
        case .badURL(let detail): return "\(url): \(detail)"
        case .unsupported(let detail): return "\(url): \(detail)"
        }
    }
}
