"""A filter: a stage that reads a stream and writes one, between two ckpt tools, keeping
the output valid: its manifest right, its header's producer its own, unchanged tensors
forwarded chunk by chunk still compressed, ancillary frames and unknown keys passed on,
and no end frame unless the whole input was read and checked."""
from __future__ import annotations

import os
import signal
import sys
from typing import BinaryIO, Callable, Iterator, List, Optional, Union

from .arrays import array_bytes
from .format import (DEFAULT_CHUNK, Descriptor, StreamError, UsageError, WriteError, descriptor, nbytes)
from .reader import AncillaryFrame, StreamReader, StreamTensor
from .writer import StreamWriter

#: What a manifest mapping returns for one input tensor: None (drop it), a Descriptor (or
#: a (name, dtype, shape) tuple), or a list of them (it becomes these tensors, in order).
Mapped = Union[None, Descriptor, tuple, List[Descriptor]]


def _is_array(x) -> bool:
    return hasattr(x, "__array_interface__") or (hasattr(x, "__array__") and hasattr(x, "dtype"))


class Filter:
    """Reads a ckpt stream (default: standard input) and writes one (default: standard
    output)::

        with Filter(producer="my-filter") as f:
            f.plan(lambda d: None if d.name.endswith("position_ids") else d.renamed(d.name.replace("gamma", "weight")),
                   append=[Descriptor("extra", "F32", (2,))])
            for t in f:                                   # StreamTensor: data not read yet
                if t.name.endswith(".bias"):
                    f.write(t.name, t.dtype, t.shape, t.array() * numpy.float32(0.5))
                else:
                    f.forward(t)                          # chunks byte for byte, still compressed
            f.write("extra", "F32", (2,), numpy.zeros(2, numpy.float32))

    The manifest. A stream carries exactly its manifest's tensors, in order. The output's
    manifest is the input's unless ``plan(mapping)`` maps each input descriptor to what
    it becomes (``None`` drops it; ``append=`` lists tensors added at the end). Then:
    iterating skips the tensors the plan drops; ``forward(t)`` uses the planned name; every
    tensor written is checked against the plan, in order, and ``close()`` checks that all
    were written. When the output cannot be known before the data is seen, call
    ``omit_manifest()``: the output has none (ckpt-write then spools the tensors to disk
    before writing, which costs time and space). If the input has no manifest, neither has
    the output; a plan's mapping still names and drops tensors.

    The header: the input's, with ``producer`` replaced; ``source_format``, ``metadata``
    and any other key are kept. Edit ``f.header`` before the output begins (it begins at
    the first tensor read or written).

    Ancillary frames (kinds 0x80-0xFF) are copied to the output in stream order, each at
    the output's frame boundary when the reader meets it (those before the first tensor
    after the output's header and manifest); tensor attributes pass on unchanged with
    ``forward``.

    Errors: StreamError for a broken input (with its byte offset and tensor), WriteError
    for an output that would be invalid. Leaving the ``with`` block by an exception writes
    no end frame, so the next stage fails rather than taking a partial stream. ``run()``
    turns these into messages and exit statuses for a script."""

    def __init__(self, producer: str, input: Optional[BinaryIO] = None, output: Optional[BinaryIO] = None, *,
                 compress: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK, source: Optional[str] = None):
        """`compress`: zlib level (0-9) for the tensors written here (forwarded ones keep
        theirs), None for none. `chunk_size`: their chunk size. `source`: the input's name
        in error messages (default "<stdin>" when reading standard input)."""
        self._pending_ancillary: List[AncillaryFrame] = []
        self._output = output if output is not None else sys.stdout.buffer
        if input is None:
            input, source = sys.stdin.buffer, source or "<stdin>"
        self.writer: Optional[StreamWriter] = None
        self.reader = StreamReader(input, source=source, on_ancillary=self._on_ancillary)
        #: The output header: the input's with `producer` replaced (edit before output begins).
        self.header = dict(self.reader.header)
        self.header["producer"] = producer
        #: The input's manifest (list of Descriptor) or None.
        self.input_manifest = self.reader.manifest
        #: The output's manifest: the input's until plan() or omit_manifest().
        self.manifest: Optional[List[Descriptor]] = None if self.input_manifest is None else list(self.input_manifest)
        self.compress, self.chunk_size = compress, chunk_size
        self._mapping: Optional[Callable[[Descriptor], Mapped]] = None
        self._planned_for: dict = {}
        self._written: dict = {}  # output name -> where it came from (for messages)
        self._closed = False

    # --- planning --------------------------------------------------------------------------

    def _apply(self, d: Descriptor) -> List[Descriptor]:
        r = self._mapping(d)
        if r is None:
            return []
        if isinstance(r, Descriptor) or (isinstance(r, tuple) and r and isinstance(r[0], str)):
            return [descriptor(r)]
        return [descriptor(x) for x in r]

    def plan(self, mapping: Callable[[Descriptor], Mapped], append=()) -> Optional[List[Descriptor]]:
        """Describes the output: `mapping(descriptor)` for each input tensor returns None
        (drop it), a Descriptor (``d.renamed(...)``, ``d.with_dtype(...)``, ...) or a list of
        them (it becomes several tensors, in that order); `append` lists tensors added after
        the last. Returns the output manifest (None if the input has none, see the class
        note). Call before the first tensor is read. WriteError if two output tensors
        would share a name."""
        if self.writer is not None:
            raise UsageError("plan() must come before the first tensor is read or written")
        self._mapping = mapping
        self._planned_for = {}
        append = [descriptor(a) for a in append]
        if self.input_manifest is None:
            self.manifest = None
            return None
        out, origin = [], {}
        for d in self.input_manifest:
            mapped = self._apply(d)
            self._planned_for[d] = mapped
            for o in mapped:
                self._claim(origin, o.name, f"input tensor {d.name!r}")
                out.append(o)
        for a in append:
            self._claim(origin, a.name, "an appended tensor")
            out.append(a)
        self.manifest = out
        return out

    @staticmethod
    def _claim(origin: dict, name: str, what: str):
        if name in origin:
            raise WriteError(f"two output tensors would be named {name!r}: from {origin[name]} and from {what}")
        origin[name] = what

    def omit_manifest(self) -> None:
        """Sends no manifest: for filters that cannot know their output before the data."""
        if self.writer is not None:
            raise UsageError("omit_manifest() must come before the first tensor is read or written")
        self.manifest = None

    def planned(self, t: Union[StreamTensor, Descriptor]) -> List[Descriptor]:
        """What the plan makes of input tensor `t` ([] if dropped; [t's descriptor] without a plan)."""
        d = t.descriptor if isinstance(t, StreamTensor) else Descriptor(*t)
        if self._mapping is None:
            return [d]
        if d not in self._planned_for:
            self._planned_for[d] = self._apply(d)
        return self._planned_for[d]

    # --- output -----------------------------------------------------------------------------

    def _on_ancillary(self, frame: AncillaryFrame) -> None:
        if self.writer is not None and not self.writer.closed:
            self.writer.write_ancillary(frame.kind, frame.body)
        else:
            self._pending_ancillary.append(frame)

    def _start(self) -> StreamWriter:
        if self.writer is None:
            self.writer = StreamWriter(self._output, self.header, manifest=self.manifest, compress=self.compress,
                                       chunk_size=self.chunk_size)
            for a in self._pending_ancillary:
                self.writer.write_ancillary(a.kind, a.body)
            self._pending_ancillary = []
        return self.writer

    def _begin(self, d: Descriptor, origin: str, attributes=None, raw_attributes=None) -> StreamWriter:
        if self._closed:
            raise UsageError("the filter is closed")
        w = self._start()
        if d.name in self._written:
            raise WriteError(f"two output tensors would be named {d.name!r}: from {self._written[d.name]} "
                             f"and from {origin}", w.offset, d.name)
        if self.manifest is not None:
            i = w.count
            if i >= len(self.manifest):
                raise WriteError(f"{d} is not in the output manifest, whose {len(self.manifest)} tensors are all written; "
                                 "plan(mapping, append=...) describes added tensors", w.offset, d.name)
            if self.manifest[i] != d:
                raise WriteError(f"{d} is not what the output manifest lists next (entry {i}: {self.manifest[i]}); "
                                 "write tensors in the planned order, describe renames, drops and additions "
                                 "with plan(), or call omit_manifest()", w.offset, d.name)
        w.begin_tensor(*d, attributes=attributes, raw_attributes=raw_attributes)
        self._written[d.name] = origin
        return w

    def forward(self, t: StreamTensor, name: Optional[str] = None, shape=None) -> None:
        """Passes input tensor `t` on with its data unchanged: its attributes and every chunk
        frame byte for byte (compressed chunks stay compressed; each is still inflated and
        its CRC checked on the way). `t` must be unread (its chunks not taken).

        It goes out as `name` and `shape` (same dtype and byte length: a reshape keeps the
        row-major bytes); by default as the plan has it (the planned entry with its dtype and
        shape, else with its dtype and byte length), else as it came."""
        if not t.unread:
            raise UsageError(f"tensor {t.name}: forward() needs a tensor whose data was not taken; "
                             "send data already read with write()")
        if name is None and shape is None:
            planned = [p for p in self.planned(t) if p.dtype == t.dtype and p.nbytes == t.nbytes]
            d = next((p for p in planned if p.shape == t.shape), planned[0] if planned else t.descriptor)
        else:
            d = descriptor((t.name if name is None else name, t.dtype, t.shape if shape is None else shape))
            if d.nbytes != t.nbytes:
                raise WriteError(f"cannot be forwarded as {d}: {d.nbytes} bytes, the tensor has {t.nbytes}", None, t.name)
        w = self._begin(d, f"input tensor {t.name!r}", raw_attributes=t.raw_attributes)
        for chunk in t.chunks():
            w.forward_chunk(chunk)
        w.end_tensor()

    def write(self, name: str, dtype: str, shape, data, attributes: Optional[dict] = None) -> None:
        """Writes a tensor: a new one, or a changed version of an input tensor. `data` is
        bytes (the raw little-endian bytes), a numpy array (converted to `dtype`: BF16 and
        F8_E4M3 rounded to nearest even, others by numpy's cast; its shape must be `shape`
        or flat), or an iterable of such pieces in order (streamed: e.g. a generator over
        ``t.arrays()``). Chunked and compressed as the filter was set up."""
        d = descriptor((name, dtype, shape))
        if _is_array(data):
            import numpy as np
            a = np.asarray(data)
            if a.shape != d.shape and not (a.ndim == 1 and a.size * nbytes(dtype, ()) == d.nbytes):
                raise WriteError(f"an array of shape {a.shape} given for {d}", None, name)
            data = [a]
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = [data]
        w = self._begin(d, "a written tensor", attributes=attributes)
        for piece in data:
            w.write_chunk(array_bytes(piece, dtype) if _is_array(piece) else piece)
        w.end_tensor()

    # --- iteration and the end --------------------------------------------------------------

    def __iter__(self) -> Iterator[StreamTensor]:
        """The input tensors (StreamTensor, data not read), without those the plan drops
        (their data is still read and checked). The output begins here."""
        self._start()
        for t in self.reader.tensors():
            if self._mapping is not None and not self.planned(t):
                continue
            yield t

    def close(self) -> None:
        """Reads and checks the rest of the input (to its end frame), then ends the output
        (WriteError if the output manifest was not written in full). Input tensors not
        handled by then are not passed on."""
        if self._closed:
            return
        self._start()
        self.reader.read_to_end()
        if self.manifest is not None and self.writer.count != len(self.manifest):
            raise WriteError(f"the output manifest lists {len(self.manifest)} tensors, {self.writer.count} were written "
                             f"(first missing: {self.manifest[self.writer.count]})", self.writer.offset)
        self.writer.close()
        self._closed = True

    def __enter__(self) -> "Filter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            # No end frame: the next stage sees a truncated stream and fails, as it must.
            self._closed = True
            try:
                self._output.flush()
            except Exception:
                pass
        return False


def run(main: Callable[[], Optional[int]], prog: Optional[str] = None) -> None:
    """Runs a filter script's `main()` and exits with its return value (0 for None).

    A StreamError (broken input, or an output that would be invalid) prints
    ``PROG: message`` and exits 65 (EX_DATAERR, as the ckpt tools); a UsageError exits 70
    (EX_SOFTWARE: the script misused the API). A closed downstream pipe ends the process
    quietly by SIGPIPE, as the ckpt tools and ``cat`` do."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        status = main()
    except StreamError as e:
        sys.stderr.write(f"{prog}: {e}\n")
        status = 65
    except UsageError as e:
        sys.stderr.write(f"{prog}: {e}\n")
        status = 70
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        if hasattr(signal, "SIGPIPE"):
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGPIPE)
        status = 141
    sys.exit(status or 0)
