#!/usr/bin/env python3
"""Quantize floating-point tensors whose name matches GLOB to float8 (e4m3fn), per tensor.

Usage: fp8.py GLOB

    ckpt-read model.safetensors | scripts/filters/fp8.py '*.weight' | ckpt-write out.safetensors

Each matching F16, BF16, F32 or F64 tensor NAME becomes NAME as F8_E4M3 (torch's
float8_e4m3fn; same shape and attributes) followed by NAME.scale, a float32 scalar, so that
NAME ~= float32(NAME) * NAME.scale. The scale maps the tensor's largest magnitude to 448,
the largest e4m3fn value: scale = float32(max|x|) / 448 (1 for an all-zero tensor); values
are divided by it in float32 and rounded to nearest even, bit for bit as ml_dtypes'
float8_e4m3fn does. A tensor with an infinity or NaN is refused. Every other tensor passes
through untouched (chunks byte for byte, still compressed); the manifest lists the new
tensors. A matching tensor is held in memory while it is quantized (its maximum must be
known first). Needs numpy (not ml_dtypes).
"""
import fnmatch
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import numpy as np  # noqa: E402
import ckpt_stream as cs  # noqa: E402

FLOATS = ("F16", "BF16", "F32", "F64")


def quantize(x):
    """float32 array -> (float8_e4m3fn bit patterns, float32 scale)."""
    amax = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
    scale = amax / np.float32(cs.F8_E4M3_MAX) if amax > 0 else np.float32(1)
    if scale == 0:  # max|x| below 448 x the smallest float32: the values round to zero anyway
        scale = np.float32(1)
    return cs.f32_to_f8e4m3fn_bits(x / scale), scale


def main():
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        return 64
    pattern = sys.argv[1]

    def matches(d):
        return d.dtype in FLOATS and fnmatch.fnmatchcase(d.name, pattern)

    with cs.Filter(producer="fp8.py") as f:
        f.plan(lambda d: [d.with_dtype("F8_E4M3"), cs.Descriptor(d.name + ".scale", "F32", ())] if matches(d) else d)
        for t in f:
            if not matches(t.descriptor):
                f.forward(t)
                continue
            if t.dtype == "BF16":
                x = cs.bf16_bits_to_f32(t.array("<u2"))
            else:
                x = t.array().astype(np.float32)
            if not np.isfinite(x).all():
                raise cs.StreamError("has an infinity or NaN: fp8.py quantizes finite values only", tensor=t.name)
            q, scale = quantize(x)
            f.write(t.name, "F8_E4M3", t.shape, q.tobytes(), attributes=t.attributes)
            f.write(t.name + ".scale", "F32", (), np.float32(scale))
    return 0


if __name__ == "__main__":
    cs.run(main, "fp8.py")
