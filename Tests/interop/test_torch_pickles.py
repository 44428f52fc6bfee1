"""Every pickle torch can write (protocols 0-5, zip and legacy), Python 2 era files, and
hostile pickles: read equal to what was saved (and to torch.load where torch can load it),
or refused with one line and exit 65, never a crash."""
import collections
import io
import pickle
import pickletools
import struct
import sys
import zipfile

import pytest
import torch

from conftest import run, shell
from test_torch_read import assert_same, raw_bytes, rewrite, state_dict, stream_tensors

EX_DATAERR = 65


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_every_protocol_reads_equal(tmp_path, protocol, layout):
    sd = state_dict()
    path = tmp_path / f"p{protocol}.pt"
    torch.save(sd, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    _, ours = stream_tensors(path)
    assert_same(ours, sd)
    theirs = torch_load(path)
    if layout == "zip" and protocol > 0:
        assert theirs is not None
    if theirs is not None:
        assert_same(ours, theirs)
    # torch's legacy loader handles only typed storages: check it on the dtypes of that era.
    classic = {k: v for k, v in sd.items() if v.dtype in (torch.float32, torch.float16, torch.float64, torch.int64, torch.uint8)}
    torch.save(classic, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    _, ours = stream_tensors(path)
    assert_same(ours, classic)
    if protocol > 0:
        assert_same(ours, torch_load(path))


def torch_load(path):
    """What torch.load returns, by whichever of its two unpicklers can read the file, or None:
    torch cannot read its own protocol 0 files (text persistent ids), and its full unpickler
    fails on legacy files holding untyped storages (uint16, float8 ...)."""
    for weights_only in (True, False):
        try:
            return torch.load(path, weights_only=weights_only)
        except Exception:
            pass
    return None


# What torch 0.3/0.4 under Python 2 wrote: protocol 2, the state dict's OrderedDict reduced
# to a list of [key, value] lists, str keys as SHORT_BINSTRING, `_rebuild_tensor` (v1) on
# typed storages saved on cuda:0.

class Storage:
    def __init__(self, key, tensor):
        self.key, self.tensor = key, tensor.contiguous()


class V1Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor, (self.storage, self.offset, self.size, self.stride))


class Py2OrderedDict:
    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return (collections.OrderedDict, ([[k, v] for k, v in self.items],))


STORAGE_CLASS = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage, torch.int64: torch.LongStorage,
                 torch.uint8: torch.ByteStorage}


class Py2Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", STORAGE_CLASS[obj.tensor.dtype], obj.key, "cuda:0", obj.tensor.numel(), None)
        return None


def py2_strings(data):
    """Rewrites BINUNICODE as SHORT_BINSTRING (Python 2's str); protocol 2 has no frames to fix."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "BINUNICODE" and len(arg.encode()) < 256:
            out += b"U" + bytes([len(arg.encode())]) + arg.encode()
        else:
            out += data[pos:end]
    return bytes(out)


def dumps(obj, protocol):
    f = io.BytesIO()
    Py2Pickler(f, protocol=protocol).dump(obj)
    return f.getvalue()


def write_py2_legacy(path, tensors, protocol=2):
    """tensors: name -> (tensor, as a view: (offset, size, stride) into it or None)."""
    storages, items = [], []
    for i, (name, (t, view)) in enumerate(tensors.items()):
        s = Storage(str(i), t)
        storages.append(s)
        offset, size, stride = view or (0, tuple(t.shape), tuple(t.stride()))
        items.append((name, V1Tensor(s, offset, size, stride)))
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    fix = py2_strings if protocol == 2 else (lambda b: b)
    with open(path, "wb") as f:
        f.write(dumps(0x1950A86A20F9469CFC6C, protocol))
        f.write(dumps(1001, protocol))
        f.write(fix(dumps(sys_info, protocol)))
        f.write(fix(dumps(Py2OrderedDict(items), protocol)))
        f.write(fix(dumps([s.key for s in storages], protocol)))
        for s in storages:
            f.write(struct.pack("<q", s.tensor.numel()))
            f.write(raw_bytes(s.tensor))


def py2_tensors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    return {
        "features.0.weight": (torch.randn(8, 3, 3, 3, generator=g), None),
        "features.0.bias": (torch.randn(8, generator=g).half(), None),
        "bn.num_batches_tracked": (torch.tensor([5]), None),
        "classifier.weight": (base, (6, (2, 3), (6, 2))),  # a strided view at an offset
        "mask": (torch.tensor([1, 0, 1], dtype=torch.uint8), None),
    }


def expected(tensors):
    out = {}
    for name, (t, view) in tensors.items():
        out[name] = t if view is None else t.contiguous().view(-1).as_strided(view[1], view[2], view[0])
    return out


def test_python2_era_legacy_file_reads_equal_to_torch_load(tmp_path):
    path = tmp_path / "resnet_py2.pth"
    write_py2_legacy(path, py2_tensors())
    assert b"U\x11features.0.weight" in path.read_bytes()  # Python 2 str keys really are there
    theirs = torch.load(path, map_location="cpu", weights_only=False)
    assert list(theirs) == list(py2_tensors())
    _, ours = stream_tensors(path)
    assert_same(ours, theirs)
    assert_same(ours, expected(py2_tensors()))


def test_python2_era_protocol0_file(tmp_path):
    # Protocol 0: text persistent ids; torch.load cannot read these, compare with the sources.
    path = tmp_path / "p0_py2.pth"
    write_py2_legacy(path, py2_tensors(), protocol=0)
    assert b"P('storage', <class 'torch.FloatStorage'>, '0', 'cuda:0', 216, None)\n" in path.read_bytes()
    _, ours = stream_tensors(path)
    assert_same(ours, expected(py2_tensors()))


def refused(path, *needles, limit_kb=None):
    """ckpt-read --list and ckpt-read | ckpt-write both fail with one line, exit 65, no output."""
    prefix = f"ulimit -v {limit_kb}; " if limit_kb else ""
    p = shell(f"{prefix}ckpt-read --list {path}")
    err = p.stderr.decode()
    assert p.returncode == EX_DATAERR, (p.returncode, err)
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    out = path.parent / "out.safetensors"
    q = shell(f"{prefix}ckpt-read {path} | ckpt-write {out}")
    assert q.returncode != 0 and not out.exists()
    return err


def test_forged_broadcast_view_is_refused_within_an_address_space_limit(tmp_path):
    # torch.load returns this as an expanded view of 16 floats; written out it is 4 TiB.
    src = tmp_path / "b.pt"
    torch.save({"x": torch.arange(16, dtype=torch.float32).expand(4, 16)}, src)
    forged = tmp_path / "broadcast.pt"

    def patch(n, d):
        if not n.endswith("data.pkl"):
            return d
        assert b"K\x04K\x10\x86" in d and b"K\x00K\x01\x86" in d
        big = b"J" + struct.pack("<i", 2**20)
        return d.replace(b"K\x04K\x10\x86", big + big + b"\x86", 1).replace(b"K\x00K\x01\x86", b"K\x00K\x00\x86", 1)
    rewrite(src, forged, patch)
    assert torch.load(forged, weights_only=True)["x"].shape == (2**20, 2**20)  # torch itself accepts it
    refused(forged, "expands to [1048576, 1048576]", "1024 MiB", limit_kb=2_000_000)


def test_small_broadcast_view_is_expanded(tmp_path):
    path = tmp_path / "b.pt"
    sd = {"x": torch.arange(16, dtype=torch.float32).expand(4, 16), "y": torch.ones(3, 1).expand(3, 5)}
    torch.save(sd, path)
    _, ours = stream_tensors(path)
    assert_same(ours, sd)


def deep_pickle(n):
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_deeply_nested_pickle_is_refused_not_a_crash(tmp_path, layout):
    path = tmp_path / "deep.pt"
    if layout == "zip":
        src = tmp_path / "a.pt"
        torch.save({"w": torch.ones(2)}, src)
        rewrite(src, path, lambda n, d: deep_pickle(50_000) if n.endswith("data.pkl") else d)
    else:
        path.write_bytes(dumps(0x1950A86A20F9469CFC6C, 2) + dumps(1001, 2) + dumps({}, 2) + deep_pickle(50_000))
    refused(path, "nested deeper than 256")


def test_format_detection_names_what_it_tried(tmp_path):
    odd = tmp_path / "one.pkl"
    odd.write_bytes(pickle.dumps(1, protocol=2))  # starts with 0x80 like a msgpack map
    err = refused(odd, "not a checkpoint format", "legacy torch pickle", "safetensors", "Flax msgpack")
    assert "msgpack value" not in err
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    refused(empty, "the file is empty")
