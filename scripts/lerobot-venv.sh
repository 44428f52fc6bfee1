#!/usr/bin/env bash
# A virtualenv where LeRobot 0.4.4 imports, for the optional LeRobot checks of the
# `openpi-to-pytorch.sh --lerobot` tests (not run by CI, not needed by anything else).
#
#   scripts/lerobot-venv.sh [VENV]      (default /work/lerobot-venv; keep it out of the repo)
#   CKPT_LEROBOT_VENV=VENV .venv/bin/python -m pytest Tests/interop/test_lerobot.py
#
# lerobot==0.4.4 cannot be installed with its own dependencies here (it pins torch < 2.11 and a
# patched transformers), so it goes in with --no-deps beside the torch these machines have
# (2.13.0, CPU) and the packages its policy, config and processor modules import. About 1.6 GB,
# a few minutes. pip then lists lerobot's unmet pins (torch, torchvision, wandb, gymnasium, ...):
# expected; none of them is imported by the modules the tests use.
# torchvision's C extension is built for CUDA torch and does not load with the CPU wheel: the
# check in Tests/interop/test_lerobot.py declares the two operator schemas torchvision registers
# (torchvision::nms, torchvision::qnms) with torch.library before lerobot is imported, and stands
# in for the PaliGemma tokenizer (the processors load google/paligemma-3b-pt-224 from the Hub).
set -euo pipefail
VENV="${1:-/work/lerobot-venv}"
PY="${PYTHON:-python3.11}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 transformers==4.53.2 huggingface-hub==0.35.3 tokenizers==0.21.4 \
    safetensors numpy pytest
"${PIP[@]}" --no-deps lerobot==0.4.4
# huggingface-hub repeated: datasets 5 would pull hub 2.x, which transformers 4.53 refuses.
"${PIP[@]}" draccus==0.10.0 'datasets>=4,<5' Pillow accelerate imageio diffusers==0.35.2 pyserial \
    'deepdiff>=7.0.1,<9' av==15.1.0 einops huggingface-hub==0.35.3
"${PIP[@]}" --no-deps torchvision==0.28.0
echo "lerobot-venv: $VENV ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("lerobot", m.version("lerobot"), "torch", m.version("torch"))'))"
