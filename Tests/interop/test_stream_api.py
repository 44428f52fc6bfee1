"""The ckpt_stream package's filter API (python/ckpt_stream) against the Swift tools:
manifests kept right through renames, drops and additions; compressed chunks passed on byte
for byte; ancillary frames and unknown keys passed on; every malformed input the Swift
reader refuses refused here too, with the same message; element-aligned numpy pieces; and
the worked filters in scripts/filters/ end to end."""
import io
import os
import re
import struct
import subprocess
import sys
import threading
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ckpt_stream as cs
from conftest import ROOT, run, tool

FILTERS = os.path.join(ROOT, "scripts", "filters")
EX_DATAERR = 65


def frames(stream: bytes):
    """(offset, kind, frame bytes) for every frame after the preamble, by the spec's layout
    alone (independent of the package under test)."""
    out, i = [], 64
    while i < len(stream):
        kind = stream[i + 4]
        n = 16 + struct.unpack_from("<Q", stream, i + 8)[0]
        n += (-n) % 64
        out.append((i, kind, stream[i:i + n]))
        i += n
    return out


def frame_at(stream, kind, n=0):
    return [f for f in frames(stream) if f[1] == kind][n][0]


def pipeline(*stages, input=None):
    """Runs stages (argument lists) connected by pipes; returns (returncodes, stderrs, stdout)."""
    procs, prev = [], None
    for i, args in enumerate(stages):
        p = subprocess.Popen(args, stdin=prev.stdout if prev else subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        if prev:
            prev.stdout.close()
        procs.append(p)
        prev = p
    def feed():
        try:
            if input is not None:
                procs[0].stdin.write(input)
            procs[0].stdin.close()
        except BrokenPipeError:  # the first stage stopped reading (it failed: its status says so)
            pass

    def drain(p, into):
        into.append(p.stderr.read())

    errs = [[] for _ in procs]
    threads = [threading.Thread(target=feed)] + [threading.Thread(target=drain, args=pe) for pe in zip(procs, errs)]
    for t in threads:
        t.start()
    out = procs[-1].stdout.read()
    for t in threads:
        t.join()
    return [p.wait() for p in procs], [e[0].decode() for e in errs], out


def filter_cmd(name, *args):
    return [sys.executable, os.path.join(FILTERS, name), *args]


def read_all(stream: bytes):
    r = cs.StreamReader(io.BytesIO(stream))
    return r, {t.name: t for t in r}


# --- a filter that renames, drops and adds tensors ---------------------------------------------

FILTER_SCRIPT = r'''
import numpy as np
import ckpt_stream as cs

def main():
    with cs.Filter(producer="test-filter") as f:
        def mapping(d):
            if d.name.endswith("position_ids"):
                return None                                       # drop
            d = d.renamed(d.name.replace("gamma", "weight"))      # rename
            if d.name == "enc.weight":
                return [d, cs.Descriptor("enc.weight.norm", "F32", ())]  # and add one after it
            return d
        f.plan(mapping, append=[cs.Descriptor("extra", "BF16", (3,))])
        for t in f:
            if t.name.endswith(".bias"):
                f.write(t.name, t.dtype, t.shape, t.array() * np.float32(0.5), attributes=t.attributes)
            elif t.name == "enc.gamma":
                a = t.array()
                f.write("enc.weight", t.dtype, t.shape, a)
                f.write("enc.weight.norm", "F32", (), np.float32(np.linalg.norm(a)))
            else:
                f.forward(t)                                      # planned name, chunks as they came
        f.write("extra", "BF16", (3,), np.array([1.0, 1.00390625, 3.0], np.float32))  # rounds to even

cs.run(main, "test-filter")
'''


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {
        "emb.position_ids": np.arange(7, dtype=np.int64)[None],
        "enc.gamma": rng.standard_normal((5, 3)).astype(np.float32),
        "enc.bias": rng.standard_normal(3).astype(np.float32),
        "dec.gamma": rng.standard_normal(4).astype(np.float32),
        "big": rng.standard_normal(1_500_000).astype(np.float32),  # > 4 MiB: two chunks
        "half": rng.standard_normal((2, 9)).astype(np.float16),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_filter_renames_drops_and_adds_keeping_the_manifest(model, tmp_path):
    src, ref = model
    script = tmp_path / "f.py"
    script.write_text(FILTER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    mid = subprocess.run(f"{tool('ckpt-read')} --compress zlib {src} | {sys.executable} {script}", shell=True,
                         capture_output=True, env=env)
    assert mid.returncode == 0, mid.stderr.decode()
    r, got = read_all(mid.stdout)
    # Safetensors files are read in offset order; the filter's manifest follows its input's.
    order = [d.name for d in cs.StreamReader(io.BytesIO(run(["ckpt-read", str(src)], check=True).stdout)).manifest]
    expected_names = []
    for n in order:
        if n.endswith("position_ids"):
            continue
        expected_names.append(n.replace("gamma", "weight"))
        if n == "enc.gamma":
            expected_names.append("enc.weight.norm")
    expected_names.append("extra")
    assert [d.name for d in r.manifest] == expected_names == list(got)
    assert r.header == {"producer": "test-filter", "source_format": "safetensors", "metadata": {"format": "pt"}}

    out = tmp_path / "out.safetensors"
    p = run(["ckpt-write", str(out)], input=mid.stdout)
    assert p.returncode == 0, p.stderr
    assert b"spool" not in p.stderr  # the manifest let ckpt-write lay the file out first
    back = load_file(str(out))
    assert sorted(back) == sorted(expected_names)
    np.testing.assert_array_equal(back["enc.weight"], ref["enc.gamma"])
    np.testing.assert_array_equal(back["dec.weight"], ref["dec.gamma"])
    np.testing.assert_array_equal(back["enc.bias"], ref["enc.bias"] * np.float32(0.5))
    np.testing.assert_array_equal(back["big"], ref["big"])
    np.testing.assert_array_equal(back["half"], ref["half"])
    assert back["enc.weight.norm"] == np.float32(np.linalg.norm(ref["enc.gamma"]))
    with safe_open(str(out), framework="pt") as f:
        extra = f.get_tensor("extra")
        assert f.metadata() == {"format": "pt"}
    assert extra.dtype == torch.bfloat16
    # 1.00390625 is halfway between two bfloat16 values: to even, i.e. 1.0.
    assert extra.float().tolist() == [1.0, 1.0, 3.0]


def test_filter_errors_name_the_tensor_and_leave_no_end_frame(model, tmp_path):
    src, _ = model
    stream = run(["ckpt-read", str(src)], check=True).stdout
    out = io.BytesIO()
    with pytest.raises(cs.WriteError, match=r"tensor enc\.renamed: enc\.renamed F32\[3\] is not what the output "
                                            r"manifest lists next \(entry \d: .*\); .*plan\(\)"):
        with cs.Filter("t", io.BytesIO(stream), out) as f:
            for t in f:
                f.forward(t, name="enc.renamed") if t.name == "enc.bias" else f.forward(t)
    p = run(["ckpt-write", str(tmp_path / "o.ckpts")], input=out.getvalue())
    assert p.returncode == EX_DATAERR and b"truncated stream" in p.stderr, p.stderr
    # Forwarding a tensor whose data was taken is refused.
    with pytest.raises(cs.UsageError, match="tensor .*: forward\\(\\) needs a tensor whose data was not taken"):
        with cs.Filter("t", io.BytesIO(stream), io.BytesIO()) as f:
            for t in f:
                t.read()
                f.forward(t)
    # A reshape must keep the byte length.
    with pytest.raises(cs.WriteError, match=r"tensor enc\.bias: cannot be forwarded as enc\.bias F32\[2\]: 8 bytes, "
                                            r"the tensor has 12"):
        with cs.Filter("t", io.BytesIO(stream), io.BytesIO()) as f:
            for t in f:
                f.forward(t, shape=(2,) if t.name == "enc.bias" else None)
    # Two tensors given one name, without a manifest to catch it up front.
    nomani = io.BytesIO()
    with cs.Filter("t", io.BytesIO(stream), nomani) as f:
        f.omit_manifest()
        for t in f:
            f.forward(t)
    with pytest.raises(cs.WriteError, match="two output tensors would be named 'x': from input tensor '.*' and from "
                                            "input tensor '.*'"):
        with cs.Filter("t", io.BytesIO(nomani.getvalue()), io.BytesIO()) as f:
            for t in f:
                f.forward(t, name="x")


# --- compressed chunks pass through byte for byte -----------------------------------------------

def chunk_frames(stream):
    return [f[2] for f in frames(stream) if f[1] == cs.CHUNK]


def test_compressed_pass_through_is_byte_identical(model):
    src, ref = model
    rc, errs, out = pipeline([tool("ckpt-read"), "--compress", "zlib:1", str(src)],
                             filter_cmd("rename.py", r"^enc\.", "encoder."))
    assert rc == [0, 0], errs
    before = run(["ckpt-read", "--compress", "zlib:1", str(src)], check=True).stdout
    a, b = chunk_frames(before), chunk_frames(out)
    assert len(a) == len(b) >= 7 and a == b
    # They are compressed (codec 2 for the floats, shuffled by element size): not re-encoded.
    codecs = {struct.unpack_from("<I", c, 32)[0] for c in b}
    assert codecs == {cs.CODEC_ZLIB_SHUFFLED}
    assert sum(map(len, b)) < 0.99 * sum(v.nbytes for v in ref.values())
    r, got = read_all(out)
    assert [d.name for d in r.manifest] == [n.replace("enc.", "encoder.") if n.startswith("enc.") else n
                                            for n in (d.name for d in cs.StreamReader(io.BytesIO(before)).manifest)]
    assert got["encoder.gamma"].array().tolist() == ref["enc.gamma"].tolist()


def test_pass_through_still_checks_every_chunk(model, tmp_path):
    """Forwarding keeps the stored bytes but inflates and checks them on the way: a corrupt
    chunk stops the filter, and the next stage sees no end frame."""
    src, _ = model
    stream = bytearray(run(["ckpt-read", "--compress", "zlib:1", str(src)], check=True).stdout)
    at = frame_at(stream, cs.CHUNK, 1)
    stream[at + 36] ^= 0x01  # the stored CRC of the raw bytes
    chunk_offset = struct.unpack_from("<Q", stream, at + 16)[0]
    rc, errs, out = pipeline(filter_cmd("rename.py", "x", "y"), [tool("ckpt-write"), str(tmp_path / "o.ckpts")],
                             input=bytes(stream))
    assert rc == [EX_DATAERR, EX_DATAERR], errs
    assert f"rename.py: <stdin>: byte {at}: tensor " in errs[0], errs[0]
    assert f"crc32 mismatch in chunk at tensor offset {chunk_offset}" in errs[0], errs[0]
    assert not os.path.exists(tmp_path / "o.ckpts")
    assert "truncated stream" in errs[1]


# --- ancillary frames and unknown keys ---------------------------------------------------------

def test_ancillary_frames_and_unknown_keys_are_passed_on(tmp_path):
    header = {"producer": "p", "source_format": "s", "metadata": {"lr": cs.JSONNumber("1e-4"), "n": 3},
              "x_future": {"k": [1, cs.JSONNumber("2.50")]}}
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, header, manifest=[("a", "F32", (4,)), ("b", "U8", (3,)), ("c", "I16", (2,))],
                        chunk_size=8)
    w.write_ancillary(0x80, b"before the first tensor")
    w.begin_tensor("a", "F32", (4,), {"unknown_key": {"x": 1}, "dtype_note": "\u00e9"})
    w.write_chunk(np.arange(2, dtype=np.float32).tobytes())
    w.write_ancillary(0xC1, b"between two chunks")
    w.write_chunk(np.arange(2, 4, dtype=np.float32).tobytes())
    w.end_tensor()
    w.write_ancillary(0xFF, b"")
    w.write(cs.Tensor("b", "U8", (3,), b"\x01\x02\x03", {"k": "v"}))
    w.write(cs.Tensor("c", "I16", (2,), b"\x05\x00\x06\x00"))
    w.write_ancillary(0x90, bytes(range(200)))
    w.close()
    src = buf.getvalue()

    out = io.BytesIO()
    with cs.Filter("relay", io.BytesIO(src), out) as f:
        f.plan(lambda d: d.renamed("b2").with_shape((3, 1)) if d.name == "b" else d)  # forward follows the plan
        for t in f:
            if t.name == "c":
                f.write("c", "I16", (2,), t.array() * 2, attributes=t.attributes)
            else:
                f.forward(t)
    result = out.getvalue()

    anc = lambda s: [(fr[4], fr[16:16 + struct.unpack_from("<Q", fr, 8)[0]]) for _, k, fr in frames(s) if k >= 0x80]
    assert anc(result) == anc(src) == [(0x80, b"before the first tensor"), (0xC1, b"between two chunks"), (0xFF, b""),
                                       (0x90, bytes(range(200)))]
    # Where they were: the one inside tensor a is still between its two chunks.
    kinds = [k for _, k, _ in frames(result)]
    assert kinds[:8] == [cs.HEADER, cs.MANIFEST, 0x80, cs.TENSOR, cs.CHUNK, 0xC1, cs.CHUNK, cs.TENSOR_END]
    hbody = frames(result)[0][2][16:16 + struct.unpack_from("<Q", frames(result)[0][2], 8)[0]]
    assert hbody == (b'{"producer":"relay","source_format":"s","metadata":{"lr":1e-4,"n":3},'
                     b'"x_future":{"k":[1,2.50]}}')
    # Attributes: byte for byte when forwarded, the same JSON when rewritten.
    tensor_frames = [fr for _, k, fr in frames(result) if k == cs.TENSOR]
    assert b'{"unknown_key":{"x":1},"dtype_note":"\\u00e9"}' in tensor_frames[0]
    r = cs.StreamReader(io.BytesIO(result))
    assert [(t.name, t.attributes, t.data) for t in r] == [
        ("a", {"unknown_key": {"x": 1}, "dtype_note": "\u00e9"}, np.arange(4, dtype=np.float32).tobytes()),
        ("b2", {"k": "v"}, b"\x01\x02\x03"), ("c", {}, b"\x0a\x00\x0c\x00")]
    assert cs.StreamReader(io.BytesIO(result)).manifest[1] == ("b2", "U8", (3, 1))
    # ckpt-write skips the ancillary frames it does not know.
    out_path = tmp_path / "o.safetensors"
    p = run(["ckpt-write", str(out_path)], input=result)
    assert p.returncode == 0, p.stderr
    assert load_file(str(out_path))["c"].tolist() == [10, 12]


# --- the reader refuses what the Swift reader refuses ------------------------------------------

def base_stream(compress=None):
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t", "metadata": {}},
                        manifest=[("a", "F32", (4,)), ("b", "U8", (3,))], chunk_size=8, compress=compress)
    w.write(cs.Tensor("a", "F32", (4,), np.arange(4, dtype=np.float32).tobytes()))
    w.write(cs.Tensor("b", "U8", (3,), b"\x07\x08\x09"))
    w.close()
    return buf.getvalue()


def duplicated_names():
    """A stream without a manifest that sends tensor "a" twice (the writer does not check)."""
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t", "metadata": {}})
    for _ in range(2):
        w.write(cs.Tensor("a", "U8", (1,), b"\x01"))
    w.close()
    return buf.getvalue()


def poke(s, offset, value, fmt="<B"):
    s = bytearray(s)
    struct.pack_into(fmt, s, offset, value)
    return bytes(s)


def replace_frame(s, kind, new_frame, n=0):
    at = frame_at(s, kind, n)
    old = [f for f in frames(s) if f[0] == at][0][2]
    return s[:at] + new_frame + s[at + len(old):]


def insert_before(s, kind, new_frame, n=0):
    at = frame_at(s, kind, n)
    return s[:at] + new_frame + s[at:]


def ancillary_with_dirty_padding():
    f = bytearray(cs.format.frame(0x80, b"abc"))
    f[-1] = 1
    return bytes(f)


P, Z, ZS = base_stream(), base_stream(compress=6), base_stream(compress="zstd:3")
C = lambda s, n=0: frame_at(s, cs.CHUNK, n)  # noqa: E731
MALFORMED = [
    ("empty input", b"", "the input is empty"),
    ("bad magic", P[:1] + b"X" + P[2:], r"not a ckpt stream \(bad magic\)"),
    ("major version 2", poke(P, 8, 2, "<H"), r"version 2\.0 is not supported"),
    ("preamble flags", poke(P, 12, 1), "reserved field preamble flags is not zero"),
    ("preamble reserved bytes", poke(P, 40, 1), "reserved field preamble padding is not zero"),
    ("short preamble", P[:30], "truncated stream: input ended inside the preamble"),
    ("frame marker", poke(P, 64, 0xFE), "frame does not start with the FFFFFFFF marker"),
    ("frame flags", poke(P, 64 + 5, 1), "reserved field frame flags is not zero"),
    ("frame reserved field", poke(P, 64 + 6, 1), "reserved field frame flags is not zero"),
    ("unknown critical frame kind", poke(P, frame_at(P, cs.TENSOR) + 4, 0x10), "unknown critical frame kind 0x10$"),
    ("header frame padding", poke(P, 64 + 127, 1), r"the header frame is not followed by zero padding \(frames are padded"),
    ("chunk frame padding", poke(P, C(P) + 64 + 8, 1), "the chunk frame is not followed by zero padding"),
    ("ancillary frame padding", insert_before(P, cs.TENSOR, ancillary_with_dirty_padding()),
     "the ancillary frame is not followed by zero padding"),
    ("chunk header cut short", P[:C(P) + 16 + 20], "input ended inside the 48-byte chunk header of tensor a"),
    ("chunk header reserved bytes", poke(P, C(P) + 50, 1), "reserved field chunk header is not zero"),
    ("shuffle width with codec 0", poke(P, C(P) + 40, 2), r"reserved field chunk shuffle width \(codec 0\) is not zero"),
    ("shuffle width 1 with codec 2", poke(Z, C(Z) + 40, 1), r"shuffle width 1 is not in 2\.\.\.16"),
    ("unknown codec", poke(P, C(P) + 32, 7, "<I"), "unknown chunk codec 7"),
    ("codec 0 stored != raw", poke(P, C(P) + 24, 4, "<Q"), "uncompressed chunk stores 8 bytes but declares 4"),
    ("chunk offset", poke(P, C(P) + 16, 8, "<Q"), r"chunk at tensor offset 8, expected 0 \(chunk lost or reordered\)"),
    # The second chunk (offset 8) made to hold 16 bytes: 8 of data and 8 of its padding.
    ("chunk beyond the tensor", poke(poke(P, C(P, 1) + 24, 16, "<Q"), C(P, 1) + 8, 64, "<Q"),
     r"chunk \[8, 24\) extends beyond the tensor's 16 bytes"),
    ("chunk crc", poke(P, C(P) + 36, zlib.crc32(np.arange(2, dtype=np.float32).tobytes()) ^ 1, "<I"),
     "crc32 mismatch in chunk at tensor offset 0"),
    ("corrupt zlib data", poke(Z, C(Z) + 64 + struct.unpack_from("<Q", Z, C(Z) + 8)[0] - 48 - 1,
                               Z[C(Z) + 64 + struct.unpack_from("<Q", Z, C(Z) + 8)[0] - 48 - 1] ^ 0xFF),
     "decompression failed: zlib"),
    ("corrupt zstd data", poke(ZS, C(ZS) + 64 + 8, ZS[C(ZS) + 64 + 8] ^ 0xFF), "decompression failed: zstd"),
    ("a name twice without a manifest", duplicated_names(), "tensor name appears twice in the stream"),
    ("chunk outside a tensor", insert_before(P, cs.TENSOR, [f[2] for f in frames(P) if f[1] == cs.CHUNK][0]),
     "unexpected chunk frame, expected tensor or end"),
    ("tensor-end reserved field", poke(P, frame_at(P, cs.TENSOR_END) + 28, 1, "<I"), "reserved field tensor-end is not zero"),
    ("tensor-end crc", poke(P, frame_at(P, cs.TENSOR_END) + 24, 1, "<I"), "crc32 mismatch: tensor-end frame says 0x00000001"),
    ("tensor byte length", poke(P, frame_at(P, cs.TENSOR) + 16 + 18, 12, "<Q"), "byte length 12 does not match F32"),
    ("tensor contradicts the manifest", poke(P, frame_at(P, cs.TENSOR) + 16 + 4, ord("c")),
     r"stream contradicts its manifest: manifest entry 0 is a F32\[4\], stream has c F32\[4\]"),
    ("manifest lists a name twice", replace_frame(P, cs.MANIFEST, cs.format.frame(cs.MANIFEST, struct.pack("<Q", 2) + 2 * (
        cs.format.encode_descriptor("a", "F32", (4,))))), "tensor name listed twice"),
    ("duplicate JSON key", replace_frame(P, cs.HEADER, cs.format.frame(
        cs.HEADER, b'{"producer":"t","producer":"u","source_format":"t"}')), "duplicate key"),
    ("lone surrogate in JSON", replace_frame(P, cs.HEADER, cs.format.frame(
        cs.HEADER, b'{"producer":"\\ud800","source_format":"t"}')), "lone surrogate"),
    # The header object, metadata, then 254 arrays: the 1 inside is the 257th level.
    ("JSON nested too deep", replace_frame(P, cs.HEADER, cs.format.frame(
        cs.HEADER, b'{"producer":"t","source_format":"t","metadata":{"x":' + b"[" * 254 + b"1" + b"]" * 254 + b"}}")),
     "nesting deeper than 256"),
    ("header without producer", replace_frame(P, cs.HEADER, cs.format.frame(cs.HEADER, b'{"source_format":"t"}')),
     "expected an object with string fields producer and source_format"),
    ("header frame too large", poke(P, 64 + 8, 1 << 31, "<Q"), "header frame declares 2147483648 bytes, more than the limit"),
    ("a second header", insert_before(P, cs.TENSOR, frames(P)[0][2]), "unexpected header frame, expected tensor or end"),
    ("missing end frame", P[:frame_at(P, cs.END)], "truncated stream: input ended inside the stream"),
    ("cut inside a tensor", P[:C(P, 1)], "truncated stream: input ended inside tensor a"),
    ("end frame totals", poke(P, frame_at(P, cs.END) + 16, 3, "<Q"), "end frame does not match the stream"),
    ("data after the end frame", P + bytes(64), "data after the end frame"),
]


@pytest.mark.parametrize("name,stream,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_reader_refuses_what_the_swift_reader_refuses(name, stream, message, tmp_path):
    with pytest.raises(cs.StreamError, match=message):
        cs.StreamReader(io.BytesIO(stream)).read_to_end()
    p = run(["ckpt-write", str(tmp_path / "o.safetensors")], input=stream)
    assert p.returncode == EX_DATAERR and not os.path.exists(tmp_path / "o.safetensors"), p.stderr
    assert re.search(message, p.stderr.decode()), p.stderr.decode()


def test_the_unmodified_base_streams_are_valid():
    for s in (P, Z, ZS):
        assert [t.data for t in cs.StreamReader(io.BytesIO(s))] == [np.arange(4, dtype=np.float32).tobytes(), b"\x07\x08\x09"]


# --- element-aligned numpy pieces ----------------------------------------------------------------

def test_aligned_arrays_carry_split_elements_over(tmp_path):
    values = {"f": np.arange(10, dtype=np.float32) * 1.5, "d": np.linspace(-1, 1, 5), "h": np.arange(9, dtype=np.int16),
              "bf": np.array([1.5, -2, 3.25, 4], np.float32).astype(ml_dtypes.bfloat16), "e": np.zeros(0, np.float32)}
    for compress in (None, 1):
        buf = io.BytesIO()
        w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t"}, chunk_size=7, compress=compress)
        for k, v in values.items():
            w.write(cs.from_array(k, v))
        w.close()
        # ckpt-write takes the oddly chunked stream too.
        p = run(["ckpt-write", "--force", str(tmp_path / "o.ckpts")], input=buf.getvalue())
        assert p.returncode == 0, p.stderr
        r = cs.StreamReader(io.BytesIO(buf.getvalue()))
        seen = {}
        for t in r.tensors():
            offsets = [c.offset for c in t.chunks()] if t.name == "h" else None
            if offsets is not None:
                assert offsets == [0, 7, 14]  # 18 bytes of I16 in chunks of 7: elements split at 7 and 14
                continue
            pieces = list(t.arrays())
            seen[t.name] = pieces
            assert all(p.dtype == values[t.name].dtype for p in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), values[t.name])
        # 40 bytes in chunks of 7 end at 7, 14, 21, 28, 35, 40: whole elements so far 1, 3, 5, 7, 8, 10.
        assert [len(p) for p in seen["f"]] == [1, 2, 2, 2, 1, 2]
        # F64 (8 bytes) in chunks of 7: the first chunk holds no whole element.
        assert [len(p) for p in seen["d"]] == [1, 1, 1, 1, 1]
        assert seen["e"] == []
    # Without ml_dtypes' types, BF16 as bit patterns.
    r = cs.StreamReader(io.BytesIO(buf.getvalue()))
    for t in r.tensors():
        if t.name == "bf":
            bits = np.concatenate(list(t.arrays("<u2")))
            break
    with pytest.raises(cs.UsageError, match="tensor bf: the reader has moved past this tensor"):
        next(iter(r.tensors()))
        t.read()
    assert bits.tolist() == values["bf"].view(np.uint16).tolist()


# --- the worked filters --------------------------------------------------------------------------

def f8_bits(path, name):
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(name)
    assert t.dtype == torch.float8_e4m3fn
    return t.view(torch.uint8).numpy()


def test_f8_rounding_matches_ml_dtypes_bit_for_bit():
    rng = np.random.default_rng(7)
    grid = np.array(sorted({float(v) for v in np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
                            .astype(np.float32) if np.isfinite(v)}), np.float32)
    mids = (grid[1:] + grid[:-1]) / 2  # ties: round to even
    x = np.concatenate([
        grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        np.array([0.0, -0.0, 448, 464, 464.00003, 480, 1e30, np.inf, -np.inf, np.nan, -np.nan, 2 ** -10, 3 * 2 ** -11,
                  1e-45, -1e-45, 2 ** -6, np.nextafter(2 ** -6, 0)], np.float32),
        (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32),  # every exponent and sign, top mantissa bits
        rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        rng.standard_normal(100_000).astype(np.float32) * 100,
    ])
    ours = cs.f32_to_f8e4m3fn_bits(x)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns casting NaN and infinities
        assert np.array_equal(ours, x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    finite = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(cs.f8e4m3fn_bits_to_f32(finite),
                                  finite.view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_fp8_filter_end_to_end(tmp_path):
    rng = np.random.default_rng(11)
    src_t = {"l.weight": rng.standard_normal((64, 33)).astype(np.float32) * 3,
             "l.bias": rng.standard_normal(33).astype(np.float32),
             "h.weight": (rng.standard_normal(40) * 1e-3).astype(np.float16),
             "b.weight": rng.standard_normal(50).astype(np.float32).astype(ml_dtypes.bfloat16),
             "z.weight": np.zeros(4, np.float32),
             "ids": np.arange(5, dtype=np.int64)}
    src = tmp_path / "in.safetensors"
    save_file(src_t, str(src))
    out = tmp_path / "out.safetensors"
    rc, errs, _ = pipeline([tool("ckpt-read"), "--compress", "zlib", str(src)], filter_cmd("fp8.py", "*.weight"),
                           [tool("ckpt-write"), str(out)])
    assert rc == [0, 0, 0], errs
    assert "spool" not in errs[2]  # the new tensors were in the manifest
    with safe_open(str(out), framework="pt") as f:
        names = sorted(f.keys())
    assert names == sorted(["l.weight", "l.weight.scale", "l.bias", "h.weight", "h.weight.scale", "b.weight",
                            "b.weight.scale", "z.weight", "z.weight.scale", "ids"])
    for n in ("l.weight", "h.weight", "b.weight", "z.weight"):
        x = src_t[n].astype(np.float32)
        amax = np.float32(np.abs(x).max())
        scale = amax / np.float32(448) if amax > 0 else np.float32(1)
        with safe_open(str(out), framework="pt") as f:
            got_scale = f.get_tensor(n + ".scale")
        assert got_scale.dtype == torch.float32 and got_scale.shape == () and got_scale.item() == scale, n
        expected = (x / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        assert np.array_equal(f8_bits(out, n), expected), n
        assert f8_bits(out, n).shape == src_t[n].shape
    with safe_open(str(out), framework="pt") as f:
        np.testing.assert_array_equal(f.get_tensor("l.bias").numpy(), src_t["l.bias"])
        np.testing.assert_array_equal(f.get_tensor("ids").numpy(), src_t["ids"])
    # The largest magnitude maps to 448 exactly.
    assert (f8_bits(out, "l.weight") & 0x7F).max() == 0x7E


def test_fp8_refuses_non_finite_values(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file({"w": np.array([1.0, np.inf], np.float32)}, str(src))
    rc, errs, _ = pipeline([tool("ckpt-read"), str(src)], filter_cmd("fp8.py", "*"),
                           [tool("ckpt-write"), str(tmp_path / "o.safetensors")])
    assert rc[1:] == [EX_DATAERR, EX_DATAERR], errs
    assert "fp8.py: tensor w: has an infinity or NaN" in errs[1]
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_rename_filter_end_to_end(model, tmp_path):
    src, ref = model
    out = tmp_path / "out.safetensors"
    rc, errs, _ = pipeline([tool("ckpt-read"), str(src)], filter_cmd("rename.py", r"^(enc|dec)\.(\w+)$", r"model.\1.layer.\2"),
                           [tool("ckpt-write"), str(out)])
    assert rc == [0, 0, 0], errs
    back = load_file(str(out))
    assert sorted(back) == sorted(["model.enc.layer.gamma", "model.enc.layer.bias", "model.dec.layer.gamma", "big", "half",
                                   "emb.position_ids"])
    np.testing.assert_array_equal(back["model.dec.layer.gamma"], ref["dec.gamma"])
    np.testing.assert_array_equal(back["emb.position_ids"], ref["emb.position_ids"])


def test_rename_collision_is_refused_before_anything_is_written(model, tmp_path):
    src, _ = model
    out = tmp_path / "out.safetensors"
    rc, errs, _ = pipeline([tool("ckpt-read"), str(src)], filter_cmd("rename.py", r"\.(gamma|bias)$", ".w"),
                           [tool("ckpt-write"), str(out)])
    assert rc[1:] == [EX_DATAERR, EX_DATAERR], errs
    assert errs[1].strip() == ("rename.py: two output tensors would be named 'enc.w': from input tensor 'enc.gamma' and "
                               "from input tensor 'enc.bias'") or errs[1].strip() == (
        "rename.py: two output tensors would be named 'enc.w': from input tensor 'enc.bias' and "
        "from input tensor 'enc.gamma'"), errs[1]
    assert "the input is empty" in errs[2]
    assert not os.path.exists(out)
    p = subprocess.run(filter_cmd("rename.py", "(", "x"), capture_output=True)
    assert p.returncode == 64 and b"bad PATTERN" in p.stderr


def test_scale_filter_streams_across_split_elements(tmp_path):
    """scale.py scales chunk by chunk; with 7-byte chunks elements straddle chunks."""
    x = {"a.w": np.random.default_rng(2).standard_normal(100).astype(np.float32),
         "b.w": np.random.default_rng(3).standard_normal(30).astype(np.float32).astype(ml_dtypes.bfloat16),
         "c": np.arange(6, dtype=np.float16)}
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t"}, manifest=[(k, cs.from_array(k, v).dtype, v.shape)
                                                                               for k, v in x.items()], chunk_size=7)
    for k, v in x.items():
        w.write(cs.from_array(k, v))
    w.close()
    out = tmp_path / "o.safetensors"
    rc, errs, _ = pipeline(filter_cmd("scale.py", "*.w", "-0.3"), [tool("ckpt-write"), str(out)], input=buf.getvalue())
    assert rc == [0, 0], errs
    back = load_file(str(out))
    np.testing.assert_array_equal(back["a.w"], x["a.w"] * np.float32(-0.3))
    expected = (x["b.w"].astype(np.float32) * np.float32(-0.3)).astype(ml_dtypes.bfloat16)
    assert back["b.w"].view(np.uint16).tolist() == expected.view(np.uint16).tolist()
    np.testing.assert_array_equal(back["c"], x["c"])


def test_zstd_chunks_both_ways(tmp_path):
    # Swift writes zstd (codecs 4 and 3), Python reads it; Python writes zstd, ckpt-write reads it.
    src = tmp_path / "m.safetensors"
    t = {"w": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100), "ids": np.arange(7, dtype=np.uint8)}
    save_file(t, str(src))
    # Level 1 compresses shuffled chunks with a 64-entry match table of our choosing, level 2
    # with zstd's own parameters: both must be plain zstd frames to another decoder.
    for codec in ("zstd", "zstd:2"):
        stream = run(["ckpt-read", "--compress", codec, str(src)], check=True).stdout
        chunks = [struct.unpack_from("<I", stream, at + 32)[0] for at, kind, _ in frames(stream) if kind == cs.CHUNK]
        assert chunks == [4, 3]
        got = {x.name: x.data for x in cs.StreamReader(io.BytesIO(stream))}
        assert got == {k: v.tobytes() for k, v in t.items()}
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t", "metadata": {}}, compress="zstd")
    for k, v in t.items():
        w.write(cs.from_array(k, v))
    w.close()
    out = tmp_path / "o.safetensors"
    run(["ckpt-write", str(out)], input=buf.getvalue(), check=True)
    back = load_file(str(out))
    assert set(back) == set(t) and all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in t.items())
