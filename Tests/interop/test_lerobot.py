"""scripts/openpi-to-pytorch.sh --lerobot: an openpi checkpoint becomes a LeRobot 0.4.4 policy
folder. Always: every file parsed the way LeRobot reads it (json, safetensors.torch.load_file).
With CKPT_LEROBOT_VENV (scripts/lerobot-venv.sh): LeRobot itself parses the config, loads both
processor pipelines, and writes the same folder's files from the same stats for comparison."""
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from test_recipes import openpi_lora_checkpoint, recipe

RNG = np.random.default_rng(14)
CAMERAS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
STATE, ACTIONS = 6, 7   # the small checkpoints: action_in_proj and pi0's state_proj take 7


def norm_stats(n):
    """As openpi's normalize.save writes them: float64 lists, indent 2."""
    x = RNG.standard_normal((1000, n)) * RNG.uniform(0.01, 3.0, n) + RNG.uniform(-1, 1, n)
    q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist()}


def write_stats(step, asset="libero", stats=None):
    stats = stats or {"state": norm_stats(STATE), "actions": norm_stats(ACTIONS)}
    d = step / "assets" / asset
    d.mkdir(parents=True, exist_ok=True)
    (d / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}, indent=2))
    return stats


@pytest.fixture(scope="module", params=[False, True], ids=["pi0", "pi05"])
def converted(request, tmp_path_factory):
    pi05 = request.param
    tmp = tmp_path_factory.mktemp("pi05" if pi05 else "pi0")
    step = tmp / "30000"
    openpi_lora_checkpoint(str(step), pi05)
    (step / "assets" / "robot" / "norm_stats.json").unlink()   # the fixture's empty stats
    (step / "assets" / "robot").rmdir()
    stats = write_stats(step)
    out = tmp / "lerobot"
    p = recipe(step, out, "--lerobot")
    assert p.returncode == 0, p.stderr.decode()
    return pi05, step, out, stats, p.stderr.decode()


def pre_state_name(pi05):
    return f"policy_preprocessor_step_{2 if pi05 else 5}_normalizer_processor.safetensors"


POST_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"


def test_folder_files(converted):
    pi05, step, out, stats, err = converted
    assert sorted(os.listdir(out)) == sorted(["model.safetensors", "config.json", "policy_preprocessor.json", "policy_postprocessor.json",
                                              pre_state_name(pi05), POST_STATE])
    assert "LeRobot stats from" in err and f"state {STATE}, actions {ACTIONS}" in err


def test_model_is_the_plain_recipes(converted, tmp_path):
    """Same keys (no model. prefix: LeRobot adds it when loading), same bytes."""
    from safetensors import safe_open
    pi05, step, out, stats, err = converted
    plain = tmp_path / "plain"
    p = recipe(step, plain)
    assert p.returncode == 0, p.stderr.decode()
    with safe_open(str(out / "model.safetensors"), "np") as a, safe_open(str(plain / "model.safetensors"), "np") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert not any(k.startswith("model.") for k in a.keys())
        assert "action_in_proj.weight" in a.keys()
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


CONFIG_FIELDS = [  # PreTrainedConfig's fields, then PI0Config's / PI05Config's, as draccus orders them
    "type", "n_obs_steps", "input_features", "output_features", "device", "use_amp", "use_peft", "push_to_hub", "repo_id",
    "private", "tags", "license", "pretrained_path", "paligemma_variant", "action_expert_variant", "dtype", "chunk_size",
    "n_action_steps", "max_state_dim", "max_action_dim", "num_inference_steps", "time_sampling_beta_alpha",
    "time_sampling_beta_beta", "time_sampling_scale", "time_sampling_offset", "min_period", "max_period", "rtc_config",
    "image_resolution", "empty_cameras", "normalization_mapping", "gradient_checkpointing", "compile_model", "compile_mode",
    "freeze_vision_encoder", "train_expert_only", "optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay",
    "optimizer_grad_clip_norm", "scheduler_warmup_steps", "scheduler_decay_steps", "scheduler_decay_lr", "tokenizer_max_length"]


def expected_features(pi05):
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 224, 224]} for c in CAMERAS}
    inputs["observation.state"] = {"type": "STATE", "shape": [STATE]}
    return inputs, {"action": {"type": "ACTION", "shape": [ACTIONS]}}


def test_config(converted):
    pi05, step, out, stats, err = converted
    text = (out / "config.json").read_text()
    c = json.loads(text)
    fields = list(CONFIG_FIELDS)
    if pi05:  # PI05Config declares tokenizer_max_length twice: the first place, the last default
        fields.remove("tokenizer_max_length")
        fields.insert(fields.index("normalization_mapping"), "tokenizer_max_length")
    assert list(c) == fields
    inputs, outputs = expected_features(pi05)
    assert c["type"] == ("pi05" if pi05 else "pi0")
    assert c["input_features"] == inputs and c["output_features"] == outputs
    assert list(c["input_features"]) == list(inputs)
    mode = "QUANTILES" if pi05 else "MEAN_STD"
    assert c["normalization_mapping"] == {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    assert c["max_action_dim"] == 7 and c["max_state_dim"] == (32 if pi05 else 7)
    assert c["chunk_size"] == c["n_action_steps"] == 50 and c["dtype"] == "float32" and c["device"] is None
    assert c["paligemma_variant"] == "gemma_2b" and c["action_expert_variant"] == "gemma_300m"
    assert c["tokenizer_max_length"] == (200 if pi05 else 48)
    assert text.startswith('{\n    "type": ') and not text.endswith("\n")   # json.dump, indent 4


def test_processors(converted):
    pi05, step, out, stats, err = converted
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    post = json.loads((out / "policy_postprocessor.json").read_text())
    assert pre["name"] == "policy_preprocessor" and post["name"] == "policy_postprocessor"
    names = [s["registry_name"] for s in pre["steps"]]
    if pi05:
        assert names == ["rename_observations_processor", "to_batch_processor", "normalizer_processor",
                         "pi05_prepare_state_tokenizer_processor_step", "tokenizer_processor", "device_processor"]
    else:
        assert names == ["rename_observations_processor", "to_batch_processor", "pi0_new_line_processor",
                         "tokenizer_processor", "device_processor", "normalizer_processor"]
    assert [s["registry_name"] for s in post["steps"]] == ["unnormalizer_processor", "device_processor"]
    for steps in (pre["steps"], post["steps"]):
        for i, s in enumerate(steps):
            assert set(s) <= {"registry_name", "config", "state_file"} and "config" in s
            if "state_file" in s:
                assert s["registry_name"].endswith("normalizer_processor")
                assert s["state_file"] == f"{'policy_preprocessor' if steps is pre['steps'] else 'policy_postprocessor'}_step_{i}_{s['registry_name']}.safetensors"
    norm = next(s for s in pre["steps"] if s["registry_name"] == "normalizer_processor")
    unnorm = post["steps"][0]
    assert norm["state_file"] == pre_state_name(pi05) and unnorm["state_file"] == POST_STATE
    inputs, outputs = expected_features(pi05)
    mode = "QUANTILES" if pi05 else "MEAN_STD"
    assert norm["config"] == {"eps": 1e-08, "features": {**inputs, **outputs}, "norm_map": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}}
    assert unnorm["config"] == {"eps": 1e-08, "features": outputs, "norm_map": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}}
    tok = next(s for s in pre["steps"] if s["registry_name"] == "tokenizer_processor")["config"]
    assert tok == {"max_length": 200 if pi05 else 48, "task_key": "task", "padding_side": "right", "padding": "max_length",
                   "truncation": True, "tokenizer_name": "google/paligemma-3b-pt-224"}
    assert pre["steps"][0]["config"] == {"rename_map": {}}
    assert post["steps"][1]["config"] == {"device": "cpu", "float_dtype": None}


def test_normalizer_stats(converted, tmp_path):
    """As LeRobot's _load_step_state reads them (safetensors.torch.load_file), flat FEATURE.STAT
    float32 1-D tensors equal to norm_stats.json; laid out as safetensors' save_file lays them."""
    import torch
    from safetensors.torch import load_file, save_file
    pi05, step, out, stats, err = converted
    want = {}
    for key, feature in (("state", "observation.state"), ("actions", "action")):
        for stat, values in stats[key].items():
            want[f"{feature}.{stat}"] = torch.tensor(values, dtype=torch.float32)
    save_file(want, str(tmp_path / "ref.safetensors"))
    for name in (pre_state_name(pi05), POST_STATE):
        got = load_file(str(out / name))
        assert sorted(got) == sorted(want)
        for k, v in got.items():
            assert v.dtype == torch.float32 and v.dim() == 1
            assert torch.equal(v, want[k]), k
            assert np.array_equal(v.numpy(), np.asarray(stats["state" if k.startswith("observation") else "actions"][k.rsplit(".", 1)[1]], dtype=np.float32))
        assert (out / name).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_asset_choice_and_stats_errors(tmp_path):
    step = tmp_path / "30000"
    openpi_lora_checkpoint(str(step), True)
    other = write_stats(step, "droid")        # now robot/ (empty stats) and droid/ hold norm_stats.json
    p = recipe(step, tmp_path / "a", "--lerobot")
    assert p.returncode == 64 and b"choose one with --asset-id" in p.stderr, p.stderr
    p = recipe(step, tmp_path / "b", "--lerobot", "--asset-id", "robot")
    assert p.returncode == 65 and b"no stats for state" in p.stderr, p.stderr
    p = recipe(step, tmp_path / "c", "--lerobot", "--asset-id", "nope")
    assert p.returncode == 66, p.stderr
    p = recipe(step, tmp_path / "d", "--lerobot", "--asset-id", "droid", "--cameras", "top")
    assert p.returncode == 0, p.stderr.decode()
    c = json.loads((tmp_path / "d" / "config.json").read_text())
    assert list(c["input_features"]) == ["observation.images.top", "observation.state"]
    # pi0.5 normalizes by quantiles: stats without q01/q99 are refused before any conversion.
    no_q = {k: {"mean": v["mean"], "std": v["std"], "q01": None, "q99": None} for k, v in other.items()}
    write_stats(step, "droid", no_q)
    p = recipe(step, tmp_path / "e", "--lerobot", "--asset-id", "droid")
    assert p.returncode == 65 and b"normalizes by q01 q99, and state has no q01" in p.stderr, p.stderr
    assert not (tmp_path / "e" / "model.safetensors").exists()
    # Stats wider than the model's padded vectors cannot be meant for it.
    write_stats(step, "droid", {"state": norm_stats(8), "actions": norm_stats(9)})
    p = recipe(step, tmp_path / "f", "--lerobot", "--asset-id", "droid")
    assert p.returncode == 65 and b"actions stats have 9 numbers, the model's actions 7" in p.stderr, p.stderr


LEROBOT_CHECK = textwrap.dedent('''
    import json, sys, pathlib, tempfile
    import torch
    # torchvision's C extension is built for CUDA torch: declare the operators it registers,
    # which torchvision's Python side looks up at import.
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Offline: the tokenizer step loads google/paligemma-3b-pt-224 from the Hub in __post_init__.
    # A stand-in tokenizer; get_config() still saves tokenizer_name (the step was made by name).
    import lerobot.processor.tokenizer_processor as tp
    class OfflineTokenizer:
        @staticmethod
        def from_pretrained(name, *a, **k):
            assert name == "google/paligemma-3b-pt-224", name
            return object()
    tp.AutoTokenizer = OfflineTokenizer
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
    from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors

    out, stats_file = pathlib.Path(sys.argv[1]), sys.argv[2]
    report = {}
    cfg = PreTrainedConfig.from_pretrained(out)
    report["config"] = [type(cfg).__name__, cfg.type, {k: [v.type.value, list(v.shape)] for k, v in cfg.input_features.items()},
                        {k: [v.type.value, list(v.shape)] for k, v in cfg.output_features.items()},
                        {k: v.value for k, v in cfg.normalization_mapping.items()}, cfg.max_state_dim, cfg.max_action_dim]
    # What LeRobot writes itself for this config and these stats.
    ns = json.load(open(stats_file))["norm_stats"]
    dataset_stats = {{"state": "observation.state", "actions": "action"}[k]: {s: v for s, v in d.items() if v is not None} for k, d in ns.items()}
    make = make_pi05_pre_post_processors if cfg.type == "pi05" else make_pi0_pre_post_processors
    pre, post = make(cfg, dataset_stats=dataset_stats)
    ref = pathlib.Path(tempfile.mkdtemp())
    pre.save_pretrained(ref); post.save_pretrained(ref); cfg._save_pretrained(ref)
    report["ref_files"] = sorted(p.name for p in ref.iterdir())
    report["same"] = {p.name: p.read_bytes() == (out / p.name).read_bytes() for p in ref.iterdir()}
    ours = (out / "config.json").read_text().replace('"device": null', '"device": "%s"' % cfg.device)
    report["same"]["config.json"] = ours == (ref / "config.json").read_text()
    # LeRobot's loader on our folder: the stats its normalizers hold.
    lpre = PolicyProcessorPipeline.from_pretrained(out, config_filename="policy_preprocessor.json")
    lpost = PolicyProcessorPipeline.from_pretrained(out, config_filename="policy_postprocessor.json",
                                                    to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    norm = [s for s in lpre.steps if type(s).__name__ == "NormalizerProcessorStep"][0]
    unnorm = lpost.steps[0]
    report["stats"] = {f"{k}.{s}": t.tolist() for k, d in norm._tensor_stats.items() for s, t in d.items()}
    report["post_stats_equal"] = all(torch.equal(t, unnorm._tensor_stats[k][s]) for k, d in norm._tensor_stats.items() for s, t in d.items())
    # The postprocessor on an action at the normalized origin gives back the stats' centre.
    act = lpost(torch.zeros(1, len(dataset_stats["action"]["mean"])))
    report["unnormalized_zero"] = act[0].tolist()
    print(json.dumps(report))
''')


def test_lerobot_loads_the_folder(converted, tmp_path):
    venv = os.environ.get("CKPT_LEROBOT_VENV")
    if not venv:
        pytest.skip("CKPT_LEROBOT_VENV is not set: LeRobot 0.4.4 cannot be installed into the test venv "
                    "(it pins torch < 2.11); scripts/lerobot-venv.sh builds one")
    pi05, step, out, stats, err = converted
    script = tmp_path / "check.py"
    script.write_text(LEROBOT_CHECK)
    stats_file = step / "assets" / "libero" / "norm_stats.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([os.path.join(venv, "bin", "python"), str(script), str(out), str(stats_file)],
                       capture_output=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    r = json.loads(p.stdout.decode().strip().splitlines()[-1])
    inputs, outputs = expected_features(pi05)
    mode = "QUANTILES" if pi05 else "MEAN_STD"
    assert r["config"] == ["PI05Config" if pi05 else "PI0Config", "pi05" if pi05 else "pi0",
                           {k: [v["type"], v["shape"]] for k, v in inputs.items()},
                           {k: [v["type"], v["shape"]] for k, v in outputs.items()},
                           {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}, 32 if pi05 else 7, 7]
    assert r["ref_files"] == sorted(["config.json", "policy_preprocessor.json", "policy_postprocessor.json", pre_state_name(pi05), POST_STATE])
    assert r["same"] == {name: True for name in r["ref_files"]}, r["same"]
    want = {f"{f}.{s}": np.float32(v).tolist() for k, f in (("state", "observation.state"), ("actions", "action")) for s, v in stats[k].items()}
    assert r["stats"] == want
    assert r["post_stats_equal"]
    a = stats["actions"]
    centre = a["q01"] if pi05 else a["mean"]
    if pi05:
        centre = ((np.float32(a["q99"]) - np.float32(a["q01"])) / 2 + np.float32(a["q01"])).tolist()
    np.testing.assert_allclose(r["unnormalized_zero"], centre, rtol=1e-6)


def test_stats_rounding_to_float32(tmp_path):
    """The awk converter gives the float32 torch.tensor(values, dtype=float32) gives, byte for byte
    in the file: round to nearest even, subnormals, the overflow edge, signed zero, exponents."""
    import torch
    from safetensors.torch import save_file
    rng = np.random.default_rng(7)
    edge = [0.0, -0.0, 1.0, -1.0, 0.1, 2.5e-06, 16777217.0, 3.4028235e38, 3.4028236e38, 1e39, 1e-45, 7e-46, 7.1e-46,
            1.4e-45, 1.1754942e-38, 1.17549435e-38, 0.30000001192092896, 1 + 2.0 ** -24, 1 + 3 * 2.0 ** -24, 123456789]
    values = edge + (rng.standard_normal(300) * 10.0 ** rng.integers(-46, 39, 300)).tolist()
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": values, "std": None}, "actions": {"q99": values[::-1]}}}))
    p = subprocess.run(["awk", "-v", "map=state=observation.state,actions=action", "-f",
                        os.path.join(ROOT, "scripts", "lib", "norm-stats-safetensors.awk"), str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert f"dims\tobservation.state\t{len(values)}" in lines and "note\tnorm_stats.state.std is null: left out" in lines
    escaped = next(l for l in lines if l.startswith("file\t"))[5:]
    got = subprocess.run(["bash", "-c", 'printf "%b" "$1"', "-", escaped], capture_output=True).stdout
    want = tmp_path / "want.safetensors"
    save_file({"observation.state.mean": torch.tensor(values, dtype=torch.float32),
               "action.q99": torch.tensor(values[::-1], dtype=torch.float32)}, str(want))
    assert got == want.read_bytes()
