#!/usr/bin/env bash
# Installs what pagerd needs on a fresh machine (Debian, as root). Safe to run again: it
# installs only what is missing.
#
#   scripts/setup.sh              building pagerd and running the demo (scripts/demo.sh)
#   scripts/setup.sh --for-tests  that, and what only the tests need (scripts/test.sh):
#                                 systemd, prometheus, tmux, the packaging tools (dpkg-dev,
#                                 binutils, lintian, man-db, file), QEMU >= 8.2, cargo-fuzz
#   scripts/setup.sh [--for-tests] --plan   lists what it covers, one line each; installs nothing
#   scripts/setup.sh --mirror     prints the Debian mirror bookworm-backports would be added
#                                 from (the one apt's own sources use), or fails saying why
#
# $PAGERD_APT_DIR names apt's configuration directory (default /etc/apt).
set -euo pipefail

for_tests=false
mode=install
for arg in "$@"; do
  case "$arg" in
    --for-tests) for_tests=true ;;
    --plan) mode=plan ;;
    --mirror) mode=mirror ;;
    *)
      echo "usage: $0 [--for-tests] [--plan | --mirror]" >&2
      exit 2
      ;;
  esac
done
apt_dir=${PAGERD_APT_DIR:-/etc/apt}

# The mirror apt's own Debian entries use (deb822 .sources first, then one-line .list
# entries), security archives left out. Nothing is guessed: no entry, no mirror.
debian_mirror() {
  local mirror
  mirror=$(
    {
      grep -hs '^URIs:' "$apt_dir"/sources.list.d/*.sources | awk '{ for (i = 2; i <= NF; i++) print $i }'
      grep -hs '^deb ' "$apt_dir"/sources.list "$apt_dir"/sources.list.d/*.list |
        sed 's/\[[^]]*\]//' | awk '{ print $2 }'
    } | grep -v -- '-security' | grep -v '^$' | head -n1 || true
  )
  if [ -z "$mirror" ]; then
    echo "setup: no Debian mirror in apt's sources ($apt_dir/sources.list, $apt_dir/sources.list.d/)" >&2
    echo "setup: add the mirror you use there, or install qemu-system-x86 >= 8.2 yourself" >&2
    return 1
  fi
  echo "$mirror"
}

if [ "$mode" = mirror ]; then
  debian_mirror
  exit
fi

packages=(
  libclang-dev # userfaultfd-sys generates its bindings with bindgen, which needs libclang
)
if $for_tests; then
  packages+=(
    systemd    # systemd-analyze checks the shipped unit (systemd need not be running)
    prometheus # the metrics tests scrape pagerd with a real Prometheus and run promtool
    tmux       # pagerctl top is tested at a real terminal
    dpkg-dev   # scripts/package.sh: dpkg-shlibdeps finds the binaries' library dependencies
    binutils   # scripts/package.sh: objcopy and strip split the debug symbols off
    lintian    # the package test: no lintian errors
    man-db     # the package test: every manual page renders with `man -l`
    file       # the package test: the installed binaries are stripped
  )
fi
if [ "$mode" = plan ]; then
  printf 'apt %s\n' "${packages[@]}"
  if $for_tests; then
    echo "apt qemu-system-x86 (>= 8.2, from bookworm-backports)"
    echo "cargo cargo-fuzz (with the nightly toolchain)"
  fi
  exit
fi

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if $for_tests; then
  # QEMU >= 8.2 (rom=off, for clones that map the FUSE memory file read-only) comes from
  # bookworm-backports: add that suite with the mirror the existing entries use, if missing.
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1 \
    || ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo 0)" ge 1:8.2; then
    if ! grep -rqs 'bookworm-backports' "$apt_dir"/sources.list "$apt_dir"/sources.list.d/; then
      mirror=$(debian_mirror)
      echo "setup: adding bookworm-backports from $mirror"
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" >"$apt_dir"/sources.list.d/backports.sources
    fi
    echo "setup: installing qemu-system-x86 from bookworm-backports"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-x86 >/dev/null
  fi
  # cargo-fuzz runs the libFuzzer targets (fuzz/); it needs the nightly toolchain, and
  # building it takes minutes once.
  if cargo +nightly --version >/dev/null 2>&1; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
      echo "setup: installing cargo-fuzz"
      cargo install cargo-fuzz --locked --quiet
    fi
  else
    echo "setup: warning: no nightly toolchain; the libFuzzer targets (fuzz/) will be skipped" >&2
  fi
fi
for dev in /dev/userfaultfd /dev/kvm /dev/fuse; do
  [ -e "$dev" ] || echo "setup: warning: $dev is missing; what needs it will fail" >&2
done
