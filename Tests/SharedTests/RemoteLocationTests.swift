import Testing
@testable import Shared

/// URL conventions (what each scheme asks for), reply parsing, and bad URLs. The transfers
/// themselves are tested end to end against a local server (Tests/interop/test_remote.py).
@Suite struct RemoteLocationTests {
    func env(_ values: [String: String]) -> (String) -> String? { { values[$0] } }

    @Test func hubURLsFollowHuggingFaceHub() throws {
        let none = env([:])
        let repo = try RemoteLocation("hf://google/gemma-2b", environment: none)
        #expect(repo.url == "https://huggingface.co/google/gemma-2b/resolve/main")
        #expect(repo.display == "hf://google/gemma-2b@main")
        #expect(repo.appending("model.safetensors").url == "https://huggingface.co/google/gemma-2b/resolve/main/model.safetensors")
        // The revision after the repo (HfFileSystem's form) or after the file (the issue's form).
        let a = try RemoteLocation("hf://org/repo@v1.0/sub dir/w.safetensors", environment: none)
        let b = try RemoteLocation("hf://org/repo/sub dir/w.safetensors@v1.0", environment: none)
        #expect(a.url == "https://huggingface.co/org/repo/resolve/v1.0/sub%20dir/w.safetensors")
        #expect(a == b)
        // huggingface_hub quotes the revision with safe="": refs/pr/1 stays one segment.
        let pr = try RemoteLocation("hf://org/repo@refs/pr/1", environment: env(["HF_ENDPOINT": "http://127.0.0.1:9/"]))
        #expect(pr.url == "http://127.0.0.1:9/org/repo/resolve/refs%2Fpr%2F1")
        let prFile = try RemoteLocation("hf://org/repo@refs/pr/1/model.safetensors", environment: none)
        #expect(prFile.url == "https://huggingface.co/org/repo/resolve/refs%2Fpr%2F1/model.safetensors")
        #expect(try RemoteLocation("hf://org/repo@refs%2Fpr%2F1/model.safetensors", environment: none) == prFile)
        #expect(try RemoteLocation(prFile.display, environment: none) == prFile)
        let data = try RemoteLocation("hf://datasets/org/d/x.npz", environment: none)
        #expect(data.url == "https://huggingface.co/datasets/org/d/resolve/main/x.npz")
        // A display form parses back to the same location (shards are named from it).
        #expect(try RemoteLocation(a.display, environment: none) == a)
    }

    @Test func credentialsComeFromTheEcosystemsVariables() throws {
        let hub = try RemoteLocation("hf://o/r", environment: env(["HF_TOKEN": "hf_x"]))
        #expect(hub.headers == ["Authorization: Bearer hf_x"] && hub.credentialSent && hub.credentialName == "HF_TOKEN")
        let anonymous = try RemoteLocation("hf://o/r", environment: env([:]))
        #expect(anonymous.headers.isEmpty && !anonymous.credentialSent && anonymous.credentialName == "HF_TOKEN")
        let gcs = try RemoteLocation("gs://b/o", environment: env(["CKPT_GCS_TOKEN": "t", "STORAGE_EMULATOR_HOST": "localhost:4443"]))
        #expect(gcs.url == "http://localhost:4443/b/o" && gcs.headers == ["Authorization: Bearer t"] && gcs.credentialName == "CKPT_GCS_TOKEN")
        let google = try RemoteLocation("gs://b/o", environment: env(["GOOGLE_OAUTH_ACCESS_TOKEN": "g", "CKPT_GCS_TOKEN": "t"]))
        #expect(google.headers == ["Authorization: Bearer g"])
        let web = try RemoteLocation("https://h/x.safetensors", environment: env(["HF_TOKEN": "hf_x"]))
        #expect(web.headers.isEmpty && web.credentialName == nil)
    }

    @Test func cloudStorageObjectsKeepTheirSlashes() throws {
        let l = try RemoteLocation("gs://openpi-assets/checkpoints/pi0_base/params", environment: env([:]))
        #expect(l.url == "https://storage.googleapis.com/openpi-assets/checkpoints/pi0_base/params")
        #expect(l.appending("_METADATA").url == "https://storage.googleapis.com/openpi-assets/checkpoints/pi0_base/params/_METADATA")
        #expect(l.parent.name == "params")
        #expect(l.parent.folder.display == "gs://openpi-assets/checkpoints/pi0_base")
    }

    @Test func badURLsAreUsageErrors() {
        for text in ["hf://onlyorg", "hf://org/repo@", "gs://", "https:///x", "ftp://h/x", "hf://org//x"] {
            #expect(throws: RemoteError.self, "\(text)") { try RemoteLocation(text, environment: { _ in nil }) }
        }
        #expect(RemoteError(.badURL(detail: "x"), url: "u").exitStatus == .usage)
        #expect(RemoteError(.notFound, url: "u").exitStatus == .noInput)
        #expect(RemoteError(.denied(status: 403, credential: "HF_TOKEN", sent: false), url: "u").exitStatus == .noPermission)
        #expect(RemoteError(.changed(detail: "x"), url: "u").exitStatus == .ioError)
    }

    @Test func namesFromACheckpointStayInItsFolder() throws {
        #expect(RemoteLocation.staysInside("d/0a1b") && RemoteLocation.staysInside("model-00001-of-00002.safetensors"))
        for bad in ["../x", "a/../../b", "a//b", "./a", "a/", ""] { #expect(!RemoteLocation.staysInside(bad), "\(bad)") }
        // A query (a presigned URL) is the object's own: siblings do not carry it, messages hide it.
        let signed = try RemoteLocation("https://u:p@h.example/a/model.safetensors?sig=s3cr3t", environment: env([:]))
        #expect(signed.url == "https://u:p@h.example/a/model.safetensors?sig=s3cr3t")
        #expect(signed.display == "https://…@h.example/a/model.safetensors?…")
        #expect(signed.name == "model.safetensors")
        #expect(signed.parent.folder.appending("x.json").url == "https://u:p@h.example/a/x.json")
        #expect(signed.text == signed.url)
    }

    @Test func contentRangeParsing() {
        #expect(ContentRange("bytes 0-99/1000") == ContentRange(first: 0, last: 99, total: 1000))
        #expect(ContentRange("bytes 5-5/*")?.total == nil)
        for bad in [nil, "", "bytes 9-1/10", "bytes 0-10/10", "bytes -1-2/5", "items 0-1/2", "bytes 0-1", "bytes 0-x/5", "bytes +1-2/5", "bytes 1-2/+5"] {
            #expect(ContentRange(bad) == nil, "\(bad ?? "nil")")
        }
    }

    @Test func headerLinesOfTheLastResponse() {
        let h = HTTPClient.parseHeaders("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/2\r\nETag:  \"abc\"\r\nX: a:b\r\n\r\n")
        #expect(h == ["content-range": "bytes 0-1/2", "etag": "\"abc\"", "x": "a:b"])
    }
}

extension ContentRange {
    init(first: Int, last: Int, total: Int?) {
        self.init("bytes \(first)-\(last)/\(total.map(String.init) ?? "*")")!
    }
}
