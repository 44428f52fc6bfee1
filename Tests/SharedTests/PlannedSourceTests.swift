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
        if fail { throw OrbaxError("made to fail", file: "test", tensor: "t\(i)") }
        let b = AlignedBuffer(capacity: bytes)
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
