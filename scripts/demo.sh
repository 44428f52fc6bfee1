#!/usr/bin/env bash
# The main job on the example checkpoint shipped in the repo: build the tools in release
# mode, then convert examples/tiny-bert.safetensors through the ckpt stream and prove the
# result is identical. Installs zlib1g-dev and libzstd-dev if missing; needs no Python.
set -euo pipefail
cd "$(dirname "$0")/.."

for pkg in zlib1g-dev libzstd-dev; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    fi
done
swift build -c release 2>&1 | tail -1
BIN="$(swift build -c release --show-bin-path)"
export PATH="$BIN:$PATH"
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
IN=examples/tiny-bert.safetensors

echo "== what is in $IN"
ckpt-read --list "$IN"

echo "== ckpt-read | ckpt-write: safetensors -> stream -> safetensors"
ckpt-read "$IN" | ckpt-write --force "$OUT/tiny-bert.safetensors"
cmp "$IN" "$OUT/tiny-bert.safetensors" && echo "identical to the input, byte for byte"

echo "== the same stream compressed, saved to disk, written later"
ckpt-read --compress zlib "$IN" -o "$OUT/tiny-bert.ckpts" --force
ckpt-write --force --input "$OUT/tiny-bert.ckpts" "$OUT/from-saved.safetensors"
cmp "$IN" "$OUT/from-saved.safetensors" && echo "identical again ($(stat -c %s "$OUT/tiny-bert.ckpts") bytes of stream)"

echo "== only the encoder, split into Hugging Face shards of at most 50 kB"
mkdir -p "$OUT/sharded"
ckpt-read --only 'encoder.*' "$IN" | ckpt-write --force --max-shard-size 50kB "$OUT/sharded"
ls "$OUT/sharded"
echo "outputs are in $OUT"
