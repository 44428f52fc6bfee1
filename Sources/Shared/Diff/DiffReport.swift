import Glibc

/// The comparison of two checkpoints: per-tensor differences and the names only one has.
///
/// Memory: A is read one tensor at a time. B is read by name when it is a file (its tensors
/// are found from its header), so one pair is held; a B stream in A's order also holds one
/// pair; a B stream in another order holds the tensors of B that arrive before A asks for them.
public struct DiffReport {
    public var diffs: [TensorDiff] = []
    public var onlyInA: [String] = []
    public var onlyInB: [String] = []
    public var countA = 0, countB = 0

    public var equal: Bool { onlyInA.isEmpty && onlyInB.isEmpty && diffs.allSatisfy { $0.status == .equal } }

    /// A name twice in one input makes "equal" and "only in A" ambiguous: that is trouble
    /// (a `StreamError.duplicateTensor` naming the input), not a difference.
    public static func build(a: TensorSource, b: TensorSource, rtol: Double, atol: Double,
                             nameA: String = "A", nameB: String = "B") throws -> DiffReport {
        var r = DiffReport()
        var seenA = Set<String>(), seenB = Set<String>()
        func once(_ name: String, in seen: inout Set<String>, _ source: String) throws {
            guard seen.insert(name).inserted else { throw StreamError(.duplicateTensor, source: source, tensor: name) }
        }
        let bNames = b.manifest.map { Set($0.map(\.name)) }
        var bByName: [String: Int] = [:]
        if let planned = b as? PlannedSource {
            for (i, entry) in planned.plan.enumerated() { bByName[entry.0.descriptor.name] = i }
        }
        var bHeld: [String: (TensorDescriptor, AlignedBuffer)] = [:]
        var bUsed = Set<String>()
        var bDone = false

        func fromB(_ name: String) throws -> (TensorDescriptor, AlignedBuffer)? {
            if let planned = b as? PlannedSource {
                guard let i = bByName[name] else { return nil }
                return (planned.plan[i].0.descriptor, try planned.tensorBytes(at: i))
            }
            if let held = bHeld.removeValue(forKey: name) { return held }
            if let bNames, !bNames.contains(name) { return nil }
            while !bDone {
                guard let t = try b.nextTensor() else { bDone = true; break }
                try once(t.descriptor.name, in: &seenB, nameB)
                let buffer = try AlignedBuffer(capacity: max(t.descriptor.byteCount, 1))
                try b.readTensor(t.descriptor, into: buffer, stage: "ckpt-diff")
                r.countB += 1
                if t.descriptor.name == name { return (t.descriptor, buffer) }
                bHeld[t.descriptor.name] = (t.descriptor, buffer)
            }
            return nil
        }

        while let t = try a.nextTensor() {
            r.countA += 1
            let da = t.descriptor
            try once(da.name, in: &seenA, nameA)
            let bufferA = try AlignedBuffer(capacity: max(da.byteCount, 1))
            try a.readTensor(da, into: bufferA, stage: "ckpt-diff")
            guard let (db, bufferB) = try fromB(da.name) else {
                r.onlyInA.append(da.name)
                continue
            }
            bUsed.insert(da.name)
            let d = withExtendedLifetime((bufferA, bufferB)) {
                TensorDiff.compare(name: da.name, a: da, UnsafeRawPointer(bufferA.pointer), b: db, UnsafeRawPointer(bufferB.pointer), rtol: rtol, atol: atol)
            }
            r.diffs.append(d)
        }
        // What B has that A did not ask for.
        if let planned = b as? PlannedSource {
            r.countB = planned.plan.count
            r.onlyInB = planned.plan.map(\.0.descriptor.name).filter { !bUsed.contains($0) }
        } else {
            r.onlyInB = bHeld.keys.sorted()
            while !bDone, let t = try b.nextTensor() {
                try once(t.descriptor.name, in: &seenB, nameB)
                r.countB += 1
                r.onlyInB.append(t.descriptor.name)
                while try b.nextChunk() != nil {}
            }
        }
        return r
    }

    static func number(_ x: Double) -> String {
        if x == 0 { return "0" }
        if x.isNaN { return "nan" }
        var s = ""
        let e = Int(floor(log10(abs(x))))
        if e >= -3 && e < 6 {
            let p = pow(10, Double(max(0, 3 - e)))
            s = "\((x * p).rounded() / p)"
        } else {
            let m = x / pow(10, Double(e))
            s = "\((m * 100).rounded() / 100)e\(e)"
        }
        return s
    }

    public var summary: String {
        let differing = diffs.filter { $0.status != .equal }.count
        return "A: \(countA) tensors, B: \(countB); \(diffs.count) in both: \(diffs.count - differing) equal, \(differing) not; "
            + "\(onlyInA.count) only in A, \(onlyInB.count) only in B: \(equal ? "equal" : "different")\n"
    }

    /// One row per tensor in both, then the names only one has, then the summary.
    public func table(brief: Bool) -> String {
        if brief { return summary }
        let headers = ["tensor", "status", "max|a-b|", "mean|a-b|", "max rel", "cosine", "NaN a/b", "Inf a/b"]
        var rows: [[String]] = diffs.map { d in
            var status = d.status.rawValue
            if d.status == .dtype { status += " (\(d.a.dtype.rawValue)/\(d.b.dtype.rawValue))" }
            if d.status == .shape { status += " (\(d.a.shapeText)/\(d.b.shapeText))" }
            if d.status == .different { status += " (\(d.mismatched) elements)" }
            return [d.name, status, DiffReport.number(d.maxAbs), DiffReport.number(d.meanAbs), DiffReport.number(d.maxRel),
                    DiffReport.number(d.cosine), "\(d.nanA)/\(d.nanB)", "\(d.infA)/\(d.infB)"]
        }
        rows.insert(headers, at: 0)
        let widths = headers.indices.map { c in rows.map { $0[c].count }.max()! }
        var out = ""
        for row in rows {
            out += zip(row, widths).map { $0 + String(repeating: " ", count: $1 - $0.count) }.joined(separator: "  ")
                .trimmingCharacters(in: " ") + "\n"
        }
        for n in onlyInA { out += "only in A: \(n)\n" }
        for n in onlyInB { out += "only in B: \(n)\n" }
        return out + summary
    }

    public func json() -> String {
        func num(_ x: Double) -> JSONValue { x.isFinite ? .number("\(x)") : .string("\(x)") }
        let tensors: [JSONValue] = diffs.map { d in
            var o = JSONObject()
            o["name"] = .string(d.name)
            o["status"] = .string(d.status.rawValue)
            o["dtype_a"] = .string(d.a.dtype.rawValue)
            o["dtype_b"] = .string(d.b.dtype.rawValue)
            o["shape_a"] = .array(d.a.shape.map { .int($0) })
            o["shape_b"] = .array(d.b.shape.map { .int($0) })
            o["max_abs"] = num(d.maxAbs)
            o["mean_abs"] = num(d.meanAbs)
            o["max_rel"] = num(d.maxRel)
            o["cosine"] = num(d.cosine)
            o["mismatched"] = .int(d.mismatched)
            o["nan_a"] = .int(d.nanA)
            o["nan_b"] = .int(d.nanB)
            o["inf_a"] = .int(d.infA)
            o["inf_b"] = .int(d.infB)
            return .object(o)
        }
        var top = JSONObject()
        top["equal"] = .bool(equal)
        top["only_in_a"] = .array(onlyInA.map { .string($0) })
        top["only_in_b"] = .array(onlyInB.map { .string($0) })
        top["tensors"] = .array(tensors)
        return String(decoding: JSONWriter.compact(.object(top)), as: UTF8.self) + "\n"
    }
}
