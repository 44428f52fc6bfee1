"""safetensors in and out, checked with the real safetensors library and a real model."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import run, shell


def test_real_model_round_trips_byte_identical(minilm, tmp_path):
    out = tmp_path / "out.safetensors"
    p = shell(f"ckpt-read {minilm} | ckpt-write {out}")
    assert p.returncode == 0, p.stderr
    assert open(minilm, "rb").read() == out.read_bytes()


def test_real_model_round_trips_through_compressed_saved_stream(minilm, tmp_path):
    saved = tmp_path / "m.ckpts"
    assert shell(f"ckpt-read --compress zlib:6 {minilm} -o {saved}").returncode == 0
    assert saved.stat().st_size < os.path.getsize(minilm)
    out = tmp_path / "out.safetensors"
    p = run(["ckpt-write", str(out), "--input", str(saved)])
    assert p.returncode == 0, p.stderr
    assert open(minilm, "rb").read() == out.read_bytes()


def test_list_matches_the_safetensors_library(minilm):
    p = run(["ckpt-read", "--list", minilm], check=True)
    lines = p.stdout.decode().splitlines()
    rows = [l.split() for l in lines[1:-1]]
    with safe_open(minilm, framework="numpy") as f:
        names = list(f.keys())
        assert sorted(r[0] for r in rows) == sorted(names)
        assert len(rows) == 104
        for name, dtype, shape, nbytes in rows:
            t = f.get_slice(name)
            assert dtype == t.get_dtype()
            assert json.loads(shape) == t.get_shape()
            assert int(nbytes) == int(np.prod(t.get_shape(), dtype=np.int64)) * (8 if dtype == "I64" else 4)
    total = sum(int(r[3]) for r in rows)
    assert lines[-1].startswith(f"104 tensors, {total} bytes")


def test_every_numpy_dtype_and_metadata_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 4)), "f32": rng.standard_normal((5,)).astype(np.float32),
        "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "bf16": rng.standard_normal((7,)).astype(np.float32).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "i32": np.array([-1, 2**31 - 1], np.int32),
        "i16": np.array([-3], np.int16), "i8": np.array([-128, 127], np.int8), "u8": np.arange(9, dtype=np.uint8),
        "u16": np.array([65535], np.uint16), "u32": np.array([7], np.uint32), "u64": np.array([2**64 - 1], np.uint64),
        "bool": np.array([True, False, True]), "c64": np.array([1 + 2j], np.complex64),
        "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 4), np.float32),
    }
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src), metadata={"format": "np", "note": "héllo \"quoted\""})
    out = tmp_path / "out.safetensors"
    assert shell(f"ckpt-read {src} | ckpt-write {out}").returncode == 0
    assert src.read_bytes() == out.read_bytes()
    back = load_file(str(out))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes()
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == {"format": "np", "note": "héllo \"quoted\""}


def test_only_and_exclude_select_tensors(minilm, tmp_path):
    out = tmp_path / "enc.safetensors"
    p = shell(f"ckpt-read --only 'encoder.layer.0.*' --exclude '*.bias' {minilm} | ckpt-write {out}")
    assert p.returncode == 0, p.stderr
    got = load_file(str(out))
    ref = load_file(minilm)
    expected = [k for k in ref if k.startswith("encoder.layer.0.") and not k.endswith(".bias")]
    assert sorted(got) == sorted(expected) and len(expected) == 8
    for k in expected:
        assert np.array_equal(got[k], ref[k])
    # A selection that keeps nothing (a mistyped pattern) is a usage error, not an empty file.
    empty = tmp_path / "empty.safetensors"
    p = shell(f"ckpt-read --only 'encoder.layer.0*' --exclude 'encoder*' {minilm} | ckpt-write {empty}")
    err = p.stderr.decode()
    assert p.returncode != 0 and not empty.exists(), err
    assert "selects no tensor" in err and "--only 'encoder.layer.0*'" in err, err
    assert run(["ckpt-read", "--list", "--only", "nothing*", minilm]).returncode == 64


def test_sharded_write_follows_hugging_face(minilm, tmp_path):
    out = tmp_path / "sharded"
    out.mkdir()
    p = shell(f"ckpt-read {minilm} | ckpt-write --max-shard-size 20MB {out}")
    assert p.returncode == 0, p.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ref = load_file(minilm)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())
    assert sorted(index["weight_map"]) == sorted(ref)
    # Same split as huggingface_hub's own algorithm, given the tensors in file order.
    order = [r.split()[0] for r in run(["ckpt-read", "--list", minilm]).stdout.decode().splitlines()[1:-1]]
    split = split_state_dict_into_shards_factory({k: ref[k] for k in order}, get_storage_size=lambda a: a.nbytes,
                                                 filename_pattern="model{suffix}.safetensors", max_shard_size="20MB")
    assert index["weight_map"] == split.tensor_to_filename
    files = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert files == sorted(split.filename_to_tensors)
    # The index text is what transformers writes: json.dumps(indent=2, sort_keys=True) + newline.
    assert (out / "model.safetensors.index.json").read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for name in files:
        with safe_open(str(out / name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert index["weight_map"][k] == name
                assert np.array_equal(f.get_tensor(k), ref[k])
    # Reading the shards back (by folder and by index) gives the original tensors.
    again = tmp_path / "again.safetensors"
    for src in (out, out / "model.safetensors.index.json"):
        assert shell(f"ckpt-read {src} | ckpt-write --force {again}").returncode == 0
        assert load_file(str(again)).keys() == ref.keys()
        for k, v in load_file(str(again)).items():
            assert np.array_equal(v, ref[k])


def test_writing_without_a_manifest_spools_and_says_so(minilm, tmp_path):
    # A Python filter that drops the manifest.
    relay = (
        "import sys; sys.path.insert(0, 'python'); import ckpt_stream as cs;"
        "r = cs.StreamReader(sys.stdin.buffer); w = cs.StreamWriter(sys.stdout.buffer, r.header);"
        "[w.write(t) for t in r]; w.close()"
    )
    out = tmp_path / "o.safetensors"
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    p = shell(f"ckpt-read {minilm} | python -c \"{relay}\" | ckpt-write {out}", cwd=root)
    assert p.returncode == 0, p.stderr
    assert b"no manifest" in p.stderr and b"spool" in p.stderr
    assert open(minilm, "rb").read() == out.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def f8_file(path):
    """A safetensors file with an F8_E4M3 tensor (numpy cannot save one itself)."""
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([0x38, 0x40, 0xB8, 0x7E]))


def test_float8_passes_through(tmp_path):
    src = tmp_path / "f8.safetensors"
    f8_file(src)
    out = tmp_path / "o.safetensors"
    assert shell(f"ckpt-read {src} | ckpt-write {out}").returncode == 0
    with safe_open(str(out), framework="numpy") as f:
        assert f.get_slice("x").get_dtype() == "F8_E4M3"
    assert out.read_bytes()[-4:] == bytes([0x38, 0x40, 0xB8, 0x7E])


@pytest.mark.parametrize("damage,needle", [("drop", "missing from weight_map"), ("move", "does not hold it")])
def test_index_and_shards_must_agree(minilm, tmp_path, damage, needle):
    out = tmp_path / "sharded"
    out.mkdir()
    assert shell(f"ckpt-read {minilm} | ckpt-write --max-shard-size 20MB {out}").returncode == 0
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["weight_map"])[0]
    if damage == "drop":
        del index["weight_map"][name]
    else:
        others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
        index["weight_map"][name] = others[0]
    index_path.write_text(json.dumps(index))
    p = run(["ckpt-read", "--list", str(out)])
    assert p.returncode == 65 and needle.encode() in p.stderr and name.encode() in p.stderr


def test_large_output_bypasses_the_page_cache_and_equals_the_cached_one(tmp_path):
    """Files of 64 MiB and more are written with O_DIRECT by default: unaligned tensor runs
    (odd sizes, a header whose length is not a multiple of 4 KiB) land byte for byte as
    through the page cache, and the safetensors library loads them."""
    rng = np.random.default_rng(7)
    tensors = {f"layer.{i}.w": rng.standard_normal((1021, 4099 + i), dtype=np.float32) for i in range(4)}
    tensors["odd"] = rng.integers(0, 255, 12_345, dtype=np.uint8)
    tensors["bf16"] = rng.standard_normal(70_001, dtype=np.float32).astype(ml_dtypes.bfloat16)
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    assert src.stat().st_size > 64 << 20
    stream = run(["ckpt-read", str(src)], check=True).stdout
    direct, cached = tmp_path / "direct.safetensors", tmp_path / "cached.safetensors"
    run(["ckpt-write", str(direct)], input=stream, check=True)
    run(["ckpt-write", "--buffered-io", str(cached)], input=stream, check=True)
    assert direct.read_bytes() == cached.read_bytes() == src.read_bytes()
    back = load_file(str(direct))
    for k, v in tensors.items():
        assert np.array_equal(back[k].view(np.uint8), v.view(np.uint8)), k
