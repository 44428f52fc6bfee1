"""Partitioned conversion: ckpt-read --part K/N | ... | ckpt-write --part K/N DIR, N pipelines under
xargs -P and GNU parallel, then ckpt-write --finalize DIR; the result equals the single run."""
import json
import os
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, run, shell

EX_USAGE, EX_DATAERR, EX_CANTCREAT, EX_TEMPFAIL = 64, 65, 73, 75


@pytest.fixture
def model(tmp_path):
    """A small model of several types and sizes (a stack of 4 layers the rules below combine)."""
    g = torch.Generator().manual_seed(0)
    t = {f"layers.{i}.w": torch.randn(24, 16, generator=g) for i in range(4)}
    t["emb"] = torch.randn(100, 16, generator=g).to(torch.bfloat16)
    t["head.weight"] = torch.randn(40, 16, generator=g)
    t["head.bias"] = torch.zeros(40)
    t["step"] = torch.tensor(7, dtype=torch.int64)
    t["norm"] = torch.ones(16, dtype=torch.float16)
    path = tmp_path / "in.safetensors"
    save_file(t, str(path))
    return path


STACK_RULES = """# Test rules: the four layers into one stacked tensor, everything else renamed.
layers.{L:int}.w -> stacked/w | rearrange "L o i -> L i o"
{x*} -> renamed/{x}
"""


def listing(args):
    """Names of the tensors `ckpt-read --list ARGS` prints."""
    p = run(["ckpt-read", "--list", *args])
    assert p.returncode == 0, p.stderr
    return [line.split()[0] for line in p.stdout.decode().splitlines()[1:-1]]


def check_index(out, reference):
    """What transformers' sharded loading does: every weight_map entry is in the shard it names,
    every shard holds only what the index gives it, and the values are the reference's."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    ref = load_file(str(reference))
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {k for k, s in index["weight_map"].items() if s == shard} == set(f.keys())
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), ref[k]), k
    return index


def test_xargs_three_parts_equal_the_single_run(model, tmp_path):
    single = tmp_path / "single.safetensors"
    assert shell(f"ckpt-read {model} | ckpt-write {single}").returncode == 0
    out = tmp_path / "out"
    # The README's recipe: N pipelines, 2 at a time, in any order.
    p = shell(f"seq 0 2 | xargs -P 2 -I{{}} sh -c 'ckpt-read -q --part {{}}/3 {model} | ckpt-write -q --part {{}}/3 {out}'")
    assert p.returncode == 0, p.stderr
    assert not (out / "model.safetensors.index.json").exists()  # not before --finalize
    records = sorted(os.listdir(out / ".ckpt-parts"))
    assert records == ["part-0-of-3.json", "part-1-of-3.json", "part-2-of-3.json"]
    rec = json.loads((out / ".ckpt-parts" / "part-0-of-3.json").read_text())
    assert rec["format"] == "safetensors" and rec["index"] == 0 and rec["count"] == 3
    assert rec["stream_part"]["count"] == 3 and len(rec["stream_part"]["input"]) == 64
    assert rec["files"] == [{"path": "model-00001-of-00003.safetensors", "size": os.path.getsize(out / "model-00001-of-00003.safetensors")}]
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                       "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = check_index(out, single)
    # Byte-balanced, largest first to the least loaded part: emb 3200 -> 0, head.weight 2560 -> 1,
    # the layers (1536 each, by name) -> 2, 2, 1, 2; head.bias 160, norm 32 and step 8 -> 0.
    ref = load_file(str(single))
    sizes = {}
    for k, shard in index["weight_map"].items():
        sizes[shard] = sizes.get(shard, 0) + ref[k].numel() * ref[k].element_size()
    assert [sizes[f"model-0000{k}-of-00003.safetensors"] for k in (1, 2, 3)] == [3400, 4096, 4608], sizes
    assert run(["ckpt-diff", "--brief", str(single), str(out)]).returncode == 0
    # Finalizing again is a no-op that says so.
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == 0 and b"finalized already" in p.stderr


def test_gnu_parallel_locally(model, tmp_path):
    if shutil.which("parallel") is None:
        pytest.fail("GNU parallel is not installed: run scripts/setup.sh (apt package parallel)")
    out = tmp_path / "out"
    p = shell(f"parallel --will-cite -j2 'ckpt-read -q --part {{}}/3 {model} | ckpt-write -q --part {{}}/3 {out}' ::: 0 1 2 "
              f"&& ckpt-write -q --finalize {out}")
    assert p.returncode == 0, p.stderr
    check_index(out, model)
    assert run(["ckpt-diff", "--brief", str(model), str(out)]).returncode == 0


def test_group_rules_keep_a_stack_in_one_part(model, tmp_path):
    rules = tmp_path / "stack.rules"
    rules.write_text(STACK_RULES)
    single = tmp_path / "single.safetensors"
    assert shell(f"ckpt-read {model} | ckpt-slice --rules {rules} | ckpt-write {single}").returncode == 0
    layers = {f"layers.{i}.w" for i in range(4)}
    # Without the rules the four layers are spread over the parts, and ckpt-slice cannot stack them.
    loose = [set(listing(["--part", f"{k}/3", str(model)])) & layers for k in range(3)]
    assert sum(1 for s in loose if s) > 1
    out = tmp_path / "loose"
    for k in range(3):
        p = shell(f"ckpt-read -q --part {k}/3 {model} | ckpt-slice --rules {rules} | ckpt-write -q --part {k}/3 {out}")
        if loose[k]:
            assert p.returncode == EX_DATAERR and b"stack" in p.stderr, p.stderr
    assert run(["ckpt-write", "--finalize", str(out)]).returncode == EX_TEMPFAIL
    # With them the stack is one group: in one part, whole.
    grouped = [set(listing(["--part", f"{k}/3", "--group-rules", str(rules), str(model)])) for k in range(3)]
    assert [s & layers for s in grouped].count(layers) == 1
    assert set().union(*grouped) == set(listing([str(model)]))
    out = tmp_path / "grouped"
    p = shell(f"seq 0 2 | xargs -P 2 -I{{}} sh -c 'ckpt-read -q --part {{}}/3 --group-rules {rules} {model} "
              f"| ckpt-slice --rules {rules} | ckpt-write -q --part {{}}/3 {out}' && ckpt-write -q --finalize {out}")
    assert p.returncode == 0, p.stderr
    check_index(out, single)
    assert run(["ckpt-diff", "--brief", str(single), str(out)]).returncode == 0
    # Shipped rule sets are found by name, as ckpt-slice finds them, with --set.
    p = run(["ckpt-read", "--list", "--part", "0/2", "--group-rules", "openpi-pi0-jax-to-pytorch", "--set", "llm_head_dim=4", str(model)])
    assert p.returncode == 0, p.stderr


def test_a_python_filter_forwards_the_part_key(model, tmp_path):
    # ckpt_stream (python/) keeps header keys it does not know, so --finalize can still check.
    out = tmp_path / "out"
    scale = os.path.join(ROOT, "scripts", "filters", "scale.py")
    for k in range(2):
        p = shell(f"ckpt-read -q --part {k}/2 {model} | {shlex.quote(sys.executable)} {scale} 'head.*' 2 | ckpt-write --part {k}/2 {out}")
        assert p.returncode == 0 and b"no part key" not in p.stderr, p.stderr
        record = json.loads((out / ".ckpt-parts" / f"part-{k}-of-2.json").read_text())
        assert record["stream_part"]["index"] == k
    assert run(["ckpt-write", "-q", "--finalize", str(out)]).returncode == 0
    ref = load_file(str(model))
    got = {k: v for shard in set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
           for k, v in load_file(str(out / shard)).items()}
    assert torch.equal(got["head.weight"], ref["head.weight"] * 2) and torch.equal(got["emb"], ref["emb"])


def test_finalize_refuses_missing_unfinished_and_damaged_parts(model, tmp_path):
    out = tmp_path / "out"

    def part(k, n=3, src=model, extra=""):
        return shell(f"ckpt-read -q --part {k}/{n} {src} | ckpt-write -q {extra} --part {k}/{n} {out}")

    def finalize():
        p = run(["ckpt-write", "--finalize", str(out)])
        if p.returncode != 0:
            assert not (out / "model.safetensors.index.json").exists()  # never half-written with an index
            assert len(p.stderr.decode().strip().splitlines()) == 1
        return p

    p = finalize()  # no folder yet
    assert p.returncode == 66, p.stderr
    out.mkdir()
    p = finalize()
    assert p.returncode == EX_TEMPFAIL and b"no part has finished yet" in p.stderr
    assert part(0).returncode == 0 and part(2).returncode == 0
    p = finalize()
    assert p.returncode == EX_TEMPFAIL and b"part 1 of 0..2 has no record" in p.stderr, p.stderr
    # A part cut off mid-stream (a killed job): its shard is not there, nor its record.
    stream = run(["ckpt-read", "-q", "--part", "1/3", str(model)]).stdout
    p = run(["ckpt-write", "--part", "1/3", str(out)], input=stream[:len(stream) // 2])
    assert p.returncode == EX_DATAERR
    assert not (out / "model-00002-of-00003.safetensors").exists()
    assert finalize().returncode == EX_TEMPFAIL
    assert part(1).returncode == 0
    # A shard damaged after its part finished (truncated): refused, naming the part to run again.
    shard = out / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    p = finalize()
    assert p.returncode == EX_DATAERR and b"model-00002-of-00003.safetensors" in p.stderr and b"run part 1/3 again" in p.stderr, p.stderr
    shard.unlink()
    p = finalize()
    assert p.returncode == EX_DATAERR and b"is missing" in p.stderr
    # Running a part again replaces its own files, no --force needed.
    assert part(1).returncode == 0
    # A shard of the right size holding other tensors than its record says (its header is read).
    data = shard.read_bytes()
    assert data.count(b'"head.weight"') == 1
    shard.write_bytes(data.replace(b'"head.weight"', b'"head.wEight"'))
    p = finalize()
    assert p.returncode == EX_DATAERR and b"holds other tensors than part 1/3 wrote" in p.stderr, p.stderr
    assert part(1).returncode == 0
    assert finalize().returncode == 0
    check_index(out, model)


def test_finalize_refuses_parts_of_different_inputs_counts_and_plans(model, tmp_path):
    other = tmp_path / "other.safetensors"
    t = load_file(str(model))
    t["extra"] = torch.ones(3)
    save_file(t, str(other))
    out = tmp_path / "out"
    for k, src in [(0, model), (1, model), (2, other)]:
        assert shell(f"ckpt-read -q --part {k}/3 {src} | ckpt-write -q --part {k}/3 {out}").returncode == 0
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_DATAERR and b"different inputs" in p.stderr, p.stderr
    assert not (out / "model.safetensors.index.json").exists()
    # Part 2 again, with another grouping: one input, two plans.
    rules = tmp_path / "stack.rules"
    rules.write_text(STACK_RULES)
    assert shell(f"ckpt-read -q --part 2/3 --group-rules {rules} {model} | ckpt-write -q --part 2/3 {out}").returncode == 0
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_DATAERR and b"different plans" in p.stderr, p.stderr
    # A stale record of another N.
    assert shell(f"ckpt-read -q --part 2/3 {model} | ckpt-write -q --part 2/3 {out}").returncode == 0
    assert shell(f"ckpt-read -q --part 0/2 {model} | ckpt-write -q --part 0/2 {out}").returncode == 0
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_DATAERR and b"different part counts" in p.stderr, p.stderr
    (out / ".ckpt-parts" / "part-0-of-2.json").unlink()
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == 0 and b"model-00001-of-00002.safetensors in " in p.stderr and b"not in the index" in p.stderr, p.stderr
    check_index(out, model)


def test_parts_cut_another_way_must_not_share_a_tensor(model, tmp_path):
    # Streams without a part key (selected with --only): accepted, and checked for overlap.
    out = tmp_path / "out"
    p = shell(f"ckpt-read --only 'layers.*' {model} | ckpt-write --part 0/2 {out}")
    assert p.returncode == 0 and b"no part key" in p.stderr
    assert shell(f"ckpt-read --exclude 'layers.0.*' {model} | ckpt-write -q --part 1/2 {out}").returncode == 0
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_DATAERR and b"layers.1.w is in part 0/2 and in part 1/2" in p.stderr, p.stderr
    assert shell(f"ckpt-read --exclude 'layers.*' {model} | ckpt-write -q --part 1/2 {out}").returncode == 0
    assert run(["ckpt-write", "--finalize", str(out)]).returncode == 0
    check_index(out, model)


def test_usage_errors_and_a_finished_checkpoint(model, tmp_path):
    out = tmp_path / "out"
    assert run(["ckpt-read", "--part", "3/3", str(model)]).returncode == EX_USAGE
    assert run(["ckpt-read", "--group-rules", "x.rules", str(model)]).returncode == EX_USAGE
    stream = run(["ckpt-read", "-q", "--part", "0/3", str(model)]).stdout
    p = run(["ckpt-write", "--part", "1/3", str(out)], input=stream)
    assert p.returncode == EX_USAGE and b"the stream is part 0/3" in p.stderr
    for args in (["--format", "torch", "--part", "0/3", str(out)], ["--part", "0/3", str(out / "model.safetensors")],
                 ["--part", "0/3", "--max-shard-size", "1GB", str(out)], ["--part", "0/3", "-"],
                 ["--part", "0/3", "--finalize", str(out)]):
        p = run(["ckpt-write", *args], input=stream)
        assert p.returncode == EX_USAGE, (args, p.stderr)
    assert not out.exists()
    # A part's folder is made (its parent must exist); a stream written whole warns that it is a part.
    p = run(["ckpt-write", str(tmp_path / "whole.safetensors")], input=stream)
    assert p.returncode == 0 and b"the stream is part 0/3" in p.stderr
    # More parts than tensors: the empty parts write no shard but are recorded.
    p = shell(f"for k in $(seq 0 11); do ckpt-read -q --part $k/12 {model} | ckpt-write -q --part $k/12 {out} || exit 1; done "
              f"&& ckpt-write -q --finalize {out}")
    assert p.returncode == 0, p.stderr
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) == len(load_file(str(model))) == 9
    check_index(out, model)
    # Parts do not mix with a finished checkpoint: --force removes its index first.
    p = run(["ckpt-write", "--part", "0/12", str(out)], input=run(["ckpt-read", "-q", "--part", "0/12", str(model)]).stdout)
    assert p.returncode == EX_CANTCREAT and b"finished checkpoint" in p.stderr
    assert (out / "model.safetensors.index.json").exists()
    p = run(["ckpt-write", "--force", "--part", "0/12", str(out)], input=run(["ckpt-read", "-q", "--part", "0/12", str(model)]).stdout)
    assert p.returncode == 0 and not (out / "model.safetensors.index.json").exists()


def test_orbax_parts_restore_as_the_single_run(model, tmp_path):
    import orbax.checkpoint as ocp
    single = tmp_path / "single"
    assert shell(f"ckpt-read {model} | ckpt-write --format orbax --sep . {single}").returncode == 0
    out = tmp_path / "out"
    p = shell(f"seq 0 3 | xargs -P 2 -I{{}} sh -c 'ckpt-read -q --part {{}}/4 {model} | ckpt-write -q --format orbax --sep . --part {{}}/4 {out}'")
    assert p.returncode == 0, p.stderr
    assert not (out / "_METADATA").exists()
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == 0, p.stderr
    assert not (out / ".ckpt-parts").exists()
    a = ocp.PyTreeCheckpointer().restore(str(single))
    b = ocp.PyTreeCheckpointer().restore(str(out))
    flat_a = {k: np.asarray(v) for k, v in _flatten(a)}
    flat_b = {k: np.asarray(v) for k, v in _flatten(b)}
    assert flat_a.keys() == flat_b.keys() and "layers/0/w" in flat_a
    for k in flat_a:
        assert flat_a[k].dtype == flat_b[k].dtype and flat_a[k].tobytes() == flat_b[k].tobytes(), k
    assert run(["ckpt-diff", "--brief", str(single), str(out)]).returncode == 0


def test_orbax_finalize_refuses_a_missing_part(model, tmp_path):
    out = tmp_path / "out"
    for k in (0, 2):
        assert shell(f"ckpt-read -q --part {k}/3 {model} | ckpt-write -q --format orbax --part {k}/3 {out}").returncode == 0
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_TEMPFAIL and b"part 1 of 0..2" in p.stderr
    assert not (out / "_METADATA").exists()
    # An array folder damaged after its part finished.
    arrays = [d for d in os.listdir(out) if not d.startswith(".")]
    assert shell(f"ckpt-read -q --part 1/3 {model} | ckpt-write -q --format orbax --part 1/3 {out}").returncode == 0
    victim = next(os.path.join(out, d, f) for d in arrays for f in os.listdir(out / d) if f != ".zarray")
    os.truncate(victim, 1)
    p = run(["ckpt-write", "--finalize", str(out)])
    assert p.returncode == EX_DATAERR and b"run part" in p.stderr, p.stderr
    assert not (out / "_METADATA").exists()


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


STEP = os.path.join(ROOT, "examples", "openpi-tiny-lora")


@pytest.mark.parametrize("n", [2, 3])
def test_openpi_recipe_in_parts(tmp_path, n):
    script = os.path.join(ROOT, "scripts", "openpi-to-pytorch.sh")
    single = tmp_path / "single"
    assert shell(f"{script} {STEP} {single}").returncode == 0
    out = tmp_path / "parts"
    p = shell(f"seq 0 {n - 1} | xargs -P 2 -I{{}} {script} {STEP} {out} --part {{}}/{n}")
    assert p.returncode == 0, p.stderr
    assert not (out / "model.safetensors.index.json").exists() and not (out / "config.json").exists()
    # The part key came through lora-merge and ckpt-slice: finalize can check one input, one plan.
    records = [json.loads((out / ".ckpt-parts" / f"part-{k}-of-{n}.json").read_text()) for k in range(n)]
    assert len({(r["stream_part"]["input"], r["stream_part"]["plan"]) for r in records}) == 1
    p = shell(f"{script} {STEP} {out} --finalize")
    assert p.returncode == 0, p.stderr
    assert (out / "config.json").read_bytes() == (single / "config.json").read_bytes()
    check_index(out, single / "model.safetensors")
    assert run(["ckpt-diff", "--brief", str(single / "model.safetensors"), str(out)]).returncode == 0
    assert shell(f"{script} {STEP} {out} --part 0/{n} --lerobot").returncode == EX_USAGE


def test_lora_pairs_stay_in_one_part(tmp_path):
    # Without the pairing some part gets a base without its adapters (or adapters without their
    # base), and lora-merge refuses it; with it (the default) every part merges.
    params = os.path.join(STEP, "params")
    merge = "lora-merge -q --scheme openpi --config '*_1/*=gemma_300m_lora' --config gemma_2b_lora --dtype F32"
    failed = 0
    for k in range(3):
        p = shell(f"ckpt-read -q --root params --part {k}/3 --no-group-lora {params} | {merge} > /dev/null")
        failed += p.returncode == EX_DATAERR
    assert failed > 0
    for k in range(3):
        p = shell(f"ckpt-read -q --root params --part {k}/3 {params} | {merge} > /dev/null")
        assert p.returncode == 0, p.stderr
