import Foundation
import Glibc
import Testing
@testable import Shared

/// Bytes without a short period, so a run written at the wrong block shows.
private func noise(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) } }

@Suite(.enabled(if: directIOHere, noDirectIO)) struct DirectFileWriterTests {
    /// Writes `runs` (offset, length) of `pattern(total)` through a DirectFileWriter with a small
    /// staging window, and returns the file's bytes.
    private func write(_ runs: [(Int, Int)], total: Int, staging: Int) throws -> [UInt8] {
        let dir = temporaryDirectory()
        let path = dir + "/out.bin"
        let fd = try FileDescriptor.createExclusive(path)
        defer { fd.close() }
        #expect(ftruncate(fd.rawValue, off_t(total)) == 0)
        let data = noise(total)
        let writer = try #require(DirectFileWriter(path: path, buffered: fd, stagingSize: staging))
        try data.withUnsafeBytes { d in
            for (offset, count) in runs {
                // In pieces of odd sizes, as stream chunks arrive.
                var at = offset
                while at < offset + count {
                    let n = min(777, offset + count - at)
                    try writer.write(UnsafeRawBufferPointer(rebasing: d[at..<at + n]), at: at)
                    at += n
                }
            }
        }
        try writer.finish()
        #expect(!writer.directRefused)
        #expect(writer.bytesWrittenDirectly > 0 || runs.allSatisfy { $0.1 < 4096 })
        return readFile(path)
    }

    @Test func runsInAnyOrderLandWhereTheyBelong() throws {
        let total = 100_003
        // Unaligned starts and ends, runs inside one block, runs across many windows, out of order.
        let runs = [(40_000, 60_003), (5, 3000), (0, 5), (3005, 1100), (4105, 35_895)]
        #expect(try write(runs, total: total, staging: 8192) == noise(total))
    }

    @Test func aRunThatContinuesAcrossWritesIsOneRun() throws {
        let total = 3 * 4096 + 100
        #expect(try write([(0, total)], total: total, staging: 4096) == noise(total))
        #expect(try write([(17, total - 17), (0, 17)], total: total, staging: 4096 * 2) == noise(total))
    }

    @Test func stagingRoundsToWholeBlocks() throws {
        // 5000 bytes of staging is one block: every window still ends on a block boundary.
        let total = 20_000
        #expect(try write([(1, total - 1), (0, 1)], total: total, staging: 5000) == noise(total))
    }
}

/// Whether /tmp (where the tests write) takes O_DIRECT; where it does not (tmpfs before Linux
/// 6.6) the direct-path tests are skipped, since both sides would silently run buffered.
let directIOHere = DirectFileWriter.supported(in: testRoot)
let noDirectIO: Comment = "the file system of /tmp refuses O_DIRECT: the direct path cannot run here"

@Suite(.enabled(if: directIOHere, noDirectIO)) struct SafetensorsDirectOutputTests {
    /// Same tensors through the page cache and around it: the files are identical.
    @Test func directAndBufferedFilesAreIdentical() throws {
        let dir = temporaryDirectory()
        let tensors = [tensor("b", .f32, [3, 1001], noise(12_012)),
                       tensor("a", .bf16, [70_001], Array(noise(140_003).dropFirst())),
                       tensor("c", .u8, [5], [1, 2, 3, 4, 5])]
        var files: [[UInt8]] = []
        for (name, direct) in [("direct", true), ("buffered", false)] {
            let path = "\(dir)/\(name).safetensors"
            let sink = SafetensorsWriter(path: path, overwrite: false, directIO: direct, directThreshold: 0, log: { _ in })
            try pump(from: MemorySource(tensors, chunk: 999), to: sink)
            // The comparison means something only if one side really went around the cache.
            #expect(direct ? sink.bytesWrittenDirectly >= 147_456 : sink.bytesWrittenDirectly == 0)
            files.append(readFile(path))
        }
        #expect(files[0] == files[1])
        #expect(files[0].count > 152_019)
    }

    /// Shards: each shard's direct writer is finished as soon as the shard has its bytes (the
    /// next shard's tensors keep arriving); every shard equals the buffered one.
    @Test func shardsAreFinishedOneByOneAndIdentical() throws {
        let dir = temporaryDirectory()
        // About 40 KB each, so every shard has whole 4 KiB blocks to write directly.
        let tensors = (0..<5).map { tensor("t\($0)", .f32, [9999 + $0], noise(4 * (9999 + $0) + 1).dropFirst($0 % 2).prefix(4 * (9999 + $0)).map { $0 }) }
        for direct in [true, false] {
            let sink = SafetensorsWriter(path: "\(dir)/\(direct ? "d" : "b")/model.safetensors", maxShardSize: 80_000, overwrite: false,
                                         directIO: direct, directThreshold: 0, log: { _ in })
            mkdir("\(dir)/\(direct ? "d" : "b")", 0o755)
            try pump(from: MemorySource(tensors, chunk: 1000), to: sink)
            #expect(direct ? sink.bytesWrittenDirectly > 0 : sink.bytesWrittenDirectly == 0)
        }
        let names = try FileManager.default.contentsOfDirectory(atPath: "\(dir)/b").sorted()
        #expect(names.filter { $0.hasSuffix("-of-00004.safetensors") }.count == 4 && names.contains("model.safetensors.index.json"), "\(names)")
        for n in names { #expect(readFile("\(dir)/d/\(n)") == readFile("\(dir)/b/\(n)"), "\(n)") }
    }
}

@Suite struct MappingCacheTests {
    private func map(_ n: Int) -> UnsafeMutableRawPointer { mmap(nil, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)! }

    @Test func reusesPiecesJoinsNeighboursAndNeverRaisesThePeak() {
        let mib = 1 << 20
        let cache = MappingCache(limit: 10 * mib)
        // Two buffers live at once (peak 7 MiB), then released and kept.
        cache.willMap(4 * mib)
        cache.willMap(3 * mib)
        // a and b with a gap between them (separate mappings could be neighbours, and join).
        let a = map(8 * mib), b = a + 5 * mib
        munmap(a + 4 * mib, 1 * mib)
        #expect(cache.give(a, 4 * mib) && cache.give(b, 3 * mib))
        #expect(cache.keptBytes == 7 * mib && cache.liveBytes == 0)
        // The front of the smallest kept mapping that holds the request; its rest stays kept.
        let front = cache.take(2 * mib)
        #expect(front?.0 == b && front?.1 == 2 * mib)
        #expect(cache.keptBytes == 5 * mib && cache.liveBytes == 2 * mib)
        let rest = cache.take(1 * mib)
        #expect(rest?.0 == b + 2 * mib && rest?.1 == 1 * mib)
        // A rest under 256 KiB goes with the piece taken.
        let most = cache.take(4 * mib - 100 << 10)
        #expect(most?.0 == a && most?.1 == 4 * mib)
        #expect(cache.keptBytes == 0 && cache.liveBytes == 7 * mib)
        // Given back, the two pieces of b are one mapping again.
        #expect(cache.give(b + 2 * mib, 1 * mib) && cache.give(b, 2 * mib))
        #expect(cache.take(3 * mib).map { $0.0 == b && $0.1 == 3 * mib } == true)
        #expect(cache.give(b, 3 * mib))
        // 1 MiB of fresh pages: 4 live + 3 kept + 1 would pass the 7 MiB peak, so 1 MiB of
        // the kept mapping goes first: its end, the front stays kept.
        cache.willMap(1 * mib)
        #expect(cache.keptBytes == 2 * mib && cache.liveBytes == 5 * mib)
        #expect(cache.take(2 * mib).map { $0.0 == b && $0.1 == 2 * mib } == true)
        // 3 MiB more: nothing kept is left to unmap, so the peak grows.
        cache.willMap(3 * mib)
        #expect(cache.keptBytes == 0 && cache.liveBytes == 10 * mib)
        #expect(!cache.give(map(6 * mib), 6 * mib))  // more than half the limit: not kept (leaks in the test only)
        munmap(a, 4 * mib)  // still live, as b's front (its end was unmapped by the cache)
        munmap(b, 2 * mib)
    }
}

@Suite(.enabled(if: directIOHere, noDirectIO)) struct OrbaxDirectOutputTests {
    /// Every file of the folder, by relative path.
    private func tree(_ root: String) throws -> [String: [UInt8]] {
        var out: [String: [UInt8]] = [:]
        for p in FileManager.default.enumerator(atPath: root)!.compactMap({ $0 as? String }) {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: root + "/" + p, isDirectory: &isDir), !isDir.boolValue { out[p] = readFile(root + "/" + p) }
        }
        return out
    }

    /// Chunk files written around the page cache equal those written through it, including an
    /// array cut into chunks whose last one is padded to full size.
    @Test func directAndBufferedFoldersAreIdentical() throws {
        let dir = temporaryDirectory()
        let tensors = [tensor("params/w", .f32, [7, 1001], noise(28_028)),
                       tensor("params/b", .bf16, [3], [1, 2, 3, 4, 5, 6])]
        for direct in [true, false] {
            let sink = OrbaxWriter(path: "\(dir)/\(direct ? "d" : "b")", maxChunkBytes: 3 * 4004, overwrite: false,
                                   directIO: direct, directThreshold: 0)
            try pump(from: MemorySource(tensors, chunk: 999), to: sink)
            #expect(direct ? sink.bytesWrittenDirectly >= 3 * 4096 : sink.bytesWrittenDirectly == 0)
        }
        let d = try tree("\(dir)/d"), b = try tree("\(dir)/b")
        #expect(d.keys.sorted() == b.keys.sorted())
        #expect(d["params.w/2.0"]?.count == 3 * 4004)  // the padded edge chunk
        for (k, v) in b { #expect(d[k] == v, "\(k)") }
    }
}
