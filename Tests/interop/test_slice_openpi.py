"""The shipped openpi rules on an openpi-shaped parameter tree at reduced sizes: every output
equals what openpi's examples/convert_jax_model_to_pytorch.py does to the same arrays (its
slicing, re-implemented in numpy in scripts/bench_openpi.py, which the benchmark's Python
reference uses too), and the torch-layout weights compute
what the JAX einsums compute."""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bench_openpi import openpi_slice
from conftest import ROOT, shell

RNG = np.random.default_rng(3)
# Reduced sizes with openpi's axis layouts; N*H != D on purpose (the general o_proj rule).
L, N, K, H, D, F = 3, 4, 1, 8, 24, 40        # PaliGemma Gemma
LE, NE, HE, DE, FE = 3, 2, 8, 12, 20         # action expert
LV, NV, HV, DV, FV, P = 2, 2, 6, 12, 20, 4   # SigLIP: layers, heads, head dim, width, mlp, patch


def r(*s):
    return RNG.standard_normal(s).astype(np.float32)


def openpi_tree(pi05):
    t = {
        "PaliGemma/img/embedding/kernel": r(P, P, 3, DV), "PaliGemma/img/embedding/bias": r(DV),
        "PaliGemma/img/pos_embedding": r(1, 16, DV),
        "PaliGemma/img/Transformer/encoder_norm/scale": r(DV), "PaliGemma/img/Transformer/encoder_norm/bias": r(DV),
        "PaliGemma/img/head/kernel": r(DV, D), "PaliGemma/img/head/bias": r(D),
        "PaliGemma/llm/embedder/input_embedding": r(50, D),
        "PaliGemma/llm/layers/attn/q_einsum/w": r(L, N, D, H), "PaliGemma/llm/layers/attn/kv_einsum/w": r(L, 2, K, D, H),
        "PaliGemma/llm/layers/attn/attn_vec_einsum/w": r(L, N, H, D),
        "PaliGemma/llm/layers/mlp/gating_einsum": r(L, 2, D, F), "PaliGemma/llm/layers/mlp/linear": r(L, F, D),
        "PaliGemma/llm/layers/pre_attention_norm/scale": r(L, D), "PaliGemma/llm/layers/pre_ffw_norm/scale": r(L, D),
        "PaliGemma/llm/final_norm/scale": r(D),
        "PaliGemma/llm/layers/attn/q_einsum_1/w": r(LE, NE, DE, HE), "PaliGemma/llm/layers/attn/kv_einsum_1/w": r(LE, 2, K, DE, HE),
        "PaliGemma/llm/layers/attn/attn_vec_einsum_1/w": r(LE, NE, HE, DE),
        "PaliGemma/llm/layers/mlp_1/gating_einsum": r(LE, 2, DE, FE), "PaliGemma/llm/layers/mlp_1/linear": r(LE, FE, DE),
        "action_in_proj/kernel": r(7, DE), "action_in_proj/bias": r(DE), "action_out_proj/kernel": r(DE, 7), "action_out_proj/bias": r(7),
    }
    enc = "PaliGemma/img/Transformer/encoderblock/"
    for n in ("LayerNorm_0", "LayerNorm_1"):
        t[enc + n + "/scale"], t[enc + n + "/bias"] = r(LV, DV), r(LV, DV)
    t[enc + "MlpBlock_0/Dense_0/kernel"], t[enc + "MlpBlock_0/Dense_0/bias"] = r(LV, DV, FV), r(LV, FV)
    t[enc + "MlpBlock_0/Dense_1/kernel"], t[enc + "MlpBlock_0/Dense_1/bias"] = r(LV, FV, DV), r(LV, DV)
    for m in ("query", "key", "value"):
        t[enc + f"MultiHeadDotProductAttention_0/{m}/kernel"] = r(LV, DV, NV, HV)
        t[enc + f"MultiHeadDotProductAttention_0/{m}/bias"] = r(LV, NV, HV)
    t[enc + "MultiHeadDotProductAttention_0/out/kernel"] = r(LV, NV, HV, DV)
    t[enc + "MultiHeadDotProductAttention_0/out/bias"] = r(LV, DV)
    if pi05:
        for n in ("pre_attention_norm_1", "pre_ffw_norm_1"):
            t[f"PaliGemma/llm/layers/{n}/Dense_0/kernel"], t[f"PaliGemma/llm/layers/{n}/Dense_0/bias"] = r(LE, DE, 3 * DE), r(LE, 3 * DE)
        t["PaliGemma/llm/final_norm_1/Dense_0/kernel"], t["PaliGemma/llm/final_norm_1/Dense_0/bias"] = r(DE, 3 * DE), r(3 * DE)
        for p in ("time_mlp_in", "time_mlp_out"):
            t[f"{p}/kernel"], t[f"{p}/bias"] = r(DE, DE), r(DE)
    else:
        t["PaliGemma/llm/layers/pre_attention_norm_1/scale"], t["PaliGemma/llm/layers/pre_ffw_norm_1/scale"] = r(LE, DE), r(LE, DE)
        t["PaliGemma/llm/final_norm_1/scale"] = r(DE)
        for p, (i, o) in {"state_proj": (7, DE), "action_time_mlp_in": (2 * DE, DE), "action_time_mlp_out": (DE, DE)}.items():
            t[f"{p}/kernel"], t[f"{p}/bias"] = r(i, o), r(o)
    return t


def openpi_script(t, pi05):
    """The slicing of openpi's convert_jax_model_to_pytorch.py, on the same arrays (shared with
    the benchmark's Python reference, scripts/bench_openpi.py)."""
    return openpi_slice({k.removeprefix("PaliGemma/"): v for k, v in t.items()}, pi05)


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_openpi_rules_match_the_conversion_script(tmp_path, pi05):
    t = openpi_tree(pi05)
    src, out = tmp_path / "params.safetensors", tmp_path / "model.safetensors"
    save_file(t, str(src))
    rules = os.path.join(ROOT, "rules", f"openpi-{'pi05' if pi05 else 'pi0'}-jax-to-pytorch.rules")
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{rules}' | ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    got = load_file(str(out))
    ref = openpi_script(t, pi05)
    # Scanned layers are cut one layer at a time: the plan holds a layer, not the stack.
    plan = shell(f"ckpt-slice --plan --rules '{rules}' --input '{src}'")
    assert plan.returncode == 0, plan.stderr.decode()
    assert plan.stdout.count(b"one slice of the leading axis at a time") >= 20, plan.stdout.decode()
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # The torch layout computes what the JAX einsums compute, for q, k, v, o, gate, up, down.
    x = r(2, 5, D)
    pre = "paligemma_with_expert.paligemma.model.language_model.layers.1."
    q = np.einsum("BTD,NDH->BTNH", x, t["PaliGemma/llm/layers/attn/q_einsum/w"][1]).reshape(2, 5, N * H)
    np.testing.assert_allclose(x @ got[pre + "self_attn.q_proj.weight"].T, q, rtol=1e-5, atol=1e-5)
    k, v = np.einsum("BSD,2KDH->2BSKH".replace("2", "C"), x, t["PaliGemma/llm/layers/attn/kv_einsum/w"][1])
    np.testing.assert_allclose(x @ got[pre + "self_attn.k_proj.weight"].T, k.reshape(2, 5, K * H), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ got[pre + "self_attn.v_proj.weight"].T, v.reshape(2, 5, K * H), rtol=1e-5, atol=1e-5)
    enc = r(2, 5, N, H)
    o = np.einsum("BTNH,NHD->BTD", enc, t["PaliGemma/llm/layers/attn/attn_vec_einsum/w"][1])
    np.testing.assert_allclose(enc.reshape(2, 5, N * H) @ got[pre + "self_attn.o_proj.weight"].T, o, rtol=1e-5, atol=1e-5)
    g = t["PaliGemma/llm/layers/mlp/gating_einsum"][1]
    np.testing.assert_allclose(x @ got[pre + "mlp.gate_proj.weight"].T, x @ g[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ got[pre + "mlp.up_proj.weight"].T, x @ g[1], rtol=1e-5, atol=1e-5)
    h = r(2, 5, F)
    np.testing.assert_allclose(h @ got[pre + "mlp.down_proj.weight"].T, h @ t["PaliGemma/llm/layers/mlp/linear"][1], rtol=1e-5, atol=1e-5)


def test_openpi_rules_refuse_unmerged_lora(tmp_path):
    t = openpi_tree(False)
    t["PaliGemma/llm/layers/attn/q_einsum/lora_a"] = r(L, N, D, 2)
    src = tmp_path / "params.safetensors"
    save_file(t, str(src))
    rules = os.path.join(ROOT, "rules", "openpi-pi0-jax-to-pytorch.rules")
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{rules}' > /dev/null")
    assert p.returncode == 65
    assert b"no rule matches 1 input tensors" in p.stderr and b"q_einsum/lora_a" in p.stderr


# ---- DINOv3 (facebookresearch/dinov3 key names) -> JAX tree ---------------------------------

def dinov3_state(depth=2, dim=12, mask=True, swiglu=False):
    s = {"cls_token": r(1, 1, dim), "storage_tokens": r(1, 4, dim), "mask_token": r(1, dim), "rope_embed.periods": r(dim // 4),
         "patch_embed.proj.weight": r(dim, 3, 4, 4), "patch_embed.proj.bias": r(dim), "norm.weight": r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = r(3 * dim, dim), r(3 * dim)
        if mask:
            m = np.ones(3 * dim, np.float32)
            m[dim:2 * dim] = 0
            s[b + "attn.qkv.bias_mask"] = m
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = r(dim, dim), r(dim)
        for n in (1, 2):
            s[b + f"norm{n}.weight"], s[b + f"norm{n}.bias"], s[b + f"ls{n}.gamma"] = r(dim), r(dim), r(dim)
        for m_ in (("w1", "w2", "w3") if swiglu else ("fc1", "fc2")):
            shape = (dim, 2 * dim) if m_ in ("fc2", "w3") else (2 * dim, dim)
            s[b + f"mlp.{m_}.weight"], s[b + f"mlp.{m_}.bias"] = r(*shape), r(shape[0])
    return s


@pytest.mark.parametrize("mask,swiglu", [(True, False), (False, True)])
def test_dinov3_rules(tmp_path, mask, swiglu):
    s = dinov3_state(mask=mask, swiglu=swiglu)
    src, out = tmp_path / "dino.safetensors", tmp_path / "jax.safetensors"
    save_file(s, str(src))
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{os.path.join(ROOT, 'rules', 'dinov3-torch-to-jax.rules')}' | ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    got = load_file(str(out))
    d = 12
    for i in range(2):
        w, bias = s[f"blocks.{i}.attn.qkv.weight"], s[f"blocks.{i}.attn.qkv.bias"]
        if mask:
            bias = bias * s[f"blocks.{i}.attn.qkv.bias_mask"]
        for j, n in enumerate("qkv"):
            np.testing.assert_array_equal(got[f"blocks_{i}/attn/{n}/kernel"], w[j * d:(j + 1) * d].T)
            np.testing.assert_array_equal(got[f"blocks_{i}/attn/{n}/bias"], bias[j * d:(j + 1) * d])
        assert (got[f"blocks_{i}/attn/k/bias"] == 0).all() == mask
        np.testing.assert_array_equal(got[f"blocks_{i}/attn/proj/kernel"], s[f"blocks.{i}.attn.proj.weight"].T)
        np.testing.assert_array_equal(got[f"blocks_{i}/norm1/scale"], s[f"blocks.{i}.norm1.weight"])
        np.testing.assert_array_equal(got[f"blocks_{i}/ls2/gamma"], s[f"blocks.{i}.ls2.gamma"])
        fc = "w1" if swiglu else "fc1"
        np.testing.assert_array_equal(got[f"blocks_{i}/mlp/{fc}/kernel"], s[f"blocks.{i}.mlp.{fc}.weight"].T)
    np.testing.assert_array_equal(got["patch_embed/proj/kernel"], s["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got["rope_embed/periods"], s["rope_embed.periods"])
    assert not any("bias_mask" in k for k in got)
    # A mask still NaN (never initialised) is refused, naming the rule.
    if mask:
        s["blocks.1.attn.qkv.bias_mask"][:] = np.nan
        save_file(s, str(src))
        p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{os.path.join(ROOT, 'rules', 'dinov3-torch-to-jax.rules')}' > /dev/null")
        assert p.returncode == 65
        assert b"dinov3-torch-to-jax.rules:" in p.stderr and b"products are not finite" in p.stderr, p.stderr
