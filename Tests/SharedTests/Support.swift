import Foundation
import Glibc
@testable import Shared

/// A tensor source over in-memory tensors, optionally cut into small chunks.
final class MemorySource: TensorSource {
    let header: StreamHeader
    let manifest: [TensorDescriptor]?
    private var tensors: [(TensorHeader, [UInt8])]
    private var index = -1
    private var position = 0
    private let chunk: Int

    init(_ tensors: [(TensorHeader, [UInt8])], header: StreamHeader = StreamHeader(producer: "test", sourceFormat: "test"),
         withManifest: Bool = true, chunk: Int = 1 << 20) {
        self.tensors = tensors
        self.header = header
        manifest = withManifest ? tensors.map(\.0.descriptor) : nil
        self.chunk = chunk
    }

    func nextTensor() throws -> TensorHeader? {
        index += 1
        position = 0
        return index < tensors.count ? tensors[index].0 : nil
    }

    func nextChunk() throws -> UnsafeRawBufferPointer? {
        let data = tensors[index].1
        guard position < data.count else { return nil }
        let n = min(chunk, data.count - position)
        defer { position += n }
        return data.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[position..<position + n]) }
    }
}

/// A sink that keeps everything it is given.
final class CollectingSink: TensorSink {
    var header: StreamHeader?
    var manifest: [TensorDescriptor]?
    var tensors: [(TensorHeader, [UInt8])] = []
    var finished = false
    var aborted = false

    func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        self.header = header
        self.manifest = manifest
    }
    func beginTensor(_ tensor: TensorHeader) throws { tensors.append((tensor, [])) }
    func write(_ chunk: UnsafeRawBufferPointer) throws { tensors[tensors.count - 1].1.append(contentsOf: chunk) }
    func endTensor() throws {}
    func finish() throws { finished = true }
    func abort() { aborted = true }
}

func tensor(_ name: String, _ dtype: DType, _ shape: [Int], _ bytes: [UInt8], attributes: JSONObject = JSONObject()) -> (TensorHeader, [UInt8]) {
    (TensorHeader(try! TensorDescriptor(name: name, dtype: dtype, shape: shape), attributes: attributes), bytes)
}

/// `(i * 37 + seed) mod 256`, the pattern the golden files use.
func pattern(_ n: Int, seed: Int) -> [UInt8] { (0..<n).map { UInt8((($0 * 37) + seed) % 256) } }

/// A fresh temporary folder for one test.
/// One folder per test process holds every test's temporary folder, and is removed when the
/// process exits (a run used to leave about a thousand folders in /tmp).
let testRoot: String = {
    var template = Array("/tmp/ckpt-test-XXXXXX".utf8CString)
    let root = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    atexit { try? FileManager.default.removeItem(atPath: testRoot) }
    return root
}()

/// A new empty folder under `testRoot`.
func temporaryDirectory() -> String {
    var template = Array((testRoot + "/t-XXXXXX").utf8CString)
    return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
}

func writeFile(_ path: String, _ bytes: [UInt8]) {
    FileManager.default.createFile(atPath: path, contents: Data(bytes))
}

func readFile(_ path: String) -> [UInt8] { [UInt8](FileManager.default.contents(atPath: path) ?? Data()) }

func fileExists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

/// Stream bytes produced by StreamWriter from `source`.
func streamBytes(_ source: TensorSource, compression: ChunkCompression = .none, chunkSize: Int = StreamFormat.defaultChunkSize,
                 producer: String = "test") throws -> [UInt8] {
    let dir = temporaryDirectory()
    let path = dir + "/s.ckpts"
    let out = try AtomicOutput(path: path, overwrite: false)
    let writer = StreamWriter(output: out.descriptor, atomic: out, compression: compression, chunkSize: chunkSize, producer: producer)
    try pump(from: source, to: writer)
    return readFile(path)
}

/// Reads stream bytes back through StreamReader into memory.
func readStream(_ bytes: [UInt8]) throws -> CollectingSink {
    let dir = temporaryDirectory()
    writeFile(dir + "/in.ckpts", bytes)
    let reader = try StreamReader(try FileDescriptor.openForReading(dir + "/in.ckpts"))
    let sink = CollectingSink()
    try pump(from: reader, to: sink)
    return sink
}

func golden(_ name: String) -> [UInt8] {
    let url = Bundle.module.url(forResource: "Golden/\(name)", withExtension: nil)!
    return [UInt8](try! Data(contentsOf: url))
}
