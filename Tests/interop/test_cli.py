"""The tools as a user runs them: exit codes (sysexits), one-line errors, no partial outputs."""
import json
import os
import pty
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run, shell, tool

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_CANTCREAT = 64, 65, 66, 69, 73


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}, str(path))
    return path


def stream_of(path):
    return run(["ckpt-read", str(path)], check=True).stdout


def raw_safetensors(path, header: dict, data: bytes, pad=True):
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def assert_one_line_error(p, code, *needles):
    err = p.stderr.decode()
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Fatal error" not in err
    for n in needles:
        assert n in err, err


BAD_SAFETENSORS = [
    ("overlap", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, 6, "InvalidOffset"),
    ("hole", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, 6, "InvalidOffset"),
    ("beyond", {"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, 16, "MetadataIncompleteBuffer"),
    ("trailing", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, 9, "after the last tensor"),
    ("size", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "TensorInvalidInfo"),
    ("dtype", {"a": {"dtype": "float32", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
]


@pytest.mark.parametrize("name,header,nbytes,needle", BAD_SAFETENSORS, ids=[b[0] for b in BAD_SAFETENSORS])
def test_bad_safetensors_are_refused_and_leave_nothing(tmp_path, name, header, nbytes, needle):
    src = tmp_path / "bad.safetensors"
    raw_safetensors(src, header, bytes(nbytes))
    out = tmp_path / "out.safetensors"
    p = shell(f"ckpt-read {src} | ckpt-write {out}")
    assert p.returncode != 0
    single = run(["ckpt-read", str(src)])
    assert_one_line_error(single, EX_DATAERR, "bad.safetensors", needle)
    assert not out.exists() and os.listdir(tmp_path) == ["bad.safetensors"]


@pytest.mark.parametrize("content,needle", [
    (struct.pack("<Q", 200_000_000) + b"{}", "HeaderTooLarge"),
    (struct.pack("<Q", 1000) + b"{}", "InvalidHeaderLength"),
    (b"{}", "HeaderTooSmall"),
    (struct.pack("<Q", 3) + b"{\xff}", "not valid UTF-8"),
    (struct.pack("<Q", 6) + b'{"a":}', "InvalidHeaderDeserialization"),
], ids=["too-large", "length-beyond-file", "too-small", "not-utf8", "not-json"])
def test_bad_headers_are_refused_and_leave_nothing(tmp_path, content, needle):
    src = tmp_path / "bad.safetensors"
    src.write_bytes(content)
    assert_one_line_error(run(["ckpt-read", "--list", str(src)]), EX_DATAERR, needle)
    out = tmp_path / "out.safetensors"
    assert shell(f"ckpt-read {src} | ckpt-write {out}").returncode == EX_DATAERR
    assert os.listdir(tmp_path) == ["bad.safetensors"]


def test_reserved_tensor_name_is_refused(tmp_path):
    import io
    import ckpt_stream as cs
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t"}, manifest=[("__metadata__", "U8", (1,))])
    w.write(cs.Tensor("__metadata__", "U8", (1,), b"\x01"))
    w.close()
    p = run(["ckpt-write", str(tmp_path / "o.safetensors")], input=buf.getvalue())
    assert_one_line_error(p, EX_DATAERR, "__metadata__")
    assert os.listdir(tmp_path) == []


def test_truncated_stream_fails_and_leaves_no_output(small, tmp_path):
    s = stream_of(small)
    out = tmp_path / "o.safetensors"
    for cut in (len(s) - 64, len(s) // 2, 100, 10):
        p = run(["ckpt-write", str(out)], input=s[:cut])
        assert_one_line_error(p, EX_DATAERR, "<stdin>")
        assert "truncated" in p.stderr.decode() or "magic" in p.stderr.decode()
        assert sorted(os.listdir(tmp_path)) == ["small.safetensors"]


def test_flipped_bit_is_a_crc_error(small, tmp_path):
    s = bytearray(stream_of(small))
    data_at = s.index(struct.pack("<4f", 0, 1, 2, 3))
    s[data_at + 5] ^= 0x04
    out = tmp_path / "o.safetensors"
    p = run(["ckpt-write", str(out)], input=bytes(s))
    assert_one_line_error(p, EX_DATAERR, "tensor w", "crc32 mismatch")
    assert not out.exists()


def test_bad_magic(tmp_path):
    p = run(["ckpt-write", str(tmp_path / "o.safetensors")], input=b"PK\x03\x04" + bytes(100))
    assert_one_line_error(p, EX_DATAERR, "bad magic")


def test_empty_input_says_so(small, tmp_path):
    # The stage before failed without writing a byte: say that, not "bad magic".
    out = tmp_path / "o.safetensors"
    p = shell(f"ckpt-read {tmp_path}/missing.safetensors | ckpt-write {out}")
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == EX_DATAERR and len(err) == 2, err  # ckpt-read's error, then ckpt-write's
    assert "missing.safetensors" in err[0] and "<stdin>: byte 0: the input is empty" in err[1], err
    assert not out.exists()


@pytest.mark.parametrize("how", [["x.ckpts"], ["--format", "ckpts", "x.stream"]])
def test_ckpt_write_saves_a_stream(small, tmp_path, how):
    saved = tmp_path / how[-1]
    p = run(["ckpt-write", *how[:-1], str(saved)], input=stream_of(small))
    assert p.returncode == 0, p.stderr.decode()
    # The saved stream reads back to the same checkpoint, byte for byte.
    out = tmp_path / "back.safetensors"
    assert shell(f"ckpt-read {saved} | ckpt-write {out}").returncode == 0
    assert out.read_bytes() == small.read_bytes()
    assert run(["ckpt-read", "--list", str(saved)], check=True).stdout.decode().splitlines()[-1].startswith("2 tensors")


def test_existing_output_needs_force(small, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    p = run(["ckpt-write", str(out)], input=stream_of(small))
    assert_one_line_error(p, EX_CANTCREAT, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert run(["ckpt-write", "--force", str(out)], input=stream_of(small)).returncode == 0
    assert out.read_bytes() == small.read_bytes()


@pytest.mark.parametrize("args", [["sub/dir/o.safetensors"], ["sub/dir/o.pt"], ["--format", "orbax", "sub/dir/params"],
                                  ["sub/o.ckpts"]], ids=["safetensors", "torch", "orbax", "ckpts"])
def test_missing_output_folder_is_named_before_reading(small, tmp_path, args):
    args = [str(tmp_path / a) if "/" in a else a for a in args]
    p = run(["ckpt-write", *args], input=stream_of(small))
    folder = str(tmp_path / ("sub" if args[-1].endswith("o.ckpts") else "sub/dir"))
    assert_one_line_error(p, EX_CANTCREAT, f"{folder}: no such folder for the output (create it first: mkdir -p {folder})")
    assert os.listdir(tmp_path) == ["small.safetensors"]


def test_missing_input_and_usage_errors(tmp_path):
    assert_one_line_error(run(["ckpt-read", str(tmp_path / "nope.safetensors")]), EX_NOINPUT, "nope.safetensors")
    assert run(["ckpt-read"]).returncode == EX_USAGE
    assert run(["ckpt-read", "--compress", "brotli", "x"]).returncode == EX_USAGE
    p = run(["ckpt-write", str(tmp_path / "out.xyz")], input=b"")
    assert_one_line_error(p, EX_USAGE, "--format")
    p = run(["ckpt-write", str(tmp_path / "out.bin")], input=b"")
    assert_one_line_error(p, EX_DATAERR, "the input is empty")
    assert not (tmp_path / "out.bin").exists()
    assert run(["ckpt-write", "--max-shard-size", "lots", str(tmp_path / "o.safetensors")], input=b"").returncode == EX_USAGE


def test_refuses_binary_to_a_terminal(small):
    master, slave = pty.openpty()
    try:
        p = subprocess.run([tool("ckpt-read"), str(small)], stdout=slave, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == EX_USAGE
    assert b"terminal" in p.stderr


def test_sigpipe_ends_quietly(minilm):
    p = shell(f"ckpt-read {minilm} | head -c 100 > /dev/null; echo ${{PIPESTATUS[0]}}")
    assert p.stderr == b""
    assert p.stdout.strip() == str(128 + signal.SIGPIPE).encode()


def test_interrupted_write_leaves_no_file(small, tmp_path):
    s = stream_of(small)
    out = tmp_path / "o.safetensors"
    proc = subprocess.Popen([tool("ckpt-write"), str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(s[:-64])  # all but the end frame: the writer has laid out its file and waits
    proc.stdin.flush()
    for _ in range(100):
        if any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            break
        time.sleep(0.05)
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path)), "the temporary output never appeared"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["small.safetensors"]


def test_progress_is_forced_or_silenced(minilm, tmp_path):
    p = shell(f"ckpt-read --progress {minilm} | ckpt-write --quiet --progress {tmp_path}/o.safetensors")
    assert p.returncode == 0
    assert b"ckpt-read:" in p.stderr and b"104 tensors" in p.stderr and b"MiB/s" in p.stderr
    assert b"ckpt-write:" not in p.stderr


def test_lora_merge_without_adapters_passes_everything_and_says_so(small, tmp_path):
    p = shell(f"ckpt-read '{small}' | lora-merge | ckpt-write '{tmp_path / 'same.safetensors'}'")
    assert p.returncode == 0, p.stderr
    assert b"no LoRA adapters found; 2 tensors passed through unchanged" in p.stderr
    assert (tmp_path / "same.safetensors").read_bytes() == small.read_bytes()


def test_help_and_version():
    for t in ("ckpt-read", "ckpt-write", "lora-merge", "ckpt-slice"):
        p = run([t, "--help"])
        assert p.returncode == 0 and b"USAGE" in p.stdout.upper()
        assert run([t, "--version"]).stdout.strip() == b"0.1.0 (development build)"  # a package names its commit


def test_one_binary_serves_the_five_tools(small, tmp_path):
    ckpt = tool("ckpt")
    # By first argument: the short name or the tool's own.
    assert run([ckpt, "read", "--list", str(small)], check=True).stdout == run(["ckpt-read", "--list", str(small)], check=True).stdout
    assert run([ckpt, "ckpt-diff", str(small), str(small)]).returncode == 0
    # By the name it runs as (the tarball's symlinks).
    link = tmp_path / "ckpt-write"
    os.symlink(ckpt, link)
    out = tmp_path / "o.safetensors"
    assert run([str(link), str(out)], input=stream_of(small)).returncode == 0 and out.read_bytes() == small.read_bytes()
    p = run([ckpt, "frobnicate"])
    assert p.returncode == EX_USAGE and p.stderr.startswith(b"ckpt: unknown tool 'frobnicate'\n")
    p = run([ckpt])
    assert p.returncode == 0 and b"usage: ckpt TOOL" in p.stdout
