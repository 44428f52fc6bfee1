"""Read and write ckpt streams (version 1) in plain Python.

The byte layout is specified in docs/stream-format.md. This module needs only the
standard library; numpy is used when present (``Tensor.array()``, ``from_array``).

A filter that scales some tensors, inserted between two stages::

    import sys, ckpt_stream as cs
    reader = cs.StreamReader(sys.stdin.buffer)
    writer = cs.StreamWriter(sys.stdout.buffer, reader.header, manifest=reader.manifest)
    for t in reader:
        if t.name.endswith(".bias"):
            t = cs.from_array(t.name, t.array() * 0.5, dtype=t.dtype)
        writer.write(t)
    writer.close()
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional

MAGIC = b"\x89CKPT\r\n\x1a"
VERSION = (1, 0)
ALIGN = 64
MARKER = 0xFFFFFFFF
CHUNK_HEADER = 48
DEFAULT_CHUNK = 4 << 20
MAX_CHUNK = 256 << 20
MAX_SMALL_FRAME = 1 << 30

HEADER, MANIFEST, TENSOR, CHUNK, TENSOR_END, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F
KIND_NAMES = {HEADER: "header", MANIFEST: "manifest", TENSOR: "tensor", CHUNK: "chunk",
              TENSOR_END: "tensor-end", END: "end"}
CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED = 0, 1, 2
MAX_SHUFFLE = 16

#: Bytes per element, by safetensors dtype name.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}

#: numpy dtype strings for the types numpy has natively.
NUMPY_DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "C64": "<c8", "F64": "<f8", "I64": "<i8", "U64": "<u8",
}


class StreamError(Exception):
    """The stream broke a rule of the spec; the message says where."""


def _pad(n: int) -> int:
    return (ALIGN - n % ALIGN) % ALIGN


def _frame(kind: int, body: bytes) -> bytes:
    head = struct.pack("<IBBHQ", MARKER, kind, 0, 0, len(body))
    return head + body + b"\0" * _pad(len(head) + len(body))


def _descriptor(name: str, dtype: str, shape) -> bytes:
    n = name.encode("utf-8")
    d = dtype.encode("ascii")
    return (struct.pack("<I", len(n)) + n + struct.pack("<B", len(d)) + d
            + struct.pack("<B", len(shape)) + b"".join(struct.pack("<Q", int(x)) for x in shape))


def shuffle(data: bytes, width: int) -> bytes:
    """Codec 2's byte shuffle: element bytes grouped by position; the n % width tail stays."""
    m = len(data) // width
    return b"".join(data[j:m * width:width] for j in range(width)) + data[m * width:]


def unshuffle(data: bytes, width: int) -> bytes:
    m = len(data) // width
    out = bytearray(data)
    for j in range(width):
        out[j:m * width:width] = data[j * m:(j + 1) * m]
    return bytes(out)


def shuffle_width(dtype: str) -> int:
    """What writers shuffle by: the element size (complex64 as two float32), 1 = none."""
    return 4 if dtype == "C64" else DTYPE_SIZES[dtype]


def nbytes(dtype: str, shape) -> int:
    if dtype not in DTYPE_SIZES:
        raise StreamError(f"unknown dtype {dtype!r}")
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= int(d)
    return n


@dataclass
class Tensor:
    """A whole tensor: little-endian, row-major bytes."""
    name: str
    dtype: str
    shape: tuple
    data: bytes
    attributes: dict = field(default_factory=dict)

    def array(self):
        """The data as a numpy array (BF16 and F8 need ml_dtypes)."""
        import numpy as np
        if self.dtype in NUMPY_DTYPES:
            dt = np.dtype(NUMPY_DTYPES[self.dtype])
        else:
            import ml_dtypes
            dt = np.dtype({"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                           "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
                           "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
                           "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz}[self.dtype])
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape)


def from_array(name: str, array, dtype: Optional[str] = None, attributes: Optional[dict] = None) -> Tensor:
    """A tensor from a numpy array; `dtype` names the stream dtype (default: from the array).

    Casting float32 data to "BF16" rounds to nearest even, as ml_dtypes does."""
    import numpy as np
    a = np.asarray(array)
    if dtype is None:
        inverse = {np.dtype(v).str: k for k, v in NUMPY_DTYPES.items()}
        key = a.dtype.newbyteorder("<").str if a.dtype.byteorder == ">" else a.dtype.str
        if key in inverse:
            dtype = inverse[key]
        elif a.dtype.name == "bfloat16":
            dtype = "BF16"
        else:
            raise StreamError(f"no stream dtype for numpy {a.dtype}")
    if dtype == "BF16" and a.dtype != np.dtype("V2") and a.dtype.name != "bfloat16":
        data = f32_to_bf16_bits(a.astype("<f4")).tobytes()
    elif dtype in NUMPY_DTYPES:
        data = np.ascontiguousarray(a, dtype=np.dtype(NUMPY_DTYPES[dtype])).tobytes()
    else:
        data = np.ascontiguousarray(a).tobytes()
    if len(data) != nbytes(dtype, a.shape):
        raise StreamError(f"{name}: {len(data)} bytes do not fit {dtype}{list(a.shape)}")
    return Tensor(name, dtype, tuple(a.shape), data, attributes or {})


def f32_to_bf16_bits(a):
    """float32 array -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    import numpy as np
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4")
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, rounded).astype("<u2")


def bf16_bits_to_f32(bits):
    import numpy as np
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


class StreamWriter:
    """Writes a stream to a binary file object. Call `write` (or `begin_tensor`,
    `write_chunk`, `end_tensor`) per tensor, then `close()` for the end frame."""

    def __init__(self, out: BinaryIO, header: dict, manifest=None, compress: Optional[int] = None,
                 chunk_size: int = DEFAULT_CHUNK):
        self.out = out
        self.compress = compress
        self.chunk_size = chunk_size
        self.manifest = [tuple(m) for m in manifest] if manifest is not None else None
        self.count = 0
        self.total = 0
        self._current = None
        out.write(MAGIC + struct.pack("<HHI", *VERSION, 0) + b"\0" * 48)
        body = {"producer": header.get("producer", "ckpt_stream.py"),
                "source_format": header.get("source_format", "unknown"),
                "metadata": header.get("metadata", {})}
        # Header keys this writer does not know (the `part` of a partitioned conversion, a later
        # minor version's) are written again, as the spec asks of every filter.
        body.update((k, v) for k, v in header.items() if k not in body)
        out.write(_frame(HEADER, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")))
        if self.manifest is not None:
            entries = b"".join(_descriptor(n, d, s) for n, d, s in self.manifest)
            out.write(_frame(MANIFEST, struct.pack("<Q", len(self.manifest)) + entries))

    def begin_tensor(self, name: str, dtype: str, shape, attributes: Optional[dict] = None):
        shape = tuple(int(x) for x in shape)
        if self.manifest is not None:
            if self.count >= len(self.manifest) or self.manifest[self.count] != (name, dtype, shape):
                raise StreamError(f"tensor {name} is not the manifest's next entry")
        length = nbytes(dtype, shape)
        attrs = json.dumps(attributes, separators=(",", ":")).encode() if attributes else b""
        self.out.write(_frame(TENSOR, _descriptor(name, dtype, shape) + struct.pack("<QI", length, len(attrs)) + attrs))
        self._current = [name, length, 0, 0]  # name, length, offset, crc
        self._width = shuffle_width(dtype)

    def write_chunk(self, data):
        name, length, offset, crc = self._current
        data = memoryview(data).cast("B")
        if offset + len(data) > length:
            raise StreamError(f"tensor {name}: more than its {length} bytes")
        for start in range(0, len(data), self.chunk_size):
            piece = data[start:start + self.chunk_size]
            c = zlib.crc32(piece)
            width = 0
            if self.compress is None:
                stored, codec = piece, CODEC_NONE
            else:
                # As the Swift writer: shuffle multi-byte elements, deflate with the RLE strategy.
                z = zlib.compressobj(self.compress, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
                if self._width > 1:
                    width, codec = self._width, CODEC_ZLIB_SHUFFLED
                    stored = z.compress(shuffle(bytes(piece), width)) + z.flush()
                else:
                    codec = CODEC_ZLIB
                    stored = z.compress(piece) + z.flush()
            head = struct.pack("<IBBHQ", MARKER, CHUNK, 0, 0, CHUNK_HEADER + len(stored))
            head += struct.pack("<QQIIB", offset, len(piece), codec, c, width) + b"\0" * 23
            self.out.write(head)
            self.out.write(stored)
            self.out.write(b"\0" * _pad(len(stored)))
            offset += len(piece)
            crc = zlib.crc32(piece, crc)
        self._current[2:] = [offset, crc]

    def end_tensor(self):
        name, length, offset, crc = self._current
        if offset != length:
            raise StreamError(f"tensor {name}: {offset} of {length} bytes written")
        self.out.write(_frame(TENSOR_END, struct.pack("<QII", length, crc, 0)))
        self.count += 1
        self.total += length
        self._current = None

    def write(self, t: Tensor):
        self.begin_tensor(t.name, t.dtype, t.shape, t.attributes)
        if t.data:
            self.write_chunk(t.data)
        self.end_tensor()

    def close(self):
        if self.manifest is not None and self.count != len(self.manifest):
            raise StreamError(f"manifest lists {len(self.manifest)} tensors, {self.count} written")
        self.out.write(_frame(END, struct.pack("<QQ", self.count, self.total)))
        self.out.flush()


class StreamReader:
    """Reads and checks a stream. Iterating yields whole `Tensor`s; `chunks()` yields
    (descriptor, iterator of byte chunks) for tensors too large to hold."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.offset = 0
        pre = self._read(64)
        if len(pre) < 64 or pre[:8] != MAGIC:
            raise StreamError("not a ckpt stream (bad magic)")
        major, minor, flags = struct.unpack("<HHI", pre[8:16])
        if major != VERSION[0]:
            raise StreamError(f"ckpt stream version {major}.{minor} is not supported")
        kind, body, at = self._frame()
        if kind != HEADER:
            raise StreamError(f"byte {at}: expected a header frame")
        self.header = json.loads(body)
        self.manifest = None
        self._pending = self._frame()
        if self._pending[0] == MANIFEST:
            self.manifest = self._parse_manifest(self._pending[1])
            self._pending = None

    def _read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.f.read(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def _frame(self, small_only=True):
        """Reads the next frame; chunk frames return their header and leave data unread."""
        while True:
            at = self.offset
            head = self._read(16)
            if len(head) < 16:
                raise StreamError(f"byte {at}: truncated stream (no end frame)")
            marker, kind, flags, reserved, length = struct.unpack("<IBBHQ", head)
            if marker != MARKER:
                raise StreamError(f"byte {at}: frame does not start with the FFFFFFFF marker")
            if flags or reserved:
                raise StreamError(f"byte {at}: reserved frame fields are not zero")
            if kind == CHUNK:
                return kind, length, at
            if kind not in KIND_NAMES:
                if kind < 0x80:
                    raise StreamError(f"byte {at}: unknown critical frame kind {kind:#x}")
                self._skip(length + _pad(16 + length), at)
                continue
            if length > MAX_SMALL_FRAME:
                raise StreamError(f"byte {at}: {KIND_NAMES[kind]} frame too large")
            body = self._read(length)
            if len(body) < length:
                raise StreamError(f"byte {at}: truncated stream inside a {KIND_NAMES[kind]} frame")
            self._skip(_pad(16 + length), at)
            return kind, body, at

    def _skip(self, n, at):
        pad = self._read(n)
        if len(pad) < n:
            raise StreamError(f"byte {at}: truncated stream")

    @staticmethod
    def _parse_descriptor(b: bytes, i: int):
        (n,) = struct.unpack_from("<I", b, i); i += 4
        name = b[i:i + n].decode("utf-8"); i += n
        d = b[i]; i += 1
        dtype = b[i:i + d].decode("ascii"); i += d
        rank = b[i]; i += 1
        shape = struct.unpack_from(f"<{rank}Q", b, i); i += 8 * rank
        if dtype not in DTYPE_SIZES:
            raise StreamError(f"tensor {name}: unknown dtype {dtype!r}")
        return (name, dtype, tuple(shape)), i

    def _parse_manifest(self, body: bytes):
        (count,) = struct.unpack_from("<Q", body, 0)
        i, out = 8, []
        for _ in range(count):
            d, i = self._parse_descriptor(body, i)
            out.append(d)
        return out

    def chunks(self):
        """Yields ((name, dtype, shape), attributes, chunk iterator) per tensor; exhaust
        each chunk iterator before moving on."""
        index, total = 0, 0
        while True:
            frame = self._pending or self._frame()
            self._pending = None
            kind, body, at = frame
            if kind == END:
                count, nb = struct.unpack("<QQ", body)
                if count != index or nb != total:
                    raise StreamError(f"byte {at}: end frame says {count} tensors / {nb} bytes, stream had {index} / {total}")
                if self.manifest is not None and len(self.manifest) != index:
                    raise StreamError("stream carried fewer tensors than its manifest lists")
                if self.f.read(1):
                    raise StreamError("data after the end frame")
                return
            if kind != TENSOR:
                raise StreamError(f"byte {at}: unexpected {KIND_NAMES.get(kind, kind)} frame, expected tensor or end")
            desc, i = self._parse_descriptor(body, 0)
            length, alen = struct.unpack_from("<QI", body, i)
            attrs = json.loads(body[i + 12:i + 12 + alen]) if alen else {}
            if length != nbytes(desc[1], desc[2]):
                raise StreamError(f"tensor {desc[0]}: byte length does not match its shape")
            if self.manifest is not None and (index >= len(self.manifest) or self.manifest[index] != desc):
                raise StreamError(f"tensor {desc[0]}: stream contradicts its manifest")
            state = {"done": False}
            yield desc, attrs, self._tensor_chunks(desc[0], length, state)
            if not state["done"]:
                for _ in self._tensor_chunks(desc[0], length, state):
                    pass
            index += 1
            total += length

    def _tensor_chunks(self, name, length, state):
        if state.get("started"):
            return
        state["started"] = True
        offset, crc = 0, 0
        while True:
            kind, body, at = self._frame()
            if kind == TENSOR_END:
                nb, stored_crc, _ = struct.unpack("<QII", body)
                if nb != length or offset != length:
                    raise StreamError(f"tensor {name}: {offset} bytes arrived, {length} declared")
                if stored_crc != crc:
                    raise StreamError(f"tensor {name}: crc32 mismatch")
                state["done"] = True
                return
            if kind != CHUNK:
                raise StreamError(f"byte {at}: unexpected {KIND_NAMES.get(kind, kind)} frame inside tensor {name}")
            blen = body
            head = self._read(CHUNK_HEADER)
            if len(head) < CHUNK_HEADER or blen < CHUNK_HEADER:
                raise StreamError(f"byte {at}: truncated chunk of tensor {name}")
            coff, raw, codec, ccrc, width = struct.unpack_from("<QQIIB", head)
            if any(head[25:]) or (codec == CODEC_ZLIB_SHUFFLED) != (width != 0) or width == 1 or width > MAX_SHUFFLE:
                raise StreamError(f"byte {at}: bad reserved bytes or shuffle width in a chunk of tensor {name}")
            stored = blen - CHUNK_HEADER
            if coff != offset or coff + raw > length or raw > MAX_CHUNK or stored > MAX_CHUNK + 65536:
                raise StreamError(f"byte {at}: bad chunk offset or length in tensor {name}")
            data = self._read(stored)
            if len(data) < stored:
                raise StreamError(f"byte {at}: truncated stream inside tensor {name}")
            self._skip(_pad(16 + blen), at)
            if codec == CODEC_ZLIB:
                data = zlib.decompress(data)
            elif codec == CODEC_ZLIB_SHUFFLED:
                data = unshuffle(zlib.decompress(data), width)
            elif codec != CODEC_NONE:
                raise StreamError(f"byte {at}: unknown codec {codec}")
            if len(data) != raw:
                raise StreamError(f"byte {at}: chunk inflates to {len(data)} bytes, declared {raw}")
            if zlib.crc32(data) != ccrc:
                raise StreamError(f"byte {at}: tensor {name}: crc32 mismatch in chunk at offset {coff}")
            crc = zlib.crc32(data, crc)
            offset += raw
            yield data

    def __iter__(self) -> Iterator[Tensor]:
        for (name, dtype, shape), attrs, chunks in self.chunks():
            yield Tensor(name, dtype, shape, b"".join(chunks), attrs)
