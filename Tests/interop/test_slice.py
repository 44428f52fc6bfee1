"""ckpt-slice end to end: the shipped generic and BERT rules on real weights and real flax
modules, casts bit for bit against ml_dtypes, --plan without data, and bad rule files."""
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ROOT, run, shell

RULES = os.path.join(ROOT, "rules")


def slice_file(tmp_path, tensors, rules_text=None, rules=None, args=""):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    if out.exists():
        out.unlink()
    if rules_text is not None:
        rules = tmp_path / "test.rules"
        rules.write_text(rules_text)
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{rules}' {args} | ckpt-write '{out}'")
    return p, (load_file(str(out)) if p.returncode == 0 else None)


def raw_tensor(path, name, dtype):
    """A tensor of a safetensors file read from its bytes (safetensors.numpy has no float8)."""
    import json
    import struct
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8:8 + n])[name]
    a, b = info["data_offsets"]
    assert info["dtype"] in ("F8_E4M3", "F8_E5M2", "BF16", "F16")
    return np.frombuffer(data[8 + n + a:8 + n + b], dtype=dtype)


def test_bert_round_trip_on_the_real_minilm(tmp_path, minilm):
    flax, back = tmp_path / "flax.safetensors", tmp_path / "back.safetensors"
    p = shell(f"ckpt-read '{minilm}' | ckpt-slice --rules '{RULES}/bert-torch-to-flax.rules' | tee '{tmp_path}/f.ckpts' "
              f"| ckpt-write '{flax}' && ckpt-read '{tmp_path}/f.ckpts' | ckpt-slice --rules '{RULES}/bert-flax-to-torch.rules' | ckpt-write '{back}'")
    assert p.returncode == 0, p.stderr.decode()
    orig, f, b = load_file(minilm), load_file(str(flax)), load_file(str(back))
    # The Flax tree FlaxBertModel has: kernels [in, out], LayerNorm scale, Embed embedding.
    assert len(f) == 103 and "embeddings.position_ids" in orig
    np.testing.assert_array_equal(f["encoder/layer/3/attention/self/query/kernel"], orig["encoder.layer.3.attention.self.query.weight"].T)
    np.testing.assert_array_equal(f["encoder/layer/0/output/LayerNorm/scale"], orig["encoder.layer.0.output.LayerNorm.weight"])
    np.testing.assert_array_equal(f["embeddings/word_embeddings/embedding"], orig["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(f["pooler/dense/kernel"], orig["pooler.dense.weight"].T)
    # And back: every tensor bit-identical; position_ids (a buffer BertModel makes itself) is omitted.
    assert set(b) == set(orig) - {"embeddings.position_ids"}
    for k, v in b.items():
        assert v.dtype == orig[k].dtype and np.array_equal(v.view(np.uint8), orig[k].view(np.uint8)), k


def test_generic_flax_to_torch_rules_against_real_flax_and_torch(tmp_path):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from flax.serialization import to_bytes
    import torch

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, ids):
            e = nn.Embed(10, 6, name="embed")(ids)
            y = nn.Conv(6, (3, 3), name="conv")(x)
            y = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(y)
            y = nn.BatchNorm(use_running_average=True, name="bn")(y)
            y = nn.LayerNorm(name="ln")(y)
            return nn.Dense(5, name="fc")(y.mean((1, 2)) + e.mean(1))

    x, ids = jnp.ones((1, 8, 8, 3)), jnp.zeros((1, 2), jnp.int32)
    variables = Net().init(jax.random.PRNGKey(0), x, ids)
    variables = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.PRNGKey(1), a.shape) * 0.1, variables)
    src, out = tmp_path / "vars.msgpack", tmp_path / "torch.safetensors"
    src.write_bytes(to_bytes(variables))
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{RULES}/flax-to-torch.rules' | ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    sd = {k: torch.from_numpy(v) for k, v in load_file(str(out)).items()}
    assert sorted(sd) == sorted(["embed.weight", "conv.weight", "conv.bias", "depthwise.weight", "depthwise.bias", "bn.weight", "bn.bias",
                                 "bn.running_mean", "bn.running_var", "ln.weight", "ln.bias", "fc.weight", "fc.bias"])
    # The torch modules with these weights compute what the flax ones do.
    xt = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    conv.load_state_dict({"weight": sd["conv.weight"], "bias": sd["conv.bias"]})
    dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    dw.load_state_dict({"weight": sd["depthwise.weight"], "bias": sd["depthwise.bias"]})
    y_t = dw(conv(xt)).detach().numpy().transpose(0, 2, 3, 1)
    p_ = variables["params"]
    y_f = nn.Conv(6, (3, 3), feature_group_count=6).apply({"params": p_["depthwise"]},
                                                           nn.Conv(6, (3, 3)).apply({"params": p_["conv"]}, jnp.asarray(xt.numpy().transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(y_t, np.asarray(y_f), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), np.asarray(p_["fc"]["kernel"]).T)
    np.testing.assert_array_equal(sd["bn.running_var"].numpy(), np.asarray(variables["batch_stats"]["bn"]["var"]))
    np.testing.assert_array_equal(sd["ln.weight"].numpy(), np.asarray(p_["ln"]["scale"]))
    # And torch-to-flax brings the params back (batch statistics beside them, as documented).
    back = tmp_path / "back.safetensors"
    p = shell(f"ckpt-read '{out}' | ckpt-slice --rules '{RULES}/torch-to-flax.rules' | ckpt-write '{back}'")
    assert p.returncode == 0, p.stderr.decode()
    b = load_file(str(back))
    for name, leaf in {"conv/kernel": p_["conv"]["kernel"], "depthwise/kernel": p_["depthwise"]["kernel"], "fc/kernel": p_["fc"]["kernel"],
                       "embed/embedding": p_["embed"]["embedding"], "ln/scale": p_["ln"]["scale"], "bn/mean": variables["batch_stats"]["bn"]["mean"]}.items():
        np.testing.assert_array_equal(b[name], np.asarray(leaf), err_msg=name)


SPECIALS = np.array([0.0, -0.0, 1.0, -1.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -7 + 2 ** -8, 65504, 65520, 1e5, 448, 464, 465, 480, 57344, 61440,
                     2 ** -14, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -9, 2 ** -10, 2 ** -16, 2 ** -17, 1e-45, 3.4e38, np.inf, -np.inf, np.nan, 0.1, -7.3e-3],
                    dtype=np.float64)


@pytest.mark.parametrize("target,ref", [("BF16", ml_dtypes.bfloat16), ("F16", np.float16), ("F8_E4M3", ml_dtypes.float8_e4m3fn),
                                        ("F8_E5M2", ml_dtypes.float8_e5m2)])
@pytest.mark.parametrize("source", [np.float32, np.float64])
def test_cast_rounds_bit_for_bit_like_ml_dtypes(tmp_path, target, ref, source):
    rng = np.random.default_rng(5)
    values = np.concatenate([SPECIALS, -SPECIALS, rng.standard_normal(3000) * 10.0 ** rng.integers(-12, 6, 3000)]).astype(source)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(ref)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"x": values}, str(src))
    (tmp_path / "c.rules").write_text(f"x -> y | cast {target}\n")
    p = shell(f"ckpt-read '{src}' | ckpt-slice --rules '{tmp_path / 'c.rules'}' | ckpt-write '{out}'")
    assert p.returncode == 0, p.stderr.decode()
    bits = np.uint8 if expected.itemsize == 1 else np.uint16
    got = raw_tensor(str(out), "y", bits)
    mismatch = np.nonzero(got != expected.view(bits))[0]
    assert mismatch.size == 0, [(float(values[i]), hex(got[i]), hex(expected.view(bits)[i])) for i in mismatch[:8]]


def test_scale_add_and_widening_cast_match_numpy(tmp_path):
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    xb = x.astype(ml_dtypes.bfloat16)
    p, out = slice_file(tmp_path, {"a": x, "b": xb, "c": x[:3]}, rules_text="a -> a2 | scale 0.3\nb -> b1 | add 1\nb -> never\nkeep c\n")
    assert p.returncode == 0, p.stderr.decode()
    np.testing.assert_array_equal(out["c"], x[:3])
    np.testing.assert_array_equal(out["a2"], x * np.float32(0.3))
    np.testing.assert_array_equal(out["b1"].view(np.uint16), (xb + 1).view(np.uint16))  # ml_dtypes: in float32, rounded once
    p, out = slice_file(tmp_path, {"b": xb}, rules_text="b -> b | cast F32\n")
    np.testing.assert_array_equal(out["b"], xb.astype(np.float32))


def test_stack_unstack_and_index(tmp_path):
    layers = {f"layers.{i}.q.weight": np.full((2, 3), i, np.float32) + np.arange(6, dtype=np.float32).reshape(2, 3) for i in range(3)}
    layers.update({f"layers.{i}.kv": np.arange(2 * 4, dtype=np.float32).reshape(2, 4) + 10 * i for i in range(3)})
    rules = ('layers.{i:int}.q.weight -> scan/q/kernel | rearrange "i o d -> i d o"\n'
             'layers.{i:int}.kv -> layers.{i}.{s=k,v} | index [:, 1:3] | rearrange "s x -> s x"\n')
    p, out = slice_file(tmp_path, layers, rules_text=rules)
    assert p.returncode == 0, p.stderr.decode()
    np.testing.assert_array_equal(out["scan/q/kernel"], np.stack([layers[f"layers.{i}.q.weight"].T for i in range(3)]))
    for i in range(3):
        np.testing.assert_array_equal(out[f"layers.{i}.k"], layers[f"layers.{i}.kv"][0, 1:3])
        np.testing.assert_array_equal(out[f"layers.{i}.v"], layers[f"layers.{i}.kv"][1, 1:3])
    p = run(["ckpt-slice", "--plan", "--rules", str(tmp_path / "test.rules"), "--input", str(tmp_path / "in.safetensors")])
    assert p.returncode == 0, p.stderr.decode()
    assert b"stacks 3 inputs" in p.stdout
    # A gap in the stacked indices is an error naming the rule.
    del layers["layers.1.q.weight"]
    p, _ = slice_file(tmp_path, layers, rules_text=rules)
    assert p.returncode == 65
    assert b"test.rules:1: stacking {i}: indices 0,2 are not 0..<2" in p.stderr, p.stderr


def test_plan_reads_only_the_manifest(tmp_path):
    t = {"a.weight": np.ones((1000, 1000), np.float32), "a.bias": np.ones(1000, np.float32)}
    src = tmp_path / "m.safetensors"
    save_file(t, str(src))
    stream = run(["ckpt-read", str(src)], check=True).stdout
    # Keep only the first 64 KiB of a 4 MB stream: --plan must not need more than the manifest.
    cut = tmp_path / "cut.ckpts"
    cut.write_bytes(stream[:65536])
    rules = tmp_path / "r.rules"
    rules.write_text('{m}.weight -> {m}/kernel | rearrange "o i -> i o"\n{m}.bias -> {m}/bias\n')
    p = run(["ckpt-slice", "--plan", "--rules", str(rules), "--input", str(cut)])
    assert p.returncode == 0, p.stderr
    assert b"a.weight F32[1000, 1000]\n  -> a/kernel F32[1000, 1000]" in p.stdout, p.stdout
    assert b"a.bias F32[1000]  -> a/bias F32[1000]" in p.stdout and b"streams" in p.stdout
    assert b"peak held 11.4 MiB" in p.stdout or b"peak held" in p.stdout
    # A saved `ckpt-read --list` table plans the same way.
    table = tmp_path / "list.txt"
    table.write_bytes(run(["ckpt-read", "--list", str(src)], check=True).stdout)
    q = run(["ckpt-slice", "--plan", "--rules", str(rules), "--input", str(table)])
    assert q.returncode == 0, q.stderr
    assert q.stdout == p.stdout
    # The same rules on the cut stream itself fail loudly: the data is missing.
    assert run(["ckpt-slice", "--rules", str(rules), "--input", str(cut), "-o", str(tmp_path / "x.ckpts")]).returncode != 0


@pytest.mark.parametrize("text,message", [
    ("x -> y | transpose\n", b"test.rules:1: unknown operation 'transpose'"),
    ("# fine\nx -> {y\n", b"test.rules:2: '{' without '}'"),
    ("x -> y | rearrange \"a b -> b\"\n", b"test.rules:1: rearrange \"a b -> b\": axes a must appear on both sides"),
    ("x -> y | rearrange \"a b c -> c b a\"\n", b"test.rules:1: rearrange \"a b c -> c b a\": the left side has 3 axes, the tensor 2"),
    ("x -> y | rearrange \"(a b) c -> a b c\" a=3\n", b"test.rules:1: rearrange \"(a b) c -> a b c\": 4 is not divisible by 3"),
    ("x -> y\nz -> y\n", b"test.rules:2"),
    ("x -> y\n", b"no rule matches 1 input tensors"),
    ("x -> y.{L} | cast F32\n", b"target {L} is neither captured by the source nor an axis"),
    ("include nowhere.rules\n", b"nowhere.rules: cannot read the rule file"),
])
def test_bad_rules_name_file_and_line(tmp_path, text, message):
    p, _ = slice_file(tmp_path, {"x": np.ones((4, 5), np.float32), "z": np.ones(3, np.float32)}, rules_text=text)
    assert p.returncode == 65, p.stderr
    if b"test.rules:2" == message:
        assert b"two rules write y: " in p.stderr and b"test.rules:1 and " in p.stderr
    assert message in p.stderr, p.stderr.decode()
    assert not (tmp_path / "out.safetensors").exists()


def test_bert_rules_give_exactly_what_flax_bert_model_builds(tmp_path, minilm):
    """transformers 4.x FlaxBertModel.from_pretrained(dir, from_pt=True), run in .venv-tf4
    (transformers 5 has no Flax models): every leaf bit-identical to the rules' output."""
    import subprocess
    py = os.path.join(ROOT, ".venv-tf4", "bin", "python")
    if not os.path.exists(py):
        pytest.fail(".venv-tf4 is missing: run scripts/setup.sh")
    ref = tmp_path / "flax-ref.safetensors"
    code = ("import sys, numpy as np; from transformers import FlaxBertModel; from flax.traverse_util import flatten_dict; "
            "from safetensors.numpy import save_file; m = FlaxBertModel.from_pretrained(sys.argv[1], from_pt=True); "
            "save_file({k: np.asarray(v) for k, v in flatten_dict(m.params, sep='/').items()}, sys.argv[2])")
    p = subprocess.run([py, "-c", code, os.path.dirname(minilm), str(ref)], capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    out = tmp_path / "ours.safetensors"
    q = shell(f"ckpt-read '{minilm}' | ckpt-slice --rules '{RULES}/bert-torch-to-flax.rules' | ckpt-write '{out}'")
    assert q.returncode == 0, q.stderr.decode()
    theirs, ours = load_file(str(ref)), load_file(str(out))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k].view(np.uint8), v.view(np.uint8)), k


def test_without_a_manifest_single_tensor_rules_stream_and_stacks_are_refused(tmp_path):
    """A stream from a user's filter may have no manifest: each tensor is planned alone."""
    t = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32), "c": np.ones(1, np.float32)}
    src = tmp_path / "in.safetensors"
    save_file(t, str(src))
    strip = ("python3 -c \"import sys; sys.path.insert(0, 'python'); import ckpt_stream as s; r = s.StreamReader(sys.stdin.buffer); "
             "w = s.StreamWriter(sys.stdout.buffer, r.header); [w.write(x) for x in r]; w.close()\"")
    rules = tmp_path / "r.rules"
    rules.write_text('{m}.weight -> {m}/kernel | rearrange "o i -> i o"\nb -> b | cast BF16\n')
    out = tmp_path / "o.safetensors"
    p = shell(f"ckpt-read '{src}' | {strip} | ckpt-slice --rules '{rules}' --keep-unmatched | ckpt-write '{out}'", cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()
    got = load_file(str(out))
    np.testing.assert_array_equal(got["a/kernel"], t["a.weight"].T)
    assert got["b"].dtype == ml_dtypes.bfloat16 and "c" in got
    # Without --keep-unmatched, every unmatched tensor is listed (at the end) and nothing is written.
    p = shell(f"ckpt-read '{src}' | {strip} | ckpt-slice --rules '{rules}' | ckpt-write '{tmp_path / 'x.safetensors'}'", cwd=ROOT)
    assert p.returncode == 65 and b"no rule matches 1 input tensors" in p.stderr and b": c" in p.stderr, p.stderr
    assert not (tmp_path / "x.safetensors").exists()
    save_file({"l.0": np.ones(2, np.float32), "l.1": np.ones(2, np.float32)}, str(src))
    rules.write_text('l.{i:int} -> stacked\n')
    p = shell(f"ckpt-read '{src}' | {strip} | ckpt-slice --rules '{rules}' > /dev/null", cwd=ROOT)
    assert p.returncode == 65 and b"stacks tensors, which needs the stream's manifest" in p.stderr, p.stderr


def test_cast_option_casts_every_float_output_and_nothing_else(tmp_path):
    t = {"w": np.ones((2, 3), ml_dtypes.bfloat16), "ids": np.arange(4, dtype=np.int64), "x": np.ones(2, np.float32)}
    p, out = slice_file(tmp_path, t, rules_text='w -> kernel | rearrange "a b -> b a"\nkeep ids\n', args="--cast F32 --keep-unmatched")
    assert p.returncode == 0, p.stderr.decode()
    assert out["kernel"].dtype == np.float32 and out["kernel"].shape == (3, 2)
    assert out["ids"].dtype == np.int64 and out["x"].dtype == np.float32
    p, out = slice_file(tmp_path, t, rules_text="w -> w2 | cast? F16\nids -> ids2 | cast? F16\nx -> x\n")
    assert p.returncode == 0, p.stderr.decode()
    assert out["w2"].dtype == np.float16 and out["ids2"].dtype == np.int64
    # --cast alone: every float tensor of the input, names and the rest as they were.
    src, whole = tmp_path / "in.safetensors", tmp_path / "whole.safetensors"
    p = shell(f"ckpt-read {src} | ckpt-slice --cast F32 | ckpt-write {whole}")
    assert p.returncode == 0, p.stderr.decode()
    out = load_file(str(whole))
    assert {k: v.dtype for k, v in out.items()} == {"w": np.float32, "ids": np.int64, "x": np.float32}
    assert np.array_equal(out["w"], t["w"].astype(np.float32)) and np.array_equal(out["ids"], t["ids"])
