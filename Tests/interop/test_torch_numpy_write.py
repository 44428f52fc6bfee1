"""What ckpt-write --format torch/npz/npy writes, loaded by the real torch and numpy."""
import io
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run, shell
from test_torch_read import DTYPES, raw_bytes, state_dict

EX_USAGE = 64


def plain_state_dict():
    # The writer emits each tensor as its own contiguous storage: views and ties load as copies.
    return {k: v.detach().contiguous().clone() for k, v in state_dict().items()}


def same(a, b):
    return a.dtype == b.dtype and list(a.shape) == list(b.shape) and raw_bytes(a) == raw_bytes(b)


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_every_dtype_with_weights_only(tmp_path, mmap):
    sd = plain_state_dict()
    torch.save(sd, tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    p = shell(f"ckpt-read {tmp_path / 'in.pt'} | ckpt-write {out}")
    assert p.returncode == 0, p.stderr
    back = torch.load(out, weights_only=True, mmap=mmap)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert same(back[k], v), k


def test_archive_is_valid_aligned_and_deterministic(tmp_path):
    sd = plain_state_dict()
    torch.save(sd, tmp_path / "in.pt")
    outs = []
    for folder in ("1", "2"):
        (tmp_path / folder).mkdir()
        assert shell(f"ckpt-read {tmp_path / 'in.pt'} | ckpt-write {tmp_path / folder / 'm.pt'}").returncode == 0
        outs.append((tmp_path / folder / "m.pt").read_bytes())
    assert outs[0] == outs[1]  # deterministic: no times, no random ids
    with zipfile.ZipFile(tmp_path / "1" / "m.pt") as z:
        assert z.testzip() is None  # every CRC checks out
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if "/data/" in info.filename:
                data = info.header_offset + 30 + len(info.filename) + struct.unpack_from("<H", outs[0], info.header_offset + 28)[0]
                assert data % 64 == 0, info.filename


def test_nest_under_a_key(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "in.pt")
    out = tmp_path / "out.pth"
    assert shell(f"ckpt-read {tmp_path / 'in.pt'} | ckpt-write --nest model {out}").returncode == 0
    back = torch.load(out, weights_only=True)
    assert list(back) == ["model"] and torch.equal(back["model"]["w"], torch.ones(2))


def test_real_model_safetensors_to_torch_and_back_is_byte_identical(minilm, tmp_path):
    from safetensors.torch import load_file
    pt = tmp_path / "m.bin"
    assert shell(f"ckpt-read {minilm} | ckpt-write {pt}").returncode == 0
    ref = load_file(minilm)
    back = torch.load(pt, weights_only=True, mmap=True)
    assert back.keys() == ref.keys()
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    again = tmp_path / "again.safetensors"
    p = shell(f"ckpt-read {pt} | ckpt-write {again}")
    assert p.returncode == 0, p.stderr
    # The torch file carries no safetensors metadata; the original's is {"format": "pt"}, which
    # the writer adds for streams from other formats: the round trip is byte-identical.
    assert again.read_bytes() == open(minilm, "rb").read()


def test_npz_and_npy_load_in_numpy(tmp_path):
    arrays = {"f32": np.arange(6, dtype="<f4").reshape(2, 3), "i64": np.array([-1, 5]), "b": np.array([True]),
              "c": np.array([1 + 1j], "<c8"), "s": np.array(1.5, "<f8"), "bf": np.arange(4, dtype="<f4").astype(ml_dtypes.bfloat16)}
    from safetensors.numpy import save_file
    save_file(arrays, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.npz"
    assert shell(f"ckpt-read {tmp_path / 'in.safetensors'} | ckpt-write {out}").returncode == 0
    with np.load(out) as z:
        for k, v in arrays.items():
            got = z[k].view(ml_dtypes.bfloat16) if k == "bf" else z[k]
            assert got.shape == v.shape and got.tobytes() == v.tobytes(), k
    # Our own reader reads it back, bfloat16 given by a hint.
    p = shell(f"ckpt-read --dtype-hint 'bf=BF16' {out} | ckpt-write {tmp_path / 'back.safetensors'}")
    assert p.returncode == 0, p.stderr
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back.safetensors"))
    for k, v in arrays.items():
        assert back[k].tobytes() == v.tobytes()
    one = tmp_path / "one.npy"
    assert shell(f"ckpt-read --only f32 {tmp_path / 'in.safetensors'} | ckpt-write {one}").returncode == 0
    assert np.array_equal(np.load(one), arrays["f32"])
    assert shell(f"ckpt-read {tmp_path / 'in.safetensors'} | ckpt-write {tmp_path / 'many.npy'}").returncode == EX_USAGE
    assert not (tmp_path / "many.npy").exists()


def test_npy_header_matches_numpy(tmp_path):
    for a in [np.zeros((3, 4), "<f4"), np.zeros((100000,), "<i8"), np.zeros((), "<f8"), np.zeros((2, 0, 5), "|u1")]:
        buf = io.BytesIO()
        np.save(buf, a)
        np.save(tmp_path / "x.npy", a)
        p = shell(f"ckpt-read {tmp_path / 'x.npy'} | ckpt-write --force {tmp_path / 'y.npy'}")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "y.npy").read_bytes() == buf.getvalue()
