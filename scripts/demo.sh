#!/usr/bin/env bash
# The jobs ckpt exists for, on the small checkpoints in examples/ (written by the real orbax and
# safetensors libraries; examples/make_example.py and `scripts/bench_openpi.py make STEP tiny`):
#
#   1. an openpi LoRA training step (Orbax) -> PyTorch model.safetensors, LoRA merged as openpi's
#      runtime applies it, float32; ckpt-diff against openpi's own conversion done in Python
#   2. and back: PyTorch -> openpi JAX checkpoint, equal to the merged original
#   3. a PyTorch (Hugging Face BERT) checkpoint -> a Flax parameter tree in Orbax, with the
#      plan first (--plan), and ckpt-diff across the two layouts
#   4. a stream saved compressed, written out later
#
# Builds the tools in release mode first; installs zlib1g-dev and libzstd-dev if missing. Needs
# no Python. Outputs go to the folder given, or a temporary one.
set -euo pipefail
cd "$(dirname "$0")/.."

for pkg in zlib1g-dev libzstd-dev; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    fi
done
swift build -c release 2>&1 | tail -1
BIN="$(swift build -c release --show-bin-path)"
export PATH="$BIN:$PATH" CKPT_BIN="$BIN"
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
rm -rf "$OUT/pi0-pytorch" "$OUT/pi0-jax"  # a second run writes them again
STEP=examples/openpi-tiny-lora
say() { printf '\n== %s\n' "$*"; }

say "1. an openpi LoRA training step: Orbax, bf16 frozen Gemma, f32 adapters (a few of its tensors)"
ckpt-read --root params --list "$STEP/params" | grep -E '^name|attn_vec_einsum/|mlp/linear|input_embedding|tensors'

say "   -> PyTorch model.safetensors: read | lora-merge | ckpt-slice | ckpt-write (scripts/openpi-to-pytorch.sh)"
scripts/openpi-to-pytorch.sh "$STEP" "$OUT/pi0-pytorch"
ckpt-read --list "$OUT/pi0-pytorch/model.safetensors" | tail -1

say "   ckpt-diff against openpi's conversion in Python (orbax restore, numpy einsum merge, safetensors)"
echo "   bit for bit: every weight LoRA did not touch is identical; the 28 merged ones differ in the last bits"
ckpt-diff --brief "$OUT/pi0-pytorch/model.safetensors" examples/openpi-tiny-lora.reference.safetensors || true
echo "   within float32 rounding (rtol 1e-6), all 88, and no key missing on either side:"
ckpt-diff --brief --rtol 1e-6 --atol 1e-7 "$OUT/pi0-pytorch/model.safetensors" examples/openpi-tiny-lora.reference.safetensors

say "2. and back to JAX: PyTorch -> openpi checkpoint (scripts/pytorch-to-openpi.sh)"
scripts/pytorch-to-openpi.sh "$OUT/pi0-pytorch" "$OUT/pi0-jax" --set llm_head_dim=16 --set expert_head_dim=16 --set vision_heads=2
echo "   equal, bit for bit, to the original step with its LoRA merged (all float32):"
ckpt-read --root params "$STEP/params" \
    | lora-merge --scheme openpi --config '*_1/*=gemma_300m_lora' --config gemma_2b_lora --dtype F32 --quiet \
    | ckpt-slice --cast F32 --output "$OUT/merged.ckpts" --force
ckpt-read --root params "$OUT/pi0-jax/params" | ckpt-diff --brief - "$OUT/merged.ckpts"

IN=examples/tiny-bert.safetensors
say "3. a Hugging Face BERT checkpoint (PyTorch names) -> a Flax tree in Orbax; the plan first"
ckpt-slice --rules bert-torch-to-flax --plan --input "$IN" | sed -n '/layer\.0\.attention\.self\.query/,+2p; /position_ids/p; /inputs ->/p'
ckpt-read "$IN" | ckpt-slice --rules bert-torch-to-flax | ckpt-write --force --format orbax "$OUT/bert-flax"
echo "   ckpt-diff across the two layouts (the rules applied to A first; they drop the position_ids buffer):"
ckpt-diff --brief --rules bert-torch-to-flax "$IN" "$OUT/bert-flax"

say "4. the stream itself: saved compressed, written out later, byte-identical to the input"
ckpt-read --compress zlib "$IN" -o "$OUT/tiny-bert.ckpts" --force
ckpt-write --force --input "$OUT/tiny-bert.ckpts" "$OUT/tiny-bert.safetensors"
cmp "$IN" "$OUT/tiny-bert.safetensors" && echo "identical ($(stat -c %s "$IN") bytes of safetensors; $(stat -c %s "$OUT/tiny-bert.ckpts") of stream: random weights barely compress)"

echo
echo "outputs are in $OUT"
