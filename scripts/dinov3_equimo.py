"""The DINOv3 -> equimo oracle, in two Python environments that meet through files: the torch
side (.venv: transformers 5) builds a tiny random DINOv3ViTModel, saves its weights and its
output on a random image; the JAX side (.venv-eqx: equimo) builds the same-shaped equimo
VisionTransformer as a template for `ckpt-write --format eqx --like`, then runs equimo's forward
on the converted weights and compares.

  dinov3_equimo.py hf DIR [gated]          (.venv)      DIR/model.safetensors, image.npy, expected.npy
  dinov3_equimo.py template DIR [gated]    (.venv-eqx)  DIR/template/{weights.eqx,leaves.json}
  dinov3_equimo.py check DIR               (.venv-eqx)  prints the max abs difference on all tokens
"""
import json
import os
import sys

import numpy as np

DIM, HEADS, DEPTH, PATCH, IMG = 64, 2, 2, 16, 64
HIDDEN_PLAIN, HIDDEN_GATED = 256, 176  # equimo SwiGLU hidden for mlp_ratio 4: int(256 * 2 / 3) = 170, rounded up to 8


def hf(out, gated):
    import torch
    from safetensors.torch import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                          intermediate_size=HIDDEN_GATED if gated else HIDDEN_PLAIN, image_size=IMG, patch_size=PATCH,
                          num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", layer_norm_eps=1e-5)
    model = DINOv3ViTModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    image = torch.randn(1, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        tokens = model(pixel_values=image).last_hidden_state[0].numpy()
    np.save(os.path.join(out, "image.npy"), image[0].numpy())
    np.save(os.path.join(out, "expected.npy"), tokens)


def equimo_model(gated):
    import jax
    from equimo.vision.models.vit import _DINOV3_BASE_CFG, VisionTransformer
    cfg = dict(_DINOV3_BASE_CFG)
    cfg.update(img_size=IMG, dim=DIM, num_heads=HEADS, depths=[DEPTH], patch_size=PATCH)
    if gated:
        cfg.update(ffn_layer="swiglu")
    return VisionTransformer(**cfg, key=jax.random.PRNGKey(0))


def template(out, gated):
    import equinox as eqx
    from eqx_template import saved_leaves
    m = equimo_model(gated)
    d = os.path.join(out, "template")
    os.makedirs(d, exist_ok=True)
    eqx.tree_serialise_leaves(os.path.join(d, "weights.eqx"), m)
    with open(os.path.join(d, "leaves.json"), "w") as f:
        json.dump([{"path": p, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for p, v in saved_leaves(m)], f)
    with open(os.path.join(out, "gated"), "w") as f:
        f.write("1" if gated else "0")


def check(out):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    gated = open(os.path.join(out, "gated")).read() == "1"
    m = eqx.tree_deserialise_leaves(os.path.join(out, "converted", "weights.eqx"), equimo_model(gated))
    x = jnp.asarray(np.load(os.path.join(out, "image.npy")))
    # transformers' last_hidden_state is after the final LayerNorm; equimo's features are before it.
    got = np.asarray(jax.vmap(m.norm)(m.features(x, key=jax.random.PRNGKey(0), inference=True)))
    want = np.load(os.path.join(out, "expected.npy"))
    assert got.shape == want.shape, (got.shape, want.shape)
    print(f"{float(np.max(np.abs(got - want))):.3e}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cmd, out = sys.argv[1], sys.argv[2]
    gated = len(sys.argv) > 3 and sys.argv[3] == "gated"
    {"hf": lambda: hf(out, gated), "template": lambda: template(out, gated), "check": lambda: check(out)}[cmd]()
