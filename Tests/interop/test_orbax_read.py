"""Reading Orbax checkpoints (written by the real orbax, see Tests/fixtures/orbax/README.md),
compared bit for bit with what orbax itself restores."""
import io
import json
import os
import shutil

import numpy as np
import pytest

import ckpt_stream as cs
from conftest import ROOT, run, shell

FIXTURES = os.path.join(ROOT, "Tests", "fixtures", "orbax")
EX_DATAERR = 65


def orbax_restore(path):
    import orbax.checkpoint as ocp
    try:
        return ocp.StandardCheckpointer().restore(path)
    except Exception:
        return ocp.PyTreeCheckpointer().restore(path)


def flat(tree, prefix=""):
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, (dict, list, tuple)):
            out.update(flat(v, name))
        elif v is not None and hasattr(v, "shape"):
            out[name] = np.asarray(v)
    return out


def read(path, *args):
    p = run(["ckpt-read", *args, path])
    assert p.returncode == 0, p.stderr.decode()
    r = cs.StreamReader(io.BytesIO(p.stdout))
    return r, {t.name: t for t in r}


CASES = ["a_standard", "b_pytree", "c_no_ocdbt", "h_zarr3", "i_nocompress", "j_sharded", "k_dotkey",
         "hand/zarr_plain", "hand/zarr_plain_min", "hand/ocdbt_raw", "hand/ocdbt_zstdnodes", "hand/ocdbt_zlib",
         "hand/ocdbt_gzip", "hand/ocdbt_multichunk"]


@pytest.mark.parametrize("case", CASES)
def test_same_arrays_as_orbax_restores(case):
    path = os.path.join(FIXTURES, case)
    expected = flat(orbax_restore(path))
    _, ours = read(path)
    scalars = {k for k, v in expected.items() if v.shape == () and k not in ours}
    assert set(ours) == set(expected) - scalars, case
    for name, t in ours.items():
        want = expected[name]
        assert list(t.shape) == list(want.shape), name
        assert t.data == np.ascontiguousarray(want).tobytes(), name


def test_manager_roots_pick_the_latest_step_or_the_one_asked():
    root = os.path.join(FIXTURES, "e_manager")
    _, latest = read(root)
    ref10 = flat(orbax_restore(os.path.join(root, "10", "default")))
    ref0 = flat(orbax_restore(os.path.join(root, "0", "default")))
    assert latest["params/emb"].data == ref10["params/emb"].tobytes()
    _, first = read(root, "--step", "0")
    assert first["params/emb"].data == ref0["params/emb"].tobytes()
    assert run(["ckpt-read", "--list", "--step", "7", root]).returncode == EX_DATAERR
    _, composite = read(os.path.join(FIXTURES, "f_manager_composite"))  # the params/ item of step 1
    assert set(composite) == set(flat(orbax_restore(os.path.join(FIXTURES, "f_manager_composite", "1", "params"))))


def test_scalars_and_strings_go_to_the_metadata():
    r, ours = read(os.path.join(FIXTURES, "l_misc"))
    assert list(ours) == ["np"]
    md = r.header["metadata"]
    ref = orbax_restore(os.path.join(FIXTURES, "l_misc"))
    assert md["s"] == ref["s"] and md["i"] == ref["i"] and md["f"] == pytest.approx(ref["f"])


def test_openpi_style_value_leaves_are_stripped(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    tree = {"params": {"PaliGemma": {"llm": {"w": {"value": jnp.ones((2, 3), jnp.bfloat16)}}}, "b": {"value": jnp.zeros(4)}}}
    path = str(tmp_path / "params")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    _, ours = read(path)
    assert set(ours) == {"params/PaliGemma/llm/w", "params/b"}
    _, kept = read(path, "--no-strip-value")
    assert set(kept) == {"params/PaliGemma/llm/w/value", "params/b/value"}
    # --root params: the sub-tree openpi's restore_params returns, named from there.
    _, rooted = read(path, "--root", "params")
    assert set(rooted) == {"PaliGemma/llm/w", "b"}
    assert run(["ckpt-read", "--root", "opt_state", path]).returncode == 65


def test_orbax_to_safetensors_pipeline(tmp_path):
    out = tmp_path / "o.safetensors"
    assert shell(f"ckpt-read {os.path.join(FIXTURES, 'a_standard')} | ckpt-write {out}").returncode == 0
    from safetensors.numpy import load_file
    got = load_file(str(out))
    ref = flat(orbax_restore(os.path.join(FIXTURES, "a_standard")))
    for k, v in got.items():
        assert np.array_equal(v, ref[k])


@pytest.mark.parametrize("case", ["a_standard", "c_no_ocdbt", "j_sharded", "h_zarr3"])
def test_read_ahead_changes_nothing_but_speed(case):
    """Arrays decoded ahead on another core come out in the same order with the same bytes as
    one at a time, and a budget too small for two arrays still reads everything."""
    path = os.path.join(FIXTURES, case)
    streams = [run(["ckpt-read", *args, path], check=True).stdout
               for args in ([], ["--read-ahead", "0"], ["--read-ahead", "100"])]
    assert streams[0] == streams[1] == streams[2]
    assert run(["ckpt-read", "--read-ahead", "lots", path]).returncode == 64


# --- bad input: each a clear one-line error, exit 65, no output --------------------------------

def copy(case, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, case), dst)
    return dst


def refuse(path, tmp_path, *needles):
    p = run(["ckpt-read", "--list", str(path)])
    err = p.stderr.decode()
    assert p.returncode == EX_DATAERR, err
    assert len(err.strip().splitlines()) == 1
    for n in needles:
        assert n in err, err
    out = tmp_path / "o.safetensors"
    assert shell(f"ckpt-read {path} | ckpt-write {out}").returncode != 0 and not out.exists()


def test_missing_metadata(tmp_path):
    refuse(os.path.join(FIXTURES, "hand", "ocdbt_no_metadata"), tmp_path, "missing _METADATA")


def test_manifest_with_bad_magic_or_version(tmp_path):
    ckpt = copy("hand/ocdbt_raw", tmp_path)
    m = bytearray((ckpt / "manifest.ocdbt").read_bytes())
    m[0] ^= 0xFF
    (ckpt / "manifest.ocdbt").write_bytes(bytes(m))
    refuse(ckpt, tmp_path, "bad magic")
    m[0] ^= 0xFF
    m[12] = 5  # version varint
    (ckpt / "manifest.ocdbt").write_bytes(bytes(m))
    refuse(ckpt, tmp_path, "crc32c")  # the crc covers the version byte: caught first


def test_truncated_btree_node(tmp_path):
    ckpt = copy("a_standard", tmp_path)
    for f in (ckpt / "d").iterdir():
        f.write_bytes(f.read_bytes()[:-7])
    refuse(ckpt, tmp_path, "OCDBT")


def test_forged_chunk_shape_is_refused_without_allocating(tmp_path):
    ckpt = copy("c_no_ocdbt", tmp_path)
    z = ckpt / "params.emb" / ".zarray"
    meta = json.loads(z.read_text())
    meta["shape"] = [1 << 20, 1 << 20]  # 2 TiB of bfloat16, from a 17-byte chunk
    meta["chunks"] = [1 << 20, 1 << 20]
    z.write_text(json.dumps(meta))
    refuse(ckpt, tmp_path, "params/emb", "declares 12 bytes")


@pytest.mark.parametrize("chunks", [[2, 3], [1, 1]])
def test_forged_chunk_grid_is_refused_at_once(tmp_path, chunks):
    # 10**11 declared chunks over one stored chunk: refused from the count of stored chunks,
    # without walking the grid (this used to spin for minutes, or abort under a memory limit).
    ckpt = copy("c_no_ocdbt", tmp_path)
    z = ckpt / "params.emb" / ".zarray"
    meta = json.loads(z.read_text())
    meta["shape"] = [1 << 20, 1 << 20]
    meta["chunks"] = chunks
    z.write_text(json.dumps(meta))
    p = shell(f"ulimit -v 2000000; timeout 60 ckpt-read --list {ckpt}")
    err = p.stderr.decode()
    assert p.returncode == EX_DATAERR, err
    assert "params/emb" in err and "chunks, the store holds 1" in err, err
    refuse(ckpt, tmp_path, "chunks, the store holds 1")


def test_unknown_codec_is_named(tmp_path):
    ckpt = copy("c_no_ocdbt", tmp_path)
    z = ckpt / "params.emb" / ".zarray"
    meta = json.loads(z.read_text())
    meta["compressor"] = {"id": "blosc", "cname": "lz4"}
    z.write_text(json.dumps(meta))
    refuse(ckpt, tmp_path, "blosc")


@pytest.mark.parametrize("zarr3", [False, True])
def test_live_orbax_many_chunks_lists_bool_and_manager(tmp_path, zarr3):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    big = jax.device_put(jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48), NamedSharding(mesh, P("x", "y")))
    tree = {"params": {"w": big, "b16": jnp.arange(10, dtype=jnp.bfloat16), "ids": jnp.arange(5, dtype=jnp.int32),
                       "mask": jnp.array([True, False, True]), "layers": [{"k": jnp.ones((2, 2))}, {"k": jnp.zeros((2, 2))}]}}
    options = ocp.CheckpointManagerOptions(max_to_keep=3)
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=zarr3)
    with ocp.CheckpointManager(str(tmp_path / "run"), options=options,
                               item_handlers={"params": handler}) as mngr:
        for step in (1, 2, 3):
            t = jax.tree_util.tree_map(lambda a: a + step if a.dtype != jnp.bool_ else a, tree)
            mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(t)))
        mngr.wait_until_finished()
    _, ours = read(str(tmp_path / "run"))  # the latest step, its params/ item
    expected = flat(jax.tree_util.tree_map(lambda a: a + 3 if a.dtype != jnp.bool_ else a, tree))
    assert set(ours) == set(expected)
    for name, want in expected.items():
        assert ours[name].data == np.asarray(want).tobytes(), name
    _, first = read(str(tmp_path / "run"), "--step", "1")
    assert first["params/w"].data == (np.asarray(big) + 1).tobytes()


def test_truncated_chunk_is_an_error(tmp_path):
    # tensorstore's zstd frames carry no checksum: flipped bits can decode without complaint,
    # for tensorstore as for us. A cut frame cannot.
    ckpt = copy("c_no_ocdbt", tmp_path)
    chunk = ckpt / "params.layer0.kernel" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-6])
    p = run(["ckpt-read", str(ckpt)])
    err = p.stderr.decode()
    assert p.returncode == EX_DATAERR and "params/layer0/kernel" in err and len(err.strip().splitlines()) == 1, err
    # The array is decoded as the stream goes, so part of it was already sent: the writer
    # downstream must fail on the cut stream and leave nothing.
    out = tmp_path / "out.safetensors"
    p = shell(f"ckpt-read {ckpt} | ckpt-write {out}")
    assert p.returncode != 0 and not out.exists() and not list(tmp_path.glob(".out.safetensors*")), p.stderr


@pytest.mark.parametrize("ocdbt,zarr3", [(True, False), (True, True), (False, False), (False, True)])
def test_arrays_orbax_splits_into_chunk_rows_stream_equal(tmp_path, ocdbt, zarr3):
    """Orbax splits a large array into chunks along its leading axes (chunk_byte_size; by
    default above ~2 GB): ckpt-read emits those a chunk row at a time (a zstd slab decoded as the
    stream goes) and must give orbax's own restore, byte for byte."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.standard_normal((7, 5, 6), dtype=np.float32)),
            "b": jnp.asarray(rng.standard_normal((13, 4), dtype=np.float32)).astype(jnp.bfloat16),
            "e": jnp.asarray(rng.standard_normal((12, 10, 8), dtype=np.float32)),
            "s": jnp.asarray(rng.standard_normal((9, 3), dtype=np.float32))}
    args = {"w": ocp.SaveArgs(chunk_byte_size=5 * 6 * 4 * 3), "b": ocp.SaveArgs(chunk_byte_size=4 * 2 * 5),
            "e": ocp.SaveArgs(chunk_byte_size=4 * 10 * 8 * 4), "s": ocp.SaveArgs()}
    path = str(tmp_path / "ckpt")
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)).save(path, tree, save_args=args)
    _, ours = read(path)
    restored = flat(orbax_restore(path))
    for k, v in tree.items():
        assert ours[k].data == np.asarray(v).tobytes() == restored[k].tobytes(), k


@pytest.mark.parametrize("chunks", [[3, 5], [2, 5], [7, 2], [7, 3], [3, 2], [7, 5]])
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_edge_chunks_and_bands_are_cut_to_the_array(tmp_path, chunks, compressor):
    """Chunks split along one axis, the first or the last, read side by side, with an edge chunk
    that overhangs the array (zarr stores it padded to full size); chunks split along both
    (decoded a band of chunk rows at a time); one chunk: the bytes are the array's, as
    tensorstore reads it."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import tensorstore as ts
    path = tmp_path / "ckpt"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(str(path), {"x": jnp.zeros((7, 5), jnp.float32)})
    want = np.arange(35, dtype=np.float32).reshape(7, 5) * 0.5 - 3
    shutil.rmtree(path / "x")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / "x")},
            "metadata": {"shape": [7, 5], "chunks": chunks, "dtype": "<f4",
                         "compressor": {"id": "zstd", "level": 1} if compressor else None}}
    ts.open(spec, create=True).result().write(want).result()
    _, ours = read(str(path))
    assert ours["x"].data == want.tobytes()
    # A chunk cut short: the stream must fail, not pad.
    last = path / "x" / f"{(7 - 1) // chunks[0]}.{(5 - 1) // chunks[1]}"
    if compressor and (chunks[0] < 7 or chunks[1] < 5):
        last.write_bytes(last.read_bytes()[:-3])
        p = run(["ckpt-read", str(path)])
        assert p.returncode == EX_DATAERR and "x" in p.stderr.decode(), p.stderr.decode()
