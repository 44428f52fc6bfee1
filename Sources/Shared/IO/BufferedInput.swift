/// Sequential reads from a descriptor: small reads (frame headers) come from a 64 KiB
/// buffer, large ones (chunk data) go straight into the caller's memory. Tracks the
/// absolute offset for error messages.
public final class BufferedInput {
    public let descriptor: FileDescriptor
    private let buffer: AlignedBuffer
    private var start = 0
    private var end = 0
    private var eof = false
    /// Bytes consumed so far, i.e. the offset of the next byte.
    public private(set) var offset = 0

    public init(_ descriptor: FileDescriptor, bufferSize: Int = 1 << 16) throws {
        self.descriptor = descriptor
        buffer = try AlignedBuffer(capacity: bufferSize)
        descriptor.enlargePipeBuffer()
    }

    /// Buffers at least `wanted` bytes unless the input ends first. Each read(2) takes what
    /// is available rather than waiting for a full buffer: on a pipe, a stage must act on a
    /// frame as soon as it has arrived.
    private func refill(wanted: Int) throws {
        if start > 0 {
            if end > start { buffer.pointer.copyMemory(from: buffer.pointer + start, byteCount: end - start) }
            end -= start
            start = 0
        }
        while end - start < wanted && !eof && end < buffer.capacity {
            let n = try descriptor.readSome(into: UnsafeMutableRawBufferPointer(start: buffer.pointer + end, count: buffer.capacity - end))
            if n == 0 { eof = true }
            end += n
        }
    }

    /// Reads up to `n` bytes; fewer only at end of input.
    public func read(_ n: Int) throws -> [UInt8] {
        if end - start < n && n <= buffer.capacity { try refill(wanted: n) }
        if end - start >= n {
            let out = [UInt8](UnsafeRawBufferPointer(start: buffer.pointer + start, count: n))
            start += n
            offset += n
            return out
        }
        // More than the buffer holds: grow with what arrives (doubling), so a length a frame
        // declares is never allocated before the input has shown it has that much.
        var out: [UInt8] = []
        while out.count < n {
            let want = min(n - out.count, max(buffer.capacity, out.count))
            let have = out.count
            out.append(contentsOf: repeatElement(0, count: want))
            let got = try out.withUnsafeMutableBytes { try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[have...])) }
            if got < want {
                out.removeLast(want - got)
                break
            }
        }
        return out
    }

    /// Fills `destination`; returns fewer bytes only at end of input.
    public func read(into destination: UnsafeMutableRawBufferPointer) throws -> Int {
        let buffered = min(end - start, destination.count)
        if buffered > 0 {
            destination.baseAddress!.copyMemory(from: buffer.pointer + start, byteCount: buffered)
            start += buffered
        }
        var got = buffered
        if got < destination.count && !eof {
            let rest = UnsafeMutableRawBufferPointer(rebasing: destination[got...])
            let n = try descriptor.readFully(into: rest)
            if n < rest.count { eof = true }
            got += n
        }
        offset += got
        return got
    }

    /// Hands over up to `max` already-buffered bytes (valid until the next call) so a caller
    /// can move the rest of a region with splice(2), then account for it with `consumed`.
    public func takeBuffered(max: Int) -> UnsafeRawBufferPointer {
        let n = min(max, end - start)
        let p = UnsafeRawBufferPointer(start: buffer.pointer + start, count: n)
        start += n
        offset += n
        return p
    }

    /// Records `n` bytes read from the descriptor behind the buffer's back (by splice).
    public func consumedDirectly(_ n: Int) { offset += n }

    /// True when no byte is left.
    public func atEnd() throws -> Bool {
        if end > start { return false }
        try refill(wanted: 1)
        return end == start
    }
}
