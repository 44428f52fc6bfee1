"""Whole tensors, and the numpy side: dtype mapping, element-aligned views of chunked data,
array -> stream bytes (BF16 and F8_E4M3 rounded to nearest even, as ml_dtypes does, without
needing it). numpy is imported only when these functions are called."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from .format import DTYPE_SIZES, StreamError, UsageError, WriteError, nbytes

#: numpy dtype strings for the types numpy has natively.
NUMPY_DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "C64": "<c8", "F64": "<f8", "I64": "<i8", "U64": "<u8",
}

#: ml_dtypes type names for the types numpy lacks.
ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
             "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


def numpy_dtype(dtype: str, override=None):
    """The numpy dtype for stream dtype `dtype`. Types numpy lacks (BF16, F8_*) come from
    ml_dtypes; without it, pass `override` (e.g. "<u2" to see BF16 as bit patterns), which
    must have the same element size."""
    import numpy as np
    if dtype not in DTYPE_SIZES:
        raise StreamError(f"unknown dtype {dtype!r}")
    if override is not None:
        dt = np.dtype(override)
        if dt.itemsize != DTYPE_SIZES[dtype]:
            raise UsageError(f"numpy dtype {dt} has {dt.itemsize}-byte elements, {dtype} has {DTYPE_SIZES[dtype]}")
        return dt
    if dtype in NUMPY_DTYPES:
        return np.dtype(NUMPY_DTYPES[dtype])
    try:
        import ml_dtypes
    except ImportError:
        raise UsageError(f"numpy has no {dtype}: install ml_dtypes, or pass a numpy dtype of the same size "
                         "(e.g. '<u2' or '|u1') to see the bit patterns") from None
    return np.dtype(getattr(ml_dtypes, ML_DTYPES[dtype]))


def stream_dtype(np_dtype) -> str:
    """The stream dtype name for a numpy (or ml_dtypes) dtype; StreamError if there is none."""
    import numpy as np
    dt = np.dtype(np_dtype)
    for name, ml in ML_DTYPES.items():
        if dt.name == ml:
            return name
    key = dt.newbyteorder("<").str if dt.byteorder == ">" else dt.str
    for name, s in NUMPY_DTYPES.items():
        if np.dtype(s).str == key:
            return name
    raise StreamError(f"no stream dtype for numpy {dt}")


def aligned_arrays(chunks: Iterable, dtype: str, numpy_dtype_=None):
    """Yields flat numpy arrays of whole elements from byte chunks that may split elements:
    the bytes of a split element are carried over to the next array. One array per chunk
    (none for a chunk holding less than one element); zero-copy views of the chunk unless
    an element was carried into it. StreamError if bytes are left over at the end."""
    import numpy as np
    dt = numpy_dtype(dtype, numpy_dtype_)
    size = dt.itemsize
    carry = b""
    for data in chunks:
        if carry:
            data = carry + bytes(data)
        n = len(data) - len(data) % size
        if n:
            yield np.frombuffer(data, dtype=dt, count=n // size)
        carry = bytes(data[n:])
    if carry:
        raise StreamError(f"{len(carry)} bytes left over at the end, less than one {dtype} element")


def array_bytes(array, dtype: str) -> bytes:
    """The bytes of `array` (row-major, little-endian) as stream dtype `dtype`.

    Converting to BF16 or F8_E4M3 goes through float32 and rounds to nearest even, bit for
    bit as ml_dtypes does (which is not needed); to other dtypes, numpy's cast (``astype``);
    an array already of the dtype (or of raw void elements of its size) is taken as is."""
    import numpy as np
    a = np.asarray(array)
    if dtype not in DTYPE_SIZES:
        raise WriteError(f"unknown dtype {dtype!r}")
    size = DTYPE_SIZES[dtype]
    if a.dtype.kind == "V" and a.dtype.itemsize == size or a.dtype.name == ML_DTYPES.get(dtype):
        return np.ascontiguousarray(a).tobytes()
    if dtype == "BF16":
        return f32_to_bf16_bits(a.astype("<f4")).tobytes()
    if dtype == "F8_E4M3":
        return f32_to_f8e4m3fn_bits(a.astype("<f4")).tobytes()
    return np.ascontiguousarray(a, dtype=numpy_dtype(dtype)).tobytes()


@dataclass
class Tensor:
    """A whole tensor in memory: little-endian, row-major bytes."""
    name: str
    dtype: str
    shape: tuple
    data: bytes
    attributes: dict = field(default_factory=dict)

    def array(self, numpy_dtype_=None):
        """The data as a numpy array of the tensor's shape (BF16 and F8 need ml_dtypes, or
        pass a same-size numpy dtype for the bit patterns)."""
        import numpy as np
        return np.frombuffer(self.data, dtype=numpy_dtype(self.dtype, numpy_dtype_)).reshape(self.shape)


def from_array(name: str, array, dtype: Optional[str] = None, attributes: Optional[dict] = None) -> Tensor:
    """A Tensor from a numpy array; `dtype` names the stream dtype (default: the array's).
    Conversions as ``array_bytes`` (BF16, F8_E4M3: round to nearest even)."""
    import numpy as np
    a = np.asarray(array)
    if dtype is None:
        dtype = stream_dtype(a.dtype)
    data = array_bytes(a, dtype)
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
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    import numpy as np
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


#: Largest finite float8_e4m3fn value.
F8_E4M3_MAX = 448.0


def f32_to_f8e4m3fn_bits(a):
    """float32 array -> uint8 float8_e4m3fn bit patterns (torch's float8_e4m3fn, the stream's
    F8_E4M3), rounding to nearest even like ml_dtypes: magnitudes from 464 up, infinities
    and NaN become NaN (0x7F, sign kept); there is no infinity and no saturation."""
    import numpy as np
    x = np.ascontiguousarray(a, dtype="<f4")
    u = x.view("<u4")
    sign = ((u >> 24) & 0x80).astype(np.uint8)
    mag = u & np.uint32(0x7FFFFFFF)
    # Normal results (|x| >= 2**-6): keep 3 of float32's 23 mantissa bits, round to nearest
    # even, rebias the exponent from 127 to 7. Anything past 448 lands on 0x7F or beyond: NaN.
    rounded = (mag + (np.uint32(0x7FFFF) + ((mag >> 20) & np.uint32(1)))) >> 20
    normal = np.minimum(rounded.astype(np.int64) - ((127 - 7) << 3), 0x7F)
    # Subnormal results: multiples of 2**-9, rint rounds half to even; 8 is 2**-6 = 0x08.
    small = mag < np.uint32(0x3C800000)
    sub = np.rint(np.where(small, np.abs(x), np.float32(0)) * np.float32(512)).astype(np.int64)
    bits = np.where(small, sub, normal)
    return (bits.astype(np.uint8) | sign).reshape(x.shape)


def f8e4m3fn_bits_to_f32(bits):
    """uint8 float8_e4m3fn bit patterns -> float32 (exact; 0x7F/0xFF are NaN)."""
    import numpy as np
    b = np.asarray(bits, dtype=np.uint8)
    e = ((b >> 3) & 0xF).astype(np.int32)
    m = (b & 7).astype(np.float32)
    mag = np.where(e == 0, np.ldexp(m, -9), np.ldexp(m + 8, e - 10)).astype(np.float32)
    mag = np.where((b & 0x7F) == 0x7F, np.float32(np.nan), mag)
    return np.where(b & 0x80, -mag, mag).astype(np.float32)
