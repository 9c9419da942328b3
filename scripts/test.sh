#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, lints, unit and end-to-end tests
# (real userfaultfd, real pagerd processes). Needs root (hugetlbfs pages, /dev/userfaultfd).
# Then smoke-tests the benchmark harness. Ends with one line summing every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
# Tests that cannot run here say why in this file (testkit::skip); the summary counts them.
export PAGERD_TEST_SKIPS=$(mktemp)
trap 'rm -f "$log" "$PAGERD_TEST_SKIPS"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# Smoke-test the fan-out benchmark harness (a small matrix; the full one is in docs/benchmarks.md).
if [ "$status" = 0 ]; then
  cargo run --release --quiet -p pagerd-benches --bin fanout -- --quick --out target/bench/quick \
    >target/bench-quick.txt 2>&1 || { status=$?; cat target/bench-quick.txt; }
  tail -n 3 target/bench-quick.txt
fi
if [ -s "$PAGERD_TEST_SKIPS" ]; then
  echo "skipped tests:"
  sed 's/^/  /' "$PAGERD_TEST_SKIPS"
fi
skipped=$(wc -l <"$PAGERD_TEST_SKIPS")
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
