"""What ckpt-write --format orbax writes, restored by the real orbax."""
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import run, shell

EX_CANTCREAT, EX_DATAERR = 73, 65


def restore_both(path):
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(path), ocp.PyTreeCheckpointer().restore(path)


def test_real_model_through_orbax_and_back_is_byte_identical(minilm, tmp_path):
    ckpt = str(tmp_path / "orbax")
    p = shell(f"ckpt-read {minilm} | ckpt-write --format orbax {ckpt}")
    assert p.returncode == 0, p.stderr
    ref = load_file(minilm)
    for restored in restore_both(ckpt):
        assert set(restored) == set(ref)  # safetensors names have no "/": one flat dict
        for k, v in ref.items():
            assert np.array_equal(np.asarray(restored[k]), v), k
    back = tmp_path / "back.safetensors"
    assert shell(f"ckpt-read {ckpt} | ckpt-write {back}").returncode == 0
    assert back.read_bytes() == open(minilm, "rb").read()


def test_nested_tree_dtypes_and_chunking(tmp_path):
    arrays = {"params/Dense_0/kernel": np.arange(70, dtype=np.float32).reshape(10, 7),
              "params/Dense_0/bias": np.ones(7, np.float32),
              "params/emb": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
              "step": np.array(7, np.int32), "mask": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)}
    src = tmp_path / "in.safetensors"
    save_file(arrays, str(src))
    ckpt = str(tmp_path / "ckpt")
    # 100-byte chunks: the 280-byte kernel becomes 4 chunks of 3 rows, the last one padded.
    p = shell(f"ckpt-read {src} | ckpt-write --format orbax --orbax-chunk 100 {ckpt}")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(os.path.join(ckpt, "params.Dense_0.kernel"))) == [".zarray", "0.0", "1.0", "2.0", "3.0"]
    for restored in restore_both(ckpt):
        assert np.array_equal(np.asarray(restored["params"]["Dense_0"]["kernel"]), arrays["params/Dense_0/kernel"])
        assert np.asarray(restored["params"]["emb"]).tobytes() == arrays["params/emb"].tobytes()
        assert int(np.asarray(restored["step"])) == 7
        assert np.asarray(restored["empty"]).shape == (0, 3)
    _, ours = None, run(["ckpt-read", "--list", ckpt]).stdout.decode()
    assert "params/Dense_0/kernel" in ours


def test_existing_output_and_failed_runs(tmp_path, minilm):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "keep").write_text("x")
    stream = run(["ckpt-read", "--only", "pooler.*", minilm]).stdout
    p = run(["ckpt-write", "--format", "orbax", str(ckpt)], input=stream)
    assert p.returncode == EX_CANTCREAT and (ckpt / "keep").exists()
    p = run(["ckpt-write", "--format", "orbax", "--force", str(ckpt)], input=stream)
    assert p.returncode == 0 and not (ckpt / "keep").exists() and (ckpt / "_METADATA").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    other = tmp_path / "other"
    p = run(["ckpt-write", "--format", "orbax", str(other)], input=stream[:-64])
    assert p.returncode == EX_DATAERR
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no output, no temporary folder


def test_interrupted_orbax_write_leaves_no_folder(tmp_path, minilm):
    import signal
    import subprocess
    import time
    from conftest import tool
    stream = run(["ckpt-read", "--only", "encoder.layer.0.*", minilm]).stdout
    out = tmp_path / "ckpt"
    proc = subprocess.Popen([tool("ckpt-write"), "--format", "orbax", str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(stream[:-64])  # all but the end frame: every array folder exists, the run waits
    proc.stdin.flush()
    for _ in range(100):
        tmp = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if tmp and any(tmp[0].iterdir()):
            break
        time.sleep(0.05)
    assert tmp and len(list(tmp[0].iterdir())) > 3, "the temporary folder never filled"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
