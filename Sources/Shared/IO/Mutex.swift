import Glibc

/// A small pthread mutex, with one condition variable for threads that wait under it for a
/// state others change (the remote reader's fetched pages); the standard library's
/// `Synchronization.Mutex` needs newer deployment targets than some toolchains offer, and this
/// is all we need.
public final class Mutex: @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        m = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(m, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(m)
        condition.deallocate()
        m.deallocate()
    }

    /// Waits for a `broadcast`; call only inside `withLock` (the lock is released while waiting).
    public func wait() { pthread_cond_wait(condition, m) }

    /// Wakes every waiter; call inside `withLock`.
    public func broadcast() { pthread_cond_broadcast(condition) }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }
}
