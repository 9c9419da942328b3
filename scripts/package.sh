#!/usr/bin/env bash
# Builds the Debian packages of pagerd and prints their paths, one a line:
#   target/deb/pagerd_VERSION_ARCH.deb         the service
#   target/deb/pagerd-dbgsym_VERSION_ARCH.deb  its debug symbols
#
# pagerd holds the two binaries, stripped (/usr/bin/pagerd, /usr/bin/pagerctl), the systemd
# unit (/lib/systemd/system/pagerd.service), its options file /etc/default/pagerd (a
# conffile), manual pages pagerd(8), pagerctl(1) and one per pagerctl subcommand, and bash,
# zsh and fish completions, all generated from the binaries' own command lines; the
# maintainer scripts in dist/debian/ enable and start the service on install, reload it in
# place on upgrade and stop it on removal. pagerd-dbgsym holds the symbols the binaries were
# stripped of, under /usr/lib/debug/.build-id/, where gdb finds them by build id.
# Install with `dpkg -i` (docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins -p pagerd -p pagerd-ctl
bin=target/release
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
changelog_version=$(sed -n '1s/^pagerd (\([^)]*\)).*/\1/p' dist/debian/changelog)
if [ "$version" != "$changelog_version" ]; then
  echo "package: Cargo.toml says $version but dist/debian/changelog says $changelog_version" >&2
  exit 1
fi
arch=$(dpkg --print-architecture)
stage=target/deb/stage
dbgstage=target/deb/dbgsym
out=target/deb/pagerd_${version}_${arch}.deb
dbgout=target/deb/pagerd-dbgsym_${version}_${arch}.deb
rm -rf "$stage" "$dbgstage" "$out" "$dbgout"
mkdir -p "$stage/DEBIAN" "$dbgstage/DEBIAN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Binaries: the debug sections go to /usr/lib/debug/.build-id/XX/REST.debug in the dbgsym
# package, the binary keeps a link to that file (.gnu_debuglink) and loses its symbols.
build_ids=()
for name in pagerd pagerctl; do
  install -D -m 0755 "$bin/$name" "$stage/usr/bin/$name"
  id=$(readelf -n "$stage/usr/bin/$name" | sed -n 's/^ *Build ID: *//p')
  if [ -z "$id" ]; then
    echo "package: $bin/$name has no build id" >&2
    exit 1
  fi
  debug="$dbgstage/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
  mkdir -p "$(dirname "$debug")"
  objcopy --only-keep-debug --compress-debug-sections "$stage/usr/bin/$name" "$debug"
  chmod 0644 "$debug"
  strip --remove-section=.comment --remove-section=.note "$stage/usr/bin/$name"
  objcopy --add-gnu-debuglink="$debug" "$stage/usr/bin/$name"
  build_ids+=("$id")
done

install -D -m 0644 dist/systemd/pagerd.service "$stage/lib/systemd/system/pagerd.service"
install -D -m 0644 dist/default/pagerd "$stage/etc/default/pagerd"
for script in postinst prerm postrm; do
  install -m 0755 "dist/debian/$script" "$stage/DEBIAN/$script"
done
echo /etc/default/pagerd >"$stage/DEBIAN/conffiles"

# Manual pages and completions, from the binaries just built.
"$bin/pagerd" --write-docs "$work"
"$bin/pagerctl" man "$work/man1"
"$bin/pagerctl" completions bash >"$work/pagerctl.bash"
"$bin/pagerctl" completions zsh >"$work/_pagerctl"
"$bin/pagerctl" completions fish >"$work/pagerctl.fish"
install -D -m 0644 "$work/pagerd.8" "$stage/usr/share/man/man8/pagerd.8"
install -d "$stage/usr/share/man/man1"
install -m 0644 "$work"/man1/*.1 "$stage/usr/share/man/man1/"
gzip -9n "$stage"/usr/share/man/man8/*.8 "$stage"/usr/share/man/man1/*.1
for name in pagerd pagerctl; do
  install -D -m 0644 "$work/$name.bash" "$stage/usr/share/bash-completion/completions/$name"
  install -D -m 0644 "$work/_$name" "$stage/usr/share/zsh/vendor-completions/_$name"
  install -D -m 0644 "$work/$name.fish" "$stage/usr/share/fish/vendor_completions.d/$name.fish"
done

# Documentation: this repository's docs, the changelog and the copyright.
install -D -m 0644 README.md "$stage/usr/share/doc/pagerd/README.md"
for page in docs/*.md; do
  install -D -m 0644 "$page" "$stage/usr/share/doc/pagerd/$page"
done
install -D -m 0644 dist/debian/copyright "$stage/usr/share/doc/pagerd/copyright"
install -D -m 0644 dist/debian/changelog "$stage/usr/share/doc/pagerd/changelog"
gzip -9n "$stage/usr/share/doc/pagerd/changelog"
# The symbols package shares them, as Debian's automatic debug packages do.
mkdir -p "$dbgstage/usr/share/doc"
ln -s pagerd "$dbgstage/usr/share/doc/pagerd-dbgsym"

# Shared-library dependencies of the binaries, as dpkg-shlibdeps finds them.
mkdir -p "$work/src/debian"
printf 'Source: pagerd\n\nPackage: pagerd\nArchitecture: any\n' >"$work/src/debian/control"
depends=$(cd "$work/src" && dpkg-shlibdeps -O "$OLDPWD/$stage/usr/bin/pagerd" \
  "$OLDPWD/$stage/usr/bin/pagerctl" | sed -n 's/^shlibs:Depends=//p')

maintainer=$(sed -n '0,/^ -- /s/^ -- \(.*>\)  .*/\1/p' dist/debian/changelog)
installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: pagerd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Section: admin
Priority: optional
Installed-Size: $installed_kib
Depends: $depends
Recommends: systemd
Description: page daemon serving forked microVMs' memory
 pagerd owns snapshot memory files and serves every fork's memory on demand:
 through userfaultfd (the VMM hands its uffd to pagerd, as Firecracker does)
 and through read-only memory files on a FUSE mount that forks map
 copy-on-write. pagerctl manages snapshots, forks and references over its
 JSON control socket.
CONTROL
dbg_kib=$(du -sk --exclude=DEBIAN "$dbgstage" | cut -f1)
cat >"$dbgstage/DEBIAN/control" <<CONTROL
Package: pagerd-dbgsym
Source: pagerd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Section: debug
Priority: optional
Installed-Size: $dbg_kib
Depends: pagerd (= $version)
Auto-Built-Package: debug-symbols
Build-Ids: ${build_ids[*]}
Description: debug symbols for pagerd
 The symbols stripped from /usr/bin/pagerd and /usr/bin/pagerctl, found by gdb
 through the binaries' build ids.
CONTROL
# Checksums of every file but the conffile (dpkg keeps its own for that).
for dir in "$stage" "$dbgstage"; do
  (cd "$dir" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' |
    sort -z | xargs -0 md5sum >DEBIAN/md5sums)
done
dpkg-deb --build --root-owner-group "$stage" "$out" >/dev/null
dpkg-deb --build --root-owner-group "$dbgstage" "$dbgout" >/dev/null
echo "$out"
echo "$dbgout"
