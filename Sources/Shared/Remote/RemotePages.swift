import Dispatch
import Glibc

/// A remote file as memory: an anonymous mapping of the file's size, filled on demand. Readers
/// see the same `MappedFile` API as for a local file; `ensure` fetches the missing pages of a
/// range (in requests of up to 8 MiB, several in flight) and waits for them, `prefetch` starts
/// fetching ahead without waiting, and `forget` gives pages back to the system once read, so a
/// sequential read holds about the prefetch window, not the file.
///
///     file:   | forgotten (absent) | present | in flight ... | absent ............ |
///                                  ^ reader      ^ prefetched up to reader + window
///
/// Pages are 64 KiB (larger past 64 GiB): small random reads (a zip's local headers) fetch
/// little, and a page once present is not fetched again until forgotten, so each byte is
/// fetched about once.
final class RemotePages: @unchecked Sendable {
    static let smallestPage = 64 << 10
    /// 64 KiB, or larger for a file over 64 GiB, so the page table stays under a million
    /// entries whatever size a server declares.
    let pageSize: Int
    /// The largest single request.
    static let requestSize = 8 << 20
    /// Requests in flight at once (connections).
    static let connections = 4
    /// How far ahead of a sequential reader `prefetch` keeps pages coming.
    static let window = 64 << 20

    let object: RemoteObject
    let base: UnsafeMutableRawPointer
    let size: Int

    private enum Page: UInt8 {
        case absent, wanted, inFlight, present
    }

    private let lock = Mutex()
    private var pages: [Page]
    /// Runs of pages waiting for a worker, urgent ones (someone waits) first.
    private var queue: [Range<Int>] = []
    private var workers = 0
    private var failure: RemoteError?
    private var hugePages = false

    init(_ object: RemoteObject) throws {
        self.object = object
        size = object.size
        let length = max(size, 1)
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0), p != MAP_FAILED else {
            throw IOError(.mmap, path: object.location.display, errno: errno)
        }
        base = p
        var page = RemotePages.smallestPage
        while size / page > 1 << 20 { page *= 2 }
        pageSize = page
        pages = Array(repeating: .absent, count: (size + page - 1) / page)
        // The head arrived with the open: its whole pages are present.
        let headPages = object.head.count == size ? pages.count : object.head.count / pageSize
        if headPages > 0 {
            object.head.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: min(object.head.count, size)) }
            for i in 0..<headPages { pages[i] = .present }
        }
    }

    deinit {
        // Workers hold `self` while they run: none is left when this runs.
        munmap(base, max(size, 1))
    }

    private func pageRange(_ offset: Int, _ count: Int) -> Range<Int> {
        guard count > 0 else { return 0..<0 }
        return offset / pageSize..<(offset + count - 1) / pageSize + 1
    }

    /// Fetches what is missing of `[offset, offset + count)` and waits for it.
    func ensure(offset: Int, count: Int) throws(RemoteError) {
        let range = pageRange(offset, count)
        guard !range.isEmpty else { return }
        let failed: RemoteError? = lock.withLock {
            while true {
                if let failure { return failure }
                if range.allSatisfy({ pages[$0] == .present }) { return nil }
                // Absent pages (never asked for, or forgotten by another thread meanwhile) are asked for.
                if range.contains(where: { pages[$0] == .absent }) { enqueue(range, urgent: true) }
                lock.wait()
            }
        }
        if let failed { throw failed }
    }

    /// Starts fetching `[offset, offset + count)` (clipped to the file) without waiting.
    func prefetch(offset: Int, count: Int) {
        let end = min(size, offset + count)
        guard offset < end else { return }
        lock.withLock {
            guard failure == nil else { return }
            if !hugePages {
                // A sequential reader has begun: the file is filled by memcpy from the socket
                // from here on, and 2 MiB pages fault 512x less often (a 2 GiB copy from a local
                // nginx: 3.0 s -> 1.05 s; 4 KiB faults were serialised across the fetching
                // threads). Not before: the scattered 64 KiB reads of opening a file (a zip's
                // local headers) would each take a 2 MiB page. One madvise for the mapping (one
                // per request contends for the address-space lock: 2.1 s). Where THP is off,
                // nothing changes.
                hugePages = true
                _ = madvise(base, max(size, 1), MADV_HUGEPAGE)
            }
            enqueue(pageRange(offset, end - offset), urgent: false)
        }
    }

    /// Gives the whole pages inside `[offset, offset + count)` back (zero-filled, absent again),
    /// absent ones too (a huge page partly filled holds memory under them). Pages being fetched
    /// are left alone.
    func forget(offset: Int, count: Int) {
        let first = (offset + pageSize - 1) / pageSize
        let end = min((offset + count) / pageSize, pages.count)
        guard first < end else { return }
        lock.withLock {
            for run in runs(in: first..<end, where: { $0 == .present || $0 == .absent }) {
                for i in run { pages[i] = .absent }
                _ = madvise(base + run.lowerBound * pageSize, min(run.upperBound * pageSize, size) - run.lowerBound * pageSize, MADV_DONTNEED)
            }
        }
    }

    /// The maximal runs of consecutive pages in `range` whose state satisfies `matches`, each
    /// at most `limit` pages. Called with the lock held.
    private func runs(in range: Range<Int>, limit: Int = .max, where matches: (Page) -> Bool) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var i = range.lowerBound
        while i < range.upperBound {
            guard matches(pages[i]) else { i += 1; continue }
            var j = i + 1
            while j < range.upperBound && matches(pages[j]) && j - i < limit { j += 1 }
            runs.append(i..<j)
            i = j
        }
        return runs
    }

    /// Marks the absent pages of `range` wanted and queues them in runs of at most
    /// `requestSize`; starts workers up to `connections`. Called with the lock held.
    private func enqueue(_ range: Range<Int>, urgent: Bool) {
        let runs = runs(in: range, limit: max(1, RemotePages.requestSize / pageSize), where: { $0 == .absent })
        guard !runs.isEmpty else { return }
        for run in runs { for i in run { pages[i] = .wanted } }
        if urgent { queue.insert(contentsOf: runs, at: 0) } else { queue.append(contentsOf: runs) }
        while workers < RemotePages.connections && workers < queue.count {
            workers += 1
            startWorker()
        }
    }

    /// A thread of its own, not the shared dispatch pool: readers waiting in `ensure` may hold
    /// pool threads (a concurrentPerform assembling an array), and the fetch must not wait
    /// for them.
    private func startWorker() {
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let started = pthread_create(&thread, nil, { raw in
            let pages = Unmanaged<RemotePages>.fromOpaque(raw!).takeRetainedValue()
            pages.work()
            return nil
        }, box.toOpaque())
        if started == 0 {
            pthread_detach(thread)
        } else {
            box.release()
            DispatchQueue.global().async { self.work() }  // no thread to be had: the pool it is
        }
    }

    /// A worker: takes runs off the queue until it is empty.
    private func work() {
        while true {
            let run: Range<Int>? = lock.withLock {
                guard failure == nil, !queue.isEmpty else {
                    workers -= 1
                    return nil
                }
                let r = queue.removeFirst()
                for i in r { pages[i] = .inFlight }
                return r
            }
            guard let run else { return }
            let start = run.lowerBound * pageSize
            let end = min(run.upperBound * pageSize, size)
            var error: RemoteError?
            do { try object.read(into: UnsafeMutableRawBufferPointer(start: base + start, count: end - start), at: start) } catch let e {
                error = e
            }
            lock.withLock {
                if let error {
                    if failure == nil { failure = error }
                    for i in run { pages[i] = .absent }
                } else {
                    for i in run { pages[i] = .present }
                }
                lock.broadcast()
            }
        }
    }
}
