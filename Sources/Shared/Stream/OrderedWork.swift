import Dispatch

/// A unit of CPU work (compress or decompress one chunk, make a tensor ahead) run on another
/// core.
///
/// It runs in a dispatch group rather than signalling a semaphore: the group is left only after
/// the worker has released the closure that ran it, so once `wait()` returns no worker thread
/// holds the job, or anything it holds, any longer. (With a semaphore the worker's last
/// reference went a moment after the waiter woke: memory freed after the caller had finished,
/// which is what makes libFuzzer run a leak check on every input.)
public class Job: @unchecked Sendable {
    private let group = DispatchGroup()
    public var failure: Error?

    /// Override: the work itself. Runs on a worker thread.
    open func run() throws {}

    /// Runs `run()` on a worker thread of the global queue.
    public func start() {
        DispatchQueue.global(qos: .userInitiated).async(group: group) { [self] in
            do { try run() } catch { failure = error }
        }
    }

    /// Blocks until `run()` has returned and the worker has let go of the job; rethrows its error.
    public func wait() throws {
        group.wait()
        if let failure { throw failure }
    }
}

/// A job that makes one value (a tensor read ahead, a slice built ahead) from a closure, which
/// it lets go once it has run: what the closure holds (files, decoders, a source) goes with it.
final class ResultJob<Value>: Job, @unchecked Sendable {
    private var make: (() throws -> Value)?
    private var made: Value?

    init(_ make: @escaping () throws -> Value) {
        self.make = make
    }

    override func run() throws {
        defer { make = nil }
        made = try make!()
    }

    /// The value, or the error making it threw.
    func value() throws -> Value {
        try wait()
        return made!
    }
}

/// Starts jobs on worker threads and hands them back in submission order, with at most
/// `window` in flight so memory stays bounded (window × chunk buffers).
public final class OrderedWork<J: Job> {
    public let window: Int
    /// Jobs in submission order. Handed-back jobs leave at once: a finished job still holds
    /// its buffers, and keeping it here would keep them alive.
    private var pending: [J] = []
    public init(window: Int) { self.window = max(1, window) }

    public var count: Int { pending.count }
    public var isFull: Bool { count >= window }

    public func submit(_ job: J) {
        pending.append(job)
        job.start()
    }

    /// The oldest job, once finished; nil if none is pending.
    public func next() throws -> J? {
        guard !pending.isEmpty else { return nil }
        let job = pending.removeFirst()  // the window is a handful of jobs: O(window)
        try job.wait()
        return job
    }

    /// Waits for every job still running (used on errors, so no worker outlives its buffers).
    public func drain() {
        for job in pending { try? job.wait() }
        pending.removeAll()
    }

    /// How many worker threads to keep busy: every core.
    public static var cores: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}

import Glibc
