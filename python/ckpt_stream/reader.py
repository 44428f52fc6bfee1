"""Reading a ckpt stream, checking every rule a conforming reader must (as the Swift
``StreamReader``/``FrameDecoder`` do): magic, version, zero reserved fields and padding,
the frame grammar, chunk order, sizes, codecs, every chunk's and tensor's CRC-32, the
manifest, and the end frame's totals. Each broken rule raises StreamError with the
byte offset of the frame and the tensor's name."""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Callable, Iterator, List, NamedTuple, Optional

from .format import (zstd_codec, CHUNK, CHUNK_HEADER, CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED, CODECS, SHUFFLED_CODECS, DTYPE_SIZES, END,
                     FIRST_ANCILLARY, FRAME_HEADER, HEADER, KIND_NAMES, MAGIC, MANIFEST, MARKER, MAX_CHUNK,
                     MAX_CHUNK_EXPANSION, MAX_INT64, MAX_RANK, MAX_SHUFFLE, MAX_SMALL_FRAME, PREAMBLE_SIZE,
                     TENSOR, TENSOR_END, VERSION, Descriptor, StreamError, UsageError, frame, load_json, nbytes, padding,
                     unshuffle)


class AncillaryFrame(NamedTuple):
    """A frame of kind 0x80-0xFF as read: readers that do not know it pass it on or skip it."""
    kind: int
    body: bytes
    #: Byte offset of the frame in the stream it came from.
    offset: int

    @property
    def frame(self) -> bytes:
        """The frame's bytes, identical to what was read (its padding was checked to be zero)."""
        return frame(self.kind, self.body)


class Chunk:
    """One chunk of a tensor as it arrived, already checked: ``data`` is the raw bytes
    (inflated if the chunk was compressed) and matched the chunk's CRC-32.

    ``write_frame(out)`` writes the chunk frame exactly as it was read, still compressed,
    so a filter passes a tensor on without re-compressing it (``Filter.forward``)."""
    __slots__ = ("tensor", "offset", "raw_length", "codec", "crc", "shuffle_width", "data", "frame_offset",
                 "_head", "_stored")

    def __init__(self, tensor, offset, raw_length, codec, crc, shuffle_width, data, frame_offset, head, stored):
        self.tensor = tensor              #: the tensor's name
        self.offset = offset              #: where the chunk's bytes start in the tensor's bytes
        self.raw_length = raw_length      #: len(data)
        self.codec = codec                #: CODEC_NONE, CODEC_ZLIB or CODEC_ZLIB_SHUFFLED
        self.crc = crc                    #: CRC-32 of data
        self.shuffle_width = shuffle_width
        self.data = data                  #: the raw bytes (bytes)
        self.frame_offset = frame_offset  #: byte offset of the chunk frame in the input
        self._head, self._stored = head, stored

    @property
    def stored(self) -> bytes:
        """The bytes as stored in the frame (compressed unless codec is CODEC_NONE)."""
        return self._stored

    @property
    def frame_length(self) -> int:
        return len(self._head) + len(self._stored) + padding(len(self._stored))

    @property
    def frame(self) -> bytes:
        """The whole chunk frame as read: header, chunk header, stored bytes, padding."""
        return self._head + self._stored + b"\0" * padding(len(self._stored))

    def write_frame(self, out: BinaryIO) -> int:
        """Writes the frame as read to `out`; returns its length."""
        out.write(self._head)
        out.write(self._stored)
        pad = padding(len(self._stored))
        if pad:
            out.write(b"\0" * pad)
        return self.frame_length

    def __repr__(self):
        return (f"Chunk(tensor={self.tensor!r}, offset={self.offset}, raw_length={self.raw_length}, "
                f"codec={self.codec}, stored={len(self._stored)})")


class StreamTensor:
    """A tensor of a stream being read: its descriptor and attributes at once, its data on
    demand, chunk by chunk.

    The data can be taken once, while this is the reader's current tensor: ``chunks()``
    (checked Chunk objects), ``read()`` (all bytes), ``array()`` (numpy, shaped),
    ``arrays()`` (element-aligned numpy pieces, one per chunk). Moving on to the next
    tensor skips (but still checks) whatever was not taken."""

    def __init__(self, reader: "StreamReader", desc: Descriptor, attributes: dict, raw_attributes: bytes,
                 index: int, frame_offset: int):
        self._reader = reader
        self.descriptor = desc
        #: The attributes JSON object (a dict), ``{}`` when the frame has none.
        self.attributes = attributes
        #: The attributes' bytes as read (b"" for none): ``Filter.forward`` passes them on unchanged.
        self.raw_attributes = raw_attributes
        #: Position in the stream (0 for the first tensor).
        self.index = index
        #: Byte offset of the tensor frame in the input.
        self.frame_offset = frame_offset
        self._state = "unread"  # -> "reading" -> "done" (all taken), or "passed" (the reader read on past it)
        self._data: Optional[bytes] = None

    name = property(lambda self: self.descriptor.name)
    dtype = property(lambda self: self.descriptor.dtype)
    shape = property(lambda self: self.descriptor.shape)
    nbytes = property(lambda self: self.descriptor.nbytes, doc="The tensor's byte length.")

    @property
    def unread(self) -> bool:
        """True while no chunk has been taken (``Filter.forward`` needs that)."""
        return self._state == "unread"

    def chunks(self) -> Iterator[Chunk]:
        """The tensor's chunks in order, each checked (CRC-32) before it is yielded; the
        tensor's length and CRC are checked after the last. Can be called once."""
        if self._state == "passed" or self._reader._current is not self:
            raise UsageError(f"tensor {self.name}: the reader has moved past this tensor (take a tensor's data "
                             "before asking for the next tensor)")
        if self._state != "unread":
            raise UsageError(f"tensor {self.name}: its data was already taken; chunks(), read(), array() and "
                             "arrays() take it once (read() keeps it for array() and arrays())")
        self._state = "reading"
        return self._reader._chunks(self)

    def read(self) -> bytes:
        """All the tensor's raw bytes (little-endian, row-major), read and checked; kept, so
        later calls (and ``array()``) return the same bytes."""
        if self._data is None:
            self._data = b"".join(c.data for c in self.chunks())
        return self._data

    def array(self, numpy_dtype=None):
        """The whole tensor as a numpy array of its shape (BF16 and F8 need ml_dtypes, or
        pass `numpy_dtype`, e.g. "<u2" for BF16 bit patterns)."""
        from .arrays import numpy_dtype as to_numpy
        import numpy as np
        return np.frombuffer(self.read(), dtype=to_numpy(self.dtype, numpy_dtype)).reshape(self.shape)

    def arrays(self, numpy_dtype=None):
        """Yields the tensor's elements as flat numpy arrays in order, one per chunk, each
        holding whole elements: bytes of an element split across two chunks are carried
        over to the next array. Holds one chunk at a time. `numpy_dtype` as in ``array()``."""
        from .arrays import aligned_arrays
        source = [self._data] if self._data is not None else (c.data for c in self.chunks())
        return aligned_arrays(source, self.dtype, numpy_dtype)

    def __repr__(self):
        return f"StreamTensor({self.descriptor}, index={self.index})"


class _Short(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads over a frame body."""

    def __init__(self, body: bytes):
        self.b, self.i = body, 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise _Short(n)
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    @property
    def remaining(self) -> int:
        return len(self.b) - self.i


def _hex(v: int, width: int = 4) -> str:
    """Two digits per byte of the field (`width` bytes), as the Swift reader prints them."""
    return f"0x{v:0{2 * width}x}"


class StreamReader:
    """Reads and checks a ckpt stream from a binary file object.

    ``header`` (dict, unknown keys kept) and ``manifest`` (list of Descriptor, or None) are
    read on construction. ``tensors()`` yields lazy StreamTensor objects; iterating the
    reader itself yields whole Tensor objects (data read). ``on_ancillary``, if given, is
    called with each AncillaryFrame (kinds 0x80-0xFF) in stream order; otherwise they are
    skipped. Ancillary frames larger than 1 GiB are refused when ``on_ancillary`` is set.

    Every rule of docs/stream-format.md is checked; a stream is only complete once
    ``tensors()`` is exhausted (its end frame and EOF were read)."""

    def __init__(self, f: BinaryIO, source: Optional[str] = None,
                 on_ancillary: Optional[Callable[[AncillaryFrame], None]] = None):
        self.f = f
        self.source = source
        self.on_ancillary = on_ancillary
        self.offset = 0
        self.manifest: Optional[List[Descriptor]] = None
        self._current: Optional[StreamTensor] = None
        self._reading: Optional[Descriptor] = None   # the tensor whose chunks the parser is in
        self._reading_offset = 0
        self._reading_crc = 0
        self._tensors_read = 0
        self._names = set()  # tensor names seen, when there is no manifest to check them against
        self._bytes_read = 0
        self._pushed = None
        self.ended = False

        pre = self._read(PREAMBLE_SIZE)
        if len(pre) < PREAMBLE_SIZE:
            if not pre:
                raise self._error("the input is empty: no stream arrived (did the stage before this one fail?)", 0)
            if len(pre) >= 8 and pre[:8] == MAGIC:
                raise self._truncated("the preamble", len(pre))
            raise self._error("not a ckpt stream (bad magic)", 0)
        if pre[:8] != MAGIC:
            raise self._error("not a ckpt stream (bad magic)", 0)
        major, minor, flags = struct.unpack_from("<HHI", pre, 8)
        if major != VERSION[0]:
            raise self._error(f"ckpt stream version {major}.{minor} is not supported (this reader reads 1.x)", 0)
        if flags:
            raise self._error("reserved field preamble flags is not zero", 0)
        if any(pre[16:]):
            raise self._error("reserved field preamble padding is not zero", 0)
        self.version = (major, minor)

        while True:
            at = self.offset
            h = self._read(FRAME_HEADER)
            if not h:
                raise self._truncated("the stream before its header frame", at)
            kind, length = self._frame_header(h, at)
            if kind >= FIRST_ANCILLARY:
                self._ancillary(kind, length, at)
                continue
            if kind == CHUNK:
                raise self._error("unexpected chunk frame, expected header", at)
            body = self._body(kind, length, at)
            if kind != HEADER:
                raise self._error(f"unexpected {KIND_NAMES[kind]} frame, expected header", at)
            self.header = self._parse_header(body, at)
            break
        first = self._event(allow_manifest=True)
        if first[0] == "manifest":
            self.manifest = first[1]
        else:
            self._pushed = first

    # --- low-level reading ------------------------------------------------------------------

    def _error(self, reason, at=None, tensor=None) -> StreamError:
        return StreamError(reason, at, tensor, self.source)

    def _truncated(self, inside, at, tensor=None) -> StreamError:
        return self._error(f"truncated stream: input ended inside {inside} (no end frame)", at, tensor)

    def _read(self, n: int) -> bytes:
        data = self.f.read(n) or b""
        if 0 < len(data) < n:  # a pipe or socket may return less than asked: read on to n or EOF
            parts, got = [data], len(data)
            while got < n:
                b = self.f.read(n - got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
            data = b"".join(parts)
        self.offset += len(data)
        return data

    def _frame_header(self, h: bytes, at: int):
        if len(h) < FRAME_HEADER:
            raise self._truncated("a frame header", at)
        marker, kind, flags, reserved, length = struct.unpack("<IBBHQ", h)
        if marker != MARKER:
            raise self._error(f"frame does not start with the FFFFFFFF marker (found {_hex(marker)})", at)
        if flags or reserved:
            raise self._error("reserved field frame flags is not zero", at)
        if kind not in KIND_NAMES and kind < FIRST_ANCILLARY:
            raise self._error(f"unknown critical frame kind {_hex(kind, 1)}", at)
        return kind, length

    def _padding(self, after: int, at: int, kind: str, tensor=None):
        n = padding(after)
        if n:
            pad = self._read(n)
            if len(pad) < n:
                raise self._truncated(f"the padding after a {kind} frame (frames are padded to a multiple of 64 bytes)",
                                      at, tensor)
            if any(pad):
                raise self._error(f"the {kind} frame is not followed by zero padding (frames are padded with zeros "
                                  "to a multiple of 64 bytes)", at, tensor)

    def _body(self, kind: int, length: int, at: int) -> bytes:
        """A non-chunk frame's body (at most 1 GiB) and its padding."""
        name = KIND_NAMES.get(kind, "ancillary")
        tensor = self._reading.name if self._reading else None
        if length > MAX_SMALL_FRAME:
            raise self._error(f"{name} frame declares {length} bytes, more than the limit of {MAX_SMALL_FRAME}", at, tensor)
        body = self._read(length)
        if len(body) < length:
            raise self._truncated(f"a {name} frame", at, tensor)
        self._padding(FRAME_HEADER + length, at, name, tensor)
        return body

    def _ancillary(self, kind: int, length: int, at: int):
        if self.on_ancillary is not None:
            self.on_ancillary(AncillaryFrame(kind, self._body(kind, length, at), at))
            return
        left = length
        while left:
            n = min(left, 1 << 16)
            if len(self._read(n)) < n:
                raise self._truncated("an ancillary frame", at)
            left -= n
        self._padding(FRAME_HEADER + length, at, "ancillary")

    # --- frame bodies -----------------------------------------------------------------------

    def _json(self, body: bytes, at: int, what: str = "", tensor=None):
        try:
            return load_json(body)
        except ValueError as e:
            raise self._error(f"invalid JSON: {what}{e}", at, tensor) from None

    def _parse_header(self, body: bytes, at: int) -> dict:
        h = self._json(body, at)
        if not (isinstance(h, dict) and isinstance(h.get("producer"), str) and isinstance(h.get("source_format"), str)):
            raise self._error("malformed header frame: expected an object with string fields producer and source_format", at)
        if "metadata" in h and not isinstance(h["metadata"], dict):
            raise self._error("malformed header frame: metadata is not an object", at)
        return h

    def _descriptor(self, c: _Cursor, kind: str, at: int) -> Descriptor:
        try:
            raw_name = c.take(c.u32())
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise self._error(f"malformed {kind} frame: tensor name is not valid UTF-8", at) from None
            dtype = c.take(c.u8()).decode("utf-8", "replace")
            if dtype not in DTYPE_SIZES:
                raise self._error(f'unknown dtype "{dtype}"', at, name)
            rank = c.u8()
            if rank > MAX_RANK:
                raise self._error(f"invalid shape: rank {rank} exceeds {MAX_RANK}", at, name)
            shape = tuple(c.u64() for _ in range(rank))
        except _Short:
            raise self._error(f"malformed {kind} frame: body too short", at) from None
        for d in shape:
            if d > MAX_INT64:
                raise self._error(f"invalid shape: dimension {d} too large", at, name)
        try:
            nbytes(dtype, shape)
        except StreamError as e:
            raise self._error(e.reason, at, name) from None
        return Descriptor(name, dtype, shape)

    def _parse_manifest(self, body: bytes, at: int) -> List[Descriptor]:
        c = _Cursor(body)
        try:
            count = c.u64()
        except _Short:
            raise self._error("malformed manifest frame: body too short", at) from None
        if count > len(body) // 6:  # each entry needs at least 6 bytes
            raise self._error(f"malformed manifest frame: count {count} exceeds what the body holds", at)
        out = [self._descriptor(c, "manifest", at) for _ in range(count)]
        if c.remaining:
            raise self._error(f"malformed manifest frame: {c.remaining} unexpected bytes after the entries", at)
        seen = set()
        for d in out:
            if d.name in seen:
                raise self._error("stream contradicts its manifest: tensor name listed twice", at, d.name)
            seen.add(d.name)
        return out

    def _parse_tensor(self, body: bytes, at: int):
        c = _Cursor(body)
        d = self._descriptor(c, "tensor", at)
        try:
            length = c.u64()
            raw_attrs = c.take(c.u32())
        except _Short:
            raise self._error("malformed tensor frame: body too short", at) from None
        if c.remaining:
            raise self._error(f"malformed tensor frame: {c.remaining} unexpected bytes at the end", at)
        if length != d.nbytes:
            raise self._error(f"malformed tensor frame: byte length {length} does not match "
                              f"{d.dtype}[{', '.join(map(str, d.shape))}] ({d.nbytes} bytes)", at, d.name)
        attrs = {}
        if raw_attrs:
            attrs = self._json(raw_attrs, at, "attributes: ", d.name)
            if not isinstance(attrs, dict):
                raise self._error("malformed tensor frame: attributes are not a JSON object", at, d.name)
        return d, attrs, raw_attrs

    def _read_chunk(self, length: int, at: int, h: bytes) -> Chunk:
        t = self._reading
        if length < CHUNK_HEADER:
            raise self._error("malformed chunk frame: body shorter than the 48-byte chunk header", at, t.name)
        ch = self._read(CHUNK_HEADER)
        if len(ch) < CHUNK_HEADER:
            raise self._truncated(f"the {CHUNK_HEADER}-byte chunk header of tensor {t.name}", at, t.name)
        offset, raw, codec, crc, width = struct.unpack_from("<QQIIB", ch)
        if any(ch[25:]):
            raise self._error("reserved field chunk header is not zero", at, t.name)
        if codec not in CODECS:
            raise self._error(f"unknown chunk codec {codec}", at, t.name)
        if codec in SHUFFLED_CODECS:
            if not 2 <= width <= MAX_SHUFFLE:
                raise self._error(f"malformed chunk frame: shuffle width {width} is not in 2...{MAX_SHUFFLE}", at, t.name)
        elif width:
            raise self._error(f"reserved field chunk shuffle width (codec {codec}) is not zero", at, t.name)
        stored_length = length - CHUNK_HEADER
        if raw > MAX_CHUNK or stored_length > MAX_CHUNK + MAX_CHUNK_EXPANSION:
            raise self._error(f"chunk frame declares {max(raw, stored_length)} bytes, more than the limit of {MAX_CHUNK}",
                              at, t.name)
        if codec == CODEC_NONE and stored_length != raw:
            raise self._error(f"malformed chunk frame: uncompressed chunk stores {stored_length} bytes but declares {raw}",
                              at, t.name)
        if offset != self._reading_offset:
            raise self._error(f"chunk at tensor offset {offset}, expected {self._reading_offset} "
                              "(chunk lost or reordered)", at, t.name)
        if offset + raw > t.nbytes:
            raise self._error(f"chunk [{offset}, {offset + raw}) extends beyond the tensor's {t.nbytes} bytes", at, t.name)
        stored = self._read(stored_length)
        if len(stored) < stored_length:
            raise self._truncated(f"chunk data of tensor {t.name}", at, t.name)
        self._padding(FRAME_HEADER + length, at, "chunk", t.name)
        if codec == CODEC_NONE:
            data = stored
        elif codec in (CODEC_ZLIB, CODEC_ZLIB_SHUFFLED):
            data = self._inflate(stored, raw, at, t.name)
        else:
            data = self._unzstd(stored, raw, at, t.name)
        if codec in SHUFFLED_CODECS:
            data = unshuffle(data, width)
        actual = zlib.crc32(data)
        if actual != crc:
            raise self._error(f"crc32 mismatch in chunk at tensor offset {offset}: stored {_hex(crc)}, computed "
                              f"{_hex(actual)} (data corrupted)", at, t.name)
        self._reading_offset += raw
        self._reading_crc = zlib.crc32(data, self._reading_crc)
        return Chunk(t.name, offset, raw, codec, crc, width, data, at, h + ch, stored)

    def _inflate(self, stored: bytes, raw: int, at: int, tensor: str) -> bytes:
        """Inflates a zlib stream that must give exactly `raw` bytes (never more than raw + 1 in memory)."""
        d = zlib.decompressobj()
        try:
            out = d.decompress(stored, raw + 1)
        except zlib.error as e:
            raise self._error(f"decompression failed: zlib: {e}", at, tensor) from None
        if len(out) > raw:
            reason = f"inflates to more than the declared {raw} bytes"
        elif not d.eof:
            reason = "zlib stream is truncated"
        elif len(out) < raw:
            reason = f"inflated to {len(out)} bytes, declared {raw}"
        elif d.unused_data:
            reason = f"{len(d.unused_data)} bytes after the end of the zlib stream"
        else:
            return out
        raise self._error(f"decompression failed: zlib: {reason}", at, tensor)

    def _unzstd(self, stored: bytes, raw: int, at: int, tensor: str) -> bytes:
        """Decompresses a zstd frame that must give exactly `raw` bytes."""
        codec = zstd_codec()
        if codec is None:
            raise self._error("a zstd chunk (codecs 3 and 4) needs Python 3.14's compression.zstd or the zstandard "
                              "package (pip install zstandard)", at, tensor)
        try:
            out = codec[1](stored, raw)
        except Exception as e:  # zstd's own error types differ between the two modules
            raise self._error(f"decompression failed: zstd: {e}", at, tensor) from None
        if len(out) != raw:
            raise self._error(f"decompression failed: zstd: decompressed to {len(out)} bytes, expected {raw}", at, tensor)
        return out

    # --- the grammar --------------------------------------------------------------------------

    def _event(self, allow_manifest: bool = False):
        """The next frame that matters, checked against the grammar: ("manifest", list),
        ("tensor", StreamTensor), ("chunk", Chunk), ("tensor-end",) or ("end",)."""
        if self._pushed is not None:
            e, self._pushed = self._pushed, None
            return e
        while True:
            at = self.offset
            h = self._read(FRAME_HEADER)
            if len(h) < FRAME_HEADER:
                inside = (f"tensor {self._reading.name}" if self._reading else
                          "the stream" if not h else "a frame header")
                raise self._truncated(inside, at)
            kind, length = self._frame_header(h, at)
            if kind >= FIRST_ANCILLARY:
                self._ancillary(kind, length, at)
                continue
            expected = "chunk or tensor-end" if self._reading else "tensor or end"
            if kind == CHUNK:
                if self._reading is None:
                    raise self._error(f"unexpected chunk frame, expected {expected}", at)
                return ("chunk", self._read_chunk(length, at, h))
            body = self._body(kind, length, at)
            if kind == MANIFEST and self._reading is None and allow_manifest:
                return ("manifest", self._parse_manifest(body, at))
            if kind == TENSOR and self._reading is None:
                d, attrs, raw_attrs = self._parse_tensor(body, at)
                m = self.manifest
                if m is not None:
                    if self._tensors_read >= len(m):
                        raise self._error(f"stream contradicts its manifest: more tensors than the manifest's {len(m)}",
                                          at, d.name)
                    if m[self._tensors_read] != d:
                        raise self._error(f"stream contradicts its manifest: manifest entry {self._tensors_read} is "
                                          f"{m[self._tensors_read]}, stream has {d}", at, d.name)
                elif d.name in self._names:
                    # Names are unique with or without a manifest (a manifest's were checked).
                    raise self._error("tensor name appears twice in the stream", at, d.name)
                else:
                    self._names.add(d.name)
                self._reading, self._reading_offset, self._reading_crc = d, 0, 0
                return ("tensor", StreamTensor(self, d, attrs, raw_attrs, self._tensors_read, at))
            if kind == TENSOR_END and self._reading is not None:
                t = self._reading
                if len(body) != 16:
                    raise self._error(f"malformed tensor-end frame: body is {len(body)} bytes, expected 16", at, t.name)
                length_, crc, reserved = struct.unpack("<QII", body)
                if reserved:
                    raise self._error("reserved field tensor-end is not zero", at, t.name)
                if length_ != t.nbytes or self._reading_offset != t.nbytes:
                    raise self._error(f"tensor declares {t.nbytes} bytes but {self._reading_offset} arrived", at, t.name)
                if crc != self._reading_crc:
                    raise self._error(f"crc32 mismatch: tensor-end frame says {_hex(crc)}, data gives "
                                      f"{_hex(self._reading_crc)}", at, t.name)
                self._reading = None
                self._tensors_read += 1
                self._bytes_read += t.nbytes
                return ("tensor-end",)
            if kind == END and self._reading is None:
                if len(body) != 16:
                    raise self._error(f"malformed end frame: body is {len(body)} bytes, expected 16", at)
                count, total = struct.unpack("<QQ", body)
                if count != self._tensors_read or total != self._bytes_read:
                    raise self._error(f"end frame does not match the stream: says {count} tensors / {total} bytes, "
                                      f"stream carried {self._tensors_read} / {self._bytes_read}", at)
                if self.manifest is not None and len(self.manifest) != self._tensors_read:
                    raise self._error(f"stream contradicts its manifest: manifest lists {len(self.manifest)} tensors, "
                                      f"stream carried {self._tensors_read}", at)
                if self.f.read(1):
                    raise self._error("data after the end frame", self.offset)
                self.ended = True
                return ("end",)
            raise self._error(f"unexpected {KIND_NAMES[kind]} frame, expected {expected}", at,
                              self._reading.name if self._reading else None)

    def _chunks(self, t: StreamTensor) -> Iterator[Chunk]:
        while t._state == "reading":
            e = self._event()
            if e[0] == "chunk":
                yield e[1]
            else:  # tensor-end, checked
                t._state = "done"

    def _finish(self, t: StreamTensor) -> None:
        """Reads (and checks) the rest of `t`, whatever the caller took of it."""
        if t._state != "done":
            t._state = "reading"
            for _ in self._chunks(t):
                pass
            t._state = "passed"

    # --- public iteration -----------------------------------------------------------------------

    def tensors(self) -> Iterator[StreamTensor]:
        """Yields each tensor as a StreamTensor (data not yet read); when the stream ends,
        checks the end frame and that nothing follows it. A tensor's unread data is read
        and checked when the next one is asked for."""
        while not self.ended:
            if self._current is not None:
                self._finish(self._current)
                self._current = None
            e = self._event()
            if e[0] == "end":
                return
            self._current = e[1]
            yield e[1]

    def read_to_end(self) -> None:
        """Reads and checks the rest of the stream, through its end frame."""
        for _ in self.tensors():
            pass

    def __iter__(self):
        """Yields whole tensors (``Tensor``, data in memory); use ``tensors()`` to stream."""
        from .arrays import Tensor
        for t in self.tensors():
            yield Tensor(t.name, t.dtype, t.shape, t.read(), t.attributes)
