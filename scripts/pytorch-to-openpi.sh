#!/usr/bin/env bash
# openpi PyTorch model folder -> openpi JAX checkpoint step (OUT_STEP_DIR/params, Orbax).
#
#   scripts/pytorch-to-openpi.sh PT_DIR OUT_STEP_DIR [options]
#
#   PT_DIR                          what scripts/openpi-to-pytorch.sh writes, or what openpi's
#                                   PyTorch training saves (model.safetensors; keys may carry a
#                                   "model." prefix, as LeRobot's do)
#   --precision float32|bfloat16    output type (default: float32)
#   --set NAME=VALUE                a model size the PyTorch shapes do not say (repeatable):
#                                   llm_head_dim, expert_head_dim (default 256), vision_heads
#                                   (default 16), openpi's gemma_2b/gemma_300m/SigLIP So400m
#
# Writes OUT_STEP_DIR/params, restorable by openpi's restore_params ({"params": ...} as openpi
# nests it; no "value" leaves), and copies PT_DIR/assets beside it. The variant (pi0 or pi0.5) is
# told from the keys: pi0.5 has time_mlp_in. Every key must be consumed: a key no rule converts
# fails the run and no output is left.
set -euo pipefail
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
[ $# -ge 2 ] || usage
PT="$1" OUT="$2"
shift 2
PRECISION=float32
SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --precision) PRECISION="$2"; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    *) usage ;;
    esac
done
case "$PRECISION" in float32) DTYPE=F32 ;; bfloat16) DTYPE=BF16 ;; *) echo "pytorch-to-openpi: --precision is float32 or bfloat16" >&2; exit 64 ;; esac
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${CKPT_BIN:-$HERE/.build/release}"
[ -x "$BIN/ckpt-read" ] || BIN="$HERE/.build/debug"
WEIGHTS="$PT/model.safetensors"
[ -f "$WEIGHTS" ] || { echo "pytorch-to-openpi: $WEIGHTS is missing (give the folder holding model.safetensors)" >&2; exit 66; }
[ ! -e "$OUT/params" ] || { echo "pytorch-to-openpi: $OUT/params already exists" >&2; exit 73; }

KEYS="$("$BIN/ckpt-read" --list "$WEIGHTS" | awk 'NR > 1 && NF == 4 { print $1 }')"
if grep -qE '^(model\.)?time_mlp_in\.weight$' <<<"$KEYS"; then VARIANT=pi05; else VARIANT=pi0; fi
echo "pytorch-to-openpi: $VARIANT, $PRECISION" >&2

mkdir -p "$OUT"
"$BIN/ckpt-read" "$WEIGHTS" \
    | "$BIN/ckpt-slice" --rules "$HERE/rules/openpi-$VARIANT-pytorch-to-jax.rules" ${SETS[@]+"${SETS[@]}"} --cast "$DTYPE" \
    | "$BIN/ckpt-write" --format orbax --nest params "$OUT/params"
if [ -d "$PT/assets" ]; then
    rm -rf "$OUT/assets"
    cp -r "$PT/assets" "$OUT/assets"
fi
echo "pytorch-to-openpi: wrote $OUT/params$([ -d "$PT/assets" ] && echo ", assets/")" >&2
