"""Equinox side of the eqx tests (runs in .venv-eqx, Python >= 3.12): makes a small Equinox
model and its template folder (weights.eqx by equinox.tree_serialise_leaves, leaves.json as
`ckpt-write --format eqx --like` reads it), and checks a weights.eqx written by ckpt against
what equinox itself reads and writes.

  eqx_template.py make TEMPLATE_DIR NEW_WEIGHTS.npz     # template + new random weights by path
  eqx_template.py check TEMPLATE_DIR OUT_DIR NEW_WEIGHTS.npz KEEP_GLOB
"""
import fnmatch
import hashlib
import json
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class Block(eqx.Module):
    lin: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    drop: eqx.nn.Dropout
    freqs: jax.Array  # a buffer the source does not store: copied from the template


class Model(eqx.Module):
    blocks: list
    head: eqx.nn.Linear
    scale: jax.Array  # a 0-d array parameter


def model():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    blocks = [Block(eqx.nn.Linear(8, 8, key=keys[i]), eqx.nn.LayerNorm(8), eqx.nn.Dropout(0.1 * (i + 1)),
                    jnp.arange(4, dtype=jnp.float32) / (i + 2)) for i in range(2)]
    return Model(blocks, eqx.nn.Linear(8, 3, key=keys[3]), jnp.asarray(2.0, dtype=jnp.float32))


def path_name(path):
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        else:
            raise TypeError(k)
    return ".".join(parts)


def saved_leaves(m):
    """(path, leaf) for every leaf tree_serialise_leaves writes: arrays and Python/NumPy scalars."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(m):
        if isinstance(leaf, (jax.Array, np.ndarray, bool, int, float, complex, np.generic)):
            out.append((path_name(path), leaf))
    return out


def make(template, new_weights):
    m = model()
    os.makedirs(template, exist_ok=True)
    eqx.tree_serialise_leaves(os.path.join(template, "weights.eqx"), m)
    leaves = [{"path": p, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for p, v in saved_leaves(m)]
    with open(os.path.join(template, "leaves.json"), "w") as f:
        json.dump(leaves, f)
    with open(os.path.join(template, "metadata.json"), "w") as f:
        json.dump({"format": "equimo.model.checkpoint", "format_version": 1, "weights_sha256": "0" * 64, "model_class": "Model"}, f)
    rng = np.random.default_rng(5)
    new = {p: rng.standard_normal(np.shape(v)).astype(np.asarray(v).dtype) for p, v in saved_leaves(m)
           if np.ndim(v) > 0 and not p.endswith(".freqs")}
    new["scale"] = np.asarray(3.5, dtype=np.float32)  # a 0-d array the stream does give
    np.savez(new_weights, **new)


def check(template, out, new_weights, keep):
    m = model()
    new = dict(np.load(new_weights))
    got = eqx.tree_deserialise_leaves(os.path.join(out, "weights.eqx"), m)
    for (p, want), (_, have) in zip(saved_leaves(m), saved_leaves(got)):
        if p in new:
            assert np.array_equal(np.asarray(have), new[p]) and np.asarray(have).dtype == new[p].dtype, p
        else:  # scalars and --keep leaves: the template's
            assert fnmatch.fnmatch(p, keep) or np.ndim(want) == 0, p
            assert np.array_equal(np.asarray(have), np.asarray(want)), p
    # Byte for byte what equinox writes for the same model.
    expected = jax.tree_util.tree_map(lambda x: x, got)
    path = os.path.join(out, "expected.eqx")
    eqx.tree_serialise_leaves(path, expected)
    with open(path, "rb") as f, open(os.path.join(out, "weights.eqx"), "rb") as g:
        same = f.read() == g.read()
    os.unlink(path)
    assert same, "weights.eqx differs from what equinox writes"
    meta = json.load(open(os.path.join(out, "metadata.json")))
    digest = hashlib.sha256(open(os.path.join(out, "weights.eqx"), "rb").read()).hexdigest()
    assert meta["weights_sha256"] == digest and meta["model_class"] == "Model", meta
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        check(*sys.argv[2:6])
