"""The Hugging Face PyTorch <-> Flax bridge as rule sets (rules/hf-pt-to-flax.rules,
rules/hf-flax-to-pt.rules), against transformers 4.57's own conversion, architecture by
architecture, on tiny random models (every tensor random, so a transpose or a swap shows).

scripts/hf_oracle.py runs in .venv-tf4 (transformers 5 has no Flax models): once per session it
builds every case's random PyTorch model and what from_pretrained(from_pt=True) converts it to
(transformers' loader and converter on the Flax model's parameter shapes), and a random Flax
tree and load_flax_weights_in_pytorch_model of it. Our pipelines must give the same
tensors, key for key and bit for bit; what PyTorch builds from our files must load with no
unexpected and no missing parameters beyond those the Flax tree does not have."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import hf_oracle
from conftest import ROOT, shell

RULES = os.path.join(ROOT, "rules")
ORACLE = os.path.join(ROOT, "scripts", "hf_oracle.py")

# Every case of scripts/hf_oracle.py (its table has no imports), and the rule file each direction uses.
CASES = list(hf_oracle.CASES)
PT_TO_FLAX = dict({c: "hf-pt-to-flax-sinusoidal.rules" for c in ("marian", "marian-mt", "pegasus", "pegasus-lm", "roformer")},
                  opt="hf-pt-to-flax-opt.rules", **{"resnet-cls": "hf-pt-to-flax-resnet-basic.rules"})
FLAX_TO_PT = {}
# Tensors PyTorch's state dict has and a Flax tree does not (the PyTorch model makes them at
# init): the fixed sinusoids of Marian, Pegasus, RoFormer; BatchNorm's num_batches_tracked.
SINUSOIDS = {"marian": {"encoder.embed_positions.weight", "decoder.embed_positions.weight"},
             "pegasus": {"encoder.embed_positions.weight", "decoder.embed_positions.weight"},
             "pegasus-lm": {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"},
             "roformer": {"encoder.embed_positions.weight"}}
# transformers 4.57 itself misses these (ResNet basic layers: Flax names them layer_0, layer_1
# where PyTorch has layer.0, layer.1; from_pt/from_flax leave them random). Ours are checked by
# running both models instead (test_resnet_basic_layers_compute_what_pytorch_computes).
ORACLE_WRONG = {"resnet-cls": lambda k: "/layer/layer_" in k or ".layer." in k and ".layers." in k}


def venv_tf4():
    """.venv-tf4's python: $CKPT_VENV_TF4, else the checkout's, else the main checkout's (worktrees)."""
    for py in (os.environ.get("CKPT_VENV_TF4", ""), os.path.join(ROOT, ".venv-tf4", "bin", "python"),
               "/work/main/.venv-tf4/bin/python"):
        if py and os.path.exists(py):
            return py
    pytest.fail(".venv-tf4 is missing: run scripts/setup.sh")


def oracle(*args):
    p = subprocess.run([venv_tf4(), ORACLE, *map(str, args)], capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return p.stdout.decode()


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """Every case's models and transformers' conversions of them, built once."""
    out = tmp_path_factory.mktemp("hf")
    failed = json.loads(oracle("make", out))
    assert failed == {}, failed
    return out


def load_file(path):
    """A safetensors file as numpy arrays, bfloat16 as ml_dtypes.bfloat16 (safetensors.numpy has none)."""
    import ml_dtypes
    import torch
    from safetensors.torch import load_file as load_torch
    return {k: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
            for k, t in load_torch(str(path)).items()}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def convert(src, rules, out, fmt="", args=""):
    p = shell(f"ckpt-read '{src}' | ckpt-slice {args} --rules '{RULES}/{rules}' | ckpt-write {fmt} '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    return out


@pytest.mark.parametrize("case", CASES)
def test_pytorch_to_flax_is_what_from_pt_builds(made, case, tmp_path):
    ours = load_file(str(convert(made / case / "pt" / "model.safetensors", PT_TO_FLAX.get(case, "hf-pt-to-flax.rules"),
                                 tmp_path / "flax.safetensors")))
    theirs = load_file(str(made / case / "flax-expected.safetensors"))
    # Parameters of the Flax model transformers' conversion does not make (from_pretrained
    # would leave them random): none, but for its known miss.
    missed = json.loads((made / case / "info.json").read_text())["flax_not_converted"]
    wrong = ORACLE_WRONG.get(case, lambda k: False)
    assert all(wrong(k) for k in missed), missed
    assert sorted(ours) == sorted(list(theirs) + missed)
    differ = [k for k, v in theirs.items() if not same_bits(ours[k], v)]
    assert differ == [], differ
    assert len(theirs) >= 10


@pytest.fixture(scope="session")
def to_pytorch(made, tmp_path_factory):
    """Every case's random Flax model through hf-flax-to-pt.rules into a from_pretrained
    directory, and what transformers' from_pretrained says loading each one."""
    out = tmp_path_factory.mktemp("hf-pt")
    for case in CASES:
        d = out / case / "model"
        d.mkdir(parents=True)
        shutil.copy(made / case / "flax" / "config.json", d / "config.json")
        shutil.copy(made / case / "info.json", out / case / "info.json")
        # bfloat16 trees: from_flax casts every tensor to float32 first, so does --cast F32.
        convert(made / case / "flax" / "flax_model.msgpack", FLAX_TO_PT.get(case, "hf-flax-to-pt.rules"), d / "model.safetensors",
                args="--cast F32" if case in hf_oracle.BF16 else "")
    return out, json.loads(oracle("load", *[out / c / "model" for c in CASES]))


def not_in_flax(case, key):
    return key.endswith(".num_batches_tracked") or key in SINUSOIDS.get(case, ())


@pytest.mark.parametrize("case", CASES)
def test_flax_to_pytorch_is_what_from_flax_builds_and_loads_cleanly(to_pytorch, made, case):
    out, loading = to_pytorch
    ours = load_file(str(out / case / "model" / "model.safetensors"))
    theirs = load_file(str(made / case / "pt-expected.safetensors"))
    assert sorted(ours) == sorted(k for k in theirs if not not_in_flax(case, k))
    wrong = ORACLE_WRONG.get(case, lambda k: False)
    differ = [k for k, v in ours.items() if not wrong(k) and not same_bits(v, theirs[k])]
    assert differ == [], differ
    # from_pretrained(our directory): nothing unexpected, nothing missing but what Flax lacks.
    info = loading[str(out / case / "model")]
    assert info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    assert all(not_in_flax(case, k) for k in info["missing_keys"]), info


def test_resnet_basic_layers_compute_what_pytorch_computes(made, tmp_path):
    """ResNet-18/34-style basic layers, where transformers' own conversion loses the layer
    weights: the Flax model with our tree computes the PyTorch model's logits, both ways
    (and with transformers' own from_pt tree it does not, which shows the check can fail)."""
    case = made / "resnet-cls"
    flax = convert(case / "pt" / "model.safetensors", PT_TO_FLAX["resnet-cls"], tmp_path / "flax.safetensors")
    torch_ = convert(case / "flax" / "flax_model.msgpack", "hf-flax-to-pt.rules", tmp_path / "model.safetensors")
    pairs = [(case / "pt" / "model.safetensors", flax), (torch_, case / "flax" / "flax_model.msgpack"),
             (case / "pt" / "model.safetensors", case / "flax-expected.safetensors")]
    res = json.loads(oracle("forward", "resnet-cls", *[f for pair in pairs for f in pair]).splitlines()[-1])
    assert [diff <= 1e-5 * size for diff, size in res] == [True, True, False], res


def test_msgpack_output_is_what_flax_from_pretrained_loads(made, tmp_path):
    """ckpt-write --format msgpack gives a flax_model.msgpack that FlaxX.from_pretrained reads,
    every leaf the expected one (BatchNorm collections, T5, weight norm, tied heads)."""
    args = []
    for case in ("bert-mlm", "gpt2-lm", "t5-lm", "resnet", "wav2vec2-ctc", "clip", "llama-lm"):
        d = tmp_path / case
        d.mkdir()
        shutil.copy(made / case / "pt" / "config.json", d / "config.json")
        convert(made / case / "pt" / "model.safetensors", PT_TO_FLAX.get(case, "hf-pt-to-flax.rules"), d / "flax_model.msgpack",
                fmt="--format msgpack")
        args += [case, d]
    res = json.loads(oracle("flaxload", made, *args).splitlines()[-1])
    assert res == {c: {"missing": [], "unexpected": [], "different": []} for c in args[::2]}


def test_the_comparison_sees_a_wrong_rule(made, tmp_path):
    """The generic torch-to-flax.rules guesses embeddings by *embed* in the name: ALBERT's
    embedding_hidden_mapping_in is a Linear, so its tree differs from transformers'."""
    ours = load_file(str(convert(made / "albert" / "pt" / "model.safetensors", "torch-to-flax.rules", tmp_path / "f.safetensors")))
    theirs = load_file(str(made / "albert" / "flax-expected.safetensors"))
    assert "encoder/embedding_hidden_mapping_in/kernel" in theirs and "encoder/embedding_hidden_mapping_in/kernel" not in ours


def test_real_minilm_there_and_back(tmp_path, minilm):
    """The real all-MiniLM-L6-v2: hf-pt-to-flax gives what bert-torch-to-flax gives (proven
    against FlaxBertModel in test_slice.py), and hf-flax-to-pt brings every tensor back
    bit for bit (but the position_ids buffer, which BertModel makes itself)."""
    ours = load_file(str(convert(minilm, "hf-pt-to-flax.rules", tmp_path / "flax.safetensors")))
    bert = load_file(str(convert(minilm, "bert-torch-to-flax.rules", tmp_path / "bert.safetensors")))
    assert sorted(ours) == sorted(bert) and len(ours) == 103
    assert all(same_bits(ours[k], v) for k, v in bert.items())
    back = load_file(str(convert(tmp_path / "flax.safetensors", "hf-flax-to-pt.rules", tmp_path / "back.safetensors")))
    orig = load_file(minilm)
    assert sorted(back) == sorted(set(orig) - {"embeddings.position_ids"})
    assert all(same_bits(v, orig[k]) for k, v in back.items())


def test_bfloat16_cases_are_bfloat16(made):
    """The bf16 cases test what they say: from_pt keeps bfloat16 (and so do the rules), from_flax
    gives float32 (and so does --cast F32)."""
    import ml_dtypes
    for case in sorted(hf_oracle.BF16):
        assert {v.dtype for v in load_file(made / case / "pt" / "model.safetensors").values()} == {np.dtype(ml_dtypes.bfloat16)}
        assert {v.dtype for v in load_file(made / case / "flax-expected.safetensors").values()} == {np.dtype(ml_dtypes.bfloat16)}
        assert {v.dtype for v in load_file(made / case / "pt-expected.safetensors").values()} == {np.dtype(np.float32)}


def test_a_head_checkpoint_into_a_base_model_by_a_rename_stage_first(made, tmp_path):
    """The rules keep a model's structure; to load BertForMaskedLM weights into FlaxBertModel
    (what transformers' from_pt does by itself), a first ckpt-slice drops the head and strips
    the prefix: the result is the bert/ part of the FlaxBertForMaskedLM tree, without bert/."""
    (tmp_path / "strip.rules").write_text("drop cls.{x*}\nbert.{p*} -> {p}\n")
    src, out = made / "bert-mlm" / "pt" / "model.safetensors", tmp_path / "base.safetensors"
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{tmp_path}/strip.rules' | ckpt-slice --rules '{RULES}/hf-pt-to-flax.rules' "
              f"| ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    ours, theirs = load_file(out), load_file(made / "bert-mlm" / "flax-expected.safetensors")
    base = {k[len("bert/"):]: v for k, v in theirs.items() if k.startswith("bert/")}
    assert sorted(ours) == sorted(base) and len(base) == 37
    assert all(same_bits(ours[k], v) for k, v in base.items())
