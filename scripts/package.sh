#!/usr/bin/env bash
# Builds what users install without a Swift toolchain, into dist/:
#
#   ckpt-VERSION-linux-x86_64.tar.gz            bin/ckpt and the five tool names (symlinks to it),
#                                               rules/, docs/, python/ckpt_stream, README.md
#   ckpt-VERSION-py3-none-manylinux_2_N_x86_64.whl
#                                               pip installs bin/ckpt and the five tools into the
#                                               environment's bin/, the rules into share/ckpt/rules
#                                               (where ckpt-slice --rules NAME looks), and ckpt_stream
#
# One multi-call binary (the `ckpt` product) serves all five tools: with the Swift runtime linked
# in statically, five separate binaries would ship it five times. It needs only the C libraries
# every Debian and Ubuntu has (checked below with ldd). The wheel is assembled as a folder and
# packed with PyPA's `wheel pack` (which writes RECORD); N in its platform tag is the newest
# glibc symbol version the binary uses.
#
# usage: scripts/package.sh [--python PYTHON]   (PYTHON: one with the `wheel` package; default .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=$ROOT/.venv/bin/python
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYTHON=$2; shift ;;
        *) echo "package.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

VERSION=$(sed -n 's/.*static let release = "\(.*\)"/\1/p' Sources/Shared/CLI/ToolRunner.swift)
COMMIT=$(git rev-parse --short=12 HEAD)
git diff --quiet HEAD -- Sources Package.swift rules python 2>/dev/null || COMMIT="$COMMIT-dirty"
TOOLS="ckpt-read ckpt-write lora-merge ckpt-slice ckpt-diff"
SCRATCH=$ROOT/.build/package
DIST=$ROOT/dist
STAGE=$SCRATCH/stage

start=$SECONDS
swift build -c release --product ckpt --static-swift-stdlib --scratch-path "$SCRATCH" \
    -Xcc "-DCKPT_COMMIT=\"$COMMIT\"" > "$SCRATCH.log" 2>&1 || { tail -20 "$SCRATCH.log" >&2; exit 1; }
echo "package.sh: built ckpt $VERSION (commit $COMMIT) in $((SECONDS - start)) s" >&2

rm -rf "$STAGE"
mkdir -p "$STAGE" "$DIST"
BIN=$STAGE/ckpt
cp "$SCRATCH/release/ckpt" "$BIN"
strip "$BIN"

# Only libraries every Debian/Ubuntu system has: the C library family, libstdc++/libgcc_s
# (apt itself needs them), zlib and zstd (dpkg needs them).
unexpected=$(ldd "$BIN" | awk '{print $1}' | grep -v -E '^(linux-vdso\.so|/lib64/ld-linux-x86-64\.so|lib(c|m|dl|rt|pthread|util|z|zstd|stdc\+\+|gcc_s)\.so)' || true)
if [ -n "$unexpected" ]; then
    echo "package.sh: the binary needs libraries a plain system may lack: $unexpected" >&2
    exit 1
fi
"$BIN" --version | grep -q "commit $COMMIT" || { echo "package.sh: --version does not name $COMMIT" >&2; exit 1; }
GLIBC=$(objdump -T "$BIN" | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1 | cut -d. -f2)

# The tarball.
NAME=ckpt-$VERSION-linux-x86_64
T=$STAGE/$NAME
mkdir -p "$T/bin" "$T/python"
cp "$BIN" "$T/bin/ckpt"
for t in $TOOLS; do ln -s ckpt "$T/bin/$t"; done
cp -r rules docs README.md "$T/"
[ -d python/ckpt_stream ] && cp -r python/ckpt_stream "$T/python/"
find "$T" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$STAGE" --owner=0 --group=0 --sort=name -czf "$DIST/$NAME.tar.gz" "$NAME"

# The wheel, as a folder, then packed.
W=$STAGE/wheel
DATA=$W/ckpt-$VERSION.data
INFO=$W/ckpt-$VERSION.dist-info
mkdir -p "$DATA/scripts" "$DATA/data/share/ckpt" "$INFO"
cp "$BIN" "$DATA/scripts/ckpt"
for t in $TOOLS; do
    # A wheel cannot hold symlinks: each tool is a two-line script that runs the one binary.
    printf '#!/bin/sh\nexec "$(dirname "$0")/ckpt" %s "$@"\n' "$t" > "$DATA/scripts/$t"
    chmod 755 "$DATA/scripts/$t"
done
cp -r rules "$DATA/data/share/ckpt/rules"
[ -d python/ckpt_stream ] && cp -r python/ckpt_stream "$W/"
find "$W" -name __pycache__ -prune -exec rm -rf {} +
TAG=py3-none-manylinux_2_${GLIBC}_x86_64
cat > "$INFO/WHEEL" <<WHEEL
Wheel-Version: 1.0
Generator: ckpt scripts/package.sh
Root-Is-Purelib: false
Tag: $TAG
WHEEL
{
    echo "Metadata-Version: 2.1"
    echo "Name: ckpt"
    echo "Version: $VERSION"
    echo "Summary: Fast, exact conversion of ML checkpoints between JAX and PyTorch, as Unix filters"
    echo "License: see README.md"
    echo "Requires-Python: >=3.9"
    echo "Description-Content-Type: text/markdown"
    echo
    cat README.md
} > "$INFO/METADATA"
rm -f "$DIST"/ckpt-"$VERSION"-*.whl
"$PYTHON" -m wheel pack "$W" -d "$DIST" > /dev/null

for f in "$DIST/$NAME.tar.gz" "$DIST"/ckpt-"$VERSION"-"$TAG".whl; do
    [ -f "$f" ] || { echo "package.sh: $f was not made" >&2; exit 1; }
    echo "$f $(stat -c %s "$f") bytes"
done
echo "binary: $(stat -c %s "$SCRATCH/release/ckpt") bytes, $(stat -c %s "$BIN") stripped; needs glibc 2.$GLIBC" >&2
