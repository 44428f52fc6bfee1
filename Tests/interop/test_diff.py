"""ckpt-diff: exit codes like cmp (0 equal, 1 different, 2 trouble) and what it reports."""
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from conftest import ROOT, run, shell

RNG = np.random.default_rng(11)


def files(tmp_path, a, b):
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return str(pa), str(pb)


def base():
    return {"w": RNG.standard_normal((8, 16)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
            "h": RNG.standard_normal(32).astype(ml_dtypes.bfloat16)}


def test_equal(tmp_path):
    t = base()
    a, b = files(tmp_path, t, dict(t))
    p = run(["ckpt-diff", a, b])
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(b"A: 3 tensors, B: 3; 3 in both: 3 equal, 0 not; 0 only in A, 0 only in B: equal\n")


def test_tiny_drift_within_tolerance(tmp_path):
    t = base()
    u = dict(t)
    u["w"] = t["w"] * np.float32(1 + 1e-7)
    a, b = files(tmp_path, t, u)
    p = run(["ckpt-diff", a, b])
    assert p.returncode == 1  # exact by default
    p = run(["ckpt-diff", "--rtol", "1e-6", a, b])
    assert p.returncode == 0, p.stdout
    j = json.loads(run(["ckpt-diff", "--json", "--rtol", "1e-6", a, b]).stdout)
    w = next(x for x in j["tensors"] if x["name"] == "w")
    assert j["equal"] and w["status"] == "equal" and 0 < w["max_abs"] < 1e-6 and w["cosine"] > 0.999999


def test_a_flipped_element(tmp_path):
    t = base()
    u = dict(t)
    u["w"] = t["w"].copy()
    u["w"][3, 7] = -u["w"][3, 7]
    a, b = files(tmp_path, t, u)
    p = run(["ckpt-diff", "--atol", "1e-3", a, b])
    assert p.returncode == 1
    line = next(l for l in p.stdout.decode().splitlines() if l.startswith("w "))
    assert "different (1 elements)" in line
    j = json.loads(run(["ckpt-diff", "--json", a, b]).stdout)
    w = next(x for x in j["tensors"] if x["name"] == "w")
    assert w["mismatched"] == 1 and abs(w["max_abs"] - 2 * abs(float(t["w"][3, 7]))) < 1e-6
    assert abs(w["max_rel"] - 2.0) < 1e-6


def test_a_missing_key_and_a_shape_mismatch(tmp_path):
    t = base()
    u = dict(t)
    del u["b"]
    u["extra"] = np.zeros(2, np.float32)
    u["w"] = t["w"].reshape(16, 8)
    a, b = files(tmp_path, t, u)
    p = run(["ckpt-diff", a, b])
    assert p.returncode == 1
    out = p.stdout.decode()
    assert "only in A: b\n" in out and "only in B: extra\n" in out
    assert "shape differs ([8, 16]/[16, 8])" in out
    assert out.endswith("1 only in A, 1 only in B: different\n")


def test_only_and_exclude_select_in_both_inputs(tmp_path):
    # The common case: a conversion dropped a buffer (position_ids) and renamed nothing else.
    t = base()
    t["embeddings.position_ids"] = np.arange(7, dtype=np.int64)[None]
    u = {k: v for k, v in t.items() if k != "embeddings.position_ids"}
    a, b = files(tmp_path, t, u)
    assert run(["ckpt-diff", a, b]).returncode == 1
    p = run(["ckpt-diff", "--exclude", "*.position_ids", a, b])
    assert p.returncode == 0, p.stdout
    assert p.stdout.endswith(b"A: 3 tensors, B: 3; 3 in both: 3 equal, 0 not; 0 only in A, 0 only in B: equal\n")
    # --only keeps what matches, in A and in B; stdin streams are selected the same way.
    u["w"] = u["w"] + 1
    a, b = files(tmp_path, t, u)
    p = shell(f"ckpt-read {a} | ckpt-diff --only 'h' --only 'b' - {b}")
    assert p.returncode == 0 and b"A: 2 tensors, B: 2; 2 in both: 2 equal" in p.stdout, p.stdout
    assert run(["ckpt-diff", "--only", "w", a, b]).returncode == 1
    # A pattern that selects nothing is a mistake, not "equal".
    p = run(["ckpt-diff", "--only", "encoder.*", a, b])
    assert p.returncode == 2 and f"--only 'encoder.*' selects no tensor of {a}" in p.stderr.decode(), p.stderr


def test_nan_inf_counts_and_dtype(tmp_path):
    t = {"x": np.array([1.0, np.nan, np.inf, -np.inf], np.float32)}
    u = {"x": np.array([1.0, np.nan, np.inf, -np.inf], np.float64)}
    a, b = files(tmp_path, t, u)
    p = run(["ckpt-diff", "--json", a, b])
    j = json.loads(p.stdout)["tensors"][0]
    assert p.returncode == 1 and j["status"] == "dtype differs"  # the values agree; the types do not
    assert (j["nan_a"], j["nan_b"], j["inf_a"], j["inf_b"]) == (1, 1, 2, 2)


def test_streams_in_another_order_and_trouble(tmp_path):
    t = base()
    a, b = files(tmp_path, t, t)
    # A as an .npz in insertion order (z, y, x), B a stream on stdin in safetensors' order.
    npz = tmp_path / "a.npz"
    np.savez(npz, z=np.arange(3.0), y=np.ones((2, 2), np.float32), x=np.int64(7))
    st = tmp_path / "s.safetensors"
    save_file({"x": np.array(7, np.int64), "y": np.ones((2, 2), np.float32), "z": np.arange(3.0)}, str(st))
    p = shell(f"ckpt-read '{st}' | ckpt-diff '{npz}' -")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.endswith(b"3 in both: 3 equal, 0 not; 0 only in A, 0 only in B: equal\n")
    assert run(["ckpt-diff", a, str(tmp_path / "missing.safetensors")]).returncode == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    p = run(["ckpt-diff", a, str(bad)])
    assert p.returncode == 2 and p.stderr.startswith(b"ckpt-diff: ")


def test_across_layouts_with_rules(tmp_path, minilm):
    flax = tmp_path / "flax.msgpack"
    rules = os.path.join(ROOT, "rules", "bert-torch-to-flax.rules")
    assert shell(f"ckpt-read '{minilm}' | ckpt-slice --rules '{rules}' | ckpt-write --format msgpack '{flax}'").returncode == 0
    p = run(["ckpt-diff", "--rules", rules, minilm, str(flax)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.endswith(b"103 in both: 103 equal, 0 not; 0 only in A, 0 only in B: equal\n")


def duplicate_stream(path):
    """A stream without a manifest in which "w" appears twice (what a hand-written filter can emit)."""
    import ckpt_stream as cs
    with open(path, "wb") as f:
        w = cs.StreamWriter(f, {"producer": "t", "source_format": "t"})
        w.write(cs.Tensor("w", "F32", (2,), np.ones(2, np.float32).tobytes()))
        w.write(cs.Tensor("w", "F32", (2,), np.ones(2, np.float32).tobytes()))
        w.close()


def test_a_name_twice_in_one_input_is_trouble(tmp_path):
    dup = tmp_path / "dup.ckpts"
    duplicate_stream(dup)
    other = tmp_path / "w.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(other))
    for args, side in (([str(dup), str(other)], str(dup)), ([str(other), "-"], "<stdin>")):
        p = run(["ckpt-diff", *args], input=dup.read_bytes() if "-" in args else None)
        err = p.stderr.decode()
        assert p.returncode == 2, (p.returncode, p.stdout, err)
        assert f"{side}: tensor w: tensor name appears twice in the stream" in err, err
        assert b"only in" not in p.stdout
    # ckpt-write without a manifest: the same error, not blamed on a manifest.
    p = run(["ckpt-write", str(tmp_path / "o.safetensors")], input=dup.read_bytes())
    err = p.stderr.decode().strip().splitlines()[-1]  # (after the note that it spools)
    assert p.returncode == 65 and "tensor name appears twice in the stream" in err and "manifest" not in err, err
    assert os.listdir(tmp_path) == ["dup.ckpts", "w.safetensors"]
