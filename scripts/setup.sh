#!/usr/bin/env bash
# Installs what building and testing pagerd needs on a fresh machine (Debian, as root).
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(
  libclang-dev # userfaultfd-sys generates its bindings with bindgen, which needs libclang
  systemd      # systemd-analyze checks the shipped unit (systemd need not be running)
  prometheus   # the metrics tests scrape pagerd with a real Prometheus and run promtool
  dpkg-dev     # scripts/package.sh: dpkg-shlibdeps finds the binaries' library dependencies
  binutils     # scripts/package.sh: objcopy and strip split the debug symbols off
  lintian      # the package test: no lintian errors
  man-db       # the package test: every manual page renders with `man -l`
  file         # the package test: the installed binaries are stripped
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
# QEMU >= 8.2 (rom=off, for clones that map the FUSE memory file read-only) comes from
# bookworm-backports: add that suite with the mirror the existing entries use, if missing.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 \
  || ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo 0)" ge 1:8.2; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}' | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "setup: adding bookworm-backports from $mirror"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" >/etc/apt/sources.list.d/backports.sources
  fi
  echo "setup: installing qemu-system-x86 from bookworm-backports"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
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
