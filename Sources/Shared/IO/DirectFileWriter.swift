import CLinux
import Glibc

/// Writes runs of bytes into a file with `O_DIRECT` where it can.
///
/// A converted checkpoint is written once and is far larger than anything worth caching:
/// through the page cache, every byte takes a fresh cache page, is copied into it, dirtied and
/// written back later (and a 100 GB output on a 24 GB machine evicts everything else and
/// stalls in writeback throttling). With `O_DIRECT` the device reads the bytes straight from
/// our buffer. Direct I/O moves whole, aligned blocks from aligned memory only, so bytes are
/// gathered in a staging window that mirrors the file:
///
///     file:     |  block  |  block  |  block  |  block  |  block  |
///     run:           [#######################################]
///                    ^ offset                                ^ offset + count
///     buffered: [    ####]                             [#####    ]   partial edge blocks
///     direct:             [#############################]            whole blocks
///
/// Whole blocks go out on another thread while the next window fills (two staging buffers);
/// the partial blocks at a run's edges go through the ordinary descriptor. A block is always
/// written entirely one way or the other, so the two paths never touch the same page. A run
/// ends when a write does not continue it (`write(_:at:)` with another offset) or on `finish`.
public final class DirectFileWriter {
    /// The unit of direct I/O: a page (at least 4 KiB), which also covers the device's logical
    /// block size. Edge blocks go through the page cache, so a block must be a whole page for
    /// the two paths never to share one (arm64 kernels may use 16 or 64 KiB pages).
    static let block = max(4096, MappedFile.pageSize)
    public static let stagingSize = 8 << 20
    /// Files smaller than this are written through the page cache: not worth a second
    /// descriptor and 16 MiB of staging, and likely to be read back soon.
    public static let defaultThreshold = 64 << 20

    public let buffered: FileDescriptor
    private let direct: FileDescriptor
    /// Bytes per staging window: a whole number of blocks.
    private let windowSize: Int
    /// The window being filled, and the other one (mapped when first needed, released by
    /// `finish`, so a finished file holds no memory).
    private var current: AlignedBuffer?
    private var spare: AlignedBuffer?
    private var closed = false
    private var inFlight: DirectWriteJob?
    private let work = OrderedWork<DirectWriteJob>(window: 1)
    /// File offset of `current`'s first byte (block-aligned), and how much of it holds data:
    /// bytes `[lead, filled)`.
    private var windowStart = 0
    private var lead = 0
    private var filled = 0
    private var running = false
    /// Set once the file system refused a direct write: everything after goes buffered.
    public private(set) var directRefused = false
    /// Bytes that reached the file through the direct descriptor (what tests check to know the
    /// direct path really ran).
    public private(set) var bytesWrittenDirectly = 0

    /// Opens `path` (already created, e.g. through `AtomicOutput`) a second time for direct
    /// writes; nil when the file system does not take `O_DIRECT` (tmpfs before Linux 6.6, some
    /// network and FUSE file systems): the caller writes through `buffered` instead.
    public init?(path: String, buffered: FileDescriptor, stagingSize: Int = DirectFileWriter.stagingSize) {
        let fd = retryingOnInterrupt { open(path, O_WRONLY | ckpt_o_direct() | O_CLOEXEC) }
        guard fd >= 0 else { return nil }
        self.buffered = buffered
        direct = FileDescriptor(rawValue: fd, path: path)
        windowSize = max(DirectFileWriter.block, stagingSize / DirectFileWriter.block * DirectFileWriter.block)
    }

    /// Whether the file system holding `folder` takes `O_DIRECT` (a probe file is made and
    /// removed): tests of the direct path skip, saying why, where it does not.
    public static func supported(in folder: String) -> Bool {
        let probe = folder + "/.ckpt-direct-probe-\(getpid())"
        let fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | ckpt_o_direct() | O_CLOEXEC, 0o600)
        defer { unlink(probe) }
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }

    /// A writer for an output file of `size` bytes when direct output is `enabled` and the file
    /// is at least `threshold`; nil means: write through `buffered`.
    public static func forOutput(path: String, buffered: FileDescriptor, size: Int, enabled: Bool,
                                 threshold: Int = DirectFileWriter.defaultThreshold) -> DirectFileWriter? {
        enabled && size >= threshold ? DirectFileWriter(path: path, buffered: buffered) : nil
    }

    deinit {
        work.drain()
        if !closed { direct.close() }
    }

    /// Appends `bytes` at file offset `offset`, continuing the current run or starting a new one.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        if running && offset != windowStart + filled { try endRun() }
        if !running {
            windowStart = offset & ~(DirectFileWriter.block - 1)
            lead = offset - windowStart
            filled = lead
            running = true
        }
        precondition(!closed, "DirectFileWriter written after finish")
        var done = 0
        while done < bytes.count {
            if current == nil {
                current = try spare ?? AlignedBuffer.reusable(capacity: windowSize, pageAligned: true)
                spare = nil
            }
            let n = min(bytes.count - done, windowSize - filled)
            (current!.pointer + filled).copyMemory(from: bytes.baseAddress! + done, byteCount: n)
            filled += n
            done += n
            if filled == windowSize { try submitWindow(final: false) }
        }
    }

    /// Writes what the current run still holds, waits until every byte is in the file, and
    /// releases the staging windows and the direct descriptor.
    public func finish() throws {
        guard !closed else { return }
        if running { try endRun() }
        try settle()
        current = nil
        spare = nil
        closed = true
        direct.close()
    }

    private func endRun() throws {
        try submitWindow(final: true)
        running = false
    }

    /// Sends the window's whole blocks to the device and its partial edge blocks to the
    /// ordinary descriptor. A window that is not final is full, so it ends on a block boundary.
    private func submitWindow(final: Bool) throws {
        let block = DirectFileWriter.block
        guard let buffer = current else { return }  // a run that wrote nothing
        let window = UnsafeRawBufferPointer(start: buffer.pointer, count: filled)
        var headEnd = 0
        if lead > 0 {
            headEnd = min(block, filled)
            try buffered.pwriteAll(UnsafeRawBufferPointer(rebasing: window[lead..<headEnd]), at: windowStart + lead)
        }
        let directEnd = max(headEnd, filled & ~(block - 1))
        if final && filled > directEnd {
            try buffered.pwriteAll(UnsafeRawBufferPointer(rebasing: window[directEnd..<filled]), at: windowStart + directEnd)
        }
        if directEnd > headEnd {
            try settle()
            let job = DirectWriteJob(buffer: buffer, range: headEnd..<directEnd, fileOffset: windowStart,
                                     direct: direct, buffered: buffered, refused: directRefused)
            work.submit(job)
            inFlight = job
            current = nil  // the next write takes the spare (or maps one)
        }
        windowStart += filled
        lead = 0
        filled = 0
    }

    /// Waits for the direct write in flight (if any) and takes its buffer back.
    private func settle() throws {
        guard let job = inFlight else { return }
        inFlight = nil
        _ = try work.next()
        bytesWrittenDirectly += job.directBytes
        if job.refused { directRefused = true }
        spare = job.buffer
    }
}

/// One window's whole blocks, written with `O_DIRECT` on a worker thread; through the ordinary
/// descriptor if the file system refuses (EINVAL: an alignment it wants larger than a page).
final class DirectWriteJob: Job, @unchecked Sendable {
    let buffer: AlignedBuffer
    let range: Range<Int>
    let fileOffset: Int
    let direct: FileDescriptor
    let buffered: FileDescriptor
    private(set) var refused: Bool
    private(set) var directBytes = 0

    init(buffer: AlignedBuffer, range: Range<Int>, fileOffset: Int, direct: FileDescriptor, buffered: FileDescriptor, refused: Bool) {
        self.buffer = buffer
        self.range = range
        self.fileOffset = fileOffset
        self.direct = direct
        self.buffered = buffered
        self.refused = refused
    }

    override func run() throws {
        var done = range.lowerBound
        while done < range.upperBound && !refused {
            let n = pwrite(direct.rawValue, buffer.pointer + done, range.upperBound - done, off_t(fileOffset + done))
            if n < 0 {
                if errno == EINTR { continue }
                guard errno == EINVAL else {
                    throw IOError(.write, path: direct.path, errno: errno, detail: "direct write at offset \(fileOffset + done)")
                }
                refused = true
            } else if n == 0 {
                throw IOError(.write, path: direct.path, errno: EIO, detail: "direct write at offset \(fileOffset + done) wrote nothing")
            } else {
                done += n
                directBytes += n
                // A short direct write that ends mid-block cannot be continued directly.
                if done % DirectFileWriter.block != 0 { refused = true }
            }
        }
        if done < range.upperBound {
            try buffered.pwriteAll(UnsafeRawBufferPointer(start: buffer.pointer + done, count: range.upperBound - done),
                                   at: fileOffset + done)
        }
    }
}
