/// Writes a flax msgpack file (`--format msgpack`) that `flax.serialization.msgpack_restore`
/// and `from_bytes` read: names are split on `separator` into nested maps (in first-seen
/// order), each array an ext type 1 `(shape, dtype name, bytes)`, arrays over `maxChunkSize`
/// bytes chunked as flax chunks them.
///
/// A msgpack map states its entry count first, so the whole layout is planned from the
/// manifest, the headers written, and each chunk of data put straight in place (one pass);
/// without a manifest the data is spooled first. Only tensors are written: non-tensor
/// metadata is not turned into leaves.
public final class FlaxMsgpackWriter: TensorSink {
    public let path: String
    public let separator: String
    public let maxChunkSize: Int
    public let overwrite: Bool
    /// A top-level key every name goes under (`--nest params`).
    public let nest: String?
    private let log: (String) -> Void
    private var output: AtomicOutput?
    private var spool: Spool?
    private var manifest: [TensorDescriptor]?
    /// Per tensor: where its bytes go, in order (several places for a chunked array).
    private var places: [[(offset: Int, count: Int)]] = []
    private var index = -1
    private var written = 0
    private var spoolOffset = 0

    public init(path: String, separator: String = "/", nest: String? = nil, maxChunkSize: Int = FlaxMsgpack.maxChunkSize, overwrite: Bool,
                log: @escaping (String) -> Void) {
        self.path = path
        self.separator = separator
        self.nest = nest
        self.maxChunkSize = maxChunkSize
        self.overwrite = overwrite
        self.log = log
    }

    public func begin(_ header: StreamHeader, manifest: [TensorDescriptor]?) throws {
        self.manifest = manifest
        spool = try Spool.layOutOrSpool(manifest, beside: path, log: log, layOut: layOut)
    }

    /// Plans every byte of the file, writes everything but the array data, and records where
    /// each tensor's data goes.
    private func layOut(_ tensors: [TensorDescriptor]) throws {
        let tree = try Tree(tensors, separator: separator, nest: nest, file: path)
        var skeleton: [(offset: Int, bytes: [UInt8])] = []
        var pending: [UInt8] = []
        var position = 0
        var plan = [[(offset: Int, count: Int)]](repeating: [], count: tensors.count)
        func flush() {
            if !pending.isEmpty { skeleton.append((position - pending.count, pending)) }
            pending = []
        }
        func emit(_ bytes: [UInt8]) {
            pending += bytes
            position += bytes.count
        }
        func array(_ d: TensorDescriptor, shape: [Int], count: Int, tensor: Int) {
            var payload: [UInt8] = []
            MsgpackEncoder.array(3, into: &payload)
            MsgpackEncoder.array(shape.count, into: &payload)
            for s in shape { MsgpackEncoder.uint(s, into: &payload) }
            MsgpackEncoder.string(FlaxMsgpack.dtypeNames[d.dtype]!, into: &payload)
            MsgpackEncoder.binHeader(count, into: &payload)
            var head: [UInt8] = []
            MsgpackEncoder.extHeader(type: 1, payload.count + count, into: &head)
            emit(head + payload)
            flush()
            plan[tensor].append((position, count))
            position += count
        }
        func node(_ n: Tree.Node) {
            switch n {
            case .tensor(let i):
                let d = tensors[i]
                if d.byteCount > maxChunkSize {
                    // flax: {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": 1-d array, ...}}
                    let per = max(1, maxChunkSize / d.dtype.size)
                    let total = d.elementCount
                    let chunks = (total + per - 1) / per
                    var b: [UInt8] = []
                    MsgpackEncoder.map(3, into: &b)
                    MsgpackEncoder.string(FlaxMsgpack.chunkedArrayKey, into: &b)
                    b.append(0xC3)
                    MsgpackEncoder.string("shape", into: &b)
                    MsgpackEncoder.map(d.shape.count, into: &b)
                    for (k, s) in d.shape.enumerated() {
                        MsgpackEncoder.string(String(k), into: &b)
                        MsgpackEncoder.uint(s, into: &b)
                    }
                    MsgpackEncoder.string("chunks", into: &b)
                    MsgpackEncoder.map(chunks, into: &b)
                    emit(b)
                    for c in 0..<chunks {
                        var key: [UInt8] = []
                        MsgpackEncoder.string(String(c), into: &key)
                        emit(key)
                        let n = min(per, total - c * per)
                        array(d, shape: [n], count: n * d.dtype.size, tensor: i)
                    }
                } else {
                    array(d, shape: d.shape, count: d.byteCount, tensor: i)
                }
            case .map(let children):
                var b: [UInt8] = []
                MsgpackEncoder.map(children.count, into: &b)
                emit(b)
                for (key, child) in children {
                    var k: [UInt8] = []
                    MsgpackEncoder.string(key, into: &k)
                    emit(k)
                    node(child)
                }
            }
        }
        node(tree.root)
        flush()

        let out = try AtomicOutput(path: path, overwrite: overwrite)
        output = out
        for (offset, bytes) in skeleton { try bytes.withUnsafeBytes { try out.descriptor.pwriteAll($0, at: offset) } }
        if ftruncate(out.descriptor.rawValue, off_t(position)) != 0 {
            throw IOError(.write, path: out.temporaryPath, errno: errno, detail: "reserving \(position) bytes")
        }
        places = plan
    }

    public func beginTensor(_ tensor: TensorHeader) throws {
        let d = tensor.descriptor
        index += 1
        written = 0
        if let spool {
            spoolOffset = try spool.add(d, file: path)
        } else {
            try Spool.checkNext(d, at: index, of: manifest, file: path)
        }
    }

    public func write(_ chunk: UnsafeRawBufferPointer) throws {
        if let spool {
            try spool.output.descriptor.pwriteAll(chunk, at: spoolOffset + written)
            written += chunk.count
            return
        }
        // Spread the chunk over the tensor's places (several for a chunked array).
        var done = 0
        var skipped = 0
        for place in places[index] {
            if written + done >= skipped + place.count { skipped += place.count; continue }
            let into = written + done - skipped
            let n = min(place.count - into, chunk.count - done)
            try output!.descriptor.pwriteAll(UnsafeRawBufferPointer(rebasing: chunk[done..<done + n]), at: place.offset + into)
            done += n
            skipped += place.count
            if done == chunk.count { break }
        }
        guard done == chunk.count else {
            throw StreamError(.tensorLengthMismatch(declared: UInt64(places[index].reduce(0) { $0 + $1.count }),
                                                    received: UInt64(written + chunk.count)), source: path)
        }
        written += done
    }

    public func endTensor() throws {}

    public func finish() throws {
        if let spool {
            try layOut(spool.tensors.map(\.descriptor))
            for i in spool.tensors.indices {
                try spool.copy(i, to: places[i].map { (output!.descriptor, $0.offset, $0.count) })
            }
            spool.remove()
            self.spool = nil
        } else {
            try Spool.checkComplete(index + 1, of: manifest, file: path)
        }
        try output!.commit()
    }

    public func abort() {
        spool?.remove()
        output?.abort()
    }

    /// Names split into a tree of maps, children in first-seen order.
    struct Tree {
        indirect enum Node {
            case tensor(Int)
            case map([(String, Node)])
        }
        let root: Node

        init(_ tensors: [TensorDescriptor], separator: String, nest: String? = nil, file: String) throws {
            final class Builder {
                var keys: [String] = []
                var children: [String: Builder] = [:]
                var tensor: Int?
            }
            let top = Builder()
            for (i, d) in tensors.enumerated() {
                let parts = (nest.map { [$0] } ?? []) + (separator.isEmpty ? [d.name] : d.name.components(separatedBy: separator))
                var node = top
                for (depth, part) in parts.enumerated() {
                    guard node.tensor == nil else {
                        throw StreamError(.manifestMismatch(detail: "is both an array and a folder of arrays in the tree"), source: file, tensor: d.name)
                    }
                    if let next = node.children[part] {
                        node = next
                    } else {
                        let next = Builder()
                        node.children[part] = next
                        node.keys.append(part)
                        node = next
                    }
                    if depth == parts.count - 1 {
                        guard node.tensor == nil && node.keys.isEmpty else {
                            throw StreamError(.manifestMismatch(detail: "names an array twice, or a folder of arrays"), source: file, tensor: d.name)
                        }
                        node.tensor = i
                    }
                }
            }
            func build(_ b: Builder) -> Node {
                if let t = b.tensor { return .tensor(t) }
                return .map(b.keys.map { ($0, build(b.children[$0]!)) })
            }
            root = build(top)
        }
    }
}

import Glibc
