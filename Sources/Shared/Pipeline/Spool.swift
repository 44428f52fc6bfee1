/// Where a writer keeps tensor data that arrives before it can lay out its file (a stream
/// without a manifest): a temporary file beside the output, removed when done.
public final class Spool {
    public let output: AtomicOutput
    public private(set) var tensors: [(descriptor: TensorDescriptor, offset: Int)] = []
    private var size = 0
    private var names = Set<String>()

    /// Creates `.<name>.spool` temporaries next to `path` and says so through `log`.
    public init(beside path: String, log: (String) -> Void) throws {
        let (dir, base) = splitPath(path)
        output = try AtomicOutput(path: (dir.isEmpty ? "" : dir + "/") + ".\(base).spool", overwrite: true)
        log("no manifest in the stream: spooling tensor data to \(output.temporaryPath) to lay out the file at the end")
    }

    /// What a writer that must lay out its file first does at `begin`: with a manifest, lay out
    /// now (one pass, returns nil); without one, spool the data and lay out at the end.
    public static func layOutOrSpool(_ manifest: [TensorDescriptor]?, beside path: String, log: (String) -> Void,
                                     layOut: ([TensorDescriptor]) throws -> Void) throws -> Spool? {
        if let manifest {
            try layOut(manifest)
            return nil
        }
        return try Spool(beside: path, log: log)
    }

    /// Records the next tensor; returns where its bytes go in the spool.
    public func add(_ d: TensorDescriptor, file: String) throws -> Int {
        guard names.insert(d.name).inserted else {
            throw StreamError(.duplicateTensor, source: file, tensor: d.name)
        }
        tensors.append((d, size))
        defer { size += d.byteCount }
        return size
    }

    /// Copies a spooled tensor's bytes to places in other files, in order.
    public func copy(_ index: Int, to places: [(descriptor: FileDescriptor, offset: Int, count: Int)]) throws {
        let (d, from) = tensors[index]
        let buffer = try AlignedBuffer(capacity: min(max(d.byteCount, 1), 8 << 20))
        defer { withExtendedLifetime(buffer) {} }
        var src = from
        for place in places {
            var done = 0
            while done < place.count {
                let n = min(buffer.capacity, place.count - done)
                let region = UnsafeMutableRawBufferPointer(start: buffer.pointer, count: n)
                try output.descriptor.pread(into: region, at: src)
                try place.descriptor.pwriteAll(UnsafeRawBufferPointer(region), at: place.offset + done)
                done += n
                src += n
            }
        }
    }

    public func remove() { output.abort() }
}

extension Spool {
    /// For a writer that laid out its file from the manifest: tensor `d` must be entry `index`.
    static func checkNext(_ d: TensorDescriptor, at index: Int, of manifest: [TensorDescriptor]?, file: String) throws {
        guard let manifest, index < manifest.count, manifest[index] == d else {
            throw StreamError(.manifestMismatch(detail: "tensor \(d) is not the manifest's next entry"), source: file, tensor: d.name)
        }
    }

    /// ... and all its entries must have arrived.
    static func checkComplete(_ arrived: Int, of manifest: [TensorDescriptor]?, file: String) throws {
        if let manifest, arrived != manifest.count {
            throw StreamError(.manifestMismatch(detail: "manifest lists \(manifest.count) tensors, \(arrived) arrived"), source: file)
        }
    }
}
