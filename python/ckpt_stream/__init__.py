"""Read, write and filter ckpt streams (version 1) in Python.

The stream is what passes between ckpt-read, ckpt-slice, lora-merge, ckpt-write and any
stage a user inserts; its bytes are specified in docs/stream-format.md. This package needs
only the standard library; numpy (and ml_dtypes for BF16/F8 arrays) is used when present.

A filter (see docs/python.md and scripts/filters/), run as
``ckpt-read in.safetensors | python my_filter.py | ckpt-write out.safetensors``::

    import ckpt_stream as cs

    def main():
        with cs.Filter(producer="my-filter") as f:
            f.plan(lambda d: None if d.name.endswith("position_ids") else d.renamed(d.name.replace("gamma", "weight")))
            for t in f:
                if t.name.endswith(".bias"):
                    f.write(t.name, t.dtype, t.shape, t.array() * 0.5)
                else:
                    f.forward(t)

    cs.run(main)

Lower level: ``StreamReader`` (lazy ``tensors()``, or whole ``Tensor`` objects by
iterating it) and ``StreamWriter`` (``begin_tensor``/``write_chunk``/``forward_chunk``/
``end_tensor``, or ``write(tensor)``).
"""
from .arrays import (F8_E4M3_MAX, ML_DTYPES, NUMPY_DTYPES, Tensor, aligned_arrays, array_bytes, bf16_bits_to_f32,
                     f8e4m3fn_bits_to_f32, f32_to_bf16_bits, f32_to_f8e4m3fn_bits, from_array, numpy_dtype,
                     stream_dtype)
from .filter import Filter, run
from .format import (ALIGN, CHUNK, CHUNK_HEADER, CODEC_NONE, CODEC_ZLIB, CODEC_ZLIB_SHUFFLED, DEFAULT_CHUNK,
                     DTYPE_SIZES, END, FIRST_ANCILLARY, FLOAT_DTYPES, HEADER, KIND_NAMES, MAGIC, MANIFEST, MARKER,
                     MAX_CHUNK, MAX_SHUFFLE, MAX_SMALL_FRAME, TENSOR, TENSOR_END, VERSION, Descriptor, JSONNumber,
                     StreamError, UsageError, WriteError, dump_json, load_json, nbytes, shuffle, shuffle_width,
                     unshuffle)
from .reader import AncillaryFrame, Chunk, StreamReader, StreamTensor
from .writer import StreamWriter

__version__ = "1.0.0"

__all__ = [
    "Filter", "run", "StreamReader", "StreamWriter", "StreamTensor", "Chunk", "AncillaryFrame", "Tensor",
    "Descriptor", "StreamError", "WriteError", "UsageError", "JSONNumber",
    "from_array", "array_bytes", "aligned_arrays", "numpy_dtype", "stream_dtype",
    "f32_to_bf16_bits", "bf16_bits_to_f32", "f32_to_f8e4m3fn_bits", "f8e4m3fn_bits_to_f32", "F8_E4M3_MAX",
    "nbytes", "shuffle", "unshuffle", "shuffle_width", "load_json", "dump_json",
    "DTYPE_SIZES", "FLOAT_DTYPES", "NUMPY_DTYPES", "ML_DTYPES", "MAGIC", "VERSION", "ALIGN", "DEFAULT_CHUNK",
    "MAX_CHUNK", "MAX_SMALL_FRAME", "MAX_SHUFFLE", "CHUNK_HEADER", "MARKER", "FIRST_ANCILLARY", "KIND_NAMES",
    "HEADER", "MANIFEST", "TENSOR", "CHUNK", "TENSOR_END", "END", "CODEC_NONE", "CODEC_ZLIB", "CODEC_ZLIB_SHUFFLED",
]
