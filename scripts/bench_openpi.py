"""The openpi benchmark's input and its Python reference.

    bench_openpi.py make STEP_DIR [SCALE|tiny]
                                            a synthetic pi0 LoRA training checkpoint, written by
                                            orbax as openpi writes it ({"params": ...}, value
                                            leaves, bf16 frozen LLM weights, f32 LoRA and the rest)
    bench_openpi.py convert STEP_DIR OUT    what openpi's conversion does, in Python: orbax restore
                                            to float32 numpy, LoRA merged (einsum-correct, as
                                            openpi PR #960), sliced as convert_jax_model_to_pytorch.py
                                            slices, saved with safetensors

pi0's real shapes are scaled by SCALE in width (default 0.5: Gemma width 1024, FFN 8192; expert
512/2048; SigLIP 576/2304), with the real layer counts (18, 18, 27) and vocabulary (257152).
`tiny` is the demo's checkpoint (examples/openpi-tiny-lora): every pi0 key, 2 layers each, 2
heads of 16, a vocabulary of 256 and widths of 32 (expert 16), the real LoRA ranks.
"""
import os
import sys

import numpy as np

R_LLM, A_LLM, R_EXP, A_EXP = 16, 16.0, 32, 32.0


def shapes(scale):
    tiny = scale == "tiny"
    if tiny:
        scale = 1 / 64
    D, F, N, H, K = int(2048 * scale), int(16384 * scale), 8, 256 // 2, 1
    DE, FE = int(1024 * scale), int(4096 * scale)
    DV, FV, NV = int(1152 * scale), int(4304 * scale), 16
    L, LV, V = 18, 27, 257152
    if tiny:
        N, H, NV, DV, FV, L, LV, V = 2, 16, 2, 16, 32, 2, 2, 256
    HV = DV // NV
    s = {
        "PaliGemma/img/embedding/kernel": (14, 14, 3, DV), "PaliGemma/img/embedding/bias": (DV,),
        "PaliGemma/img/pos_embedding": (1, 256, DV),
        "PaliGemma/img/Transformer/encoder_norm/scale": (DV,), "PaliGemma/img/Transformer/encoder_norm/bias": (DV,),
        "PaliGemma/img/head/kernel": (DV, D), "PaliGemma/img/head/bias": (D,),
        "PaliGemma/llm/embedder/input_embedding": (V, D),
        "PaliGemma/llm/final_norm/scale": (D,), "PaliGemma/llm/final_norm_1/scale": (DE,),
        "PaliGemma/llm/layers/pre_attention_norm/scale": (L, D), "PaliGemma/llm/layers/pre_ffw_norm/scale": (L, D),
        "PaliGemma/llm/layers/pre_attention_norm_1/scale": (L, DE), "PaliGemma/llm/layers/pre_ffw_norm_1/scale": (L, DE),
    }
    for sfx, d, f in (("", D, F), ("_1", DE, FE)):
        s[f"PaliGemma/llm/layers/attn/q_einsum{sfx}/w"] = (L, N, d, H)
        s[f"PaliGemma/llm/layers/attn/kv_einsum{sfx}/w"] = (L, 2, K, d, H)
        s[f"PaliGemma/llm/layers/attn/attn_vec_einsum{sfx}/w"] = (L, N, H, d)
        s[f"PaliGemma/llm/layers/mlp{sfx}/gating_einsum"] = (L, 2, d, f)
        s[f"PaliGemma/llm/layers/mlp{sfx}/linear"] = (L, f, d)
    e = "PaliGemma/img/Transformer/encoderblock/"
    for n in ("LayerNorm_0", "LayerNorm_1"):
        s[e + n + "/scale"] = s[e + n + "/bias"] = (LV, DV)
    s[e + "MlpBlock_0/Dense_0/kernel"], s[e + "MlpBlock_0/Dense_0/bias"] = (LV, DV, FV), (LV, FV)
    s[e + "MlpBlock_0/Dense_1/kernel"], s[e + "MlpBlock_0/Dense_1/bias"] = (LV, FV, DV), (LV, DV)
    for m in ("query", "key", "value"):
        s[e + f"MultiHeadDotProductAttention_0/{m}/kernel"], s[e + f"MultiHeadDotProductAttention_0/{m}/bias"] = (LV, DV, NV, HV), (LV, NV, HV)
    s[e + "MultiHeadDotProductAttention_0/out/kernel"], s[e + "MultiHeadDotProductAttention_0/out/bias"] = (LV, NV, HV, DV), (LV, DV)
    for p, (i, o) in {"state_proj": (32, DE), "action_in_proj": (32, DE), "action_out_proj": (DE, 32),
                      "action_time_mlp_in": (2 * DE, DE), "action_time_mlp_out": (DE, DE)}.items():
        s[f"{p}/kernel"], s[f"{p}/bias"] = (i, o), (o,)
    # LoRA on every Gemma einsum and FFN, as openpi's gemma_2b_lora / gemma_300m_lora place it.
    for sfx, r in (("", R_LLM), ("_1", R_EXP)):
        for m in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
            w = s[f"PaliGemma/llm/layers/attn/{m}{sfx}/w"]
            s[f"PaliGemma/llm/layers/attn/{m}{sfx}/lora_a"] = w[:-1] + (r,)
            s[f"PaliGemma/llm/layers/attn/{m}{sfx}/lora_b"] = w[:-2] + (r, w[-1])
        for m in ("gating_einsum", "linear"):
            w = s[f"PaliGemma/llm/layers/mlp{sfx}/{m}"]
            s[f"PaliGemma/llm/layers/mlp{sfx}/{m}_lora_a"] = w[:-1] + (r,)
            s[f"PaliGemma/llm/layers/mlp{sfx}/{m}_lora_b"] = w[:-2] + (r, w[-1])
    return s


def make(step, scale):
    import jax.numpy as jnp
    import ml_dtypes
    import orbax.checkpoint as ocp
    rng = np.random.default_rng(0)
    tree = {}
    for name, shape in shapes(scale).items():
        a = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if "/llm/" in name and "lora" not in name:
            a = a.astype(ml_dtypes.bfloat16)  # openpi's LoRA training stores the frozen LLM in bf16
        node = tree
        for part in name.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[name.split("/")[-1]] = {"value": jnp.asarray(a)}
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(step, "params")), {"params": tree})
    os.makedirs(os.path.join(step, "assets"), exist_ok=True)


def convert(step, out):
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file
    path = os.path.abspath(os.path.join(step, "params"))
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    restore_args = ocp.checkpoint_utils.construct_restore_args(meta)
    for leaf in __import__("jax").tree_util.tree_leaves(restore_args):
        leaf.restore_type = np.ndarray
        leaf.dtype = np.float32
    params = ckptr.restore(path, ocp.args.PyTreeRestore(item=meta, restore_args=restore_args))["params"]
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and set(v) != {"value"}:
                walk(v, prefix + k + "/")
            else:
                flat[prefix + k] = np.asarray(v["value"] if isinstance(v, dict) else v)
    walk(params, "")
    s = {k.removeprefix("PaliGemma/"): v for k, v in flat.items()}
    # LoRA merge (einsum-correct: attn_vec sums B over the heads; the FFN is unscaled).
    for sfx, scale in (("", A_LLM / R_LLM), ("_1", A_EXP / R_EXP)):
        at = f"llm/layers/attn/"
        for m, eq in (("q_einsum", "lndr,lnrh->lndh"), ("kv_einsum", "labdr,labrh->labdh")):
            s[f"{at}{m}{sfx}/w"] += scale * np.einsum(eq, s.pop(f"{at}{m}{sfx}/lora_a"), s.pop(f"{at}{m}{sfx}/lora_b"))
        a, b = s.pop(f"{at}attn_vec_einsum{sfx}/lora_a"), s.pop(f"{at}attn_vec_einsum{sfx}/lora_b")
        s[f"{at}attn_vec_einsum{sfx}/w"] += scale * np.einsum("lnhr,lrd->lnhd", a, b.sum(axis=1))
        ml = f"llm/layers/mlp{sfx}/"
        s[ml + "gating_einsum"] += np.einsum("lafr,larh->lafh", s.pop(ml + "gating_einsum_lora_a"), s.pop(ml + "gating_einsum_lora_b"))
        s[ml + "linear"] += np.einsum("lhr,lrf->lhf", s.pop(ml + "linear_lora_a"), s.pop(ml + "linear_lora_b"))
    o = openpi_slice(s)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in o.items()}, out)


def openpi_slice(s, pi05=False):
    """The slicing of openpi's convert_jax_model_to_pytorch.py (o_proj by the general rule for
    both Gemmas, as the rule files do), on flat params named without the `PaliGemma/` prefix;
    sizes come from the arrays. Also the test suite's reference (Tests/interop/test_slice_openpi.py)."""
    o = {}
    V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
    dv = s["img/embedding/bias"].shape[0]
    o[V + "embeddings.patch_embedding.weight"] = s["img/embedding/kernel"].transpose(3, 2, 0, 1)
    o[V + "embeddings.patch_embedding.bias"] = s["img/embedding/bias"]
    o[V + "embeddings.position_embedding.weight"] = s["img/pos_embedding"].reshape(-1, dv)
    e = "img/Transformer/encoderblock/"
    for i in range(s[e + "LayerNorm_0/scale"].shape[0]):
        p = V + f"encoder.layers.{i}."
        o[p + "layer_norm1.weight"], o[p + "layer_norm1.bias"] = s[e + "LayerNorm_0/scale"][i], s[e + "LayerNorm_0/bias"][i]
        o[p + "layer_norm2.weight"], o[p + "layer_norm2.bias"] = s[e + "LayerNorm_1/scale"][i], s[e + "LayerNorm_1/bias"][i]
        o[p + "mlp.fc1.weight"], o[p + "mlp.fc1.bias"] = s[e + "MlpBlock_0/Dense_0/kernel"][i].T, s[e + "MlpBlock_0/Dense_0/bias"][i]
        o[p + "mlp.fc2.weight"], o[p + "mlp.fc2.bias"] = s[e + "MlpBlock_0/Dense_1/kernel"][i].T, s[e + "MlpBlock_0/Dense_1/bias"][i]
        for m, t in (("key", "k"), ("value", "v"), ("query", "q")):
            o[p + f"self_attn.{t}_proj.weight"] = s[e + f"MultiHeadDotProductAttention_0/{m}/kernel"][i].reshape(dv, -1).T
            o[p + f"self_attn.{t}_proj.bias"] = s[e + f"MultiHeadDotProductAttention_0/{m}/bias"][i].reshape(-1)
        o[p + "self_attn.out_proj.weight"] = s[e + "MultiHeadDotProductAttention_0/out/kernel"][i].reshape(-1, dv).T
        o[p + "self_attn.out_proj.bias"] = s[e + "MultiHeadDotProductAttention_0/out/bias"][i]
    o[V + "post_layernorm.weight"], o[V + "post_layernorm.bias"] = s["img/Transformer/encoder_norm/scale"], s["img/Transformer/encoder_norm/bias"]
    o["paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight"] = s["img/head/kernel"].T
    o["paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias"] = s["img/head/bias"]
    o["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = s["llm/embedder/input_embedding"]
    for sfx, base in (("", "paligemma_with_expert.paligemma.model.language_model."), ("_1", "paligemma_with_expert.gemma_expert.model.")):
        q, kv = s[f"llm/layers/attn/q_einsum{sfx}/w"], s[f"llm/layers/attn/kv_einsum{sfx}/w"]
        av, g, lin = s[f"llm/layers/attn/attn_vec_einsum{sfx}/w"], s[f"llm/layers/mlp{sfx}/gating_einsum"], s[f"llm/layers/mlp{sfx}/linear"]
        n, d, h = q.shape[1:]
        for i in range(q.shape[0]):
            p = base + f"layers.{i}."
            o[p + "self_attn.q_proj.weight"] = q[i].transpose(0, 2, 1).reshape(n * h, d)
            o[p + "self_attn.k_proj.weight"], o[p + "self_attn.v_proj.weight"] = kv[i, 0, 0].T, kv[i, 1, 0].T
            o[p + "self_attn.o_proj.weight"] = av[i].reshape(n * h, d).T
            o[p + "mlp.gate_proj.weight"], o[p + "mlp.up_proj.weight"] = g[i, 0].T, g[i, 1].T
            o[p + "mlp.down_proj.weight"] = lin[i].T
            if sfx and pi05:  # pi0.5's expert: adaptive norms, a Dense per norm
                for nm, tn in (("pre_attention_norm_1", "input_layernorm"), ("pre_ffw_norm_1", "post_attention_layernorm")):
                    o[p + f"{tn}.dense.bias"] = s[f"llm/layers/{nm}/Dense_0/bias"][i]
                    o[p + f"{tn}.dense.weight"] = s[f"llm/layers/{nm}/Dense_0/kernel"][i].T
            else:
                o[p + "input_layernorm.weight"] = s[f"llm/layers/pre_attention_norm{sfx}/scale"][i]
                o[p + "post_attention_layernorm.weight"] = s[f"llm/layers/pre_ffw_norm{sfx}/scale"][i]
    o["paligemma_with_expert.paligemma.model.language_model.norm.weight"] = s["llm/final_norm/scale"]
    E = "paligemma_with_expert.gemma_expert.model."
    if pi05:
        o[E + "norm.dense.bias"] = s["llm/final_norm_1/Dense_0/bias"]
        o[E + "norm.dense.weight"] = s["llm/final_norm_1/Dense_0/kernel"].T
        heads = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")
    else:
        o[E + "norm.weight"] = s["llm/final_norm_1/scale"]
        heads = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out")
    for k in heads:
        o[f"{k}.weight"], o[f"{k}.bias"] = s[f"{k}/kernel"].T, s[f"{k}/bias"]
    return o


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], (sys.argv[3] if sys.argv[3] == "tiny" else float(sys.argv[3])) if len(sys.argv) > 3 else 0.5)
    elif sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
