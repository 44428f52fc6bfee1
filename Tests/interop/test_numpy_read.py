"""Reading NumPy .npy/.npz files written by the real numpy, compared bit for bit."""
import io

import ml_dtypes
import numpy as np
import pytest

import ckpt_stream as cs
from conftest import run, shell

EX_DATAERR, EX_USAGE = 65, 64

ARRAYS = {
    "f32": np.arange(12, dtype="<f4").reshape(3, 4) / 7, "f16": np.array([1.5, -2], "<f2"), "f64": np.array([np.pi]),
    "i64": np.array([-1, 2**40]), "i32": np.array([7], "<i4"), "i16": np.array([-2], "<i2"), "i8": np.array([-128], "i1"),
    "u8": np.arange(5, dtype="u1"), "u16": np.array([65535], "<u2"), "u32": np.array([1], "<u4"), "u64": np.array([2**63], "<u8"),
    "bool": np.array([True, False]), "c64": np.array([1 + 2j], "<c8"), "scalar": np.array(2.5, "<f4"), "empty": np.zeros((0, 2), "<f4"),
}


def read(path, *args):
    p = run(["ckpt-read", *args, str(path)])
    assert p.returncode == 0, p.stderr.decode()
    r = cs.StreamReader(io.BytesIO(p.stdout))
    return r, {t.name: t for t in r}


def check(ours, name, expected, dtype=None):
    t = ours[name]
    want = np.asarray(expected).copy(order="C")
    if want.dtype.byteorder == ">":
        want = want.astype(want.dtype.newbyteorder("<"))
    assert list(t.shape) == list(want.shape), name
    assert t.data == want.tobytes(), name
    if dtype:
        assert t.dtype == dtype


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_npy_every_dtype(tmp_path, name):
    path = tmp_path / f"{name}.npy"
    np.save(path, ARRAYS[name])
    r, ours = read(path)
    check(ours, name, ARRAYS[name])
    assert r.header["source_format"] == "npy"


def test_fortran_order_and_big_endian_become_c_order_little_endian(tmp_path):
    a = np.asfortranarray(np.arange(24, dtype="<f4").reshape(2, 3, 4))
    np.save(tmp_path / "f.npy", a)
    _, ours = read(tmp_path / "f.npy")
    check(ours, "f", a, "F32")
    b = np.arange(6, dtype=">i8").reshape(2, 3)
    np.save(tmp_path / "b.npy", b)
    _, ours = read(tmp_path / "b.npy")
    check(ours, "b", b, "I64")
    c = np.asfortranarray(np.arange(6, dtype=">f4").reshape(2, 3))
    np.save(tmp_path / "c.npy", c)
    _, ours = read(tmp_path / "c.npy")
    check(ours, "c", c, "F32")


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_versions(tmp_path, version):
    a = np.arange(10, dtype="<f8")
    with open(tmp_path / "v.npy", "wb") as f:
        np.lib.format.write_array(f, a, version=version)
    _, ours = read(tmp_path / "v.npy")
    check(ours, "v", a)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_stored_and_deflated(tmp_path, compressed):
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "a.npz", *[ARRAYS["f32"]], **{k: v for k, v in ARRAYS.items()})
    r, ours = read(tmp_path / "a.npz")
    assert r.header["source_format"] == "npz"
    check(ours, "arr_0", ARRAYS["f32"])
    for k, v in ARRAYS.items():
        check(ours, k, v)
    # The same arrays written as safetensors read back equal in numpy.
    from safetensors.numpy import load_file
    out = tmp_path / "o.safetensors"
    assert shell(f"ckpt-read {tmp_path / 'a.npz'} | ckpt-write {out}").returncode == 0
    back = load_file(str(out))
    for k, v in ARRAYS.items():
        assert np.array_equal(back[k], v), k


def test_bfloat16_needs_a_hint(tmp_path):
    a = np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "w.npy", a)
    assert b"<V2" in (tmp_path / "w.npy").read_bytes()[:128]
    p = run(["ckpt-read", "--list", str(tmp_path / "w.npy")])
    assert p.returncode == EX_DATAERR and b"--dtype-hint" in p.stderr
    _, ours = read(tmp_path / "w.npy", "--dtype-hint", "*=BF16")
    assert ours["w"].dtype == "BF16" and ours["w"].data == a.tobytes()
    assert run(["ckpt-read", "--dtype-hint", "w=F32", str(tmp_path / "w.npy")]).returncode == EX_DATAERR
    assert run(["ckpt-read", "--dtype-hint", "nonsense", str(tmp_path / "w.npy")]).returncode == EX_USAGE


def test_object_arrays_and_bad_files_are_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    p = run(["ckpt-read", str(tmp_path / "o.npy")])
    assert p.returncode == EX_DATAERR and b"object arrays are refused" in p.stderr
    np.save(tmp_path / "t.npy", np.arange(100, dtype="<f4"))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-8])
    p = run(["ckpt-read", str(tmp_path / "t.npy")])
    assert p.returncode == EX_DATAERR and b"needs 400" in p.stderr
    (tmp_path / "x.npy").write_bytes(data + b"junk")
    p = run(["ckpt-read", str(tmp_path / "x.npy")])
    assert p.returncode == EX_DATAERR and b"after the array" in p.stderr
    (tmp_path / "h.npy").write_bytes(data[:10] + b"{'descr': '<f4', 'evil': __import__('os')}\n")
    p = run(["ckpt-read", str(tmp_path / "h.npy")])
    assert p.returncode == EX_DATAERR
