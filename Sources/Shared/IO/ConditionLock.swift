import Glibc

/// A pthread mutex with one condition variable: threads wait under the lock for a state the
/// others change (fetched pages, in the remote reader) and are woken when it changes.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits for a `broadcast`; call only inside `withLock` (the lock is released while waiting).
    public func wait() { pthread_cond_wait(condition, mutex) }

    /// Wakes every waiter; call inside `withLock`.
    public func broadcast() { pthread_cond_broadcast(condition) }
}
