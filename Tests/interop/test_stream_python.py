"""The Python implementation of the stream (python/ckpt_stream) against the Swift one."""
import io
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ckpt_stream as cs
from conftest import ROOT, run, shell

GOLDEN = os.path.join(ROOT, "Tests", "SharedTests", "Golden")


def test_python_writer_reproduces_the_golden_files(tmp_path):
    # make_golden.py regenerates them; they must be identical to what is committed
    # (which the Swift writer also reproduces, in the Swift tests).
    subprocess.run([sys.executable, os.path.join(GOLDEN, "make_golden.py"), str(tmp_path)], check=True)
    for name in ("tiny.ckpts", "chunked.ckpts", "all-dtypes.ckpts", "chunked-zlib.ckpts", "bytes-zlib.ckpts"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(GOLDEN, name), "rb").read(), name


@pytest.mark.parametrize("compress", [None, "zlib", "zlib:9"])
def test_python_reads_what_swift_writes(minilm, compress):
    args = ["ckpt-read", minilm] + (["--compress", compress] if compress else [])
    stream = run(args, check=True).stdout
    r = cs.StreamReader(io.BytesIO(stream))
    ref = load_file(minilm)
    assert r.header["source_format"] == "safetensors"
    assert r.header["metadata"] == {"format": "pt"}
    assert [m[0] for m in r.manifest] == [t.name for t in cs.StreamReader(io.BytesIO(stream))]
    for t in r:
        assert np.array_equal(t.array(), ref[t.name])


def test_swift_reads_what_python_writes(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a/b": rng.standard_normal((33, 17)).astype(np.float32), "c": np.arange(10**5, dtype=np.int64),
              "h": rng.standard_normal(5).astype(ml_dtypes.bfloat16)}
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "py", "source_format": "numpy", "metadata": {"epoch": 3}},
                        manifest=[(k, cs.from_array(k, v).dtype, v.shape) for k, v in arrays.items()],
                        compress=1, chunk_size=1000)
    for k, v in arrays.items():
        w.write(cs.from_array(k, v))
    w.close()
    out = tmp_path / "o.safetensors"
    p = run(["ckpt-write", str(out)], input=buf.getvalue())
    assert p.returncode == 0, p.stderr
    back = load_file(str(out))
    for k, v in arrays.items():
        assert back[k].tobytes() == v.tobytes()
    from safetensors import safe_open
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == {"epoch": "3", "format": "pt"}


def test_python_reader_refuses_truncation_and_corruption(minilm):
    stream = run(["ckpt-read", "--only", "pooler.*", minilm], check=True).stdout
    with pytest.raises(cs.StreamError, match="truncated"):
        list(cs.StreamReader(io.BytesIO(stream[:-64])))
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(cs.StreamError):
        list(cs.StreamReader(io.BytesIO(bytes(bad))))


def test_bf16_rounding_matches_ml_dtypes():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5e-39, 3.4e38, np.inf, -np.inf, np.nan, 1e-45, 65504.0], np.float32)
    x = np.concatenate([x, np.random.default_rng(2).standard_normal(10000).astype(np.float32) * 1e3])
    ours = cs.f32_to_bf16_bits(x)
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.isnan(cs.bf16_bits_to_f32(ours[nan])).all()


def test_filter_in_the_middle_of_a_pipeline(minilm, tmp_path):
    out = tmp_path / "scaled.safetensors"
    p = shell(f"ckpt-read {minilm} | python scripts/filters/scale.py '*.LayerNorm.*' 2 | ckpt-write {out}", cwd=ROOT)
    assert p.returncode == 0, p.stderr
    ref, got = load_file(minilm), load_file(str(out))
    assert got.keys() == ref.keys()
    for k in ref:
        expected = ref[k] * np.float32(2) if ".LayerNorm." in k else ref[k]
        assert np.array_equal(got[k], expected), k


def test_filter_scales_bf16_with_round_to_nearest_even(tmp_path):
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32).astype(ml_dtypes.bfloat16)
    src = tmp_path / "b.safetensors"
    save_file({"x": x}, str(src))
    out = tmp_path / "o.safetensors"
    p = shell(f"ckpt-read {src} | python scripts/filters/scale.py x 0.3 | ckpt-write {out}", cwd=ROOT)
    assert p.returncode == 0, p.stderr
    expected = (x.astype(np.float32) * np.float32(0.3)).astype(ml_dtypes.bfloat16)
    assert load_file(str(out))["x"].view(np.uint16).tolist() == expected.view(np.uint16).tolist()
