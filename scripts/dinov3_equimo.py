"""The DINOv3 -> equimo oracle, in two Python environments that meet through files: the torch
side (.venv: transformers 5) builds a tiny random DINOv3ViTModel, saves its weights and its
output on a random image; the JAX side (.venv-eqx: equimo) builds the same-shaped equimo
VisionTransformer and saves it with equimo's own save_model as the template for `ckpt-write
--format eqx --like` (plus leaves.json), then loads the converted folder with equimo's own
load_weights (which checks the versioned metadata: model signature, weights_sha256), runs its
forward and compares.

  dinov3_equimo.py hf DIR [gated]          (.venv)      DIR/model.safetensors, image.npy, expected.npy
  dinov3_equimo.py timm DIR [gated|bias]   (.venv-timm) the same from timm's vit_small(_plus)_patch16_dinov3
                                         (bias: with q_bias and v_bias, as DINOv3's own weights have)
  dinov3_equimo.py template DIR [gated [MLP_RATIO]]  (.venv-eqx)  DIR/template/{weights.eqx,leaves.json}
                                         (timm's "plus" SwiGLU: MLP_RATIO 6; transformers' here: 4)
  dinov3_equimo.py check DIR               (.venv-eqx)  prints the max abs difference on all tokens
"""
import json
import os
import sys

import numpy as np

DIM, HEADS, DEPTH, PATCH, IMG = 64, 2, 2, 16, 64
HIDDEN_PLAIN, HIDDEN_GATED = 256, 176  # equimo SwiGLU hidden for mlp_ratio 4: int(256 * 2 / 3) = 170, rounded up to 8


def randomize_and_run(model, out, layer_scale, tokens):
    """Random weights (layer scales in [0.5, 1.5], the rest N(0, 0.2)), saved with the model's
    tokens after the final norm on a random image."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if layer_scale in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    image = torch.randn(1, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        np.save(os.path.join(out, "expected.npy"), tokens(image).numpy())
    np.save(os.path.join(out, "image.npy"), image[0].numpy())


def hf(out, gated):
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                          intermediate_size=HIDDEN_GATED if gated else HIDDEN_PLAIN, image_size=IMG, patch_size=PATCH,
                          num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", layer_norm_eps=1e-5)
    model = DINOv3ViTModel(cfg).eval()
    randomize_and_run(model, out, "layer_scale", lambda image: model(pixel_values=image).last_hidden_state[0])


def timm(out, gated, qkv_bias=False):
    import torch
    # The PyPI torchvision's C extension is built for CUDA torch and does not load with the CPU
    # wheel: declare the two operator schemas its Python side registers, then import timm.
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm as timm_models
    torch.manual_seed(0)
    name = "vit_small_plus_patch16_dinov3" if gated else "vit_small_patch16_dinov3"
    model = timm_models.create_model(name, pretrained=False, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=IMG,
                                     num_classes=0, qkv_bias=qkv_bias).eval()
    randomize_and_run(model, out, "gamma", lambda image: model.forward_features(image)[0])


def equimo_model(gated, mlp_ratio=4.0):
    import jax
    from equimo.vision.models.vit import _DINOV3_BASE_CFG, VisionTransformer
    cfg = dict(_DINOV3_BASE_CFG)
    cfg.update(img_size=IMG, dim=DIM, num_heads=HEADS, depths=[DEPTH], patch_size=PATCH)
    if gated:
        cfg.update(ffn_layer="swiglu", mlp_ratio=mlp_ratio)
    return VisionTransformer(**cfg, key=jax.random.PRNGKey(0))


def template(out, gated, mlp_ratio):
    """equimo's own save_model (weights.eqx and its versioned metadata.json), plus leaves.json."""
    from pathlib import Path

    from equimo.serialization import save_model
    from eqx_template import saved_leaves
    m = equimo_model(gated, mlp_ratio)
    d = os.path.join(out, "template")
    config = {"dim": DIM, "num_heads": HEADS, "depths": [DEPTH], "patch_size": PATCH, "img_size": IMG, "gated": gated,
              "mlp_ratio": mlp_ratio}
    save_model(Path(d), m, config, compression=False)
    with open(os.path.join(d, "leaves.json"), "w") as f:
        json.dump([{"path": p, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for p, v in saved_leaves(m)], f)
    with open(os.path.join(out, "gated"), "w") as f:
        f.write(f"{1 if gated else 0} {mlp_ratio}")


def check(out):
    import jax
    import jax.numpy as jnp
    from pathlib import Path

    from equimo.serialization import load_weights
    gated, mlp_ratio = open(os.path.join(out, "gated")).read().split()
    # equimo's own loader: it checks the versioned metadata (model signature, weights_sha256).
    m = load_weights(equimo_model(gated == "1", float(mlp_ratio)), path=Path(out, "converted"))
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
    ratio = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
    {"hf": lambda: hf(out, gated), "timm": lambda: timm(out, gated, qkv_bias=len(sys.argv) > 3 and sys.argv[3] == "bias"), "template": lambda: template(out, gated, ratio),
     "check": lambda: check(out)}[cmd]()
