"""ckpt-write --format eqx --like TEMPLATE: Equinox's tree_serialise_leaves format written against
a template of the target model, checked with equinox itself (in .venv-eqx, Python 3.12): read
back by tree_deserialise_leaves, byte for byte what equinox writes, metadata.json's
weights_sha256 the file's digest; and every way it refuses."""
import io
import os
import subprocess

import numpy as np
import pytest

import ckpt_stream as cs
from conftest import ROOT, run, shell

EQX_PY = os.path.join(ROOT, ".venv-eqx", "bin", "python")
SCRIPT = os.path.join(ROOT, "scripts", "eqx_template.py")
EX_USAGE, EX_DATAERR = 64, 65


def equinox(*args):
    if not os.path.exists(EQX_PY):
        pytest.fail(".venv-eqx is missing: run scripts/setup.sh")
    p = subprocess.run([EQX_PY, SCRIPT, *map(str, args)], capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return p.stdout.decode()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("eqx")
    equinox("make", d / "template", d / "new.npz")
    return d / "template", d / "new.npz"


def test_written_file_is_what_equinox_writes_and_reads(template, tmp_path):
    tdir, new = template
    out = tmp_path / "out"
    p = shell(f"ckpt-read {new} | ckpt-write --format eqx --like {tdir} --keep '*.freqs' {out}")
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(os.listdir(out)) == ["metadata.json", "weights.eqx"]
    assert equinox("check", tdir, out, new, "*.freqs").strip() == "ok"


def test_a_stream_without_manifest_is_spooled_to_the_same_file(template, tmp_path):
    tdir, new = template
    ref = tmp_path / "ref"
    assert shell(f"ckpt-read {new} | ckpt-write --format eqx --like {tdir} --keep '*.freqs' {ref}").returncode == 0
    r = cs.StreamReader(io.BytesIO(run(["ckpt-read", str(new)], check=True).stdout))
    buf = io.BytesIO()
    w = cs.StreamWriter(buf, {"producer": "t", "source_format": "t"})  # no manifest
    for t in reversed(list(r)):  # and in another order
        w.write(t)
    w.close()
    out = tmp_path / "out"
    p = run(["ckpt-write", "--format", "eqx", "--like", str(tdir), "--keep", "*.freqs", str(out)], input=buf.getvalue())
    assert p.returncode == 0, p.stderr.decode()
    assert (out / "weights.eqx").read_bytes() == (ref / "weights.eqx").read_bytes()


def test_refusals_leave_nothing(template, tmp_path):
    tdir, new = template
    out = tmp_path / "out"

    def refused(cmd, code, *needles):
        p = shell(cmd)
        err = p.stderr.decode()
        assert p.returncode == code, err
        for n in needles:
            assert n in err, err
        assert not out.exists()

    # An array leaf nothing fills (the RoPE buffers without --keep).
    refused(f"ckpt-read {new} | ckpt-write --format eqx --like {tdir} {out}", EX_DATAERR,
            "2 array leaves are not in the stream", "blocks.0.freqs")
    # A tensor no leaf takes.
    extra = tmp_path / "extra.npz"
    np.savez(extra, **dict(np.load(new)), **{"blocks.9.lin.weight": np.ones((8, 8), np.float32)})
    refused(f"ckpt-read {extra} | ckpt-write --format eqx --like {tdir} --keep '*.freqs' {out}", EX_DATAERR,
            "no leaf of the template is named blocks.9.lin.weight")
    # A shape that is not the leaf's.
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{**dict(np.load(new)), "head.bias": np.ones(4, np.float32)})
    refused(f"ckpt-read {wrong} | ckpt-write --format eqx --like {tdir} --keep '*.freqs' {out}", EX_DATAERR,
            "leaf head.bias is F32[3] in the template, the stream has F32[4]")
    # Usage.
    refused(f"ckpt-read {new} | ckpt-write --format eqx {out}", EX_USAGE, "--like")
    refused(f"ckpt-read {new} | ckpt-write --keep '*' {tmp_path}/x.safetensors", EX_USAGE, "--like, --keep and --zeros apply to eqx")
    # A template whose leaves.json and weights.eqx disagree.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "weights.eqx").write_bytes((tdir / "weights.eqx").read_bytes()[:-10])
    (bad / "leaves.json").write_bytes((tdir / "leaves.json").read_bytes())
    refused(f"ckpt-read {new} | ckpt-write --format eqx --like {bad} --keep '*.freqs' {out}", EX_DATAERR, "weights.eqx")


DINOV3_CASES = {
    # id: (torch side, its venv, variant flag, equimo template args, ckpt-slice extra, ckpt-write extra)
    "hf-mlp": ("hf", ".venv", [], [], "dinov3-hf-to-equimo", "", "--keep '*.freqs'"),
    "hf-swiglu": ("hf", ".venv", ["gated"], ["gated", "4"], "dinov3-hf-to-equimo", "--set mlp_up=w2 --set mlp_down=w3", "--keep '*.freqs'"),
    "timm-mlp": ("timm", ".venv-timm", [], [], "dinov3-timm-to-equimo", "",
                 "--keep '*.freqs' --keep mask_token --zeros '*.attn.qkv.bias'"),
    "timm-qv-bias": ("timm", ".venv-timm", ["bias"], [], "dinov3-timm-to-equimo", "", "--keep '*.freqs' --keep mask_token"),
    "timm-swiglu": ("timm", ".venv-timm", ["gated"], ["gated", "6"], "dinov3-timm-to-equimo", "--set mlp_down=w3",
                    "--keep '*.freqs' --keep mask_token --zeros '*.attn.qkv.bias'"),
}


@pytest.mark.parametrize("case", list(DINOV3_CASES))
def test_dinov3_runs_in_equimo_as_in_timm_and_transformers(tmp_path, case):
    # Oracle: timm's / transformers 5's forward (torch side) against equimo's forward on the
    # converted weights (JAX side), all tokens after the final norm, tiny random models with
    # random layer scales.
    side, venv, flag, template_args, rules, slice_extra, write_extra = DINOV3_CASES[case]
    script = os.path.join(ROOT, "scripts", "dinov3_equimo.py")
    py = os.path.join(ROOT, venv, "bin", "python")
    if not os.path.exists(py):
        pytest.fail(f"{venv} is missing: run scripts/setup.sh")
    jax_env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([py, script, side, str(tmp_path), *flag], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    p = subprocess.run([EQX_PY, script, "template", str(tmp_path), *template_args], capture_output=True, env=jax_env)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    p = shell(f"ckpt-read {tmp_path}/model.safetensors | ckpt-slice --rules {rules} {slice_extra} "
              f"| ckpt-write --format eqx --like {tmp_path}/template {write_extra} {tmp_path}/converted")
    assert p.returncode == 0, p.stderr.decode()
    p = subprocess.run([EQX_PY, script, "check", str(tmp_path)], capture_output=True, env=jax_env)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    diff = float(p.stdout.decode().strip().splitlines()[-1])
    print(f"\nDINOv3 {case}: equimo vs {side}, max abs difference {diff:.1e}")
    assert diff < 2e-5
    if "swiglu" in case or case == "hf-mlp":
        # The MLP names are the one thing the rules cannot tell from a tensor: the wrong choice is refused.
        wrong = "" if "swiglu" in case else "--set mlp_up=w2 --set mlp_down=w3"
        p = shell(f"ckpt-read {tmp_path}/model.safetensors | ckpt-slice --rules {rules} {wrong} "
                  f"| ckpt-write --format eqx --like {tmp_path}/template {write_extra} {tmp_path}/wrong")
        assert p.returncode == EX_DATAERR and b"no leaf of the template is named" in p.stderr, p.stderr.decode()
