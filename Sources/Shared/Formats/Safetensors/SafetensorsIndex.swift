/// The Hugging Face sharded-checkpoint index, `model.safetensors.index.json`:
/// `{"metadata": {"total_size": N, ...}, "weight_map": {tensor: shard file, ...}}`.
public struct SafetensorsIndex {
    public var metadata: JSONObject
    /// Tensor name → shard file name (relative to the index's folder), in file order.
    public var weightMap: [(tensor: String, file: String)]

    public init(metadata: JSONObject, weightMap: [(tensor: String, file: String)]) {
        self.metadata = metadata
        self.weightMap = weightMap
    }

    public static func parse(_ bytes: [UInt8], file: String) throws(SafetensorsError) -> SafetensorsIndex {
        let root: JSONValue
        do { root = try JSONParser.parse(bytes) } catch { throw SafetensorsError(.index(detail: "invalid JSON: \(error.description)"), file: file) }
        guard let obj = root.objectValue, let map = obj["weight_map"]?.objectValue else {
            throw SafetensorsError(.index(detail: "no weight_map object"), file: file)
        }
        var pairs: [(String, String)] = []
        for (tensor, value) in map {
            guard let f = value.stringValue, !f.isEmpty, !f.contains("/"), f != ".", f != ".." else {
                throw SafetensorsError(.index(detail: "weight_map entry is not a plain file name in the index's folder"), file: file, tensor: tensor)
            }
            pairs.append((tensor, f))
        }
        return SafetensorsIndex(metadata: obj["metadata"]?.objectValue ?? JSONObject(), weightMap: pairs)
    }

    /// Nothing lost silently: every tensor the shards hold must be listed under the shard that
    /// holds it, and every listed tensor must be there. `owners` maps tensor → shard file name.
    /// (torch's `pytorch_model.bin.index.json` has the same format.)
    public func verify(owners: [String: String], indexPath: String) throws(SafetensorsError) {
        var listed = Set<String>()
        for (tensor, file) in weightMap {
            listed.insert(tensor)
            guard owners[tensor] == file else {
                throw SafetensorsError(.index(detail: "weight_map puts tensor in \(file), which does not hold it"), file: indexPath, tensor: tensor)
            }
        }
        for (tensor, file) in owners where !listed.contains(tensor) {
            throw SafetensorsError(.index(detail: "tensor in \(file) is missing from weight_map"), file: indexPath, tensor: tensor)
        }
    }

    /// The bytes transformers' `save_pretrained` writes: `json.dumps(index, indent=2, sort_keys=True) + "\n"`.
    public func encoded() -> [UInt8] {
        let map = JSONObject(weightMap.map { ($0.tensor, JSONValue.string($0.file)) })
        var out = JSONWriter.pythonIndented(.object(JSONObject([("metadata", .object(metadata)), ("weight_map", .object(map))])))
        out.append(UInt8(ascii: "\n"))
        return out
    }

    /// `model.safetensors` → `model-00002-of-00005.safetensors`.
    public static func shardName(stem: String, index: Int, count: Int) -> String {
        func five(_ v: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, 5 - s.count)) + s }
        return "\(stem)-\(five(index))-of-\(five(count)).safetensors"
    }

    /// huggingface_hub's `split_state_dict_into_shards_factory`: walk tensors in order;
    /// one larger than the limit gets a shard of its own; otherwise start a new shard when
    /// the next tensor would push the current one over the limit.
    public static func planShards(_ tensors: [TensorDescriptor], maxShardSize: Int) -> [[TensorDescriptor]] {
        var shards: [[TensorDescriptor]] = []
        var current: [TensorDescriptor] = []
        var size = 0
        for t in tensors {
            if t.byteCount > maxShardSize {
                shards.append([t])
                continue
            }
            if size + t.byteCount > maxShardSize {
                shards.append(current)
                current = []
                size = 0
            }
            current.append(t)
            size += t.byteCount
        }
        if !current.isEmpty { shards.append(current) }
        return shards
    }
}
