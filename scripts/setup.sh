#!/usr/bin/env bash
# Installs what building and testing pagerd needs on a fresh machine (Debian, as root).
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(
  libclang-dev # userfaultfd-sys generates its bindings with bindgen, which needs libclang
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# cargo-fuzz runs the libFuzzer targets (fuzz/); it needs the nightly toolchain, and building
# it takes about two minutes once.
if cargo +nightly --version >/dev/null 2>&1; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
else
  echo "setup: warning: no nightly toolchain; the libFuzzer targets (fuzz/) will be skipped" >&2
fi
for dev in /dev/userfaultfd /dev/kvm /dev/fuse; do
  [ -e "$dev" ] || echo "setup: warning: $dev is missing; tests that need it will fail" >&2
done
