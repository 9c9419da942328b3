#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, lints, unit and end-to-end tests
# (real userfaultfd, real pagerd processes). Needs root (hugetlbfs pages, /dev/userfaultfd).
# Then smoke-tests the benchmark harness, runs a short end-to-end fuzzing pass and, where the
# nightly toolchain is installed, each libFuzzer target briefly. Ends with one line summing every
# test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --for-tests
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
# Tests that cannot run here say why in this file (testkit::skip); the summary counts them.
export PAGERD_TEST_SKIPS=$(mktemp)
trap 'rm -f "$log" "$PAGERD_TEST_SKIPS"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# A skipped test returns early, so cargo counts it as passed: it is moved to "skipped".
skipped_tests=$(wc -l <"$PAGERD_TEST_SKIPS")
# Smoke-test the fan-out benchmark harness (a small matrix; the full one is in docs/benchmarks.md).
if [ "$status" = 0 ]; then
  cargo run --release --quiet -p pagerd-benches --bin fanout -- --quick --out target/bench/quick \
    >target/bench-quick.txt 2>&1 || { status=$?; cat target/bench-quick.txt; }
  tail -n 3 target/bench-quick.txt
fi
# A short end-to-end fuzzing pass: hostile control lines and handoffs against a real pagerd
# while a victim fork is served (docs/security.md, "Fuzzing"; the long pass is documented there).
if [ "$status" = 0 ]; then
  cargo run --release --quiet -p pagerd-wire-fuzz -- --control-inputs 20000 --handoffs 2000 \
    --time-limit 300 --require-counts >target/wire-fuzz.txt 2>&1 ||
    { status=$?; cat target/wire-fuzz.txt; }
  tail -n 1 target/wire-fuzz.txt
  # The same as a --group member, which owns neither the victim nor its snapshot.
  cargo run --release --quiet -p pagerd-wire-fuzz -- --member --control-inputs 10000 \
    --handoffs 500 --time-limit 300 --require-counts >target/wire-fuzz-member.txt 2>&1 ||
    { status=$?; cat target/wire-fuzz-member.txt; }
  tail -n 1 target/wire-fuzz-member.txt
fi
# The libFuzzer targets (fuzz/), 20 s each, where the nightly toolchain and cargo-fuzz are.
if [ "$status" = 0 ]; then
  if cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    bash scripts/fuzz.sh 20 || status=$?
  else
    echo "!!!!!!!! SKIPPED: the libFuzzer targets (fuzz/) need 'cargo +nightly' and cargo-fuzz" >&2
    echo "!!!!!!!! (rustup toolchain install nightly; cargo install cargo-fuzz --locked)" >&2
    echo "libFuzzer targets (fuzz/): no 'cargo +nightly' or cargo-fuzz here" >>"$PAGERD_TEST_SKIPS"
  fi
fi
if [ -s "$PAGERD_TEST_SKIPS" ]; then
  echo "skipped tests:"
  sed 's/^/  /' "$PAGERD_TEST_SKIPS"
fi
skipped=$(wc -l <"$PAGERD_TEST_SKIPS")
awk -v t="$skipped_tests" -v s="$skipped" '/^test result:/ { p += $4; f += $6 }
  END { printf "all tests: %d passed, %d failed, %d skipped\n", p - t, f, s }' "$log"
exit "$status"
