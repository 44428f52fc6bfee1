/// Parses frame headers and the bodies of the small frame kinds, refusing anything the
/// spec does not allow. Errors carry the stream name and the frame's byte offset.
public struct FrameDecoder {
    public let source: String

    public init(source: String) { self.source = source }

    public struct FrameHeader: Equatable {
        public var kind: UInt8
        public var bodyLength: UInt64
    }

    public struct ChunkHeader: Equatable {
        public var offset: UInt64
        public var rawLength: UInt64
        public var codec: StreamFormat.Codec
        public var crc: UInt32
        public var storedLength: Int
        /// Element width of the byte shuffle (codec 2), else 0.
        public var shuffleWidth: Int
    }

    func error(_ r: StreamError.Reason, at offset: Int, tensor: String? = nil) -> StreamError {
        StreamError(r, source: source, offset: offset, tensor: tensor)
    }

    public func preamble(_ bytes: [UInt8], at offset: Int = 0) throws(StreamError) {
        guard bytes.count == StreamFormat.preambleSize, Array(bytes[0..<8]) == StreamFormat.magic else {
            throw error(.badMagic, at: offset)
        }
        // The length was checked above: these reads cannot fail.
        let r = ByteCursor(bytes)
        let major = try! r.getInteger(at: 8, endianness: .little, as: UInt16.self)
        let minor = try! r.getInteger(at: 10, endianness: .little, as: UInt16.self)
        let flags = try! r.getInteger(at: 12, endianness: .little, as: UInt32.self)
        guard major == StreamFormat.majorVersion else {
            throw error(.unsupportedVersion(major: major, minor: minor), at: offset)
        }
        guard flags == 0 else { throw error(.nonZeroReserved(field: "preamble flags"), at: offset) }
        guard bytes[16...].allSatisfy({ $0 == 0 }) else { throw error(.nonZeroReserved(field: "preamble padding"), at: offset) }
    }

    public func frameHeader(_ bytes: [UInt8], at offset: Int) throws(StreamError) -> FrameHeader {
        // The caller reads exactly frameHeaderSize bytes.
        precondition(bytes.count == StreamFormat.frameHeaderSize)
        var r = ByteCursor(bytes)
        let marker = try! r.readInteger(endianness: .little, as: UInt32.self)
        let kind = try! r.readByte(), flags = try! r.readByte()
        let reserved = try! r.readInteger(endianness: .little, as: UInt16.self)
        let length = try! r.readInteger(endianness: .little, as: UInt64.self)
        guard marker == StreamFormat.marker else { throw error(.badMarker(found: marker), at: offset) }
        guard flags == 0, reserved == 0 else { throw error(.nonZeroReserved(field: "frame flags"), at: offset) }
        if StreamFormat.Kind(rawValue: kind) == nil && !StreamFormat.Kind.isAncillary(kind) {
            throw error(.unknownCriticalFrame(kind: kind), at: offset)
        }
        return FrameHeader(kind: kind, bodyLength: length)
    }

    private func malformed(_ kind: StreamFormat.Kind, _ reason: String, at offset: Int) -> StreamError {
        error(.malformedFrame(kind: kind.description, reason: reason), at: offset)
    }

    public func header(_ body: [UInt8], at offset: Int) throws(StreamError) -> StreamHeader {
        let value: JSONValue
        do { value = try JSONParser.parse(body) } catch { throw self.error(.badJSON(detail: error.description), at: offset) }
        guard let obj = value.objectValue,
              let producer = obj["producer"]?.stringValue,
              let format = obj["source_format"]?.stringValue else {
            throw malformed(.header, "expected an object with string fields producer and source_format", at: offset)
        }
        var metadata = JSONObject()
        if let m = obj["metadata"] {
            guard let mo = m.objectValue else { throw malformed(.header, "metadata is not an object", at: offset) }
            metadata = mo
        }
        var extensions = JSONObject()
        for (k, v) in obj where !["producer", "source_format", "metadata"].contains(k) { extensions[k] = v }
        return StreamHeader(producer: producer, sourceFormat: format, metadata: metadata, extensions: extensions)
    }

    func descriptor(_ r: inout ByteCursor, kind: StreamFormat.Kind, at offset: Int) throws(StreamError) -> TensorDescriptor {
        do {
            let nameLength = try r.readInteger(endianness: .little, as: UInt32.self)
            guard let name = try r.readUTF8(Int(nameLength)) else {
                throw malformed(kind, "tensor name is not valid UTF-8", at: offset)
            }
            let dtypeText = String(decoding: try r.readBytes(Int(try r.readByte())), as: UTF8.self)
            guard let dtype = DType(rawValue: dtypeText) else {
                throw error(.unknownDType(name: dtypeText), at: offset, tensor: name)
            }
            let rank = Int(try r.readByte())
            guard rank <= 64 else { throw error(.badShape(detail: "rank \(rank) exceeds 64"), at: offset, tensor: name) }
            var shape: [Int] = []
            for _ in 0..<rank {
                let d = try r.readInteger(endianness: .little, as: UInt64.self)
                guard d <= UInt64(Int.max) else { throw error(.badShape(detail: "dimension \(d) too large"), at: offset, tensor: name) }
                shape.append(Int(d))
            }
            do {
                return try TensorDescriptor(name: name, dtype: dtype, shape: shape)
            } catch {
                throw self.error(.badShape(detail: error.reason), at: offset, tensor: name)
            }
        } catch let e as ByteCursorError {
            guard case .truncated(let needed, _) = e.reason else { throw malformed(kind, e.description, at: offset) }
            throw malformed(kind, "body too short (needed \(needed) bytes at body offset \(e.offset))", at: offset)
        } catch let e as StreamError {
            throw e
        } catch {
            fatalError("unreachable: \(error)")
        }
    }

    public func manifest(_ body: [UInt8], at offset: Int) throws(StreamError) -> [TensorDescriptor] {
        var r = ByteCursor(body)
        guard let count = try? r.readInteger(endianness: .little, as: UInt64.self) else { throw malformed(.manifest, "body too short", at: offset) }
        // Each entry needs at least 6 bytes: refuse counts the body cannot hold.
        guard count <= UInt64(body.count / 6) else { throw malformed(.manifest, "count \(count) exceeds what the body holds", at: offset) }
        var out: [TensorDescriptor] = []
        out.reserveCapacity(Int(count))
        for _ in 0..<count { out.append(try descriptor(&r, kind: .manifest, at: offset)) }
        guard r.remaining == 0 else { throw malformed(.manifest, "\(r.remaining) unexpected bytes after the entries", at: offset) }
        var seen = Set<String>()
        for d in out where !seen.insert(d.name).inserted {
            throw error(.manifestMismatch(detail: "tensor name listed twice"), at: offset, tensor: d.name)
        }
        return out
    }

    public func tensor(_ body: [UInt8], at offset: Int) throws(StreamError) -> TensorHeader {
        var r = ByteCursor(body)
        let d = try descriptor(&r, kind: .tensor, at: offset)
        guard let length = try? r.readInteger(endianness: .little, as: UInt64.self),
              let attrLength = try? r.readInteger(endianness: .little, as: UInt32.self),
              let attrBytes = try? r.readBytes(Int(attrLength)) else {
            throw malformed(.tensor, "body too short", at: offset)
        }
        guard r.remaining == 0 else { throw malformed(.tensor, "\(r.remaining) unexpected bytes at the end", at: offset) }
        guard length == UInt64(d.byteCount) else {
            throw error(.malformedFrame(kind: "tensor", reason: "byte length \(length) does not match \(d.dtype.rawValue)\(d.shapeText) (\(d.byteCount) bytes)"),
                        at: offset, tensor: d.name)
        }
        var attributes = JSONObject()
        if !attrBytes.isEmpty {
            let value: JSONValue
            do { value = try JSONParser.parse(attrBytes) } catch {
                throw self.error(.badJSON(detail: "attributes: \(error.description)"), at: offset, tensor: d.name)
            }
            guard let o = value.objectValue else { throw malformed(.tensor, "attributes are not a JSON object", at: offset) }
            attributes = o
        }
        return TensorHeader(d, attributes: attributes)
    }

    public func chunkHeader(_ bytes: [UInt8], bodyLength: UInt64, at offset: Int, tensor: String) throws(StreamError) -> ChunkHeader {
        guard bodyLength >= UInt64(StreamFormat.chunkHeaderSize) else {
            throw malformed(.chunk, "body shorter than the 48-byte chunk header", at: offset)
        }
        // The caller reads exactly chunkHeaderSize bytes.
        precondition(bytes.count == StreamFormat.chunkHeaderSize)
        var r = ByteCursor(bytes)
        let off = try! r.readInteger(endianness: .little, as: UInt64.self), raw = try! r.readInteger(endianness: .little, as: UInt64.self)
        let codecRaw = try! r.readInteger(endianness: .little, as: UInt32.self), crc = try! r.readInteger(endianness: .little, as: UInt32.self)
        let width = Int(try! r.readByte())
        guard try! r.readBytes(23).allSatisfy({ $0 == 0 }) else { throw error(.nonZeroReserved(field: "chunk header"), at: offset, tensor: tensor) }
        guard let codec = StreamFormat.Codec(rawValue: codecRaw) else { throw error(.unknownCodec(codec: codecRaw), at: offset, tensor: tensor) }
        if codec.isShuffled {
            guard (2...StreamFormat.maxShuffleWidth).contains(width) else {
                throw malformed(.chunk, "shuffle width \(width) is not in 2...\(StreamFormat.maxShuffleWidth)", at: offset)
            }
        } else if width != 0 {
            throw error(.nonZeroReserved(field: "chunk shuffle width (codec \(codecRaw))"), at: offset, tensor: tensor)
        }
        let stored = bodyLength - UInt64(StreamFormat.chunkHeaderSize)
        guard raw <= UInt64(StreamFormat.maxChunkSize), stored <= UInt64(StreamFormat.maxChunkSize) + 65536 else {
            throw error(.frameTooLarge(kind: "chunk", length: max(raw, stored), limit: StreamFormat.maxChunkSize), at: offset, tensor: tensor)
        }
        if codec == .none && stored != raw {
            throw malformed(.chunk, "uncompressed chunk stores \(stored) bytes but declares \(raw)", at: offset)
        }
        return ChunkHeader(offset: off, rawLength: raw, codec: codec, crc: crc, storedLength: Int(stored), shuffleWidth: width)
    }

    public func tensorEnd(_ body: [UInt8], at offset: Int) throws(StreamError) -> (length: UInt64, crc: UInt32) {
        guard body.count == 16 else { throw malformed(.tensorEnd, "body is \(body.count) bytes, expected 16", at: offset) }
        var r = ByteCursor(body)
        let length = try! r.readInteger(endianness: .little, as: UInt64.self)
        let crc = try! r.readInteger(endianness: .little, as: UInt32.self), reserved = try! r.readInteger(endianness: .little, as: UInt32.self)
        guard reserved == 0 else { throw error(.nonZeroReserved(field: "tensor-end"), at: offset) }
        return (length, crc)
    }

    public func end(_ body: [UInt8], at offset: Int) throws(StreamError) -> (tensors: UInt64, bytes: UInt64) {
        guard body.count == 16 else { throw malformed(.end, "body is \(body.count) bytes, expected 16", at: offset) }
        var r = ByteCursor(body)
        return (try! r.readInteger(endianness: .little, as: UInt64.self), try! r.readInteger(endianness: .little, as: UInt64.self))
    }
}
