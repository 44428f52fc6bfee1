#!/usr/bin/env python3
"""Writes the golden ckpt streams with the Python implementation (python/ckpt_stream).

The Swift tests write the same tensors with StreamWriter and require identical bytes, so
the two implementations pin each other. Usage: make_golden.py [OUTDIR] (default: this folder). Commit the output.
"""
import os
import struct
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "..", "python"))
import ckpt_stream as cs  # noqa: E402


def pattern(n, seed):
    return bytes((i * 37 + seed) % 256 for i in range(n))


out_dir = sys.argv[1] if len(sys.argv) > 1 else here


def write(name, header, tensors, manifest=True, **kw):
    with open(os.path.join(out_dir, name), "wb") as f:
        w = cs.StreamWriter(f, header, manifest=[(t.name, t.dtype, t.shape) for t in tensors] if manifest else None, **kw)
        for t in tensors:
            w.write(t)
        w.close()


tiny = [cs.Tensor("a", "F32", (2,), struct.pack("<2f", 1.0, 2.0)), cs.Tensor("b", "U8", (0,), b"")]
write("tiny.ckpts", {"producer": "golden", "source_format": "test", "metadata": {}}, tiny)

dtypes = []
for i, d in enumerate(cs.DTYPE_SIZES):
    shape = (2, 3) if i % 2 else (3,)
    attrs = {"index": i} if d == "BF16" else {}
    dtypes.append(cs.Tensor(f"t.{d.lower()}", d, shape, pattern(cs.nbytes(d, shape), i), attrs))
write("all-dtypes.ckpts", {"producer": "golden", "source_format": "test",
                           "metadata": {"note": "one tensor per dtype", "n": 19}}, dtypes, manifest=False)

chunked = [cs.Tensor("x/y", "I16", (10,), pattern(20, 5)), cs.Tensor("z", "F64", (1,), pattern(8, 9))]
write("chunked.ckpts", {"producer": "golden", "source_format": "test", "metadata": {}}, chunked, chunk_size=8)
write("chunked-zlib.ckpts", {"producer": "golden", "source_format": "test", "metadata": {}}, chunked,
      chunk_size=8, compress=6)
# Codec 1 (zlib over unshuffled bytes): what the writers use for one-byte dtypes.
write("bytes-zlib.ckpts", {"producer": "golden", "source_format": "test", "metadata": {}},
      [cs.Tensor("u", "U8", (300,), pattern(300, 1))], chunk_size=128, compress=9)
