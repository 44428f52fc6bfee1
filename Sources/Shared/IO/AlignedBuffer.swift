import Glibc

/// A buffer aligned to 64 bytes (cache lines, and the stream's alignment), owned by one
/// object so it can be handed between threads and recycled through a `BufferPool`.
///
/// Large buffers are mapped directly (mmap/munmap) rather than malloc'd: glibc raises its
/// mmap threshold after the first large free and then serves multi-MiB blocks from arenas
/// it seldom returns, which made a stage's resident memory creep far past what it holds.
public final class AlignedBuffer: @unchecked Sendable {
    public let capacity: Int
    public let pointer: UnsafeMutableRawPointer
    /// How many bytes are in use (set by whoever fills it).
    public var count = 0
    private let mapped: Bool
    /// Returned to `MappingCache` instead of unmapped (see `reusable`).
    private var cached = false
    private static let mapThreshold = 256 << 10
    static let hugePageThreshold = 16 << 20

    /// A buffer whose every byte the caller will write before reading (its contents are
    /// undefined): large ones come from recently released mappings (see `MappingCache`) when
    /// there are some, since a fresh page costs a fault and zeroing (and on a VM far more).
    /// `pageAligned`: mapped even when small (direct I/O needs page-aligned memory).
    public static func reusable(capacity: Int, pageAligned: Bool = false) throws -> AlignedBuffer {
        guard capacity >= mapThreshold, let (p, size) = MappingCache.shared.take(capacity) else {
            let b = try AlignedBuffer(capacity: capacity, mapped: pageAligned)
            b.cached = capacity >= mapThreshold  // smaller ones could never be taken back
            return b
        }
        let b = AlignedBuffer(reusing: p, capacity: size)
        b.cached = true
        return b
    }

    private init(reusing pointer: UnsafeMutableRawPointer, capacity: Int) {
        self.capacity = capacity
        self.pointer = pointer
        mapped = true
    }

    /// `mapped`: page-aligned mapping whatever the size (large buffers always are).
    /// Throws `AllocationError` when the system refuses the memory (exit 71): a size that
    /// came from a file must never end the process in a trap.
    public init(capacity: Int, mapped map: Bool = false) throws {
        guard capacity >= 0 else { throw AllocationError(bytes: capacity, errno: EINVAL) }
        self.capacity = capacity
        if capacity >= AlignedBuffer.mapThreshold || map {
            MappingCache.shared.willMap(capacity)
            let p = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            guard let p, p != MAP_FAILED else {
                let e = errno
                MappingCache.shared.didUnmap(capacity)
                throw AllocationError(bytes: capacity, errno: e)
            }
            // Transparent huge pages where the system offers them on request: a 2 MiB fault
            // instead of 512 small ones (on a VM each costs a trip to the hypervisor).
            if capacity >= AlignedBuffer.hugePageThreshold { _ = madvise(p, capacity, MADV_HUGEPAGE) }
            pointer = p
            mapped = true
        } else {
            var p: UnsafeMutableRawPointer?
            let rc = posix_memalign(&p, 64, max(capacity, 64))
            guard rc == 0, let p else { throw AllocationError(bytes: capacity, errno: rc) }
            pointer = p
            mapped = false
        }
    }

    deinit {
        if cached && MappingCache.shared.give(pointer, capacity) { return }
        if mapped {
            MappingCache.shared.didUnmap(capacity)
            munmap(pointer, capacity)
        } else {
            free(pointer)
        }
    }

    /// The bytes in use. The pointer is valid only while this object lives: keep a reference
    /// (or use `copyBytes()`/`withExtendedLifetime`) for as long as it is used.
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: pointer, count: count) }

    /// The bytes in use, copied into an array.
    public func copyBytes() -> [UInt8] { withExtendedLifetime(self) { [UInt8](bytes) } }
    public var whole: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: capacity) }
}

/// Recycles buffers of one size, so steady-state streaming allocates nothing (large
/// allocations are fresh mmaps in glibc, and faulting 4 MiB in costs ~1000 page faults).
public final class BufferPool: @unchecked Sendable {
    public let bufferSize: Int
    /// Idle buffers kept for reuse; more are freed, so a burst cannot pin memory.
    public let retain: Int
    private var free: [AlignedBuffer] = []
    private let lock = Mutex()

    public init(bufferSize: Int, retain: Int) {
        self.bufferSize = bufferSize
        self.retain = retain
    }

    /// A buffer of at least `minimum` bytes (the pool's size unless more is asked for).
    public func take(minimum: Int = 0) throws -> AlignedBuffer {
        if minimum <= bufferSize, let b = lock.withLock({ free.popLast() }) {
            b.count = 0
            return b
        }
        return try AlignedBuffer(capacity: max(bufferSize, minimum))
    }

    public func give(_ b: AlignedBuffer) {
        guard b.capacity == bufferSize else { return }
        lock.withLock { if free.count < retain { free.append(b) } }
    }
}

extension AlignedBuffer {
    /// The next piece of at most `size` bytes from `position` (advanced past it), nil at the
    /// end: how a source hands out a tensor it holds whole, chunk by chunk.
    public func chunk(from position: inout Int, size: Int = StreamFormat.defaultChunkSize) -> UnsafeRawBufferPointer? {
        HeldBytes(self).chunk(from: &position, size: size)
    }
}

/// Bytes a source holds and hands out chunk by chunk: a whole buffer, or a contiguous part of
/// one that several outputs share (`ckpt-slice` unstacking along a leading axis).
struct HeldBytes {
    let buffer: AlignedBuffer
    let start: Int
    let count: Int

    init(_ buffer: AlignedBuffer) {
        self.init(buffer, start: 0, count: buffer.count)
    }

    init(_ buffer: AlignedBuffer, start: Int, count: Int) {
        precondition(start >= 0 && count >= 0 && start + count <= buffer.count)
        self.buffer = buffer
        self.start = start
        self.count = count
    }

    /// The next piece of at most `size` bytes from `position` (advanced past it), nil at the end.
    func chunk(from position: inout Int, size: Int = StreamFormat.defaultChunkSize) -> UnsafeRawBufferPointer? {
        guard position < count else { return nil }
        let n = min(size, count - position)
        defer { position += n }
        return UnsafeRawBufferPointer(start: buffer.pointer + start + position, count: n)
    }
}

/// Released large mappings kept for `AlignedBuffer.reusable`, up to a fixed total: reusing one
/// avoids faulting fresh pages in (on a VM the dearest thing a stage does with memory). A
/// request takes the front of the smallest kept mapping that holds it; the rest stays kept as
/// its own mapping, and kept neighbours are joined again when given back, so buffers of
/// changing sizes (one tensor's slices, then the next's) keep using the same touched pages.
///
/// Kept mappings never raise the process's peak: it counts every mapped buffer, and before
/// fresh pages are mapped, kept ones are unmapped (oldest first) until live + kept + the new
/// mapping fit within the peak so far. The peak therefore grows only when live buffers alone
/// need more.
final class MappingCache: @unchecked Sendable {
    static let shared = MappingCache(limit: 1 << 30)
    private let lock = Mutex()
    private var kept: [(pointer: UnsafeMutableRawPointer, size: Int)] = []
    private var total = 0
    /// Bytes of mapped buffers in use, and the most of live + kept so far.
    private var live = 0
    private var peak = 0
    private let limit: Int
    /// Pieces are whole pages (`MappedFile.pageSize`), and large ones (huge pages asked for)
    /// whole multiples of 2 MiB from the start of the mapping: where the kernel aligns large
    /// mappings to huge pages (x86-64 since Linux 6.7), cuts then fall between huge pages.
    private static let hugePage = 2 << 20
    /// A rest smaller than this is not kept apart: it goes with the piece taken.
    static let smallestPiece = 256 << 10

    init(limit: Int) { self.limit = limit }

    var keptBytes: Int { lock.withLock { total } }
    var liveBytes: Int { lock.withLock { live } }

    /// A mapping of at least `size` bytes from those kept, and its size; nil if none holds it.
    func take(_ size: Int) -> (UnsafeMutableRawPointer, Int)? {
        lock.withLock {
            var best: Int?
            for (i, m) in kept.enumerated() where m.size >= size {
                if best == nil || m.size < kept[best!].size { best = i }
            }
            guard let i = best else { return nil }
            let m = kept.remove(at: i)
            total -= m.size
            let unit = size >= AlignedBuffer.hugePageThreshold ? MappingCache.hugePage : MappedFile.pageSize
            var used = (size + unit - 1) / unit * unit
            if m.size - used < MappingCache.smallestPiece {
                used = m.size
            } else {
                kept.append((m.pointer + used, m.size - used))
                total += m.size - used
            }
            live += used
            return (m.pointer, used)
        }
    }

    /// Fresh pages are about to be mapped: unmaps kept ones so they do not add to the peak.
    func willMap(_ size: Int) {
        let evicted = lock.withLock {
            let evicted = evictOldest(bytes: live + total + size - peak)
            live += size
            peak = max(peak, live + total)
            return evicted
        }
        for m in evicted { munmap(m.pointer, m.size) }
    }

    /// Takes at least `bytes` (if positive) from the kept mappings, oldest first (call with the
    /// lock held); the caller unmaps what is returned once the lock is released. A mapping
    /// larger than what is still needed loses only its end, in whole pages: a joined mapping
    /// of hundreds of MiB is not thrown away for a few MiB of fresh pages.
    private func evictOldest(bytes: Int) -> [(pointer: UnsafeMutableRawPointer, size: Int)] {
        var needed = bytes
        var evicted: [(pointer: UnsafeMutableRawPointer, size: Int)] = []
        while needed > 0, !kept.isEmpty {
            let cut = (needed + MappedFile.pageSize - 1) / MappedFile.pageSize * MappedFile.pageSize
            if kept[0].size - cut >= MappingCache.smallestPiece {
                kept[0].size -= cut
                evicted.append((kept[0].pointer + kept[0].size, cut))
                total -= cut
                break
            }
            let m = kept.removeFirst()
            total -= m.size
            needed -= m.size
            evicted.append(m)
        }
        return evicted
    }

    /// A mapped buffer was released and is being unmapped (not kept).
    func didUnmap(_ size: Int) {
        lock.withLock { live -= size }
    }

    /// Keeps a released mapping if it fits the limit (evicting older ones), joined with kept
    /// neighbours; false: the caller unmaps it (and reports that with `didUnmap`).
    func give(_ pointer: UnsafeMutableRawPointer, _ size: Int) -> Bool {
        guard size <= limit / 2 else { return false }
        let evicted = lock.withLock {
            live -= size
            var joined = (pointer: pointer, size: size)
            while let i = kept.firstIndex(where: { $0.pointer + $0.size == joined.pointer || joined.pointer + joined.size == $0.pointer }) {
                let m = kept.remove(at: i)
                joined = (min(m.pointer, joined.pointer), m.size + joined.size)
            }
            total -= joined.size - size  // the neighbours were counted already
            kept.append(joined)
            total += joined.size
            return evictOldest(bytes: total - limit)
        }
        for m in evicted { munmap(m.pointer, m.size) }
        return true
    }
}

/// Memory the system would not give (mmap or posix_memalign failed): EX_OSERR, one line.
public struct AllocationError: CkptError, Equatable {
    public var bytes: Int
    public var errno: Int32
    /// The tensor the memory was for, where the caller knows it.
    public var tensor: String?

    public init(bytes: Int, errno: Int32, tensor: String? = nil) {
        self.bytes = bytes
        self.errno = errno
        self.tensor = tensor
    }

    public var exitStatus: SysExit { .osError }
    public var description: String {
        (tensor.map { "tensor \($0): " } ?? "") + "cannot allocate \(bytes) bytes: \(String(cString: strerror(errno)))"
    }
}
