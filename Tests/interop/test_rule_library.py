"""Rule sets by name: ckpt-slice --rules NAME finds the shipped set from any working folder
(beside an installed binary, or in the source tree it was built in), CKPT_RULES_PATH adds
folders, --list-rules lists them, and ckpt-diff --rules takes names too."""
import os
import shutil

from conftest import BIN, ROOT, run

EX_USAGE = 64
SHIPPED = sorted(f[:-len(".rules")] for f in os.listdir(os.path.join(ROOT, "rules")) if f.endswith(".rules"))
TINY_BERT = os.path.join(ROOT, "examples", "tiny-bert.safetensors")


def listed(p):
    assert p.returncode == 0, p.stderr.decode()
    rows = [line.split(None, 1) for line in p.stdout.decode().splitlines()]
    return {r[0]: (r[1] if len(r) > 1 else "") for r in rows}


def test_list_rules_from_any_folder(tmp_path):
    sets = listed(run(["ckpt-slice", "--list-rules"], cwd=tmp_path))
    assert sorted(sets) == SHIPPED
    assert all(sets[n] for n in sets), sets  # every set says what it converts
    assert sets["bert-torch-to-flax"].startswith("Hugging Face BertModel")


def test_a_name_means_the_shipped_file(tmp_path):
    by_name = run(["ckpt-slice", "--plan", "--rules", "bert-torch-to-flax", "--input", TINY_BERT], cwd=tmp_path)
    by_path = run(["ckpt-slice", "--plan", "--rules", os.path.join(ROOT, "rules", "bert-torch-to-flax.rules"), "--input", TINY_BERT])
    assert by_name.returncode == 0, by_name.stderr.decode()
    assert by_name.stdout == by_path.stdout and b"embeddings/LayerNorm/scale" in by_name.stdout
    # ".rules" may be given too.
    assert run(["ckpt-slice", "--plan", "--rules", "bert-torch-to-flax.rules", "--input", TINY_BERT], cwd=tmp_path).stdout == by_path.stdout


def test_unknown_name_is_a_usage_error_listing_the_shipped_ones(tmp_path):
    p = run(["ckpt-slice", "--plan", "--rules", "no-such-set", "--input", TINY_BERT], cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == EX_USAGE, err
    assert "no rule set named 'no-such-set'" in err and "bert-torch-to-flax" in err


def test_installed_layout_and_rules_path(tmp_path):
    # A prefix as a wheel installs it: bin/ckpt-slice and share/ckpt/rules/.
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(BIN, "ckpt-slice"), prefix / "bin")
    shutil.copytree(os.path.join(ROOT, "rules"), prefix / "share" / "ckpt" / "rules")
    (prefix / "share" / "ckpt" / "rules" / "extra.rules").write_text("# An installed extra set.\nkeep {all*}\n")
    exe = str(prefix / "bin" / "ckpt-slice")
    sets = listed(run([exe, "--list-rules"], cwd=tmp_path))
    assert sorted(sets) == sorted(SHIPPED + ["extra"])
    # CKPT_RULES_PATH comes first: a set of one's own, even one that shadows a shipped name.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "flax-to-torch.rules").write_text("# My own flax-to-torch.\nkeep {all*}\n")
    env = dict(os.environ, CKPT_RULES_PATH=str(mine))
    sets = listed(run([exe, "--list-rules"], cwd=tmp_path, env=env))
    assert sets["flax-to-torch"] == "My own flax-to-torch."
    p = run([exe, "--plan", "--rules", "flax-to-torch", "--input", TINY_BERT], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr.decode()
    # Every tensor passes through under its own name: my set, not the shipped one, was used.
    assert f"embeddings.LayerNorm.weight F32[32]  -> kept ({mine}/flax-to-torch.rules:2)".encode() in p.stdout, p.stdout.decode()


def test_ckpt_diff_takes_names(tmp_path):
    flax = tmp_path / "flax.msgpack"
    assert run(["ckpt-write", "--format", "msgpack", str(flax)],
               input=run(["ckpt-slice", "--rules", "bert-torch-to-flax", "--input", TINY_BERT], cwd=tmp_path, check=True).stdout).returncode == 0
    p = run(["ckpt-diff", "--rules", "bert-torch-to-flax", TINY_BERT, str(flax)], cwd=tmp_path)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
