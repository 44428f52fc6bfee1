import Glibc

/// A checkpoint named by a URL, and how to ask for the files it holds. The conventions are
/// those of the ecosystem's own clients, so a URL that works with gsutil, huggingface_hub or
/// curl works here, and tests can point every scheme at a local server:
///
/// - `https://HOST/PATH` (and `http://`): as given.
/// - `gs://BUCKET/OBJECT`: `GET {STORAGE_EMULATOR_HOST or https://storage.googleapis.com}/BUCKET/OBJECT`
///   (the XML API, which serves public objects anonymously); a bearer token from
///   `GOOGLE_OAUTH_ACCESS_TOKEN` or `CKPT_GCS_TOKEN` when set.
/// - `hf://ORG/REPO[@REV][/FILE][@REV]` (also `hf://datasets/ORG/REPO/...`):
///   `{HF_ENDPOINT or https://huggingface.co}/ORG/REPO/resolve/REV/FILE` (REV defaults to
///   `main`), with `Authorization: Bearer $HF_TOKEN` when set. libcurl follows the Hub's
///   redirect to its CDN and sends a custom Authorization header only to the first host.
///
/// A location names a file or a folder; folders are never listed (object stores and the Hub
/// list through other APIs): readers ask for the files a format names (an index, a manifest).
public struct RemoteLocation: Sendable, Equatable {
    public enum Service: Sendable, Equatable {
        case web
        case cloudStorage
        case hub
    }

    public let service: Service
    /// The location as a user would write it (`hf://org/repo@main/model.safetensors`): messages name this.
    public let display: String
    /// The URL asked for.
    public let url: String
    /// Text that parses back to this location (a reader is handed this): the URL for the web,
    /// the `gs://`/`hf://` form otherwise (whose display hides nothing).
    public var text: String { service == .web ? url : display }
    /// Extra request header lines (credentials). Never printed.
    let headers: [String]
    /// The variable that holds the credential this service takes, and whether it is set.
    public let credentialName: String?
    public let credentialSent: Bool

    /// Whether `path` is a URL this reader takes (rather than a local path).
    public static func isRemote(_ path: String) -> Bool {
        ["https://", "http://", "gs://", "hf://"].contains { path.hasPrefix($0) }
    }

    /// Parses `text`; `environment` looks variables up (the process's by default).
    public init(_ text: String, environment: (String) -> String? = RemoteLocation.processEnvironment(_:)) throws(RemoteError) {
        func bad(_ detail: String) -> RemoteError { RemoteError(.badURL(detail: detail), url: text) }
        func token(_ names: [String]) -> (String, String)? {
            for n in names { if let v = environment(n), !v.isEmpty { return (n, v) } }
            return nil
        }
        if text.hasPrefix("https://") || text.hasPrefix("http://") {
            let rest = text.drop(while: { $0 != ":" }).dropFirst(3)
            guard let host = rest.split(separator: "/", omittingEmptySubsequences: false).first, !host.isEmpty else {
                throw bad("no host in the URL")
            }
            // Messages never show a query (a presigned URL's signature) or a user:password@.
            let scheme = text.hasPrefix("https://") ? "https://" : "http://"
            let afterScheme = text.dropFirst(scheme.count)
            let authority = afterScheme.prefix(while: { $0 != "/" && $0 != "?" && $0 != "#" })
            var shown = scheme + (authority.lastIndex(of: "@").map { "…@" + authority[authority.index(after: $0)...] } ?? String(authority))
            shown += RemoteLocation.withoutQuery(String(afterScheme.dropFirst(authority.count)))
            if RemoteLocation.withoutQuery(text).count < text.count { shown += "?…" }
            self.init(service: .web, display: shown, url: text, headers: [], credentialName: nil, credentialSent: false)
        } else if text.hasPrefix("gs://") {
            let path = String(text.dropFirst(5))
            guard let bucket = path.split(separator: "/").first, !bucket.isEmpty else { throw bad("no bucket: gs://BUCKET/OBJECT") }
            var endpoint = environment("STORAGE_EMULATOR_HOST").flatMap { $0.isEmpty ? nil : $0 } ?? "https://storage.googleapis.com"
            if !endpoint.contains("://") { endpoint = "http://" + endpoint }
            while endpoint.hasSuffix("/") { endpoint.removeLast() }
            let credential = token(["GOOGLE_OAUTH_ACCESS_TOKEN", "CKPT_GCS_TOKEN"])
            self.init(service: .cloudStorage, display: text, url: endpoint + "/" + RemoteLocation.percentEncoded(path, keepSlashes: true),
                      headers: credential.map { ["Authorization: Bearer \($0.1)"] } ?? [],
                      credentialName: credential?.0 ?? "GOOGLE_OAUTH_ACCESS_TOKEN", credentialSent: credential != nil)
        } else if text.hasPrefix("hf://") {
            var segments = text.dropFirst(5).split(separator: "/", omittingEmptySubsequences: false).map(String.init)
            while segments.last == "" { segments.removeLast() }
            var kind = ""
            if let first = segments.first, first == "datasets" || first == "spaces" {
                kind = first + "/"
                segments.removeFirst()
            }
            guard segments.count >= 2, !segments[0].isEmpty, !segments[1].isEmpty, !segments.contains("") else {
                throw bad("expected hf://ORG/REPO[/FILE][@REVISION]")
            }
            var revision: String?
            if let at = segments[1].firstIndex(of: "@") {
                revision = String(segments[1][segments[1].index(after: at)...])
                segments[1] = String(segments[1][..<at])
                // huggingface_hub's special refs hold slashes: @refs/pr/1, @refs/convert/parquet.
                if revision == "refs", segments.count >= 4, ["pr", "convert"].contains(segments[2]) {
                    revision = "refs/" + segments[2] + "/" + segments[3]
                    segments.removeSubrange(2...3)
                }
            } else if segments.count > 2, let last = segments.last, let at = last.lastIndex(of: "@") {
                revision = String(last[last.index(after: at)...])
                segments[segments.count - 1] = String(last[..<at])
            }
            if let r = revision, r.isEmpty { throw bad("empty revision after @") }
            revision = revision.map(RemoteLocation.percentDecoded)  // @refs%2Fpr%2F1 is the same revision
            let rev = revision ?? "main"
            var endpoint = environment("HF_ENDPOINT").flatMap { $0.isEmpty ? nil : $0 } ?? "https://huggingface.co"
            while endpoint.hasSuffix("/") { endpoint.removeLast() }
            let repo = segments[0] + "/" + segments[1]
            let file = segments.dropFirst(2).joined(separator: "/")
            var url = endpoint + "/" + kind + repo + "/resolve/" + RemoteLocation.percentEncoded(rev, keepSlashes: false)
            if !file.isEmpty { url += "/" + RemoteLocation.percentEncoded(file, keepSlashes: true) }
            let credential = token(["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
            self.init(service: .hub, display: "hf://" + kind + repo + "@" + rev + (file.isEmpty ? "" : "/" + file), url: url,
                      headers: credential.map { ["Authorization: Bearer \($0.1)"] } ?? [],
                      credentialName: credential?.0 ?? "HF_TOKEN", credentialSent: credential != nil)
        } else {
            throw bad("not a URL ckpt reads (https://, http://, gs://, hf://)")
        }
    }

    private init(service: Service, display: String, url: String, headers: [String], credentialName: String?, credentialSent: Bool) {
        self.service = service
        self.display = display
        self.url = url
        self.headers = headers
        self.credentialName = credentialName
        self.credentialSent = credentialSent
    }

    /// Whether `relative` stays inside a folder: no empty, `.` or `..` segment (a name read
    /// from a checkpoint must not reach other paths on a host the credential is sent to).
    public static func staysInside(_ relative: String) -> Bool {
        !relative.split(separator: "/", omittingEmptySubsequences: false).contains { $0.isEmpty || $0 == "." || $0 == ".." }
    }

    /// The file `relative` (a `/`-separated path; `staysInside`) inside this location, taken as
    /// a folder (a query is the object's own, and is not carried over).
    public func appending(_ relative: String) -> RemoteLocation {
        precondition(RemoteLocation.staysInside(relative), "relative path leaves its folder")
        func join(_ a: String, _ b: String) -> String { a.hasSuffix("/") ? a + b : a + "/" + b }
        return RemoteLocation(service: service, display: join(RemoteLocation.withoutQuery(display), relative),
                              url: join(RemoteLocation.withoutQuery(url), RemoteLocation.percentEncoded(relative, keepSlashes: true)),
                              headers: headers, credentialName: credentialName, credentialSent: credentialSent)
    }

    /// The folder holding this location's file, and the file's name.
    public var parent: (folder: RemoteLocation, name: String) {
        func cut(_ s: String) -> (String, String) {
            var t = Substring(s)
            while t.hasSuffix("/") { t = t.dropLast() }
            guard let slash = t.lastIndex(of: "/") else { return (String(t), "") }
            return (String(t[..<slash]), String(t[t.index(after: slash)...]))
        }
        let (u, name) = cut(RemoteLocation.withoutQuery(url)), (d, _) = cut(RemoteLocation.withoutQuery(display))
        return (RemoteLocation(service: service, display: d, url: u, headers: headers, credentialName: credentialName,
                               credentialSent: credentialSent), RemoteLocation.percentDecoded(name))
    }

    /// The last path segment (`model.safetensors`), decoded.
    public var name: String { parent.name }

    /// `text` up to its first `?` or `#`.
    static func withoutQuery(_ text: String) -> String {
        String(text.prefix(while: { $0 != "?" && $0 != "#" }))
    }

    public static func processEnvironment(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

    /// RFC 3986 percent-encoding of everything but unreserved characters (and `/` when kept):
    /// what huggingface_hub's `quote(filename)` and `quote(revision, safe="")` produce.
    static func percentEncoded(_ s: String, keepSlashes: Bool) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(UnicodeScalar(b))
            if (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || "-._~".contains(c) || (keepSlashes && b == 0x2F) {
                out.append(c)
            } else {
                let hex = Array("0123456789ABCDEF")
                out += "%" + String(hex[Int(b >> 4)]) + String(hex[Int(b & 15)])
            }
        }
        return out
    }

    static func percentDecoded(_ s: String) -> String {
        var bytes: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "%"), it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) {
                bytes.append(v)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

