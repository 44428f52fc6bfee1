#!/usr/bin/env bash
# PyTorch checkpoint -> JAX (Orbax checkpoint or Flax msgpack) by a slice rule file.
#
#   scripts/pytorch-to-jax.sh IN RULES OUT [orbax|msgpack]
#
#   scripts/pytorch-to-jax.sh dinov3_vits16.pth rules/dinov3-torch-to-jax.rules dinov3/params orbax
#   scripts/pytorch-to-jax.sh model.safetensors rules/bert-torch-to-flax.rules flax_model.msgpack msgpack
#
# IN is anything ckpt-read reads (.pth/.pt/.bin, safetensors, ...). The format defaults to
# orbax for a folder-like OUT and msgpack for *.msgpack. Every key must be consumed by a rule.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
IN="$1" RULES="$2" OUT="$3"
FORMAT="${4:-$(case "$OUT" in *.msgpack) echo msgpack ;; *) echo orbax ;; esac)}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${CKPT_BIN:-$HERE/.build/release}"
[ -x "$BIN/ckpt-read" ] || BIN="$HERE/.build/debug"
"$BIN/ckpt-read" "$IN" | "$BIN/ckpt-slice" --rules "$RULES" | "$BIN/ckpt-write" --format "$FORMAT" "$OUT"
