#!/usr/bin/env python3
"""Multiply every floating-point tensor whose name matches GLOB by FACTOR.

Usage: scale.py GLOB FACTOR

    ckpt-read model.safetensors | scripts/filters/scale.py 'encoder.*.bias' 0.5 | ckpt-write out.safetensors

GLOB is an fnmatch pattern over whole names ('*' crosses dots). Matching F16, BF16, F32
and F64 tensors are scaled chunk by chunk in their own precision (BF16 through float32,
rounded to nearest even) and keep their dtype, shape and attributes; every other tensor
passes through untouched, its chunks byte for byte (still compressed). The manifest is
unchanged. Needs numpy.
"""
import fnmatch
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import numpy as np  # noqa: E402
import ckpt_stream as cs  # noqa: E402

FLOATS = ("F16", "F32", "F64", "BF16")


def scaled(pieces, dtype, factor):
    """Scales element-aligned numpy pieces of a tensor. BF16 arrives and leaves as uint16 bit
    patterns (sent as bytes, which Filter.write takes as they are), so ml_dtypes is not needed."""
    for a in pieces:
        if dtype == "BF16":
            yield cs.f32_to_bf16_bits(cs.bf16_bits_to_f32(a) * np.float32(factor)).tobytes()
        else:
            yield a * a.dtype.type(factor)


def main():
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__)
        return 64
    pattern, factor = sys.argv[1], float(sys.argv[2])
    with cs.Filter(producer="scale.py") as f:
        for t in f:
            if t.dtype in FLOATS and fnmatch.fnmatchcase(t.name, pattern):
                pieces = t.arrays("<u2" if t.dtype == "BF16" else None)
                f.write(t.name, t.dtype, t.shape, scaled(pieces, t.dtype, factor), attributes=t.attributes)
            else:
                f.forward(t)
    return 0


if __name__ == "__main__":
    cs.run(main, "scale.py")
