"""What users install without Swift (scripts/package.sh): the wheel in a fresh virtualenv and the
tarball, each run with nothing but what it installs and /usr/bin on PATH."""
import glob
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import ROOT

TOOLS = ["ckpt-read", "ckpt-write", "lora-merge", "ckpt-slice", "ckpt-diff"]


def head_commit():
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def dist():
    """dist/ as scripts/package.sh leaves it for this commit (built here if missing or stale)."""
    def current():
        wheels = glob.glob(os.path.join(ROOT, "dist", "ckpt-*-manylinux_*_x86_64.whl"))
        tars = glob.glob(os.path.join(ROOT, "dist", "ckpt-*-linux-x86_64.tar.gz"))
        binary = os.path.join(ROOT, ".build", "package", "stage", "ckpt")
        if len(wheels) != 1 or len(tars) != 1 or not os.path.exists(binary):
            return None
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        return (wheels[0], tars[0]) if f"commit {head_commit()}" in version else None

    found = current()
    if found is None:
        subprocess.run([os.path.join(ROOT, "scripts", "package.sh"), "--python", sys.executable], check=True)
        found = current()
    assert found, "scripts/package.sh did not leave one wheel and one tarball for HEAD in dist/"
    return found


def bare(bin_dir, args, **kw):
    """Runs a command with only `bin_dir` and /usr/bin on PATH (no Swift toolchain, no repo)."""
    env = {"PATH": f"{bin_dir}:/usr/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-o", "pipefail", "-c", args], env=env, capture_output=True, **kw)


def bert_like(path):
    rng = np.random.default_rng(5)
    tensors = {
        "bert.embeddings.word_embeddings.weight": rng.standard_normal((50, 16)).astype(np.float32),
        "bert.encoder.layer.0.attention.self.query.weight": rng.standard_normal((16, 16)).astype(np.float32),
        "bert.encoder.layer.0.attention.self.query.bias": rng.standard_normal(16).astype(np.float32),
    }
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return tensors


def test_wheel_installs_and_converts_in_a_fresh_venv(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--disable-pip-version-check", wheel], check=True)
    bin_dir = venv / "bin"
    for t in TOOLS:
        assert (bin_dir / t).exists(), t
    # --version names the release and the commit it was built from.
    p = bare(bin_dir, "ckpt-read --version", text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"0.1.0 (commit {head_commit()})", p

    src = tmp_path / "model.safetensors"
    tensors = bert_like(src)
    out = tmp_path / "model.pt"
    p = bare(bin_dir, f"cd {tmp_path} && ckpt-read {src} | ckpt-write {out} && ckpt-diff {src} {out}")
    assert p.returncode == 0, p.stderr.decode()
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(loaded[k].numpy(), v), k

    # The shipped rules are found where pip put them (<venv>/share/ckpt/rules).
    p = bare(bin_dir, "ckpt-slice --list-rules", text=True)
    assert p.returncode == 0 and "bert-torch-to-flax" in p.stdout and "hf-pt-to-flax" in p.stdout, p
    assert os.path.exists(venv / "share" / "ckpt" / "rules" / "bert-torch-to-flax.rules")
    flax = tmp_path / "flax.safetensors"
    p = bare(bin_dir, f"ckpt-read {src} | ckpt-slice --rules bert-torch-to-flax --keep-unmatched | ckpt-write {flax}")
    assert p.returncode == 0, p.stderr.decode()
    q = load_file(str(flax))["bert/encoder/layer/0/attention/self/query/kernel"]
    assert np.array_equal(q, tensors["bert.encoder.layer.0.attention.self.query.weight"].T)

    # URLs: the packaged binary loads the system's libcurl at run time (it links none).
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from range_server import RangeServer
    server = RangeServer(str(tmp_path)).start()
    try:
        p = bare(bin_dir, f"ckpt-read {server.url}/model.safetensors | ckpt-write {tmp_path}/from-url.safetensors")
        assert p.returncode == 0, p.stderr.decode()
        assert (tmp_path / "from-url.safetensors").read_bytes() == src.read_bytes()
    finally:
        server.shutdown()
        server.server_close()

    # ckpt_stream is importable from the venv's own Python, no sys.path set-up.
    p = subprocess.run([str(bin_dir / "python"), "-c", "import ckpt_stream, sys; print(ckpt_stream.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and str(venv) in p.stdout, p.stderr


def test_tarball_runs_from_where_it_is_unpacked(dist, tmp_path):
    _, tarball = dist
    with tarfile.open(tarball) as t:
        t.extractall(tmp_path, filter="tar")
    (top,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    bin_dir = top / "bin"
    for t in TOOLS:
        assert os.readlink(bin_dir / t) == "ckpt", t
    p = bare(bin_dir, "ckpt-slice --list-rules", text=True)
    assert p.returncode == 0 and "bert-torch-to-flax" in p.stdout, p
    src = tmp_path / "m.safetensors"
    bert_like(src)
    p = bare(bin_dir, f"ckpt-read --compress zlib {src} > {tmp_path}/s.ckpts && ckpt-write {tmp_path}/o.safetensors < {tmp_path}/s.ckpts"
                      f" && ckpt-diff {src} {tmp_path}/o.safetensors")
    assert p.returncode == 0, p.stderr.decode()
    # Only system libraries every Debian/Ubuntu has.
    libs = subprocess.run(["ldd", str(bin_dir / "ckpt")], capture_output=True, text=True, check=True).stdout
    names = sorted(l.split()[0] for l in libs.splitlines() if l.strip())
    allowed = ("linux-vdso.so", "/lib64/ld-linux-x86-64.so", "libc.so", "libm.so", "libz.so", "libzstd.so", "libstdc++.so", "libgcc_s.so")
    assert all(n.startswith(allowed) for n in names), names
