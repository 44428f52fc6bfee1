"""Writing a ckpt stream. The writer refuses (WriteError, before writing anything of it)
whatever would make the stream invalid: a tensor the manifest does not list next, more or
fewer bytes than a tensor's shape, chunks out of order, a manifest not matched at the end."""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Iterable, Optional

from .format import (CHUNK, CHUNK_HEADER, CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED, CODEC_ZSTD, CODEC_ZSTD_SHUFFLED, zstd_codec, DEFAULT_CHUNK, END,
                     FIRST_ANCILLARY, HEADER, MAGIC, MANIFEST, MARKER, MAX_CHUNK, TENSOR, TENSOR_END, VERSION,
                     Descriptor, UsageError, WriteError, descriptor, dump_json, encode_descriptor, frame, padding,
                     shuffle, shuffle_width)


class StreamWriter:
    """Writes a stream to a binary file object: the preamble, header and manifest (if
    given) at once; then per tensor ``begin_tensor``, ``write_chunk`` (or ``forward_chunk``)
    calls and ``end_tensor`` -- or ``write(tensor)`` for a whole one; ``close()`` writes
    the end frame. Without ``close()`` the stream has no end frame and every reader
    refuses it as truncated, which is what a failing stage should leave behind.

    `header` is a dict with string ``producer`` and ``source_format`` and an object
    ``metadata``; other keys are written too, in order. `manifest` lists the tensors
    (Descriptor or (name, dtype, shape)) the stream will carry, in order, or is None (the
    stream then has no manifest). `compress` is how chunks written here are stored: None
    (plain), a zlib level 0-9, or "zlib[:LEVEL]" / "zstd[:LEVEL]" as `ckpt-read --compress`
    takes it (zstd needs Python 3.14 or the zstandard package); forwarded chunks keep their
    own codec."""

    def __init__(self, out: BinaryIO, header: dict, manifest: Optional[Iterable] = None,
                 compress: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK):
        self._codec = _parse_compress(compress)
        if not (isinstance(chunk_size, int) and 1 <= chunk_size <= MAX_CHUNK):
            raise UsageError(f"chunk_size must be 1 to {MAX_CHUNK} bytes, not {chunk_size!r}")
        body = {"producer": "ckpt_stream", "source_format": "unknown", "metadata": {}}
        body.update(header)
        if not (isinstance(body["producer"], str) and isinstance(body["source_format"], str)
                and isinstance(body["metadata"], dict)):
            raise WriteError("the header needs string producer and source_format and an object metadata")
        self.manifest = None
        if manifest is not None:
            self.manifest = [descriptor(m) for m in manifest]
            seen = set()
            for d in self.manifest:
                if d.name in seen:
                    raise WriteError("the manifest lists this name twice", tensor=d.name)
                seen.add(d.name)
        self.out = out
        self.compress = compress
        self.chunk_size = chunk_size
        self.header = body
        #: Tensors and tensor bytes written so far (what the end frame will say).
        self.count = 0
        self.total = 0
        #: Bytes written so far: the output offset of the next frame.
        self.offset = 0
        self.closed = False
        self._tensor: Optional[Descriptor] = None
        self._tensor_offset = 0
        self._crc = 0
        self._put(MAGIC + struct.pack("<HHI", *VERSION, 0) + b"\0" * 48)
        self._put(frame(HEADER, dump_json(body, ensure_ascii=False)))
        if self.manifest is not None:
            entries = b"".join(encode_descriptor(*d) for d in self.manifest)
            self._put(frame(MANIFEST, struct.pack("<Q", len(self.manifest)) + entries))

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def _open(self) -> Descriptor:
        if self._tensor is None:
            raise UsageError("no tensor is open: call begin_tensor first")
        return self._tensor

    @property
    def in_tensor(self) -> bool:
        """True between begin_tensor and end_tensor."""
        return self._tensor is not None

    @property
    def next_planned(self) -> Optional[Descriptor]:
        """The manifest entry the next tensor must match (None without a manifest or past its end)."""
        if self.manifest is None or self.count >= len(self.manifest):
            return None
        return self.manifest[self.count]

    def begin_tensor(self, name: str, dtype: str, shape, attributes: Optional[dict] = None,
                     raw_attributes: Optional[bytes] = None) -> None:
        """Writes a tensor frame. `attributes` is a JSON-able dict; `raw_attributes` the
        bytes of one as read (passed on unchanged). At most one of the two."""
        if self.closed:
            raise UsageError("the stream is closed")
        if self._tensor is not None:
            raise UsageError(f"tensor {self._tensor.name} is still open: call end_tensor first")
        d = descriptor((name, dtype, shape))
        if self.manifest is not None:
            if self.count >= len(self.manifest):
                raise WriteError(f"the manifest lists {len(self.manifest)} tensors, all written; this one is not in it",
                                 self.offset, name)
            if self.manifest[self.count] != d:
                raise WriteError(f"{d} is not the manifest's next entry (entry {self.count}: {self.manifest[self.count]}); "
                                 "a stream carries exactly its manifest's tensors, in order", self.offset, name)
        if attributes is not None and raw_attributes is not None:
            raise UsageError("give attributes or raw_attributes, not both")
        attrs = raw_attributes if raw_attributes is not None else (
            dump_json(attributes, ensure_ascii=True) if attributes else b"")
        if not isinstance(attrs, (bytes, bytearray)):
            raise UsageError("raw_attributes must be bytes")
        self._put(frame(TENSOR, encode_descriptor(*d) + struct.pack("<QI", d.nbytes, len(attrs)) + bytes(attrs)))
        self._tensor, self._tensor_offset, self._crc = d, 0, 0

    def write_chunk(self, data) -> None:
        """Writes bytes of the open tensor (any length: split into chunk_size chunks,
        compressed if the writer compresses)."""
        t = self._open()
        data = memoryview(data).cast("B")
        if self._tensor_offset + len(data) > t.nbytes:
            raise WriteError(f"more than its {t.nbytes} bytes ({self._tensor_offset} written, {len(data)} more given)",
                             self.offset, t.name)
        width = shuffle_width(t.dtype)
        for start in range(0, len(data), self.chunk_size):
            piece = data[start:start + self.chunk_size]
            crc = zlib.crc32(piece)
            shuffled = 0
            if self._codec is None:
                stored, codec = piece, CODEC_NONE
            else:
                # As the Swift writer: shuffle multi-byte elements; deflate with the RLE strategy.
                family, level = self._codec
                payload = shuffle(bytes(piece), width) if width > 1 else piece
                shuffled = width if width > 1 else 0
                if family == "zstd":
                    codec = CODEC_ZSTD_SHUFFLED if shuffled else CODEC_ZSTD
                    stored = zstd_codec()[0](bytes(payload), level)
                else:
                    codec = CODEC_ZLIB_SHUFFLED if shuffled else CODEC_ZLIB
                    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
                    stored = z.compress(payload) + z.flush()
            head = struct.pack("<IBBHQ", MARKER, CHUNK, 0, 0, CHUNK_HEADER + len(stored))
            head += struct.pack("<QQIIB", self._tensor_offset, len(piece), codec, crc, shuffled) + b"\0" * 23
            self._put(head)
            self._put(stored)
            self._put(b"\0" * padding(len(stored)))
            self._tensor_offset += len(piece)
            self._crc = zlib.crc32(piece, self._crc)

    def forward_chunk(self, chunk) -> None:
        """Writes a chunk read from another stream (a reader's Chunk) exactly as it arrived,
        still compressed. Its offset must be where the open tensor continues."""
        t = self._open()
        if chunk.offset != self._tensor_offset:
            raise WriteError(f"a chunk at tensor offset {chunk.offset} cannot follow {self._tensor_offset} bytes",
                             self.offset, t.name)
        if chunk.offset + chunk.raw_length > t.nbytes:
            raise WriteError(f"chunk [{chunk.offset}, {chunk.offset + chunk.raw_length}) extends beyond the tensor's "
                             f"{t.nbytes} bytes", self.offset, t.name)
        self.offset += chunk.write_frame(self.out)
        self._tensor_offset += chunk.raw_length
        self._crc = zlib.crc32(chunk.data, self._crc)

    def end_tensor(self) -> None:
        """Writes the tensor-end frame (length and CRC of all the tensor's bytes)."""
        t = self._open()
        if self._tensor_offset != t.nbytes:
            raise WriteError(f"{self._tensor_offset} of its {t.nbytes} bytes written", self.offset, t.name)
        self._put(frame(TENSOR_END, struct.pack("<QII", t.nbytes, self._crc, 0)))
        self.count += 1
        self.total += t.nbytes
        self._tensor = None

    def write(self, t) -> None:
        """Writes a whole Tensor (name, dtype, shape, data, attributes)."""
        self.begin_tensor(t.name, t.dtype, t.shape, t.attributes)
        if t.data:
            self.write_chunk(t.data)
        self.end_tensor()

    def write_ancillary(self, kind: int, body: bytes) -> None:
        """Writes an ancillary frame (kind 0x80-0xFF), allowed between any two frames."""
        if not FIRST_ANCILLARY <= kind <= 0xFF:
            raise UsageError(f"kind {kind:#x} is not ancillary (0x80-0xFF)")
        if self.closed:
            raise UsageError("the stream is closed")
        self._put(frame(kind, bytes(body)))

    def close(self) -> None:
        """Writes the end frame and flushes. The manifest, if any, must have been written in full."""
        if self.closed:
            return
        if self._tensor is not None:
            raise WriteError("still open at close: call end_tensor first", self.offset, self._tensor.name)
        if self.manifest is not None and self.count != len(self.manifest):
            raise WriteError(f"the manifest lists {len(self.manifest)} tensors, {self.count} were written "
                             f"(next missing: {self.manifest[self.count]})", self.offset)
        self._put(frame(END, struct.pack("<QQ", self.count, self.total)))
        self.out.flush()
        self.closed = True


def _parse_compress(compress):
    """None, or (family, level) from a zlib level or "zlib[:LEVEL]" / "zstd[:LEVEL]"."""
    if compress is None:
        return None
    if isinstance(compress, int) and not isinstance(compress, bool) and 0 <= compress <= 9:
        return ("zlib", compress)
    if isinstance(compress, str):
        family, _, level = compress.partition(":")
        try:
            if family == "zlib" and (not level or 0 <= int(level) <= 9):
                return ("zlib", int(level) if level else 1)
            if family == "zstd" and (not level or (-7 <= int(level) <= 19 and int(level) != 0)):
                if zstd_codec() is None:
                    raise UsageError("zstd needs Python 3.14's compression.zstd or the zstandard package")
                return ("zstd", int(level) if level else 1)
        except ValueError:
            pass
    raise UsageError(f"compress must be None, a zlib level 0-9, 'zlib[:LEVEL]' or 'zstd[:LEVEL]', not {compress!r}")
