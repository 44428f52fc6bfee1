"""Faults end cleanly: a file-size limit or a full disk is exit 74 with one line and no
temporary files; an existing output is left as it was; a stage killed mid-pipeline leaves
nothing downstream; memory the system refuses is exit 71, not a trap."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import BIN, run, shell, tool

EX_DATAERR, EX_OSERR, EX_IOERR = 65, 71, 74


@pytest.fixture
def model(tmp_path):
    """About 2 MiB of tensors in a folder of its own."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.safetensors"
    rng = np.random.default_rng(3)
    save_file({f"layer{i}.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}, str(path))
    return path


def one_line(p, code, *needles):
    err = p.stderr.decode()
    lines = err.strip().splitlines()
    assert p.returncode == code, (p.returncode, err)
    assert len(lines) >= 1 and all(n in lines[-1] for n in needles), err
    assert "Fatal error" not in err and "Traceback" not in err, err


OUTPUTS = [("out.safetensors", []), ("out.pt", []), ("out.npz", []), ("out.msgpack", []), ("out.ckpts", []),
           ("out", ["--format", "orbax"])]


@pytest.mark.parametrize("name,flags", OUTPUTS, ids=[o[0] + "".join(o[1]) for o in OUTPUTS])
def test_file_size_limit_is_an_io_error_and_leaves_nothing(model, tmp_path, name, flags):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    # ulimit -f counts 1024-byte blocks: 100 KiB, less than any one file to write (each array is 256 KiB).
    p = shell(f"ckpt-read {model} | (ulimit -f 100; exec ckpt-write --buffered-io {' '.join(flags)} {out})")
    one_line(p, EX_IOERR, "write failed", "File too large", "ulimit -f")
    assert os.listdir(out_dir) == []  # no output, no temporary file


def test_file_size_limit_leaves_an_existing_output_untouched(model, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    p = shell(f"ckpt-read {model} | (ulimit -f 256; exec ckpt-write --force {out})")
    one_line(p, EX_IOERR, "File too large")
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "src"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({p.stderr.decode().strip()}); ulimit -f covers the same path")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("name,flags", [("out.safetensors", []), ("out.pt", []), ("out", ["--format", "orbax"])])
def test_full_disk_is_an_io_error_and_leaves_nothing(model, small_tmpfs, name, flags):
    out = small_tmpfs / name
    p = shell(f"ckpt-read {model} | ckpt-write {' '.join(flags)} {out}")
    one_line(p, EX_IOERR, "No space left on device")
    assert os.listdir(small_tmpfs) == []


def stream(model):
    return run(["ckpt-read", str(model)], check=True).stdout


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_stage_killed_mid_pipeline_leaves_nothing_downstream(model, tmp_path, sig):
    # A filter in the middle forwards half the stream, then is killed: every stage after it
    # must fail loudly and write nothing.
    data = stream(model)
    half = tmp_path / "half.bin"
    half.write_bytes(data[: len(data) // 2])
    filt = tmp_path / "filter.sh"
    filt.write_text(f"#!/bin/bash\ncat {half}\nkill -{int(sig)} $$\nsleep 5\n")
    filt.chmod(0o755)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    p = shell(f"{filt} | ckpt-slice --rules /dev/null --keep-unmatched | ckpt-write {out}")
    assert p.returncode != 0
    err = p.stderr.decode()
    assert "truncated stream" in err, err
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_writer_killed_removes_its_temporary_file(model, tmp_path, sig):
    data = stream(model)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    w = subprocess.Popen([tool("ckpt-write"), "--buffered-io", str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    w.stdin.write(data[: len(data) // 2])
    w.stdin.flush()
    deadline = time.time() + 10
    while not os.listdir(out.parent) and time.time() < deadline:  # its temporary file exists
        time.sleep(0.01)
    assert os.listdir(out.parent), "ckpt-write made no temporary file"
    w.send_signal(sig)
    w.wait(timeout=10)
    assert w.returncode == -sig or w.returncode == 128 + sig, w.returncode
    assert os.listdir(out.parent) == []


def test_refused_memory_is_exit_71_not_a_trap(tmp_path):
    # A 1 GiB broadcast view (the largest expansion accepted) under a 600 MB address-space limit.
    src = tmp_path / "b.pt"
    torch.save({"x": torch.arange(16, dtype=torch.float32).expand(1 << 14, 16)}, src)
    import zipfile
    forged = tmp_path / "b1g.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(forged, "w") as zout:
        for info in zin.infolist():
            d = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"M\x00@K\x10\x86" in d
                d = d.replace(b"M\x00@K\x10\x86", b"M\x00@M\x00@\x86", 1).replace(b"K\x00K\x01\x86", b"K\x00K\x00\x86", 1)
            zout.writestr(info.filename, d, compress_type=zipfile.ZIP_STORED)
    assert run(["ckpt-read", "--list", str(forged)], check=True).stdout.decode().splitlines()[1].split()[2] == "[16384,16384]"
    out = tmp_path / "o.safetensors"
    p = shell(f"ulimit -v 600000; ckpt-read {forged} | ckpt-write {out}")
    err = p.stderr.decode()
    assert p.returncode != 0 and not out.exists()
    assert "ckpt-read: tensor x: cannot allocate 1073741824 bytes" in err, err
    p = shell(f"ulimit -v 600000; ckpt-read {forged} > /dev/null")
    one_line(p, EX_OSERR, "cannot allocate")


def test_declared_frame_length_is_not_allocated_before_the_data_arrives(model, tmp_path):
    # A valid stream whose header frame is re-declared at 1 GiB (the largest a metadata frame
    # may be) and cut after 64 bytes. The reader used to allocate and zero the declared length
    # first: exit 71 under this 600 MB address-space limit. It must read what arrives and say
    # the stream is truncated.
    stream = run(["ckpt-read", str(model)], check=True).stdout
    assert stream[64:68] == b"\xff\xff\xff\xff" and stream[68] == 0x01  # the header frame
    forged = tmp_path / "forged.ckpts"
    forged.write_bytes(stream[:72] + (1 << 30).to_bytes(8, "little") + stream[80:144])
    out = tmp_path / "o.safetensors"
    p = shell(f"ulimit -v 600000; ckpt-write {out} < {forged}")
    one_line(p, EX_DATAERR, "truncated")
    assert not out.exists()
