"""The recipes end to end. openpi: a LoRA checkpoint written by the real orbax the way openpi's
LoRA training stores it (scanned layers, frozen base LLM weights in bf16, adapters in f32,
`value` leaves, alpha != rank) goes through scripts/openpi-to-pytorch.sh; the torch-layout
forward of every attention and MLP projection of every layer on the converted weights equals
the JAX-layout forward with the LoRA applied at run time, as openpi runs it."""
import json
import os
import subprocess

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import BIN, ROOT
from test_lora_merge import openpi_einsum_forward, rel_err
from test_slice_openpi import D, DE, F, FE, H, HE, K, L, LE, N, NE, openpi_tree

RNG = np.random.default_rng(21)
R_LLM, ALPHA_LLM = 4, 8.0      # scale 2
R_EXP, ALPHA_EXP = 2, 6.0      # scale 3


def lora_pair(shape, rank):
    a = list(shape); a[-1] = rank
    b = list(shape); b[-2] = rank
    return (RNG.standard_normal(a) * 0.1).astype(np.float32), (RNG.standard_normal(b) * 0.1).astype(np.float32)


def openpi_lora_checkpoint(step_dir, pi05):
    """{"params": tree} with value leaves, saved by orbax's PyTreeCheckpointer into step/params."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    flat = openpi_tree(pi05)
    for sfx, rank in (("", R_LLM), ("_1", R_EXP)):
        for m in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
            w = flat[f"PaliGemma/llm/layers/attn/{m}{sfx}/w"]
            flat[f"PaliGemma/llm/layers/attn/{m}{sfx}/lora_a"], flat[f"PaliGemma/llm/layers/attn/{m}{sfx}/lora_b"] = lora_pair(w.shape, rank)
        for m in ("gating_einsum", "linear"):
            w = flat[f"PaliGemma/llm/layers/mlp{sfx}/{m}"]
            flat[f"PaliGemma/llm/layers/mlp{sfx}/{m}_lora_a"], flat[f"PaliGemma/llm/layers/mlp{sfx}/{m}_lora_b"] = lora_pair(w.shape, rank)
    # openpi's LoRA training: the frozen LLM weights (not LoRA) are stored as bf16.
    stored = {k: (v.astype(ml_dtypes.bfloat16) if "/llm/" in k and "lora" not in k else v) for k, v in flat.items()}
    tree = {}
    for k, v in stored.items():
        node = tree
        for part in k.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[k.split("/")[-1]] = {"value": jnp.asarray(v)}
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(step_dir, "params")), {"params": tree})
    os.makedirs(os.path.join(step_dir, "assets", "robot"), exist_ok=True)
    with open(os.path.join(step_dir, "assets", "robot", "norm_stats.json"), "w") as f:
        json.dump({"norm_stats": {}}, f)
    return {k: v.astype(np.float32) for k, v in stored.items()}


def recipe(step, out, *args):
    env = dict(os.environ, CKPT_BIN=BIN)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "openpi-to-pytorch.sh"), str(step), str(out),
                           "--llm-lora", f"rank={R_LLM},alpha={ALPHA_LLM:g}", "--expert-lora", f"rank={R_EXP},alpha={ALPHA_EXP:g}", *args],
                          capture_output=True, env=env)


def projection_errors(t, got):
    """Worst relative error, per projection kind, of the torch-layout forward against the JAX
    forward with LoRA at run time, over every layer of both Gemmas."""
    worst = {}
    for sfx, base, n, h, d, f, layers, scale in (
            ("", "paligemma_with_expert.paligemma.model.language_model.", N, H, D, F, L, ALPHA_LLM / R_LLM),
            ("_1", "paligemma_with_expert.gemma_expert.model.", NE, HE, DE, FE, LE, ALPHA_EXP / R_EXP)):
        a = lambda m: f"PaliGemma/llm/layers/attn/{m}{sfx}/"
        x = RNG.standard_normal((2, 3, d)).astype(np.float32)
        enc = RNG.standard_normal((2, 3, n, h)).astype(np.float32)
        hid = RNG.standard_normal((2, 3, f)).astype(np.float32)
        for l in range(layers):
            p = base + f"layers.{l}."
            def note(kind, y, ref):
                worst[kind] = max(worst.get(kind, 0.0), rel_err(y, ref))
            q = openpi_einsum_forward("BTD,NDH->BTNH", x, t[a("q_einsum") + "w"][l], t[a("q_einsum") + "lora_a"][l], t[a("q_einsum") + "lora_b"][l], scale)
            note("q", x @ got[p + "self_attn.q_proj.weight"].T, q.reshape(2, 3, n * h))
            kv = openpi_einsum_forward("BSD,2KDH->2BSKH", x, t[a("kv_einsum") + "w"][l], t[a("kv_einsum") + "lora_a"][l], t[a("kv_einsum") + "lora_b"][l], scale)
            note("k", x @ got[p + "self_attn.k_proj.weight"].T, kv[0].reshape(2, 3, K * h))
            note("v", x @ got[p + "self_attn.v_proj.weight"].T, kv[1].reshape(2, 3, K * h))
            o = openpi_einsum_forward("BTNH,NHD->BTD", enc, t[a("attn_vec_einsum") + "w"][l], t[a("attn_vec_einsum") + "lora_a"][l], t[a("attn_vec_einsum") + "lora_b"][l], scale)
            note("o", enc.reshape(2, 3, n * h) @ got[p + "self_attn.o_proj.weight"].T, o)
            m = f"PaliGemma/llm/layers/mlp{sfx}/"
            g, ga, gb = t[m + "gating_einsum"][l], t[m + "gating_einsum_lora_a"][l], t[m + "gating_einsum_lora_b"][l]
            note("gate", x @ got[p + "mlp.gate_proj.weight"].T, x @ g[0] + (x @ ga[0]) @ gb[0])  # FeedForward: unscaled
            note("up", x @ got[p + "mlp.up_proj.weight"].T, x @ g[1] + (x @ ga[1]) @ gb[1])
            lw, la, lb = t[m + "linear"][l], t[m + "linear_lora_a"][l], t[m + "linear_lora_b"][l]
            note("down", hid @ got[p + "mlp.down_proj.weight"].T, hid @ lw + (hid @ la) @ lb)
    return worst


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_openpi_recipe_lora_checkpoint_to_pytorch(tmp_path, pi05):
    step = tmp_path / "30000"
    t = openpi_lora_checkpoint(str(step), pi05)
    out = tmp_path / "torch"
    p = recipe(step, out)
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert f"{'pi05' if pi05 else 'pi0'}, LoRA" in err and "float32" in err, err
    got = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == np.float32 for v in got.values())
    assert not any("lora" in k for k in got)
    worst = projection_errors(t, got)
    assert set(worst) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert max(worst.values()) < 1e-5, worst
    config = json.loads((out / "config.json").read_text())
    assert config["action_dim"] == 7 and config["precision"] == "float32"
    assert (out / "assets" / "robot" / "norm_stats.json").exists()

    # bf16 output on request: lora-merge reports the drift, and the forward shows it.
    out16 = tmp_path / "torch16"
    p = recipe(step, out16, "--precision", "bfloat16")
    assert p.returncode == 0, p.stderr.decode()
    assert b"merged tensors written as BF16" not in p.stderr  # the merge stays f32; the cast after it rounds
    got16 = {k: v.astype(np.float32) for k, v in load_file(str(out16 / "model.safetensors")).items()}
    worst16 = projection_errors(t, got16)
    print(f"\nbf16 output, worst relative error per projection: { {k: f'{v:.1e}' for k, v in worst16.items()} }")
    assert 1e-5 < max(worst16.values()) < 2e-2


def test_openpi_recipe_refuses_what_it_cannot_place(tmp_path):
    step = tmp_path / "1"
    openpi_lora_checkpoint(str(step), False)
    # An alpha whose rank does not match the adapters: lora-merge fails, nothing is written.
    env = dict(os.environ, CKPT_BIN=BIN)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "openpi-to-pytorch.sh"), str(step), str(tmp_path / "out")],
                       capture_output=True, env=env)
    assert p.returncode != 0
    assert b"the adapter has rank 4, the LoRA config says 16" in p.stderr, p.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
