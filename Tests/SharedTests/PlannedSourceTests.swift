import Glibc
import Testing
@testable import Shared

/// Records how many tensors are being made at once, and the most bytes made and not yet dropped.
private final class MakeLog: @unchecked Sendable {
    let lock = Mutex()
    var running = 0
    var maxRunning = 0
    var order: [Int] = []

    func make(_ i: Int, bytes: Int, fail: Bool = false) throws -> AlignedBuffer {
        lock.withLock {
            running += 1
            maxRunning = max(maxRunning, running)
            order.append(i)
        }
        usleep(20_000)  // long enough that a tensor made ahead overlaps this one
        lock.withLock { running -= 1 }
        if fail { throw OrbaxError(.zarr(.doesNotDecompress(detail: "made to fail")), file: "test", tensor: "t\(i)") }
        let b = try AlignedBuffer(capacity: bytes)
        b.count = bytes
        for k in 0..<bytes { b.pointer.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ k), toByteOffset: k, as: UInt8.self) }
        return b
    }
}

@Suite struct PlannedSourceReadAheadTests {
    private func plan(_ log: MakeLog, sizes: [Int], failing: Int? = nil) -> [(TensorHeader, TensorData)] {
        sizes.enumerated().map { i, n in
            (TensorHeader(try! TensorDescriptor(name: "t\(i)", dtype: .u8, shape: [n])),
             .materialized { try log.make(i, bytes: n, fail: i == failing) })
        }
    }

    private func expected(_ i: Int, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: i &* 31 &+ $0) } }

    @Test func makesAheadInsideTheBudgetAndEmitsInOrder() throws {
        let log = MakeLog()
        let sizes = [1000, 3000, 2000, 1000, 4000]
        let source = PlannedSource(header: StreamHeader(producer: "t", sourceFormat: "t"), plan: plan(log, sizes: sizes),
                                   chunkSize: 700, readAhead: ReadAhead(budget: 8000, depth: 1))
        let sink = CollectingSink()
        try pump(from: source, to: sink)
        #expect(sink.tensors.map(\.0.descriptor.name) == ["t0", "t1", "t2", "t3", "t4"])
        for (i, n) in sizes.enumerated() { #expect(sink.tensors[i].1 == expected(i, n)) }
        #expect(log.maxRunning == 2)  // one being made for emission, one ahead
    }

    @Test func aTensorThatDoesNotFitIsNotMadeAhead() throws {
        let log = MakeLog()
        // 3000 + 6000 > 8000: t1 waits until t0 is dropped; so does t2 for t1.
        let source = PlannedSource(header: StreamHeader(producer: "t", sourceFormat: "t"), plan: plan(log, sizes: [3000, 6000, 3000]),
                                   readAhead: ReadAhead(budget: 8000, depth: 1))
        let sink = CollectingSink()
        try pump(from: source, to: sink)
        #expect(sink.tensors.count == 3)
        #expect(log.maxRunning == 1)
    }

    @Test func offMakesOneAtATime() throws {
        let log = MakeLog()
        let source = PlannedSource(header: StreamHeader(producer: "t", sourceFormat: "t"), plan: plan(log, sizes: [10, 10, 10, 10]))
        try pump(from: source, to: CollectingSink())
        #expect(log.maxRunning == 1)
        #expect(log.order == [0, 1, 2, 3])
    }

    @Test func anErrorMadeAheadIsReportedInItsTurn() throws {
        let log = MakeLog()
        let source = PlannedSource(header: StreamHeader(producer: "t", sourceFormat: "t"), plan: plan(log, sizes: [100, 100, 100], failing: 1),
                                   readAhead: ReadAhead(budget: 1 << 20, depth: 2))
        #expect(try source.nextTensor()?.descriptor.name == "t0")
        var got: [UInt8] = []
        while let c = try source.nextChunk() { got += c }
        #expect(got == expected(0, 100))
        #expect(throws: OrbaxError.self) { _ = try source.nextTensor() }
    }
}

/// Produces `length` bytes of a known sequence in pieces, optionally failing at the end.
private final class CountingProducer: ChunkProducer {
    let length: Int
    let failAtEnd: Bool
    var position = 0
    init(length: Int, failAtEnd: Bool = false) {
        self.length = length
        self.failAtEnd = failAtEnd
    }
    func produce(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, length - position)
        for k in 0..<n { buffer[k] = UInt8(truncatingIfNeeded: (position + k) &* 7) }
        position += n
        return n
    }
    func finish() throws {
        if failAtEnd { throw OrbaxError(.zarr(.doesNotDecompress(detail: "trailing data")), file: "test", tensor: "s") }
    }
}

@Suite struct PlannedSourceStreamedTests {
    private func source(_ sizes: [Int], failing: Int? = nil, short: Int? = nil) -> PlannedSource {
        let plan: [(TensorHeader, TensorData)] = sizes.enumerated().map { i, n in
            (TensorHeader(try! TensorDescriptor(name: "s\(i)", dtype: .u8, shape: [n])),
             .streamed { CountingProducer(length: i == short ? n - 1 : n, failAtEnd: i == failing) })
        }
        return PlannedSource(header: StreamHeader(producer: "t", sourceFormat: "t"), plan: plan, chunkSize: 1000)
    }

    @Test func emitsEveryByteInChunks() throws {
        let sink = CollectingSink()
        try pump(from: source([2500, 0, 1000, 1]), to: sink)
        #expect(sink.tensors.map(\.1.count) == [2500, 0, 1000, 1])
        #expect(sink.tensors[0].1 == (0..<2500).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        #expect(try source([3001]).tensorBytes(at: 0).copyBytes() == (0..<3001).map { UInt8(truncatingIfNeeded: $0 &* 7) })
    }

    @Test func aProducerThatEndsEarlyOrFailsIsAnError() throws {
        #expect(throws: StreamError.self) { try pump(from: self.source([10, 2500], short: 1), to: CollectingSink()) }
        #expect(throws: OrbaxError.self) { try pump(from: self.source([2500], failing: 0), to: CollectingSink()) }
        #expect(throws: StreamError.self) { _ = try self.source([2500], short: 0).tensorBytes(at: 0) }
        // An empty tensor asks for no chunk, but its data must still end where it should.
        #expect(throws: OrbaxError.self) { try pump(from: self.source([0], failing: 0), to: CollectingSink()) }
    }
}

/// Transposes go through `ckpt_transpose` (SIMD 8x8 blocks for 2- and 4-byte elements, element
/// by element at the ragged edges): every size around the block and tile edges, every width,
/// against the definition.
@Suite struct StridedTransposeTests {
    @Test(arguments: [1, 2, 4, 8])
    func transposesEqualTheDefinition(elementSize: Int) {
        var rng = SystemRandomNumberGenerator()
        for (rows, cols) in [(1, 1), (8, 8), (7, 9), (16, 24), (31, 33), (32, 32), (33, 70), (64, 8), (9, 65), (100, 3)] {
            // Source: `cols` rows of `rows` elements (row-major); output: its transpose.
            let n = rows * cols * elementSize
            let src = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            var out = [UInt8](repeating: 0, count: n)
            src.withUnsafeBytes { s in
                out.withUnsafeMutableBytes { o in
                    StridedCopy.gather(from: s.baseAddress!, elementSize: elementSize, offset: 0, shape: [rows, cols], stride: [1, rows],
                                       into: o.baseAddress!)
                }
            }
            var want = [UInt8](repeating: 0, count: n)
            for r in 0..<rows {
                for c in 0..<cols {
                    for b in 0..<elementSize { want[(r * cols + c) * elementSize + b] = src[(c * rows + r) * elementSize + b] }
                }
            }
            #expect(out == want, "\(rows)x\(cols) of \(elementSize)-byte elements")
        }
    }

    @Test func batchedTransposeOfFloatsKeepsEveryBit() {
        // [3, 40, 24] from a [3, 24, 40] source: per batch, a transpose; NaN payloads and -0 kept.
        let (b, r, c) = (3, 40, 24)
        var src = (0..<(b * r * c)).map { UInt32(truncatingIfNeeded: $0 &* 2654435761) }
        src[5] = 0x7FC0_1234
        src[7] = 0x8000_0000
        var out = [UInt32](repeating: 0, count: src.count)
        src.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { o in
                StridedCopy.gather(from: s.baseAddress!, elementSize: 4, offset: 0, shape: [b, r, c], stride: [r * c, 1, r], into: o.baseAddress!)
            }
        }
        for i in 0..<b { for j in 0..<r { for k in 0..<c { #expect(out[(i * r + j) * c + k] == src[i * r * c + k * r + j]) } } }
    }
}
