#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, lints, unit and end-to-end tests
# (real userfaultfd, real pagerd processes). Needs root (hugetlbfs pages, /dev/userfaultfd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
