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


def back_to_openpi(pt_dir, out, *args):
    """scripts/pytorch-to-openpi.sh, with this test tree's head sizes (openpi's are the defaults)."""
    from test_slice_openpi import NV
    env = dict(os.environ, CKPT_BIN=BIN)
    sizes = ["--set", f"llm_head_dim={H}", "--set", f"expert_head_dim={HE}", "--set", f"vision_heads={NV}"]
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "pytorch-to-openpi.sh"), str(pt_dir), str(out), *sizes, *args],
                          capture_output=True, env=env)


def orbax_params(step):
    """What openpi's restore_params does: the PyTree under "params", flattened with "/"."""
    import orbax.checkpoint as ocp
    restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(step, "params")))
    assert list(restored) == ["params"]
    return flatten_tree(restored["params"])


def flatten_tree(tree):
    """A nested dict of arrays as {"a/b/c": array}."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + k + "/")
            else:
                flat[prefix + k] = np.asarray(v)
    walk(tree, "")
    return flat


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_openpi_round_trip_jax_pytorch_jax(tmp_path, pi05):
    # JAX LoRA step -> PyTorch (merged, f32) -> JAX step: every array of the LoRA-merged
    # source comes back, key for key and bit for bit, in openpi's JAX layout, restorable by orbax.
    step = tmp_path / "30000"
    openpi_lora_checkpoint(str(step), pi05)
    merged = tmp_path / "merged.safetensors"
    lora = ["--config", f"*_1/*=rank={R_EXP},alpha={ALPHA_EXP:g}", "--config", f"rank={R_LLM},alpha={ALPHA_LLM:g}"]
    p = subprocess.run(["bash", "-o", "pipefail", "-c",
                        f"{BIN}/ckpt-read --root params {step}/params | {BIN}/lora-merge --scheme openpi {' '.join(lora)} --dtype F32 "
                        f"| {BIN}/ckpt-write {merged}"], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    source = load_file(str(merged))
    assert not any("lora" in k for k in source)
    torch_dir = tmp_path / "torch"
    assert recipe(step, torch_dir).returncode == 0

    back = tmp_path / "back"
    p = back_to_openpi(torch_dir, back)
    assert p.returncode == 0, p.stderr.decode()
    assert f"{'pi05' if pi05 else 'pi0'}, float32" in p.stderr.decode()
    got = orbax_params(str(back))
    assert sorted(got) == sorted(source)
    for k, v in source.items():
        assert got[k].dtype == np.float32 and got[k].shape == v.shape and np.array_equal(got[k], v), k
    assert (back / "assets" / "robot" / "norm_stats.json").exists()

    # What openpi's PyTorch training (and LeRobot) saves: every key under "model.", plus the
    # tied lm_head; the same JAX tree comes back.
    from safetensors.numpy import save_file
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    weights = {"model." + k: v for k, v in load_file(str(torch_dir / "model.safetensors")).items()}
    weights["model.paligemma_with_expert.paligemma.lm_head.weight"] = weights["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    save_file(weights, str(prefixed / "model.safetensors"))
    p = back_to_openpi(prefixed, tmp_path / "back2")
    assert p.returncode == 0, p.stderr.decode()
    got2 = orbax_params(str(tmp_path / "back2"))
    assert sorted(got2) == sorted(source) and all(np.array_equal(got2[k], source[k]) for k in source)


def test_pytorch_to_openpi_refuses_a_key_it_cannot_place(tmp_path):
    from safetensors.numpy import save_file
    pt = tmp_path / "pt"
    pt.mkdir()
    save_file({"action_in_proj.weight": np.ones((4, 7), np.float32), "something.else.entirely": np.ones(3, np.float32)},
              str(pt / "model.safetensors"))
    p = back_to_openpi(pt, tmp_path / "out")
    assert p.returncode != 0 and b"something.else.entirely" in p.stderr
    assert not (tmp_path / "out" / "params").exists()


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


# ---- PyTorch -> JAX: a small DINOv3-style ViT ------------------------------------------------

def small_dinov3_vit(dim=16, heads=2, depth=2, patch=4, storage=2):
    """A minimal ViT with DINOv3's parameter names (patch_embed, cls/storage tokens, blocks with
    a masked-bias qkv, LayerScale, Mlp, final norm), built with real torch."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.qkv.register_buffer("bias_mask", torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]))
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, _ = x.shape
            qkv = nn.functional.linear(x, self.qkv.weight, self.qkv.bias * self.qkv.bias_mask)
            q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
            return self.proj((att @ v).transpose(1, 2).reshape(b, n, dim))

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.randn(dim) * 0.5)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(), LayerScale()
            self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(), LayerScale()

        def forward(self, x):
            x = x + self.ls1.gamma * self.attn(self.norm1(x))
            return x + self.ls2.gamma * self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
            self.storage_tokens = nn.Parameter(torch.randn(1, storage, dim))
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
            self.rope_embed = nn.Module()
            self.rope_embed.register_buffer("periods", torch.arange(1, dim // 4 + 1, dtype=torch.float32))
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)

        def forward(self, img):
            x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
            b = x.shape[0]
            x = torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], 1)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    torch.manual_seed(0)
    model = ViT().eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.bias.normal_()  # non-zero k bias: the mask must matter
    return model


def numpy_vit(p, img, dim=16, heads=2, depth=2, patch=4):
    """The same ViT on the JAX-layout tree (kernels [in, out], conv HWIO, q/k/v split)."""
    from math import erf, sqrt
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))

    def ln(x, s, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-6) * s + b

    x = img.transpose(0, 2, 3, 1)  # NHWC
    bsz, hh, ww, c = x.shape
    patches = x.reshape(bsz, hh // patch, patch, ww // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijhwc,hwco->bijo", patches, p["patch_embed/proj/kernel"]) + p["patch_embed/proj/bias"]
    x = x.reshape(bsz, -1, dim)
    x = np.concatenate([np.broadcast_to(p["cls_token"], (bsz, 1, dim)), np.broadcast_to(p["storage_tokens"], (bsz, 2, dim)), x], 1)
    for i in range(depth):
        b = f"blocks_{i}/"
        y = ln(x, p[b + "norm1/scale"], p[b + "norm1/bias"])
        q, k, v = (y @ p[b + f"attn/{s}/kernel"] + p[b + f"attn/{s}/bias"] for s in "qkv")
        split = lambda t: t.reshape(bsz, -1, heads, dim // heads).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(bsz, -1, dim)
        x = x + p[b + "ls1/gamma"] * (o @ p[b + "attn/proj/kernel"] + p[b + "attn/proj/bias"])
        y = ln(x, p[b + "norm2/scale"], p[b + "norm2/bias"])
        y = gelu(y @ p[b + "mlp/fc1/kernel"] + p[b + "mlp/fc1/bias"]) @ p[b + "mlp/fc2/kernel"] + p[b + "mlp/fc2/bias"]
        x = x + p[b + "ls2/gamma"] * y
    return ln(x, p["norm/scale"], p["norm/bias"])


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_pytorch_to_jax_recipe_dinov3_vit(tmp_path, fmt):
    import torch
    model = small_dinov3_vit()
    pth = tmp_path / "vit.pth"
    torch.save(model.state_dict(), str(pth))
    out = tmp_path / ("params" if fmt == "orbax" else "params.msgpack")
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pytorch-to-jax.sh"), str(pth), os.path.join(ROOT, "rules", "dinov3-torch-to-jax.rules"), str(out), fmt],
                       capture_output=True, env=dict(os.environ, CKPT_BIN=BIN))
    assert p.returncode == 0, p.stderr.decode()
    if fmt == "orbax":
        import orbax.checkpoint as ocp
        tree = ocp.PyTreeCheckpointer().restore(str(out.resolve()))
    else:
        from flax.serialization import msgpack_restore
        tree = msgpack_restore(out.read_bytes())
    flat = flatten_tree(tree)
    img = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(img)).numpy()
    got = numpy_vit(flat, img)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---- Hugging Face BERT -> Flax msgpack, and back ------------------------------------------------

FLAX_FORWARD = """
import sys, numpy as np, torch
from flax.serialization import msgpack_restore
from transformers import BertConfig, BertModel, FlaxBertModel
model_dir, msgpack_path = sys.argv[1], sys.argv[2]
config = BertConfig.from_pretrained(model_dir)
flax_model = FlaxBertModel(config, _do_init=False)
params = msgpack_restore(open(msgpack_path, "rb").read())
ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]], dtype=np.int32)
mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=np.int32)
ours = np.asarray(flax_model(ids, attention_mask=mask, params=params).last_hidden_state)
torch_model = BertModel.from_pretrained(model_dir, add_pooling_layer=True).eval()
with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
print(err)
assert err < 1e-5, err
"""


def test_bert_recipe_to_flax_msgpack_and_back(tmp_path, minilm):
    rules = os.path.join(ROOT, "rules")
    flax = tmp_path / "flax_model.msgpack"
    env = dict(os.environ, CKPT_BIN=BIN)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pytorch-to-jax.sh"), minilm, f"{rules}/bert-torch-to-flax.rules", str(flax)],
                       capture_output=True, env=env)
    assert p.returncode == 0, p.stderr.decode()
    diff = os.path.join(BIN, "ckpt-diff")
    # The Flax file holds exactly the original's weights, in Flax's layout.
    p = subprocess.run([diff, "--brief", "--rules", f"{rules}/bert-torch-to-flax.rules", minilm, str(flax)], capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr
    # And back to torch: identical to the original except the position_ids buffer, not written.
    back = tmp_path / "back.safetensors"
    p = subprocess.run(f"'{BIN}/ckpt-read' '{flax}' | '{BIN}/ckpt-slice' --rules '{rules}/bert-flax-to-torch.rules' | '{BIN}/ckpt-write' '{back}'",
                       shell=True, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    same = tmp_path / "same.rules"
    same.write_text("drop embeddings.position_ids\nkeep {x*}\n")
    p = subprocess.run([diff, "--brief", "--rules", str(same), minilm, str(back)], capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.endswith(b"103 in both: 103 equal, 0 not; 0 only in A, 0 only in B: equal\n")
    # The Flax params run in transformers 4.x's FlaxBertModel give the torch BertModel's output.
    py = os.path.join(ROOT, ".venv-tf4", "bin", "python")
    if not os.path.exists(py):
        pytest.fail(".venv-tf4 is missing: run scripts/setup.sh")
    p = subprocess.run([py, "-c", FLAX_FORWARD, os.path.dirname(minilm), str(flax)], capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr.decode()[-3000:]


# ---- Across hosts: two stages joined by TCP on loopback (as ssh would join them) -------------

def across_tcp(tmp_path, minilm, cut_after=None):
    import time
    relay = os.path.join(ROOT, "scripts", "tcp_relay.py")
    port_file = tmp_path / "port"
    out = tmp_path / "remote" / "flax_model.msgpack"
    out.parent.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    receiver = subprocess.Popen(["bash", "-o", "pipefail", "-c",
                                 f"python3 '{relay}' listen '{port_file}' | ckpt-slice --rules '{ROOT}/rules/bert-torch-to-flax.rules' "
                                 f"| ckpt-write --format msgpack '{out}'"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    for _ in range(200):
        if port_file.exists():
            break
        time.sleep(0.05)
    cut = f" --cut-after {cut_after}" if cut_after else ""
    sender = subprocess.run(["bash", "-o", "pipefail", "-c",
                             f"ckpt-read --compress zlib '{minilm}' | python3 '{relay}' send 127.0.0.1 {port_file.read_text()}{cut}"],
                            capture_output=True, env=env)
    _, err = receiver.communicate(timeout=120)
    return sender, receiver.returncode, err, out


def test_across_hosts_over_tcp(tmp_path, minilm):
    sender, rc, err, out = across_tcp(tmp_path, minilm)
    assert sender.returncode == 0, sender.stderr.decode()
    assert rc == 0, err.decode()
    p = subprocess.run([os.path.join(BIN, "ckpt-diff"), "--brief", "--rules", f"{ROOT}/rules/bert-torch-to-flax.rules", minilm, str(out)],
                       capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_connection_cut_mid_stream_fails_loudly_and_leaves_nothing(tmp_path, minilm):
    sender, rc, err, out = across_tcp(tmp_path, minilm, cut_after=3_000_000)
    assert rc != 0
    assert b"ckpt-slice: " in err or b"ckpt-write: " in err
    assert b"truncated" in err or b"end frame" in err or b"ended" in err, err.decode()
    assert not out.exists() and os.listdir(out.parent) == []


def test_openpi_recipe_from_a_bucket_equals_the_local_run(tmp_path):
    """scripts/openpi-to-pytorch.sh gs://... against a local server standing in for GCS
    (STORAGE_EMULATOR_HOST): the same model.safetensors as from the local folder, and the
    asset named fetched beside it."""
    from range_server import RangeServer
    root = tmp_path / "root"
    step = root / "openpi-assets" / "checkpoints" / "pi0_lora" / "30000"
    openpi_lora_checkpoint(str(step), False)
    local = tmp_path / "local"
    assert recipe(step, local).returncode == 0
    srv = RangeServer(str(root)).start()
    try:
        env = dict(os.environ, CKPT_BIN=BIN, STORAGE_EMULATOR_HOST=srv.url)
        def remote(out, *args):
            return subprocess.run(["bash", os.path.join(ROOT, "scripts", "openpi-to-pytorch.sh"), "gs://openpi-assets/checkpoints/pi0_lora/30000",
                                   str(out), "--llm-lora", f"rank={R_LLM},alpha={ALPHA_LLM:g}", "--expert-lora", f"rank={R_EXP},alpha={ALPHA_EXP:g}", *args],
                                  capture_output=True, env=env)
        p = remote(tmp_path / "remote", "--asset-id", "robot")
        assert p.returncode == 0, p.stderr.decode()
        assert (tmp_path / "remote" / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
        assert (tmp_path / "remote" / "assets" / "robot" / "norm_stats.json").read_bytes() == (step / "assets" / "robot" / "norm_stats.json").read_bytes()
        assert (tmp_path / "remote" / "config.json").read_bytes() == (local / "config.json").read_bytes()
        p = remote(tmp_path / "missing", "--asset-id", "nosuch")
        assert p.returncode == 66 and b"assets/nosuch/norm_stats.json" in p.stderr
        assert not (tmp_path / "missing" / "model.safetensors").exists()
    finally:
        srv.shutdown()
        srv.server_close()
