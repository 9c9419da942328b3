#!/usr/bin/env bash
# Runs pagerd's libFuzzer targets (fuzz/; docs/security.md, "Fuzzing") for SECONDS each,
# starting from the committed seeds and the corpus kept in fuzz/corpus/ by earlier runs.
# Needs `cargo +nightly` and cargo-fuzz (scripts/setup.sh --for-tests installs it).
#
#   scripts/fuzz.sh [SECONDS [TARGET...]]     # default: 20 s, every target
#
# A crash leaves its input in fuzz/artifacts/TARGET/ and ends with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
shift || true
targets=("$@")
# Built in fuzz/target, apart from the workspace's target directory.
unset CARGO_TARGET_DIR
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz: $target for ${seconds}s"
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -dict=fuzz/dicts/json.dict -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 2>"fuzz/$target.log" || {
    status=$?
    tail -n 40 "fuzz/$target.log"
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target/)" >&2
    exit "$status"
  }
  grep -E '^stat::number_of_executed_units|^#[0-9]+ *DONE' "fuzz/$target.log" | tail -n 2 |
    sed "s/^/fuzz: $target: /"
done
