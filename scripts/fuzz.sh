#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser with libFuzzer + AddressSanitizer (Sources/ckpt-fuzz).
#
#   scripts/fuzz.sh --list                     the target names, one per line
#   scripts/fuzz.sh TARGET [--seconds N]       build if needed, fuzz TARGET for N seconds (default 60)
#   scripts/fuzz.sh --all [--seconds N]        every target in turn, N seconds each (CI: --seconds 10)
#   scripts/fuzz.sh --replay [TARGET]          plain build (no fuzzer): run the committed corpus and
#                                              Tests/fuzz/regressions/ through the targets
#   scripts/fuzz.sh --minimize TARGET CRASH    minimise a crashing input (-minimize_crash=1)
#   scripts/fuzz.sh --build                    only build the fuzzer
#   scripts/fuzz.sh --summary                  totals per target over .build-fuzz/campaign.tsv
#
# Options for TARGET/--all: --seconds N, --timeout S (per input, default 10), --rss-mb M
# (default 2048; also the malloc limit), --max-len B (default 65536), --keep-going (libFuzzer's
# fork mode: record every crash, leak, timeout and OOM and go on fuzzing; still exits 1 if any),
# --no-nice, --bin PATH (run this already-built fuzzer instead of building: a long campaign
# keeps one binary while the sources change). Anything after `--` goes to libFuzzer as it is. Every run appends a line to
# .build-fuzz/campaign.tsv (target, seconds, executions, exec/s, cov, ft, corpus, result).
# Tests/fuzz/options/TARGET, if present, adds libFuzzer flags for that target (one a line).
#
# The committed corpus (Tests/fuzz/corpus/TARGET) is never written: each run fuzzes a working
# copy in .build-fuzz/corpus/TARGET (kept between runs, so campaigns add up), crashes go to
# .build-fuzz/artifacts/TARGET/, logs to .build-fuzz/logs/. Exit status: 0 if no crash, leak,
# timeout or out-of-memory; 1 otherwise (the reproducer's path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRATCH=$ROOT/.build-fuzz
CORPUS=$ROOT/Tests/fuzz/corpus
REGRESSIONS=$ROOT/Tests/fuzz/regressions
DICTS=$ROOT/Tests/fuzz/dicts
OPTIONS=$ROOT/Tests/fuzz/options
export SWIFT_BACKTRACE=enable=no   # or a crash waits in Swift's backtracer instead of reaching libFuzzer
NICE="nice -n 10"

targets() {
    # The names as Sources/ckpt-fuzz/Targets.swift declares them (no build needed).
    sed -n 's/^ *FuzzTarget(name: "\([a-z0-9-]*\)".*/\1/p' "$ROOT/Sources/ckpt-fuzz/Targets.swift"
}

dict_for() {
    case "$1" in
        json|safetensors-header|zarr-metadata) echo "$DICTS/json.dict" ;;
        peft) echo "$DICTS/peft.dict" ;;
        pickle) echo "$DICTS/pickle.dict" ;;
        torch) echo "$DICTS/torch.dict" ;;
        rules) echo "$DICTS/rules.dict" ;;
        ocdbt|zarr|safetensors-index) echo "$DICTS/folders.dict" ;;
        *) echo "" ;;
    esac
}

build() {
    mkdir -p "$SCRATCH/run"
    if [ -n "$PREBUILT" ]; then
        BIN=$SCRATCH/run/ckpt-fuzz-$$
        cp "$PREBUILT" "$BIN"
        trap 'rm -f "$BIN"' EXIT
        return
    fi
    # Gold (the default linker here) cannot link the fuzzer runtime with Swift's entry point
    # renaming; lld from the Swift toolchain can.
    local lld
    lld="$(dirname "$(readlink -f "$(command -v swift)")")/ld.lld"
    printf '{"schemaVersion": "1.0", "linker": {"path": "%s"}}\n' "$lld" > "$SCRATCH/toolset.json"
    local start=$SECONDS
    if ! $NICE swift build --product ckpt-fuzz --scratch-path "$SCRATCH" -c release --toolset "$SCRATCH/toolset.json" \
            -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING > "$SCRATCH/build.log" 2>&1; then
        grep -E "error" "$SCRATCH/build.log" | head -20 >&2
        echo "fuzz.sh: build failed (log: $SCRATCH/build.log)" >&2
        exit 2
    fi
    echo "fuzz.sh: built ckpt-fuzz with -sanitize=fuzzer,address in $((SECONDS - start)) s" >&2
    # Runs use a private copy, so a rebuild (or a second campaign) never meets a busy binary.
    BIN=$SCRATCH/run/ckpt-fuzz-$$
    mkdir -p "$SCRATCH/run"
    cp "$SCRATCH/release/ckpt-fuzz" "$BIN"
    trap 'rm -f "$BIN"' EXIT
}

# A process that crashed leaves its scratch folder (/dev/shm/ckpt-fuzz-PID): remove those
# whose process is gone.
clean_scratch() {
    local d
    for d in /dev/shm/ckpt-fuzz-* "${TMPDIR:-/tmp}"/ckpt-fuzz-*; do
        [ -d "$d" ] || continue
        kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"
    done
}

# Runs one target; prints a summary line; returns non-zero on a finding.
fuzz_one() {
    local t=$1 seconds=$2
    local work=$SCRATCH/corpus/$t art=$SCRATCH/artifacts/$t log=$SCRATCH/logs/$t.log
    [ -d "$CORPUS/$t" ] || { echo "fuzz.sh: no target $t (see --list)" >&2; return 2; }
    mkdir -p "$work" "$art" "$(dirname "$log")"
    # Regression inputs are not copied in: --replay runs them, and a known open crash would
    # stop every run at once.
    cp -n "$CORPUS/$t"/* "$work"/ 2>/dev/null || true
    local dict args=()
    dict=$(dict_for "$t")
    [ -n "$dict" ] && args+=("-dict=$dict")
    # Per-target libFuzzer flags, one a line (# comments): e.g. a known open leak switched off.
    if [ -f "$OPTIONS/$t" ]; then
        local opt
        while read -r opt; do [ -n "$opt" ] && [[ $opt != \#* ]] && args+=("$opt"); done < "$OPTIONS/$t"
    fi
    [ "$KEEP_GOING" = 1 ] && args+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    local status=0 before
    before=$(ls "$art" | wc -l)
    # -detect_leaks stays on (ASan's default under libFuzzer).
    (cd "$art" && $NICE "$BIN" "$t" -max_total_time="$seconds" -timeout="$TIMEOUT" -rss_limit_mb="$RSS" \
        -malloc_limit_mb="$RSS" -max_len="$MAXLEN" -print_final_stats=1 -artifact_prefix="$art/" \
        "${args[@]}" "${EXTRA[@]}" "$work") > "$log" 2>&1 || status=$?
    if [ "$KEEP_GOING" = 1 ] && [ "$(ls "$art" | wc -l)" != "$before" ]; then status=1; fi
    clean_scratch
    local execs rate cov ft corp
    # Final stats (plain mode) or the last status line (fork mode: "#N: cov: .. exec/s: ..").
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    [ -n "$rate" ] || rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    corp=$(grep -oE 'corp: [0-9]+(/[0-9]+[a-zA-Z]*)?' "$log" | tail -1 | cut -d' ' -f2)
    local result
    result=$([ $status = 0 ] && echo ok || echo "FINDING (exit $status)")
    printf '%-20s %10s execs %7s exec/s  cov %5s  ft %6s  corpus %s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
        "${ft:-?}" "${corp:-?}" "$result"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$seconds" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result" >> "$SCRATCH/campaign.tsv"
    if [ $status != 0 ]; then
        ls -t "$art" | head -5 | sed "s|^|  artifact: $art/|" >&2
        grep -E "^==[0-9]+==ERROR|SUMMARY|Test unit written|ALARM|out-of-memory|Swift runtime failure|Fatal error" "$log" | head -8 >&2
        grep -E "^ +#[0-9]+ .* in " "$log" | grep -v -E "libFuzzer|fuzzer::|__sanitizer|asan_|libc\.so" | head -6 >&2
        echo "  log: $log" >&2
        return 1
    fi
}

replay() {
    local only=${1:-}
    echo "fuzz.sh: plain build of ckpt-fuzz (replay, no fuzzer)" >&2
    swift build --product ckpt-fuzz > /dev/null
    local bin
    bin="$(swift build --show-bin-path)/ckpt-fuzz"
    local failed=0 t dirs logs=$SCRATCH/replay
    mkdir -p "$logs"
    for t in $(targets); do
        [ -n "$only" ] && [ "$t" != "$only" ] && continue
        dirs=("$CORPUS/$t")
        [ -d "$REGRESSIONS/$t" ] && dirs+=("$REGRESSIONS/$t")
        # One process per input: a crash names its input and does not hide the ones after it.
        local f n=0 bad=0
        for f in $(find "${dirs[@]}" -maxdepth 1 -type f | sort); do
            n=$((n + 1))
            if ! "$bin" "$t" "$f" > "$logs/$t.log" 2>&1; then
                echo "replay $t: CRASH on $f"
                { grep -E "Fatal error|failed|runtime failure|error" "$logs/$t.log" || tail -3 "$logs/$t.log"; } | head -3 | sed 's/^/  /'
                bad=$((bad + 1))
            fi
        done
        clean_scratch
        echo "replay $t: $n inputs, $bad crashed"
        [ $bad = 0 ] || failed=1
    done
    return $failed
}

PREBUILT=""
SECONDS_EACH=60 TIMEOUT=10 RSS=2048 MAXLEN=65536 KEEP_GOING=0
EXTRA=()
MODE="" TARGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --list) targets; exit 0 ;;
        --all) MODE=all ;;
        --replay) MODE=replay; if [ $# -gt 1 ] && [[ $2 != -* ]]; then TARGET=$2; shift; fi ;;
        --build) MODE=build ;;
        --summary)
            [ -f "$SCRATCH/campaign.tsv" ] || { echo "fuzz.sh: no runs yet" >&2; exit 1; }
            # Executions and seconds add up over runs (each continues the working corpus);
            # coverage, features and corpus are the last run's.
            awk -F'\t' '$4 ~ /^[0-9]+$/ { n[$2] += $4; s[$2] += $3; cov[$2] = $6; ft[$2] = $7; corp[$2] = $8; rate[$2] = $5;
                          if (!($2 in seen)) { seen[$2] = 1; order[++k] = $2 } }
                 END { printf "%-20s %12s %8s %10s %6s %7s  %s\n", "target", "executions", "seconds", "exec/s(last)", "cov", "ft", "corpus";
                       for (i = 1; i <= k; i++) { t = order[i];
                         printf "%-20s %12d %8d %10s %6s %7s  %s\n", t, n[t], s[t], rate[t], cov[t], ft[t], corp[t] } }' \
                "$SCRATCH/campaign.tsv"
            exit 0 ;;
        --minimize) MODE=minimize; TARGET=$2; CRASH=$(readlink -f "$3"); shift 2 ;;
        --seconds) SECONDS_EACH=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --rss-mb) RSS=$2; shift ;;
        --max-len) MAXLEN=$2; shift ;;
        --keep-going) KEEP_GOING=1 ;;
        --no-nice) NICE="" ;;
        --bin) PREBUILT=$(readlink -f "$2"); shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) MODE=one; TARGET=$1 ;;
    esac
    shift
done

case "$MODE" in
    replay) replay "$TARGET" ;;
    build) build ;;
    minimize)
        build
        out=$REGRESSIONS/$TARGET
        mkdir -p "$SCRATCH/minimized"
        min=$SCRATCH/minimized/$(basename "$CRASH").min
        (cd "$SCRATCH/minimized" && "$BIN" "$TARGET" -minimize_crash=1 -runs=20000 -timeout="$TIMEOUT" \
            -rss_limit_mb="$RSS" -malloc_limit_mb="$RSS" -exact_artifact_path="$min" "$CRASH") > "$SCRATCH/minimized/last.log" 2>&1 || true
        if [ -s "$min" ]; then
            echo "minimised: $min ($(stat -c %s "$min") bytes, was $(stat -c %s "$CRASH")); commit it under $out/"
        else
            echo "fuzz.sh: minimisation left nothing (log: $SCRATCH/minimized/last.log)" >&2; exit 1
        fi ;;
    one)
        build
        fuzz_one "$TARGET" "$SECONDS_EACH" ;;
    all)
        build
        failed=()
        for t in $(targets); do fuzz_one "$t" "$SECONDS_EACH" || failed+=("$t"); done
        if [ ${#failed[@]} -gt 0 ]; then echo "fuzz.sh: findings in: ${failed[*]}" >&2; exit 1; fi ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
