"""scripts/demo.sh, the README's first command, run as a user runs it: each job it shows must
end as the README says (these are its own lines, asserted)."""
import os
import subprocess

from conftest import ROOT


def test_demo_runs_the_jax_pytorch_jobs(tmp_path):
    p = subprocess.run([os.path.join(ROOT, "scripts", "demo.sh"), str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    # 1. openpi LoRA step -> PyTorch: equal to openpi's Python conversion within float32
    #    rounding, bit for bit where LoRA did not touch a weight, no key missing.
    assert "A: 88 tensors, B: 88; 88 in both: 60 equal, 28 not; 0 only in A, 0 only in B: different" in out
    assert "A: 88 tensors, B: 88; 88 in both: 88 equal, 0 not; 0 only in A, 0 only in B: equal" in out
    assert "lora-merge: merged 10 modules" in out and "20 adapter tensors consumed" in out
    # 2. back to JAX: bit for bit the merged original.
    assert "A: 50 tensors, B: 50; 50 in both: 50 equal, 0 not; 0 only in A, 0 only in B: equal" in out
    # 3. BERT -> Flax tree in Orbax, planned first, equal across layouts.
    assert "40 inputs -> 39 outputs" in out
    assert "A: 39 tensors, B: 39; 39 in both: 39 equal, 0 not; 0 only in A, 0 only in B: equal" in out
    # 4. the compressed stream written later is the input again.
    assert "identical (98640 bytes of safetensors" in out
    for f in ("pi0-pytorch/model.safetensors", "pi0-pytorch/config.json", "pi0-jax/params/_METADATA", "bert-flax/_METADATA"):
        assert os.path.exists(tmp_path / f), f
