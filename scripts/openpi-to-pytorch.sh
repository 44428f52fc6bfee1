#!/usr/bin/env bash
# openpi JAX checkpoint -> openpi PyTorch model folder (model.safetensors, config.json, assets/).
#
#   scripts/openpi-to-pytorch.sh CKPT_STEP_DIR OUT_DIR [options]
#
#   CKPT_STEP_DIR may be a URL (gs://openpi-assets/checkpoints/pi0_base, hf://, https://): the
#   weights stream from it; a URL cannot be listed, so assets/ come only with --asset-id ID
#
#   --precision float32|bfloat16   output type (default: float32; openpi's LoRA training keeps
#                                  the frozen base in bf16, and the merge is computed in f32)
#   --llm-lora CONFIG              LoRA config of the PaliGemma Gemma (default gemma_2b_lora:
#                                  rank 16, alpha 16); e.g. rank=16,alpha=32[,rslora]
#   --expert-lora CONFIG           LoRA config of the action expert (default gemma_300m_lora)
#   --action-horizon N             written to config.json (not stored in the weights; default 50)
#   --lerobot                      write a LeRobot 0.4.x policy folder instead (LeRobot's config.json,
#                                  policy_preprocessor/postprocessor .json and normalizer stats)
#   --asset-id ID                  the stats in assets/ID/norm_stats.json (--lerobot's default: the
#                                  one folder under assets/ that has them; for a URL, the only
#                                  asset fetched)
#   --cameras A,B,C                (--lerobot) the image features observation.images.A, ...
#                                  (default openpi's base_0_rgb,left_wrist_0_rgb,right_wrist_0_rgb)
#   --part K/N                     convert only part K of N (K from 0; e.g. a Slurm array task):
#                                  writes OUT_DIR/model-{K+1}-of-{N}.safetensors; a LoRA base and
#                                  its adapters, and whatever the rules combine, stay in one part
#   --finalize                     after every part: check them, write the index, config.json and
#                                  assets/ (exit 75 while a part is missing; nothing written)
#
# The variant (pi0 or pi0.5) and LoRA are told from the keys, never from the path: pi0.5 has
# time_mlp_in and adaptive norms; LoRA checkpoints have lora_a/lora_b leaves. Every key must be
# consumed: an adapter lora-merge could not place, or a key no rule converts, fails the run and
# no output is left.
set -euo pipefail
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
[ $# -ge 2 ] || usage
CKPT="$1" OUT="$2"
shift 2
PRECISION=float32 LLM_LORA=gemma_2b_lora EXPERT_LORA=gemma_300m_lora HORIZON=50
LEROBOT=0 ASSET_ID="" CAMERAS=base_0_rgb,left_wrist_0_rgb,right_wrist_0_rgb PART="" FINALIZE=0
while [ $# -gt 0 ]; do
    case "$1" in
    --part) PART="$2"; shift 2 ;;
    --finalize) FINALIZE=1; shift ;;
    --lerobot) LEROBOT=1; shift ;;
    --asset-id) ASSET_ID="$2"; shift 2 ;;
    --cameras) CAMERAS="$2"; shift 2 ;;
    --precision) PRECISION="$2"; shift 2 ;;
    --llm-lora) LLM_LORA="$2"; shift 2 ;;
    --expert-lora) EXPERT_LORA="$2"; shift 2 ;;
    --action-horizon) HORIZON="$2"; shift 2 ;;
    *) usage ;;
    esac
done
HERE="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib/remote.sh
. "$HERE/scripts/lib/remote.sh"
REMOTE=0
is_remote "$CKPT" && REMOTE=1
CKPT="${CKPT%/}"
[ $LEROBOT = 1 ] || [ -z "$ASSET_ID" ] || [ $REMOTE = 1 ] || { echo "openpi-to-pytorch: --asset-id goes with --lerobot or a URL" >&2; exit 64; }
if [ -n "$PART" ] || [ $FINALIZE = 1 ]; then
    # LeRobot loads one model.safetensors; a partitioned run writes shards and an index.
    [ $LEROBOT = 0 ] || { echo "openpi-to-pytorch: --part and --finalize write a sharded model.safetensors.index.json, which --lerobot folders do not take" >&2; exit 64; }
    [ -z "$PART" ] || [ $FINALIZE = 0 ] || { echo "openpi-to-pytorch: give --part K/N for each part, then --finalize once" >&2; exit 64; }
fi
case "$PRECISION" in float32) DTYPE=F32 ;; bfloat16) DTYPE=BF16 ;; *) echo "openpi-to-pytorch: --precision is float32 or bfloat16" >&2; exit 64 ;; esac
BIN="${CKPT_BIN:-$HERE/.build/release}"
[ -x "$BIN/ckpt-read" ] || BIN="$HERE/.build/debug"
PARAMS="$CKPT/params"
ASSETS="$CKPT/assets"
if [ $REMOTE = 1 ]; then
    # Only the asset named can be fetched (a URL cannot be listed); --lerobot needs it.
    ASSETS="$(mktemp -d)/assets"
    trap 'rm -rf "$(dirname "$ASSETS")"' EXIT
    if [ -n "$ASSET_ID" ]; then
        mkdir -p "$ASSETS/$ASSET_ID"
        remote_fetch "$CKPT/assets/$ASSET_ID/norm_stats.json" "$ASSETS/$ASSET_ID/norm_stats.json"
    elif [ $LEROBOT = 1 ]; then
        echo "openpi-to-pytorch: --lerobot from a URL needs --asset-id ID (assets/ID/norm_stats.json; a URL cannot be listed)" >&2; exit 64
    else
        echo "openpi-to-pytorch: assets/ are not copied from a URL unless named: give --asset-id ID for assets/ID/norm_stats.json" >&2
    fi
elif [ ! -d "$PARAMS" ]; then
    echo "openpi-to-pytorch: $PARAMS is not a folder (give the step folder holding params/ and assets/)" >&2; exit 66
fi

# What the checkpoint is, from its keys (metadata only: no data is read).
KEYS="$("$BIN/ckpt-read" --root params --list "$PARAMS" | awk 'NR > 1 && NF == 4 { print $1 }')"
if grep -q '^time_mlp_in/kernel$' <<<"$KEYS"; then VARIANT=pi05; else VARIANT=pi0; fi
if grep -qE '(/|_)lora_a$' <<<"$KEYS"; then LORA=1; else LORA=0; fi
LISTING="$("$BIN/ckpt-read" --root params --list "$PARAMS")"
first_dim() { awk -v k="$1" '$1 == k { gsub(/[][]/, "", $3); split($3, s, ","); print s[1] }' <<<"$LISTING"; }
ACTION_DIM="$(first_dim action_in_proj/kernel)"
if [ $LEROBOT = 1 ]; then
    # Stats first: a folder LeRobot cannot normalize with is not worth the conversion.
    # shellcheck source=lib/lerobot.sh
    . "$HERE/scripts/lib/lerobot.sh"
    lerobot_stats
fi
echo "openpi-to-pytorch: $VARIANT, $([ $LORA = 1 ] && echo "LoRA ($LLM_LORA; expert $EXPERT_LORA) merged" || echo "no LoRA"), $PRECISION" >&2

mkdir -p "$OUT"
RULES="$HERE/rules/openpi-$VARIANT-jax-to-pytorch.rules"
merge() {
    if [ $LORA = 1 ]; then
        "$BIN/lora-merge" --scheme openpi --config "*_1/*=$EXPERT_LORA" --config "$LLM_LORA" --dtype F32
    else
        cat
    fi
}
# LoRA adapters first: lora-merge then merges each base as it streams through instead of
# holding it until its adapters arrive (openpi's `gating_einsum` sorts before
# `gating_einsum_lora_a`; the stacked FFN weights are its largest arrays).
FIRST=()
[ $LORA = 1 ] && FIRST=(--first '*lora_[ab]')
if [ -n "$PART" ]; then
    # One part: ckpt-read keeps each LoRA base with its adapters (lora-merge's pairing) and the
    # inputs of any rule that combines tensors in one part; config.json and assets/ wait for
    # --finalize. --force: a finished model in OUT_DIR stops looking complete at once.
    "$BIN/ckpt-read" --root params "${FIRST[@]}" --part "$PART" --group-rules "$RULES" "$PARAMS" \
        | merge \
        | "$BIN/ckpt-slice" --rules "$RULES" --cast "$DTYPE" \
        | "$BIN/ckpt-write" --force --part "$PART" "$OUT"
    exit 0
fi
if [ $FINALIZE = 1 ]; then
    "$BIN/ckpt-write" --finalize "$OUT"
else
    "$BIN/ckpt-read" --root params "${FIRST[@]}" "$PARAMS" \
        | merge \
        | "$BIN/ckpt-slice" --rules "$RULES" --cast "$DTYPE" \
        | "$BIN/ckpt-write" --force "$OUT/model.safetensors"
fi

if [ $LEROBOT = 1 ]; then
    lerobot_write
    exit 0
fi

# What openpi's own converter writes beside the weights (PaliGemma is gemma_2b, the expert
# gemma_300m: the PyTorch model has no LoRA modules, the adapters are merged).
cat > "$OUT/config.json" <<EOF
{
  "action_dim": ${ACTION_DIM:-32},
  "action_horizon": $HORIZON,
  "paligemma_variant": "gemma_2b",
  "action_expert_variant": "gemma_300m",
  "precision": "$PRECISION"
}
EOF
if [ -d "$ASSETS" ]; then
    rm -rf "$OUT/assets"
    cp -r "$ASSETS" "$OUT/assets"
fi
echo "openpi-to-pytorch: wrote $OUT/$([ $FINALIZE = 1 ] && echo model.safetensors.index.json || echo model.safetensors), config.json$([ -d "$ASSETS" ] && echo ", assets/")" >&2
