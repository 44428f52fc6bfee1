#!/usr/bin/env python3
"""Writes the fuzz seed corpora, Tests/fuzz/corpus/<target>/, from the test fixtures and
from small files written by the real libraries (torch, numpy, safetensors, flax, orbax).

    .venv/bin/python scripts/fuzz_seeds.py        # rewrites Tests/fuzz/corpus/

Folder targets (ocdbt, zarr, safetensors-index) take several files in one input:
`==> relative/path <==` lines, each followed by that file's bytes (see Sources/ckpt-fuzz).
Every seed is kept small (files over MAX bytes are left out) so the fuzzer runs fast.
"""
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "Tests", "fuzz", "corpus")
MAX = 24 * 1024
sys.path.insert(0, os.path.join(ROOT, "python"))


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    if len(data) > 64 * 1024:
        print(f"skip {target}/{name}: {len(data)} bytes", file=sys.stderr)
        return
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def container(files):
    """files: [(relative path, bytes)] -> one input for a folder target."""
    parts = []
    for name, data in files:
        parts.append(b"==> " + name.encode() + b" <==\n" + data)
    return b"\n".join(parts)


def folder_files(top, skip=()):
    out = []
    for dirpath, _, names in sorted(os.walk(top)):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, top)
            if any(s in rel for s in skip) or os.path.getsize(p) > MAX:
                continue
            out.append((rel, open(p, "rb").read()))
    return out


def stream_seeds():
    golden = os.path.join(ROOT, "Tests", "SharedTests", "Golden")
    for n in sorted(os.listdir(golden)):
        if n.endswith(".ckpts"):
            put("stream", n, open(os.path.join(golden, n), "rb").read())
    import numpy as np
    import ckpt_stream as cs
    for compress in (None, 6):
        for manifest in (True, False):
            buf = io.BytesIO()
            tensors = [cs.from_array("a", np.arange(12, dtype=np.float32).reshape(3, 4)),
                       cs.from_array("b/c", np.array([1, 2, 3], dtype=np.int64), attributes={"k": "v"}),
                       cs.from_array("s", np.array(2.5, dtype=np.float16))]
            m = [(t.name, t.dtype, t.shape) for t in tensors] if manifest else None
            w = cs.StreamWriter(buf, {"producer": "seed", "source_format": "test", "metadata": {"x": 1}},
                                manifest=m, compress=compress, chunk_size=16)
            for t in tensors:
                w.write(t)
            w.close()
            put("stream", f"py-{'zlib' if compress else 'plain'}{'-manifest' if manifest else ''}.ckpts", buf.getvalue())


def safetensors_seeds():
    import numpy as np
    from safetensors.numpy import save
    files = {
        "mixed": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64),
                  "c": np.zeros((0, 3), dtype=np.float16), "d": np.array(True), "e": np.arange(4, dtype=np.uint8)},
        "one": {"w": np.ones((4, 4), dtype=np.float64)},
        "empty": {},
        "dtypes": {f"t_{d}": np.arange(3).astype(d) for d in
                   ["int8", "int16", "int32", "uint16", "uint32", "uint64", "float16", "float32", "bool"]},
    }
    for name, tensors in files.items():
        meta = {"format": "pt", "note": "seed"} if name == "mixed" else None
        data = save(tensors, metadata=meta)
        put("safetensors", name + ".safetensors", data)
        n = struct.unpack("<Q", data[:8])[0]
        put("safetensors-header", name + ".bin", struct.pack("<Q", len(data) - 8 - n) + data[8:8 + n])
    # bf16 and a shape-less scalar, by hand
    hdr = json.dumps({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                      "y": {"dtype": "F8_E4M3", "shape": [], "data_offsets": [4, 5]},
                      "__metadata__": {"a": "b"}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    put("safetensors", "bf16.safetensors", struct.pack("<Q", len(hdr)) + hdr + bytes(range(5)))
    put("safetensors-header", "bf16.bin", struct.pack("<Q", 5) + hdr)
    # a sharded checkpoint with its index
    s1 = save({"a": np.arange(4, dtype=np.float32)})
    s2 = save({"b": np.arange(2, dtype=np.int32), "c": np.ones(3, dtype=np.float16)})
    index = json.dumps({"metadata": {"total_size": 30},
                        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                                       "c": "model-00002-of-00002.safetensors"}}, indent=2).encode()
    put("safetensors-index", "two-shards", container([("model.safetensors.index.json", index),
                                                      ("model-00001-of-00002.safetensors", s1),
                                                      ("model-00002-of-00002.safetensors", s2)]))
    put("safetensors-index", "one-file", container([("model.safetensors", s1)]))
    put("json", "index.json", index)


def torch_seeds():
    import torch
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    trees = {
        "simple": {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.int64)},
        "views": {"base": base, "t": base.t(), "slice": base[1:3, ::2], "same": base},
        "dtypes": {str(d).split(".")[1]: torch.arange(3).to(d) for d in
                   [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool]},
        "nested": {"model": OrderedDict(layer=OrderedDict(weight=torch.randn(2, 2), bias=torch.randn(2))),
                   "epoch": 3, "lr": 0.1, "name": "x", "none": None, "list": [torch.ones(1), 2], "tuple": (1, 2.5)},
        "scalar": {"s": torch.tensor(3.5), "e": torch.empty(0, 4)},
    }
    for name, tree in trees.items():
        for proto in range(0, 6):
            for zipped in (True, False):
                if proto < 2 and zipped and name not in ("simple", "views"):
                    continue
                if not zipped and proto != 2 and name != "simple":
                    continue  # the reader knows legacy files by protocol 2's magic only
                buf = io.BytesIO()
                try:
                    torch.save(tree, buf, pickle_protocol=proto, _use_new_zipfile_serialization=zipped)
                except Exception as e:
                    print("torch.save", name, proto, zipped, e, file=sys.stderr)
                    continue
                data = buf.getvalue()
                put("torch", f"{name}-p{proto}-{'zip' if zipped else 'legacy'}.pt", data)
                if zipped:
                    z = zipfile.ZipFile(io.BytesIO(data))
                    pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
                    put("pickle", f"{name}-p{proto}.pkl", z.read(pkl))
    for proto in range(0, 6):
        obj = {"a": [1, 2.5, "s", b"b", None, True, (1, 2)], "big": 2 ** 70, "neg": -5, "d": {1: 2}, "u": "\u00e9\u4e2d",
               "set": frozenset([1]), "l": list(range(300))}
        put("pickle", f"builtins-p{proto}.pkl", pickle.dumps(obj, protocol=proto))
    shared = [1, 2]
    put("pickle", "memo-p2.pkl", pickle.dumps({"x": shared, "y": shared, "z": (shared, shared)}, protocol=2))


def numpy_seeds():
    import numpy as np
    arrays = {
        "f32": np.arange(6, dtype="<f4").reshape(2, 3),
        "f64-fortran": np.asfortranarray(np.arange(6, dtype="<f8").reshape(2, 3)),
        "i64-be": np.arange(4, dtype=">i8"),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False]),
        "f16-scalar": np.array(1.5, dtype=np.float16),
        "empty": np.zeros((0, 2), dtype=np.int32),
        "c64": np.arange(2, dtype=np.complex64),
        "i16-3d": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    }
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a)
        put("npy", name + ".npy", buf.getvalue())
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(3, dtype="<u4"), version=(2, 0))
    put("npy", "v2.npy", buf.getvalue())
    for compressed in (False, True):
        buf = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(buf, a=arrays["f32"], b=arrays["i64-be"], c=arrays["f16-scalar"],
                                                          d=arrays["bool"], **{"x/y": arrays["u8"]})
        put("npz", ("compressed" if compressed else "stored") + ".npz", buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf)
    put("npz", "empty.npz", buf.getvalue())


def msgpack_seeds():
    import numpy as np
    from flax import serialization
    trees = {
        "params": {"params": {"Dense_0": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
                              "embed": {"embedding": np.arange(6, dtype=np.float16).reshape(2, 3)}}},
        "mixed": {"step": 3, "lr": 0.5, "name": "x", "flag": True, "none": None, "ids": np.arange(3, dtype=np.int64),
                  "c": np.array([1 + 2j], np.complex64), "list": [np.ones(2, np.int8), 1], "scalar": np.float32(2.0)},
        "dtypes": {d: np.arange(2).astype(d) for d in ["uint8", "int16", "int32", "uint32", "float64", "bool"]},
    }
    try:
        import jax.numpy as jnp
        trees["bf16"] = {"w": np.asarray(jnp.ones((2, 2), jnp.bfloat16))}
    except Exception as e:
        print("bf16 seed:", e, file=sys.stderr)
    for name, tree in trees.items():
        try:
            put("msgpack", name + ".msgpack", serialization.msgpack_serialize(tree))
        except Exception as e:
            print("msgpack", name, e, file=sys.stderr)


def orbax_seeds():
    fx = os.path.join(ROOT, "Tests", "fixtures", "orbax")
    skip = ("commit_success", "_CHECKPOINT_METADATA")
    for name in ["a_standard", "b_pytree", "h_zarr3", "i_nocompress", "j_sharded", "k_dotkey", "l_misc"]:
        put("ocdbt", name, container(folder_files(os.path.join(fx, name), skip)))
    for name in ["ocdbt_raw", "ocdbt_zlib", "ocdbt_gzip", "ocdbt_multichunk", "ocdbt_no_metadata", "tiny", "ocdbt_zstdnodes"]:
        files = folder_files(os.path.join(fx, "hand", name), skip)
        put("ocdbt", "hand-" + name, container(files))
    put("ocdbt", "manager", container(folder_files(os.path.join(fx, "e_manager"), skip + ("/10/",))))
    # the deep B+tree: its node files only, with the manifest (many keys)
    deep = folder_files(os.path.join(fx, "g_deep_btree"), skip)
    put("ocdbt", "deep-btree", container(deep))
    for name in ["c_no_ocdbt"]:
        put("zarr", name, container(folder_files(os.path.join(fx, name), skip)))
    for name in ["zarr_plain_min", "zarr_plain"]:
        put("zarr", "hand-" + name, container(folder_files(os.path.join(fx, "hand", name), skip)))
    for dirpath, _, names in os.walk(fx):
        for n in names:
            if n in (".zarray", "zarr.json"):
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, fx).replace("/", "_")
                put("zarr-metadata", rel, open(p, "rb").read())
            if n == "_METADATA":
                put("json", "orbax-" + os.path.relpath(dirpath, fx).replace("/", "_"), open(os.path.join(dirpath, n), "rb").read())
    # zarr v3 without OCDBT, written by orbax itself
    try:
        import numpy as np
        import orbax.checkpoint as ocp
        tmp = tempfile.mkdtemp()
        try:
            tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int32)}
            for zarr3 in (True, False):
                d = os.path.join(tmp, f"z{int(zarr3)}")
                h = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=zarr3)
                ocp.Checkpointer(h).save(d, args=ocp.args.PyTreeSave(tree))
                put("zarr", f"orbax-zarr{3 if zarr3 else 2}", container(folder_files(d, skip)))
                for rel, data in folder_files(d, skip):
                    if rel.endswith((".zarray", "zarr.json")):
                        put("zarr-metadata", f"orbax-zarr{3 if zarr3 else 2}-" + rel.replace("/", "_"), data)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        print("orbax zarr seeds:", e, file=sys.stderr)


def text_seeds():
    rules = os.path.join(ROOT, "rules")
    for n in sorted(os.listdir(rules)):
        text = open(os.path.join(rules, n), "rb").read()
        if b"include " in text:  # the included file travels with it, as a second part
            text = container([(n, text), ("openpi-common.rules", open(os.path.join(rules, "openpi-common.rules"), "rb").read())])
        put("rules", n, text)
    put("rules", "ops.rules", "\n".join([
        "# every kind of line and op",
        "drop {p*}.position_ids",
        "keep scalar",
        "{p*}.{m}.weight -> {p}/{m}/kernel | rearrange \"o i -> i o\"",
        "params/{p*}/attention/self/{q}/kernel -> {p}.{q}.weight | rearrange \"d h k -> (h k) d\" | cast bf16",
        "params/{p*}/mlp/gate_up/kernel -> {p}.gate.weight | index [0] | rearrange \"i o -> o i\"",
        "params/embedder/input_embedding -> embed.weight | where rank=2 dtype=bf16 | scale 0.5",
        "model.layers.{l}.mlp.experts.{e}.down_proj.weight -> experts.{l}.down | stack e",
    ]) + "\n")
    for name, cfg in {
        "basic": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": False, "fan_in_fan_out": False,
                  "target_modules": ["q_proj", "v_proj"], "bias": "none"},
        "patterns": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
                     "rank_pattern": {"q_proj": 2, "model.layers.0.self_attn.q_proj": 16},
                     "alpha_pattern": {"^lm_head$": 3.5, "layers\\.0": 1}},
        "dora": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "lora_bias": True},
        "minimal": {"r": 2, "lora_alpha": 3},
    }.items():
        data = json.dumps(cfg, indent=2)
        put("peft", name + ".json", data)
        put("json", "peft-" + name + ".json", data)
    put("json", "values.json", json.dumps({"a": [1, -2.5e-3, 1e300, True, False, None, "\u00e9\\\"\n\t\u0001"],
                                           "nested": {"x": [[[]]], "y": {}}, "big": 123456789012345678901234567890}))
    put("json", "scalar.json", "  -0.0e+5 ")


if __name__ == "__main__":
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    for step in (stream_seeds, safetensors_seeds, torch_seeds, numpy_seeds, msgpack_seeds, orbax_seeds, text_seeds):
        try:
            step()
        except Exception as e:
            print(f"{step.__name__}: {e}", file=sys.stderr)
            raise
    total = 0
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        total += size
        print(f"{t}: {len(files)} seeds, {size} bytes")
    print(f"total {total} bytes")
