"""The oracle for rules/hf-pt-to-flax.rules and rules/hf-flax-to-pt.rules: transformers 4.57's
own PyTorch <-> Flax conversion, on tiny random models. Runs in .venv-tf4 (transformers 4.x
still has the Flax models); Tests/interop/test_hf_bridge.py calls it with subprocess.

    python scripts/hf_oracle.py make OUT [CASE ...]    # every case when none is named
    python scripts/hf_oracle.py load DIR [DIR ...]     # from_pretrained each, print loading info (JSON)
    python scripts/hf_oracle.py flaxload OUT CASE DIR [CASE DIR ...]  # FlaxX.from_pretrained(DIR) == OUT/CASE's expected tree?
    python scripts/hf_oracle.py forward CASE PT_FILE FLAX_FILE [...]  # both models on one input: max |difference|, max |output|
    python scripts/hf_oracle.py list

For each case `make` writes OUT/CASE/:
  pt/config.json, pt/model.safetensors         a random PyTorch model (every tensor random)
  flax-expected.safetensors                    FlaxX.from_pretrained(pt, from_pt=True).params, "/" names
                                               (what it converts; info.json lists what it leaves random)
  flax/config.json, flax/flax_model.msgpack    a random Flax model (every leaf random)
  pt-expected.safetensors                      load_flax_weights_in_pytorch_model(X(config), that tree),
                                               as save_pretrained writes it (tied copies left out)
"""
import json
import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def jax_compat():
    """transformers 4.57's Flax T5/LongT5 call jnp.clip(x, a_max=...), which jax 0.10 removed
    (min=/max=): a shim so the oracle's Flax models trace; the conversion code is untouched."""
    import jax.numpy as jnp
    clip = jnp.clip

    def clip_compat(x, min=None, max=None, a_min=None, a_max=None, **kw):
        return clip(x, min=a_min if min is None else min, max=a_max if max is None else max, **kw)

    jnp.clip = clip_compat


TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
T5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16)
LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37)

# case -> (model_type, config kwargs, PyTorch class, Flax class)
CASES_BASE = {
    "albert": ("albert", dict(TEXT, embedding_size=16), "AlbertModel", "FlaxAlbertModel"),
    "bart": ("bart", SEQ2SEQ, "BartModel", "FlaxBartModel"),
    "beit": ("beit", dict(VISION, use_relative_position_bias=True, use_mask_token=True), "BeitModel", "FlaxBeitModel"),
    "bert": ("bert", TEXT, "BertModel", "FlaxBertModel"),
    "bert-mlm": ("bert", TEXT, "BertForMaskedLM", "FlaxBertForMaskedLM"),
    "big_bird": ("big_bird", dict(TEXT, attention_type="original_full"), "BigBirdModel", "FlaxBigBirdModel"),
    "blenderbot": ("blenderbot", SEQ2SEQ, "BlenderbotModel", "FlaxBlenderbotModel"),
    "blenderbot-small": ("blenderbot-small", SEQ2SEQ, "BlenderbotSmallModel", "FlaxBlenderbotSmallModel"),
    "bloom": ("bloom", dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4), "BloomModel", "FlaxBloomModel"),
    "clip": ("clip", dict(projection_dim=16,
                          text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, max_position_embeddings=16),
                          vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=37)),
             "CLIPModel", "FlaxCLIPModel"),
    "dinov2": ("dinov2", dict(VISION, mlp_ratio=2), "Dinov2Model", "FlaxDinov2Model"),
    "distilbert": ("distilbert", dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64),
                   "DistilBertModel", "FlaxDistilBertModel"),
    "electra": ("electra", dict(TEXT, embedding_size=16), "ElectraModel", "FlaxElectraModel"),
    "gemma": ("gemma", dict(LLAMA, head_dim=8), "GemmaModel", "FlaxGemmaModel"),
    "gemma-lm": ("gemma", dict(LLAMA, head_dim=8), "GemmaForCausalLM", "FlaxGemmaForCausalLM"),
    "gpt2": ("gpt2", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64), "GPT2Model", "FlaxGPT2Model"),
    "gpt2-lm": ("gpt2", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64), "GPT2LMHeadModel", "FlaxGPT2LMHeadModel"),
    "gpt_neo": ("gpt_neo", dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                max_position_embeddings=64, window_size=8), "GPTNeoModel", "FlaxGPTNeoModel"),
    "gptj": ("gptj", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), "GPTJModel", "FlaxGPTJModel"),
    "llama": ("llama", LLAMA, "LlamaModel", "FlaxLlamaModel"),
    "llama-lm": ("llama", LLAMA, "LlamaForCausalLM", "FlaxLlamaForCausalLM"),
    "longt5": ("longt5", dict(T5, local_radius=4, global_block_size=4, encoder_attention_type="transient-global"),
               "LongT5Model", "FlaxLongT5Model"),
    "marian": ("marian", dict(SEQ2SEQ, pad_token_id=98, decoder_start_token_id=98), "MarianModel", "FlaxMarianModel"),
    "mbart": ("mbart", SEQ2SEQ, "MBartModel", "FlaxMBartModel"),
    "mistral": ("mistral", LLAMA, "MistralModel", "FlaxMistralModel"),
    "mt5": ("mt5", T5, "MT5Model", "FlaxMT5Model"),
    "opt": ("opt", dict(vocab_size=99, hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=64), "OPTModel", "FlaxOPTModel"),
    "pegasus": ("pegasus", SEQ2SEQ, "PegasusModel", "FlaxPegasusModel"),
    "regnet": ("regnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), "RegNetModel", "FlaxRegNetModel"),
    "resnet": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), "ResNetModel", "FlaxResNetModel"),
    "resnet-cls": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3),
                   "ResNetForImageClassification", "FlaxResNetForImageClassification"),
    "regnet-cls": ("regnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3),
                   "RegNetForImageClassification", "FlaxRegNetForImageClassification"),
    "vit-cls": ("vit", dict(VISION, num_labels=3), "ViTForImageClassification", "FlaxViTForImageClassification"),
    "bart-lm": ("bart", SEQ2SEQ, "BartForConditionalGeneration", "FlaxBartForConditionalGeneration"),
    "wav2vec2-ctc": ("wav2vec2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer",
                                      vocab_size=12), "Wav2Vec2ForCTC", "FlaxWav2Vec2ForCTC"),
    "opt-lm": ("opt", dict(vocab_size=99, hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=64), "OPTForCausalLM", "FlaxOPTForCausalLM"),
    "encoder-decoder": ("encoder-decoder", dict(encoder=dict(TEXT, model_type="bert"),
                                                decoder=dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                             add_cross_attention=True, is_decoder=True)),
                        "EncoderDecoderModel", "FlaxEncoderDecoderModel"),
    "vision-encoder-decoder": ("vision-encoder-decoder", dict(encoder=dict(VISION, model_type="vit"),
                                                              decoder=dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                                           n_positions=64, add_cross_attention=True, is_decoder=True)),
                               "VisionEncoderDecoderModel", "FlaxVisionEncoderDecoderModel"),
    "roberta": ("roberta", TEXT, "RobertaModel", "FlaxRobertaModel"),
    "roberta-prelayernorm": ("roberta-prelayernorm", TEXT, "RobertaPreLayerNormModel", "FlaxRobertaPreLayerNormModel"),
    "roformer": ("roformer", dict(TEXT, embedding_size=32), "RoFormerModel", "FlaxRoFormerModel"),
    "t5": ("t5", T5, "T5Model", "FlaxT5Model"),
    "t5-lm": ("t5", T5, "T5ForConditionalGeneration", "FlaxT5ForConditionalGeneration"),
    "vit": ("vit", VISION, "ViTModel", "FlaxViTModel"),
    "wav2vec2": ("wav2vec2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                  num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer"), "Wav2Vec2Model", "FlaxWav2Vec2Model"),
    "whisper": ("whisper", dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3),
                "WhisperModel", "FlaxWhisperModel"),
    "xglm": ("xglm", dict(vocab_size=99, d_model=32, num_layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=64),
             "XGLMModel", "FlaxXGLMModel"),
    "xlm-roberta": ("xlm-roberta", TEXT, "XLMRobertaModel", "FlaxXLMRobertaModel"),
}

# Heads: (architecture)-(head) -> its PyTorch class and Flax class; and two more classes.
CASES = dict(CASES_BASE, **{
    **{f"{arch}-{head}": (CASES_BASE[arch][0], dict(CASES_BASE[arch][1], **extra), pt, "Flax" + pt)
       for arch, head, pt, extra in [
           ("albert", "pretraining", "AlbertForPreTraining", {}),
           ("beit", "cls", "BeitForImageClassification", {"num_labels": 3}),
           ("big_bird", "qa", "BigBirdForQuestionAnswering", {}),
           ("blenderbot", "lm", "BlenderbotForConditionalGeneration", {}),
           ("bloom", "lm", "BloomForCausalLM", {}),
           ("dinov2", "cls", "Dinov2ForImageClassification", {"num_labels": 3}),
           ("distilbert", "mlm", "DistilBertForMaskedLM", {}),
           ("electra", "pretraining", "ElectraForPreTraining", {}),
           ("gpt_neo", "lm", "GPTNeoForCausalLM", {}),
           ("gptj", "lm", "GPTJForCausalLM", {}),
           ("longt5", "lm", "LongT5ForConditionalGeneration", {}),
           ("marian", "mt", "MarianMTModel", {}),
           ("mbart", "lm", "MBartForConditionalGeneration", {}),
           ("mistral", "lm", "MistralForCausalLM", {}),
           ("mt5", "lm", "MT5ForConditionalGeneration", {}),
           ("pegasus", "lm", "PegasusForConditionalGeneration", {}),
           ("roberta", "mlm", "RobertaForMaskedLM", {}),
           ("roberta", "tokcls", "RobertaForTokenClassification", {"num_labels": 3}),
           ("bert", "seqcls", "BertForSequenceClassification", {"num_labels": 3}),
           ("wav2vec2", "pretraining", "Wav2Vec2ForPreTraining", {}),
           ("whisper", "lm", "WhisperForConditionalGeneration", {}),
           ("xglm", "lm", "XGLMForCausalLM", {}),
       ]},
    "clip-vision": ("clip_vision_model", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=37), "CLIPVisionModel", "FlaxCLIPVisionModel"),
    "t5-encoder": ("t5", T5, "T5EncoderModel", "FlaxT5EncoderModel"),
    "speech-encoder-decoder": ("speech-encoder-decoder",
                               dict(encoder=dict(CASES_BASE["wav2vec2"][1], model_type="wav2vec2"),
                                    decoder=dict(SEQ2SEQ, model_type="bart", is_decoder=True, add_cross_attention=True,
                                                max_position_embeddings=128)),
                               "SpeechEncoderDecoderModel", "FlaxSpeechEncoderDecoderModel"),
    "vision-text-dual-encoder": ("vision-text-dual-encoder", dict(vision_config=dict(VISION, model_type="vit"),
                                                                  text_config=dict(TEXT, model_type="bert"), projection_dim=16),
                                 "VisionTextDualEncoderModel", "FlaxVisionTextDualEncoderModel"),
})


# Cases whose checkpoints are bfloat16 (PyTorch and Flax).
BF16 = {"llama-lm-bf16", "gemma-lm-bf16"}
CASES["llama-lm-bf16"] = CASES["llama-lm"]
CASES["gemma-lm-bf16"] = CASES["gemma-lm"]
# Cases whose PyTorch checkpoints have older names: LayerNorm gamma/beta (early checkpoints
# ported from TensorFlow), weight norm as weight_g/weight_v (torch.nn.utils.weight_norm, before
# torch's parametrizations: wav2vec2 checkpoints of that time).
LEGACY_NAMES = {"bert-mlm-gamma-beta", "wav2vec2-weight-g-v"}
CASES["bert-mlm-gamma-beta"] = CASES["bert-mlm"]
CASES["wav2vec2-weight-g-v"] = CASES["wav2vec2-ctc"]


def legacy_name(k):
    return (k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            .replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"))


def make(out, case):
    import numpy as np
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file, save_file
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model, load_pytorch_checkpoint_in_flax_state_dict

    model_type, kwargs, pt_name, flax_name = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    pt_cls, flax_cls = getattr(transformers, pt_name), getattr(transformers, flax_name)
    d = os.path.join(out, case)
    os.makedirs(d, exist_ok=True)

    # PyTorch -> Flax: every parameter and buffer random (so a transpose or a swap shows).
    torch.manual_seed(0)
    pt = pt_cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in list(pt.parameters()) + list(pt.buffers()):
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype))
        for name, v in pt.named_buffers():
            if name.endswith("running_var"):  # a variance, so that BatchNorm computes numbers
                v.abs_().add_(0.5)
    if case in BF16:
        pt = pt.to(torch.bfloat16)
    pt.save_pretrained(os.path.join(d, "pt"), safe_serialization=True)
    if case in LEGACY_NAMES:  # names of older checkpoints
        f = os.path.join(d, "pt", "model.safetensors")
        save_file({legacy_name(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    # What FlaxX.from_pretrained(d/pt, from_pt=True) does, without compiling the model: its
    # loader and converter on the model's parameter shapes (jax.eval_shape, as from_pretrained
    # with _do_init=False has them), then, as from_pretrained does, the keys the model does not
    # have are dropped. Keys the model has and the conversion did not make are recorded: there
    # from_pretrained would put random values.
    try:
        fx = flax_cls(config, seed=0, _do_init=False)
    except ValueError:  # the encoder-decoder wrappers insist on initializing
        fx = flax_cls(config, seed=0)
    shapes = fx.params_shape_tree
    shim = types.SimpleNamespace(params=shapes, base_model_prefix=fx.base_model_prefix)
    state = flatten_dict(load_pytorch_checkpoint_in_flax_state_dict(shim, os.path.join(d, "pt", "model.safetensors"), False))
    required = set(flatten_dict(shapes))
    save_file({"/".join(k): np.asarray(v) for k, v in state.items() if k in required}, os.path.join(d, "flax-expected.safetensors"))
    not_converted = sorted("/".join(k) for k in required - set(state))

    # Flax -> PyTorch: a random Flax tree of the model's shapes, every leaf random.
    rng = np.random.default_rng(2)
    tree = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in flatten_dict(shapes).items()}
    tree = unflatten_dict({k: np.abs(v) + 0.5 if k[-1] == "var" else v for k, v in tree.items()})
    if case in BF16:  # a bfloat16 tree: from_flax casts it to float32
        tree = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), tree)
    fx.save_pretrained(os.path.join(d, "flax"), params=tree)
    torch.manual_seed(0)
    pt = pt_cls(config).eval()
    load_flax_weights_in_pytorch_model(pt, tree)
    pt.save_pretrained(os.path.join(d, "pt-ref"), safe_serialization=True)
    os.replace(os.path.join(d, "pt-ref", "model.safetensors"), os.path.join(d, "pt-expected.safetensors"))
    sd = load_file(os.path.join(d, "pt-expected.safetensors"))
    json.dump({"pt_class": pt_name, "flax_class": flax_name, "model_type": model_type, "pt_expected": len(sd),
               "flax_not_converted": not_converted},
              open(os.path.join(d, "info.json"), "w"))


def flat_flax(path):
    """A Flax tree from flax_model.msgpack, or from a safetensors file of "/" names."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict, unflatten_dict
    if path.endswith(".msgpack"):
        return flatten_dict(msgpack_restore(open(path, "rb").read()), sep="/")
    from safetensors.numpy import load_file
    return load_file(path)


def flax_load(out, case, d):
    """FlaxX.from_pretrained(d) (d: config.json + our flax_model.msgpack): is every leaf the
    expected one? (Flax fills leaves missing from the file at random and drops unexpected ones.)"""
    import numpy as np
    import transformers
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import load_file
    _, params = getattr(transformers, CASES[case][3]).from_pretrained(d, _do_init=False)
    got = {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}
    exp = load_file(os.path.join(out, case, "flax-expected.safetensors"))
    return {"missing": sorted(set(exp) - set(got)), "unexpected": sorted(set(got) - set(exp)),
            "different": sorted(k for k in exp if k in got and not (got[k].dtype == exp[k].dtype and np.array_equal(got[k], exp[k])))}


def forward(case, pairs):
    """Both frameworks' models on one random input, the PyTorch one with a pair's state dict
    file (strict), the Flax one with its tree: per pair, the largest difference of their
    outputs and the largest output."""
    import jax
    import numpy as np
    import torch
    import transformers
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.torch import load_file
    model_type, kwargs, pt_name, flax_name = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    fx = getattr(transformers, flax_name)(config, seed=0, _do_init=False)
    run = jax.jit(lambda params, x: fx(x, params=params)[0])
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    res = []
    for pt_file, flax_file in pairs:
        pt = getattr(transformers, pt_name)(config).eval()
        pt.load_state_dict(load_file(pt_file), strict=True)
        flat = flat_flax(flax_file)
        # Parameters the file lacks are random, as from_pretrained leaves them.
        rng = np.random.default_rng(4)
        for k, v in flatten_dict(fx.params_shape_tree, sep="/").items():
            if k not in flat:
                flat[k] = rng.standard_normal(v.shape).astype(v.dtype)
        with torch.no_grad():
            a = pt(torch.from_numpy(x))[0].numpy()
        b = np.asarray(run(unflatten_dict(flat, sep="/"), x))
        res.append((float(np.max(np.abs(a - b.reshape(a.shape)))), float(np.max(np.abs(a)))))
    return res


def load(dirs):
    import transformers
    res = {}
    for d in dirs:
        info = json.load(open(os.path.join(d, "..", "info.json"))) if os.path.exists(os.path.join(d, "..", "info.json")) else None
        cls = getattr(transformers, info["pt_class"]) if info else transformers.AutoModel
        _, li = cls.from_pretrained(d, output_loading_info=True)
        res[d] = {k: sorted(v) if isinstance(v, (list, set)) else str(v) for k, v in li.items()}
    print(json.dumps(res))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "list":
        print("\n".join(CASES))
        sys.exit()
    import logging
    import transformers
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    jax_compat()
    if cmd == "list":
        pass
    elif cmd == "make":
        failed = {}
        for case in args[1:] or list(CASES):
            try:
                make(args[0], case)
            except Exception as e:  # one architecture failing must not hide the others
                failed[case] = f"{type(e).__name__}: {e}"[:2000]
        json.dump(failed, open(os.path.join(args[0], "failed.json"), "w"), indent=1)
        print(json.dumps(failed, indent=1))
    elif cmd == "load":
        load(args)
    elif cmd == "flaxload":  # OUT CASE DIR [CASE DIR ...]
        print(json.dumps({c: flax_load(args[0], c, d) for c, d in zip(args[1::2], args[2::2])}))
    elif cmd == "forward":  # CASE PT_FILE FLAX_FILE [PT_FILE FLAX_FILE ...]
        print(json.dumps(forward(args[0], list(zip(args[1::2], args[2::2])))))
    else:
        sys.exit(f"unknown command {cmd}")
