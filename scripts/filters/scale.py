#!/usr/bin/env python3
"""Multiply every floating-point tensor whose name matches GLOB by FACTOR.

A worked example of a custom stage between ckpt tools:

    ckpt-read model.safetensors | scripts/filters/scale.py 'encoder.*.bias' 0.5 | ckpt-write out.safetensors

Tensors that do not match pass through untouched, chunk by chunk, without being held in
memory. Matching tensors are scaled in float32 and written back in their own dtype
(bfloat16 rounded to nearest even). Needs numpy.
"""
import fnmatch
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402
import ckpt_stream as cs  # noqa: E402

FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def scaled(t: cs.Tensor, factor: float) -> cs.Tensor:
    if t.dtype == "BF16":
        values = cs.bf16_bits_to_f32(np.frombuffer(t.data, "<u2")) * np.float32(factor)
        return cs.Tensor(t.name, t.dtype, t.shape, cs.f32_to_bf16_bits(values).tobytes(), t.attributes)
    a = np.frombuffer(t.data, FLOATS[t.dtype])
    return cs.Tensor(t.name, t.dtype, t.shape, (a * a.dtype.type(factor)).astype(a.dtype).tobytes(), t.attributes)


def main() -> int:
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__)
        return 64
    pattern, factor = sys.argv[1], float(sys.argv[2])
    reader = cs.StreamReader(sys.stdin.buffer)
    header = dict(reader.header, producer="scale.py")
    writer = cs.StreamWriter(sys.stdout.buffer, header, manifest=reader.manifest)
    for (name, dtype, shape), attrs, chunks in reader.chunks():
        if fnmatch.fnmatchcase(name, pattern) and (dtype in FLOATS or dtype == "BF16"):
            writer.write(scaled(cs.Tensor(name, dtype, shape, b"".join(chunks), attrs), factor))
        else:
            writer.begin_tensor(name, dtype, shape, attrs)
            for c in chunks:
                writer.write_chunk(c)
            writer.end_tensor()
    writer.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except cs.StreamError as e:
        sys.stderr.write(f"scale.py: {e}\n")
        sys.exit(65)
