#!/usr/bin/env bash
# Builds the Debian package of pagerd: target/deb/pagerd_VERSION_ARCH.deb.
#
# It holds the two binaries (/usr/bin/pagerd, /usr/bin/pagerctl), the systemd unit
# (/lib/systemd/system/pagerd.service), manual pages pagerd(8) and pagerctl(1), and bash, zsh
# and fish completions, all generated from the binaries' own command lines. Install it with
# `dpkg -i`, then `systemctl enable --now pagerd` (docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins -p pagerd -p pagerd-ctl
bin=target/release
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
stage=target/deb/stage
out=target/deb/pagerd_${version}_${arch}.deb
rm -rf "$stage" "$out"
mkdir -p "$stage/DEBIAN"

install -D -m 0755 "$bin/pagerd" "$stage/usr/bin/pagerd"
install -D -m 0755 "$bin/pagerctl" "$stage/usr/bin/pagerctl"
install -D -m 0644 dist/systemd/pagerd.service "$stage/lib/systemd/system/pagerd.service"

docs=$(mktemp -d)
trap 'rm -rf "$docs"' EXIT
"$bin/pagerd" --write-docs "$docs"
"$bin/pagerctl" man "$docs"
"$bin/pagerctl" completions bash >"$docs/pagerctl.bash"
"$bin/pagerctl" completions zsh >"$docs/_pagerctl"
"$bin/pagerctl" completions fish >"$docs/pagerctl.fish"
install -D -m 0644 "$docs/pagerd.8" "$stage/usr/share/man/man8/pagerd.8"
install -D -m 0644 "$docs/pagerctl.1" "$stage/usr/share/man/man1/pagerctl.1"
gzip -9n "$stage/usr/share/man/man8/pagerd.8" "$stage/usr/share/man/man1/pagerctl.1"
for name in pagerd pagerctl; do
  install -D -m 0644 "$docs/$name.bash" "$stage/usr/share/bash-completion/completions/$name"
  install -D -m 0644 "$docs/_$name" "$stage/usr/share/zsh/vendor-completions/_$name"
  install -D -m 0644 "$docs/$name.fish" "$stage/usr/share/fish/vendor_completions.d/$name.fish"
done
install -D -m 0644 README.md "$stage/usr/share/doc/pagerd/README.md"
for page in docs/*.md; do
  install -D -m 0644 "$page" "$stage/usr/share/doc/pagerd/$page"
done
cat >"$stage/usr/share/doc/pagerd/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pagerd
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: pagerd
Version: $version
Architecture: $arch
Maintainer: pagerd developers <pagerd@localhost>
Section: admin
Priority: optional
Installed-Size: $installed_kib
Depends: libc6 (>= 2.36)
Recommends: systemd
Description: page daemon serving forked microVMs' memory
 pagerd owns snapshot memory files and serves every fork's memory on demand:
 through userfaultfd (the VMM hands its uffd to pagerd, as Firecracker does)
 and through read-only memory files on a FUSE mount that forks map
 copy-on-write. pagerctl manages snapshots, forks and references over its
 JSON control socket.
CONTROL
dpkg-deb --build --root-owner-group "$stage" "$out" >/dev/null
echo "$out"
