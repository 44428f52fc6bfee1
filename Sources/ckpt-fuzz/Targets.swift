import Glibc
import Shared

/// One fuzz target: a parser fed the input's bytes. A thrown error is a correct answer to
/// hostile input; only a crash, a leak, a hang or a runaway allocation is a finding.
struct FuzzTarget: Sendable {
    let name: String
    let about: String
    let run: @Sendable (UnsafeRawBufferPointer) throws -> Void
}

private let producer = "ckpt-fuzz"

/// Tensors a rule file is planned against (the shapes of a small BERT, both naming styles).
private let ruleInputs: [TensorDescriptor] = {
    var d: [TensorDescriptor] = []
    func add(_ n: String, _ s: [Int], _ t: DType = .f32) { d.append(try! TensorDescriptor(name: n, dtype: t, shape: s)) }
    for l in 0..<2 {
        for p in ["query", "key", "value"] {
            add("bert.encoder.layer.\(l).attention.self.\(p).weight", [32, 32])
            add("bert.encoder.layer.\(l).attention.self.\(p).bias", [32])
            add("params/encoder/layer_\(l)/attention/self/\(p)/kernel", [32, 4, 8])
            add("params/encoder/layer_\(l)/attention/self/\(p)/bias", [4, 8])
        }
        add("bert.encoder.layer.\(l).output.dense.weight", [32, 64], .bf16)
        add("params/encoder/layer_\(l)/mlp/gate_up/kernel", [2, 32, 64], .f16)
        add("model.layers.\(l).mlp.experts.0.down_proj.weight", [16, 8])
    }
    add("bert.embeddings.word_embeddings.weight", [100, 32])
    add("params/embedder/input_embedding", [100, 32], .bf16)
    add("scalar", [])
    return d
}()

let fuzzTargets: [FuzzTarget] = [
    FuzzTarget(name: "stream", about: "a ckpt stream (StreamReader/FrameDecoder: plain and zlib chunks), read to the end") { data in
        let (path, fd) = Scratch.shared.file("input.ckpts", data)
        let reader = try StreamReader(FileDescriptor(rawValue: fd, path: path))
        try drain(reader)
    },
    FuzzTarget(name: "safetensors", about: "a .safetensors file (SafetensorsReader: header, then every tensor's bytes)") { data in
        let (path, _) = Scratch.shared.file("input.safetensors", data)
        try drain(try SafetensorsReader.open(path: path, producer: producer))
    },
    FuzzTarget(name: "safetensors-header", about: "a safetensors JSON header alone (SafetensorsHeader.parse): u64 LE data length, then the JSON") { data in
        guard data.count >= 8 else { return }
        var dataLength = 0
        for i in (0..<8).reversed() { dataLength = dataLength << 8 | Int(data[i]) }
        let json = [UInt8](data[8...])
        let fileSize = 8 + json.count + min(max(dataLength, 0), 1 << 40)
        let h = try SafetensorsHeader.parse(json: json, fileSize: fileSize, file: "<fuzz>")
        blackHole(UInt64(h.entries.count))
    },
    FuzzTarget(name: "safetensors-index", about: "a sharded safetensors folder: ==> file <== parts, index JSON and shards (SafetensorsIndex, SafetensorsReader)") { data in
        let files = splitFiles(data, fallback: "model.safetensors.index.json")
        defer { Scratch.shared.clearFolder() }
        if let index = files.first(where: { $0.name.hasSuffix(".index.json") }) {
            if let idx = try? SafetensorsIndex.parse([UInt8](index.bytes), file: index.name) {
                var owners: [String: String] = [:]
                for (t, f) in idx.weightMap { owners[t] = f }
                _ = try? idx.verify(owners: owners, indexPath: index.name)
                blackHole(UInt64(idx.encoded().count))
            }
        }
        let dir = Scratch.shared.folder("sharded", files)
        try drain(try SafetensorsReader.open(path: dir, producer: producer))
    },
    FuzzTarget(name: "torch", about: "a torch.save file, zip or legacy (TorchReader, Unpickler, TorchRebuild), every tensor read") { data in
        let (path, _) = Scratch.shared.file("input.pt", data)
        try drain(try TorchReader.open(path: path, producer: producer))
    },
    FuzzTarget(name: "pickle", about: "a bare pickle (Unpickler.load; persistent ids returned as they are)") { data in
        let (value, end) = try Unpickler.load(data, file: "<fuzz>", persistentLoad: { pid, _ in pid })
        blackHole(UInt64(end) &+ UInt64(value.debugSize))
    },
    FuzzTarget(name: "npy", about: "a .npy file (NpyHeader, NumPyReader), the array read") { data in
        let (path, _) = Scratch.shared.file("input.npy", data)
        try drain(try NumPyReader.open(path: path, producer: producer))
    },
    FuzzTarget(name: "npz", about: "a .npz archive (ZipArchive, stored and deflated members, NumPyReader), every array read") { data in
        let (path, _) = Scratch.shared.file("input.npz", data)
        try drain(try NumPyReader.open(path: path, producer: producer))
    },
    FuzzTarget(name: "msgpack", about: "a flax msgpack file (MsgpackCursor, FlaxMsgpackReader), every leaf read") { data in
        let (path, _) = Scratch.shared.file("input.msgpack", data)
        try drain(try FlaxMsgpackReader.open(path: path, producer: producer))
    },
    FuzzTarget(name: "ocdbt", about: "an Orbax OCDBT checkpoint folder: ==> file <== parts (manifest.ocdbt, d/*, _METADATA); OCDBTStore, then OrbaxReader") { data in
        let files = splitFiles(data, fallback: "manifest.ocdbt")
        defer { Scratch.shared.clearFolder() }
        let dir = Scratch.shared.folder("ocdbt", files)
        if let store = try? OCDBTStore(directory: dir) {
            var sum: UInt64 = 0
            for (_, v) in store.values { try? v.withBytes { for b in $0 { sum &+= UInt64(b) } } }
            blackHole(sum)
        }
        // Arrays one at a time: this target is for the OCDBT store; `zarr` runs the same reader
        // with read-ahead on. (Read-ahead threads make libFuzzer's malloc/free counts differ
        // now and then, and every difference costs a LeakSanitizer pass: half this target's time.)
        try drain(try OrbaxReader.open(path: dir, options: .init(readAhead: .off), producer: producer))
    },
    FuzzTarget(name: "zarr", about: "an Orbax checkpoint of zarr v2/v3 folders: ==> file <== parts (_METADATA, <array>/.zarray or zarr.json, chunks, sharding index); OrbaxReader") { data in
        let files = splitFiles(data, fallback: "a/zarr.json")
        defer { Scratch.shared.clearFolder() }
        let dir = Scratch.shared.folder("zarr", files)
        try drain(try OrbaxReader.open(path: dir, producer: producer))
    },
    FuzzTarget(name: "zarr-metadata", about: "zarr v2 .zarray / v3 zarr.json metadata alone (ZarrArray.parse)") { data in
        let a = try ZarrArray.parse([UInt8](data), name: "a", file: "<fuzz>")
        blackHole(UInt64(a.shape.count))
    },
    FuzzTarget(name: "json", about: "JSON (JSONParser), written back (JSONWriter) and parsed again") { data in
        let v = try JSONParser.parse(data)
        let compact = JSONWriter.compact(v)
        let indented = JSONWriter.pythonIndented(v)
        do {
            _ = try JSONParser.parse(compact)
            _ = try JSONParser.parse(indented)
        } catch {
            fatalError("JSONWriter wrote what JSONParser rejects: \(error)")
        }
    },
    FuzzTarget(name: "rules", about: "a slice rule file, or ==> file <== parts whose first includes the others (SliceRuleParser, RulePattern, Rearrange), planned against a small BERT's tensors (SlicePlan)") { data in
        let files = splitFiles(data, fallback: "fuzz.rules")
        defer { Scratch.shared.clearFolder() }
        let dir = Scratch.shared.folder("rules", files.count > 1 ? files : [])
        let rules = try SliceRuleParser.parse(String(decoding: files[0].bytes, as: UTF8.self), file: dir + "/" + files[0].name)
        let plan = try SlicePlan(rules: rules, inputs: ruleInputs, keepUnmatched: true)
        blackHole(UInt64(plan.outputs.count))
    },
    FuzzTarget(name: "peft", about: "a PEFT adapter_config.json (PEFTAdapterConfig), scales of a few module names") { data in
        let json = try JSONParser.parse(data)
        let c = try PEFTAdapterConfig(json: json, file: "<fuzz>")
        for m in ["q_proj", "model.layers.0.self_attn.q_proj", "lm_head", ""] {
            if let s = try? c.scale(module: m) { blackHole(UInt64(truncatingIfNeeded: s.rank)) }
        }
    },
]

extension PickleValue {
    /// Walks the value (lists and dicts may be deep) so the unpickler's result is used.
    var debugSize: Int {
        var n = 0
        var seen = Set<ObjectIdentifier>()
        var work: [PickleValue] = [self]
        while let v = work.popLast(), n < 1_000_000 {
            n += 1
            switch v {
            case .tuple(let t): work.append(contentsOf: t)
            case .list(let l): if seen.insert(ObjectIdentifier(l)).inserted { work.append(contentsOf: l.items) }
            case .dict(let d): if seen.insert(ObjectIdentifier(d)).inserted { for e in d.entries { work.append(e.key); work.append(e.value) } }
            default: break
            }
        }
        return n
    }
}

func target(named name: String) -> FuzzTarget? { fuzzTargets.first { $0.name == name } }

/// Descriptors the last run left open on its input's files.
nonisolated(unsafe) var lastRunLeakedDescriptors: [String] = []

/// Runs one input; a thrown error is a normal outcome. A descriptor left open on the input's
/// files is a leak: fatal while fuzzing (a finding), counted when replaying.
func runOne(_ t: FuzzTarget, _ data: UnsafeRawBufferPointer) -> Error? {
    defer {
        // A worker thread may still be letting go of its last reference (a job signals its
        // result before its closure is freed): only descriptors still open after 100 ms count.
        var left = Scratch.shared.openRunDescriptors()
        for _ in 0..<100 where !left.isEmpty {
            usleep(1000)
            left = Scratch.shared.openRunDescriptors()
        }
        lastRunLeakedDescriptors = left.map { "\($0.fd) \($0.path)" }
        #if FUZZING
        if !left.isEmpty { fatalError("\(t.name): the run left descriptors open on its input's files: \(lastRunLeakedDescriptors)") }
        #endif
    }
    do { try t.run(data); return nil } catch { return error }
}
