#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, build, Swift unit tests, then the
# end-to-end and interop tests against the real Python libraries. `.ci/run` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== swift build"
swift build --build-tests
echo "== swift test (unit tests, golden vectors, bad inputs)"
swift test --skip-build
echo "== fuzz regressions (every committed corpus input and reproducer, plain build)"
scripts/fuzz.sh --replay
echo "== fuzz: every parser briefly under libFuzzer + AddressSanitizer (docs/reliability.md)"
scripts/fuzz.sh --all --seconds 10
echo "== pytest Tests/interop (tools end to end, safetensors/numpy interop, real model)"
export CKPT_BIN="$PWD/.build/debug"
export PATH="$PWD/.venv/bin:$PATH"
python -m pytest -q Tests/interop
