"""Flax msgpack checkpoints, against the real flax.serialization."""
import io
import struct

import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax import serialization

import ckpt_stream as cs
from conftest import run, shell

EX_DATAERR = 65


def tree():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Dense_0": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
            "Embed_0": {"embedding": jnp.asarray(rng.standard_normal((5, 2)), dtype=jnp.bfloat16)},
            "layers": [{"w": np.arange(6, dtype=np.int32).reshape(2, 3)}, {"w": np.ones((2, 3), np.int32)}],
        },
        "mask": np.array([True, False]),
        "scale": np.array(2.5, np.float32),
        "f16": np.arange(3, dtype=np.float16),
    }


def flat(t, prefix=""):
    out = {}
    for k, v in (t.items() if isinstance(t, dict) else enumerate(t)):
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            out.update(flat(v, name))
        else:
            out[name] = np.asarray(v)
    return out


def read(path, *args):
    p = run(["ckpt-read", *args, str(path)])
    assert p.returncode == 0, p.stderr.decode()
    r = cs.StreamReader(io.BytesIO(p.stdout))
    return r, {t.name: t for t in r}


def test_reads_what_flax_writes(tmp_path):
    t = tree()
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(serialization.to_bytes(t))
    r, ours = read(path)
    expected = flat(t)
    assert list(ours) == list(expected)
    for k, v in expected.items():
        assert list(ours[k].shape) == list(v.shape) and ours[k].data == v.tobytes(), k
    assert ours["params/Embed_0/embedding"].dtype == "BF16"
    assert r.header["source_format"] == "flax-msgpack"


def test_flax_restores_what_we_write_and_bytes_round_trip(tmp_path):
    t = tree()
    src = tmp_path / "in.msgpack"
    src.write_bytes(serialization.to_bytes(t))
    out = tmp_path / "out.msgpack"
    p = shell(f"ckpt-read {src} | ckpt-write {out}")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == src.read_bytes()  # same encoder choices as flax + msgpack-python
    back = serialization.msgpack_restore(out.read_bytes())
    restored = serialization.from_bytes(t, out.read_bytes())
    for k, v in flat(t).items():
        assert np.array_equal(np.asarray(flat(restored)[k]), v), k
    assert set(flat(back)) == set(flat(t))


def test_chunked_arrays_both_ways(tmp_path, monkeypatch):
    big = np.arange(3000, dtype=np.float32).reshape(30, 100)
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 1000)
    data = serialization.to_bytes({"w": big, "b": np.ones(4, np.float32)})
    assert b"__msgpack_chunked_array__" in data
    src = tmp_path / "chunked.msgpack"
    src.write_bytes(data)
    _, ours = read(src)
    assert ours["w"].data == big.tobytes() and list(ours["w"].shape) == [30, 100]
    out = tmp_path / "out.msgpack"
    p = shell(f"ckpt-read {src} | ckpt-write --msgpack-chunk 1000 {out}")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == data
    restored = serialization.msgpack_restore(out.read_bytes())
    assert np.array_equal(restored["w"], big)


def test_real_model_to_msgpack_and_back(minilm, tmp_path):
    from safetensors.numpy import load_file
    out = tmp_path / "m.msgpack"
    assert shell(f"ckpt-read {minilm} | ckpt-write {out}").returncode == 0
    restored = serialization.msgpack_restore(out.read_bytes())
    ref = load_file(minilm)
    assert set(restored) == set(ref)  # safetensors names have no "/": one flat map
    for k, v in ref.items():
        assert np.array_equal(restored[k], v), k
    again = tmp_path / "again.safetensors"
    assert shell(f"ckpt-read {out} | ckpt-write {again}").returncode == 0
    assert again.read_bytes() == open(minilm, "rb").read()


def test_nested_names_with_a_separator(tmp_path):
    src = tmp_path / "in.safetensors"
    from safetensors.numpy import save_file
    save_file({"encoder.layer.0.w": np.ones(2, np.float32), "encoder.layer.1.w": np.zeros(2, np.float32)}, str(src))
    out = tmp_path / "o.msgpack"
    assert shell(f"ckpt-read {src} | ckpt-write --sep . {out}").returncode == 0
    back = serialization.msgpack_restore(out.read_bytes())
    assert np.array_equal(back["encoder"]["layer"]["1"]["w"], np.zeros(2, np.float32))


def ext_array(shape, dtype, data):
    return msgpack.ExtType(1, msgpack.packb((tuple(shape), dtype, data)))


@pytest.mark.parametrize("content,needle", [
    (msgpack.packb({"w": ext_array((2, 3), "float32", b"\0" * 20)}), "needs 24 bytes"),
    (msgpack.packb({"w": ext_array((2,), "float128", b"\0" * 32)}), "float128"),
    (msgpack.packb({"w": ext_array((2**40, 2**40), "float64", b"")}), "overflow"),
    (msgpack.packb({"w": msgpack.ExtType(9, b"x")}), "ext type 9"),
    (msgpack.packb({"w": ext_array((2,), "float32", b"\0" * 8)})[:-3], "truncated"),
    (b"\xdf\xff\xff\xff\xff", "more than the bytes left"),
], ids=["shape-vs-bytes", "dtype", "overflow", "ext-type", "truncated", "huge-map"])
def test_bad_msgpack_is_refused(tmp_path, content, needle):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(content)
    p = run(["ckpt-read", "--list", str(path)])
    assert p.returncode == EX_DATAERR, p.stderr
    assert needle.encode() in p.stderr and len(p.stderr.strip().splitlines()) == 1
    out = tmp_path / "o.safetensors"
    assert shell(f"ckpt-read {path} | ckpt-write {out}").returncode == EX_DATAERR
    assert not out.exists()


def test_without_a_manifest_the_writer_spools(tmp_path):
    from conftest import ROOT
    t = tree()
    src = tmp_path / "in.msgpack"
    src.write_bytes(serialization.to_bytes(t))
    relay = ("import sys; sys.path.insert(0, 'python'); import ckpt_stream as cs;"
             "r = cs.StreamReader(sys.stdin.buffer); w = cs.StreamWriter(sys.stdout.buffer, r.header);"
             "[w.write(x) for x in r]; w.close()")
    out = tmp_path / "out.msgpack"
    p = shell(f"ckpt-read {src} | python -c \"{relay}\" | ckpt-write {out}", cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert b"spool" in p.stderr
    assert out.read_bytes() == src.read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.msgpack", "out.msgpack"]
