"""Constants of the ckpt stream (version 1), its errors, tensor descriptors, and the small
codecs the reader and writer share: frame layout, byte shuffle, strict JSON.

The byte layout is specified in docs/stream-format.md; this module and that document
must change together.
"""
from __future__ import annotations

import functools
import json
import struct
from typing import Iterable, NamedTuple, Optional, Tuple

MAGIC = b"\x89CKPT\r\n\x1a"
VERSION = (1, 0)
PREAMBLE_SIZE = 64
ALIGN = 64
MARKER = 0xFFFFFFFF
FRAME_HEADER = 16
CHUNK_HEADER = 48
#: The chunk size writers use; readers accept any size up to MAX_CHUNK.
DEFAULT_CHUNK = 4 << 20
#: Readers refuse larger chunks (raw length), so a forged length cannot force a huge allocation.
MAX_CHUNK = 256 << 20
#: ... and a chunk's stored (compressed) bytes may exceed its raw length by at most this much.
MAX_CHUNK_EXPANSION = 65536
#: Readers refuse larger header, manifest, tensor (and, here, ancillary) frames.
MAX_SMALL_FRAME = 1 << 30
MAX_RANK = 64
MAX_SHUFFLE = 16
#: Element counts and byte lengths must fit a signed 64-bit integer.
MAX_INT64 = (1 << 63) - 1
#: Deepest JSON nesting a reader accepts (as the Swift parser).
MAX_JSON_DEPTH = 256

HEADER, MANIFEST, TENSOR, CHUNK, TENSOR_END, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F
KIND_NAMES = {HEADER: "header", MANIFEST: "manifest", TENSOR: "tensor", CHUNK: "chunk",
              TENSOR_END: "tensor-end", END: "end"}
#: Frame kinds from here up are ancillary: readers skip those they do not know.
FIRST_ANCILLARY = 0x80
CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED, CODEC_ZSTD, CODEC_ZSTD_SHUFFLED = 0, 1, 2, 3, 4
CODECS = (CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED, CODEC_ZSTD, CODEC_ZSTD_SHUFFLED)
SHUFFLED_CODECS = (CODEC_ZLIB_SHUFFLED, CODEC_ZSTD_SHUFFLED)


@functools.lru_cache(maxsize=None)
def zstd_codec():
    """(compress(data, level) -> bytes, decompress(data, size) -> bytes) for zstd chunks:
    Python 3.14's compression.zstd, else the `zstandard` package; None when neither is there
    (the standard library had no zstd before 3.14). Looked up once: a failed import is not
    cached by Python, and this is asked for every chunk."""
    try:
        from compression import zstd as z  # Python 3.14+
        return (lambda data, level: z.compress(data, level=level),
                lambda data, size: z.ZstdDecompressor().decompress(data, max_length=size + 1))
    except ImportError:
        pass
    try:
        import zstandard as z
    except ImportError:
        return None
    return (lambda data, level: z.ZstdCompressor(level=level, write_content_size=True).compress(data),
            lambda data, size: z.ZstdDecompressor().decompress(data, max_output_size=size + 1))

#: Bytes per element, by safetensors dtype name (the stream's dtype names).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}

#: The floating-point dtypes (complex excluded).
FLOAT_DTYPES = ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64")


class StreamError(Exception):
    """A stream breaks a rule of docs/stream-format.md.

    ``reason`` says which rule, ``offset`` is the byte offset (from the start of the stream)
    of the frame at fault and ``tensor`` the tensor it belongs to, when known. The message
    reads ``[source: ]byte N: tensor NAME: reason`` like the Swift tools'."""

    def __init__(self, reason: str, offset: Optional[int] = None, tensor: Optional[str] = None,
                 source: Optional[str] = None):
        self.reason, self.offset, self.tensor, self.source = reason, offset, tensor, source
        where = []
        if source:
            where.append(source)
        if offset is not None:
            where.append(f"byte {offset}")
        if tensor is not None:
            where.append(f"tensor {tensor}")
        super().__init__(": ".join(where + [reason]))


class WriteError(StreamError):
    """What a writer or filter was asked to send would break the stream's rules (a tensor
    the manifest does not list next, a wrong byte count, two tensors with one name, ...).
    Nothing invalid has been written when it is raised; ``offset`` is the output offset."""


class UsageError(RuntimeError):
    """The API was used in a way it cannot serve: a tensor's data taken twice or after the
    reader moved on, ``forward`` of a tensor already read, ``plan`` after output began."""


class Descriptor(NamedTuple):
    """What a tensor is: name, dtype (a key of DTYPE_SIZES) and shape (a tuple of ints).

    Manifest entries are descriptors. It is a tuple, so ``Descriptor("a", "F32", (2,)) ==
    ("a", "F32", (2,))``; ``renamed``, ``with_dtype`` and ``with_shape`` return changed copies,
    for manifest mappings (see ``Filter.plan``)."""
    name: str
    dtype: str
    shape: Tuple[int, ...]

    def renamed(self, name: str) -> "Descriptor":
        return self._replace(name=name)

    def with_dtype(self, dtype: str) -> "Descriptor":
        return self._replace(dtype=dtype)

    def with_shape(self, shape: Iterable[int]) -> "Descriptor":
        return self._replace(shape=tuple(int(x) for x in shape))

    @property
    def nbytes(self) -> int:
        """The tensor's byte length: product(shape) x size(dtype)."""
        return nbytes(self.dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"


def descriptor(value) -> Descriptor:
    """A checked Descriptor from a Descriptor or a (name, dtype, shape) tuple; raises
    WriteError for an unknown dtype, a rank over 64 or a byte length over 2**63 - 1."""
    try:
        name, dtype, shape = value
        shape = tuple(int(x) for x in shape)
    except (TypeError, ValueError):
        raise WriteError(f"expected a Descriptor or (name, dtype, shape), got {value!r}") from None
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise WriteError(f"expected a Descriptor or (name, dtype, shape), got {value!r}")
    d = Descriptor(name, dtype, shape)
    if len(shape) > MAX_RANK:
        raise WriteError(f"rank {len(shape)} exceeds {MAX_RANK}", tensor=name)
    try:
        nbytes(dtype, shape)
    except StreamError as e:
        raise WriteError(e.reason, tensor=name) from None
    return d


def nbytes(dtype: str, shape) -> int:
    """product(shape) x size(dtype); StreamError for an unknown dtype, a negative dimension or
    a count over 2**63 - 1."""
    if dtype not in DTYPE_SIZES:
        raise StreamError(f"unknown dtype {dtype!r}")
    n = 1
    for d in shape:
        d = int(d)
        if d < 0:
            raise StreamError(f"invalid shape: negative dimension {d}")
        n *= d
        if n > MAX_INT64:
            raise StreamError("invalid shape: element count overflows")
    n *= DTYPE_SIZES[dtype]
    if n > MAX_INT64:
        raise StreamError("invalid shape: byte length overflows")
    return n


def padding(length: int) -> int:
    """Zero bytes that bring `length` up to the next multiple of 64."""
    return (ALIGN - length % ALIGN) % ALIGN


def frame(kind: int, body: bytes) -> bytes:
    """A whole frame: 16-byte header, body, zero padding."""
    head = struct.pack("<IBBHQ", MARKER, kind, 0, 0, len(body))
    return head + body + b"\0" * padding(len(head) + len(body))


def encode_descriptor(name: str, dtype: str, shape) -> bytes:
    n = name.encode("utf-8")
    d = dtype.encode("ascii")
    return (struct.pack("<I", len(n)) + n + struct.pack("<B", len(d)) + d
            + struct.pack("<B", len(shape)) + b"".join(struct.pack("<Q", int(x)) for x in shape))


def shuffle(data: bytes, width: int) -> bytes:
    """Codec 2's byte shuffle: element bytes grouped by position; the n % width tail stays."""
    m = len(data) // width
    return b"".join(data[j:m * width:width] for j in range(width)) + data[m * width:]


def unshuffle(data: bytes, width: int) -> bytes:
    """The inverse of `shuffle`."""
    m = len(data) // width
    out = bytearray(data)
    for j in range(width):
        out[j:m * width:width] = data[j * m:(j + 1) * m]
    return bytes(out)


def shuffle_width(dtype: str) -> int:
    """What writers shuffle by: the element size (complex64 as two float32), 1 = none."""
    return 4 if dtype == "C64" else DTYPE_SIZES[dtype]


# --- JSON: strict like the Swift parser, and number spelling kept when passed on -------------

class JSONNumber(float):
    """A JSON number with a fraction or exponent as read, e.g. ``1e-4``: a float that
    remembers its spelling, so a filter passes metadata on unchanged (``dump_json``)."""
    __slots__ = ("text",)

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.text = text
        return self

    def __getnewargs__(self):
        return (self.text,)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _check_json(value, depth: int) -> None:
    """Refuses lone surrogates (not UTF-8) and values nested MAX_JSON_DEPTH deep (as Swift's)."""
    if depth >= MAX_JSON_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, str):
        value.encode("utf-8")  # raises on a lone surrogate
    elif isinstance(value, (dict, list)):
        for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(k, str):
                k.encode("utf-8")
            _check_json(v, depth + 1)


def load_json(body: bytes):
    """Parses RFC 8259 JSON from UTF-8 bytes as strictly as the Swift tools: refuses invalid
    UTF-8, duplicate keys, NaN/Infinity, lone surrogates and deep nesting (ValueError).
    Numbers with a fraction or exponent become JSONNumber."""
    try:
        text = bytes(body).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=JSONNumber)
        _check_json(value, 0)
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}") from None
    except UnicodeEncodeError:
        raise ValueError("lone surrogate in a string") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason})") from None
    return value


def dump_json(value, ensure_ascii: bool = False) -> bytes:
    """Compact JSON (UTF-8) keeping dict order and each JSONNumber's spelling."""
    parts = []

    def put(v):
        if isinstance(v, JSONNumber):
            parts.append(v.text)
        elif isinstance(v, dict):
            parts.append("{")
            for i, (k, x) in enumerate(v.items()):
                if not isinstance(k, str):
                    raise TypeError(f"JSON object keys must be strings, not {k!r}")
                parts.append(("," if i else "") + json.dumps(k, ensure_ascii=ensure_ascii) + ":")
                put(x)
            parts.append("}")
        elif isinstance(v, (list, tuple)):
            parts.append("[")
            for i, x in enumerate(v):
                if i:
                    parts.append(",")
                put(x)
            parts.append("]")
        else:
            parts.append(json.dumps(v, ensure_ascii=ensure_ascii, allow_nan=False))

    put(value)
    return "".join(parts).encode("utf-8")
