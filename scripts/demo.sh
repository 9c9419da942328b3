#!/usr/bin/env bash
# The demo: one pagerd serving forks of one snapshot at once, and launching VMs from another.
#
# It builds pagerd, writes a 256 MiB snapshot memory file (64 MiB of data, the rest zeros, as
# real VM memory mostly is), starts pagerd, registers the file as a snapshot and creates eight
# forks with `pagerctl`, and starts a
# synthetic VMM per fork. Each VMM restores its memory exactly as Firecracker does (anonymous
# private memory registered with userfaultfd, handed to pagerd over the fork's socket), reads
# every page and checks it byte for byte against the snapshot. The first two forks recorded
# the snapshot's working set: four more forks get it installed before their guests ask (three
# replay it, one on demand, for comparison). Then four more VMMs map the
# snapshot's memory file from pagerd's read-only FUSE mount MAP_PRIVATE (the fallback for VMMs
# that can only map a file), check it the same way and hold it: while they do, the snapshot
# cannot be deleted. Then pagerd launches Firecracker VMs from a snapshot of a tiny guest (three
# on the uffd backend, two on its FUSE memory file); each guest checks the memory it had at the
# snapshot and says OK on its console. Then `pagerctl` shows what pagerd did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --quiet
bin=target/release
work=$(mktemp -d /tmp/pagerd-demo.XXXXXX)
pagerd_pid=
cleanup() {
  [ -n "$pagerd_pid" ] && kill "$pagerd_pid" 2>/dev/null && wait "$pagerd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== writing a 256 MiB snapshot (64 MiB of data, 192 MiB of zeros) in $work"
head -c 64M /dev/urandom >"$work/memory"
truncate -s 256M "$work/memory"

echo "== starting pagerd and registering the snapshot"
# The hypervisor pagerd launches VMs with: $FIRECRACKER, else the vendored one beside the project.
export FIRECRACKER=${FIRECRACKER:-$(cd .. && pwd)/shared/vendor/firecracker/firecracker}
export PAGERD_STATE_DIR="$work/state"  # pagerctl finds the control socket there
# pagerd prints one line once it serves; read it from a pipe (EOF means it died).
exec {ready}< <(exec "$bin/pagerd" 2>"$work/pagerd.log")
pagerd_pid=$!
if ! read -r -t 60 -u "$ready" line || [[ "$line" != "pagerd ready"* ]]; then
  cat "$work/pagerd.log"
  echo "pagerd did not start" >&2
  exit 1
fi
"$bin/pagerctl" snapshot add base "$work/memory"
"$bin/pagerctl" status

echo "== creating 8 forks and starting a synthetic VMM on each"
vmm_pids=()
for i in $(seq 1 8); do
  socket=$("$bin/pagerctl" fork create base --id "vm$i")
  order=$([ $((i % 2)) = 0 ] && echo random || echo sequential)
  "$bin/synthetic-vmm" --snapshot "$work/memory" --socket "$socket" --order "$order" verify \
    >"$work/vm$i.out" &
  vmm_pids+=($!)
done
failed=0
for i in $(seq 1 8); do
  wait "${vmm_pids[$((i - 1))]}" || failed=1
  report=$(grep '"verified"' "$work/vm$i.out" || true)
  echo "vm$i: ${report:-FAILED}"
done
for i in $(seq 1 8); do "$bin/pagerctl" fork wait "vm$i" ended >/dev/null; done

echo "== the first two forks recorded the snapshot's working set; 4 new forks get it before they fault"
# pagerd merges and stores the set just after the recording forks end.
for _ in $(seq 300); do
  "$bin/pagerctl" snapshot get base | grep -q '^working set: [0-9]' && break
  sleep 0.1
done
"$bin/pagerctl" snapshot get base
for i in $(seq 9 12); do
  prefetch=$([ "$i" = 12 ] && echo off || echo working_set)
  socket=$("$bin/pagerctl" fork create base --id "vm$i" --prefetch "$prefetch")
  "$bin/synthetic-vmm" --snapshot "$work/memory" --socket "$socket" --order random verify \
    >"$work/vm$i.out" || failed=1
  "$bin/pagerctl" fork wait "vm$i" ended >/dev/null
  grep -q '"verified"' "$work/vm$i.out" || { echo "vm$i FAILED"; failed=1; }
  summary=$("$bin/pagerctl" fork get "vm$i" | grep -E '^  (faults|prefetched):' | tr -s ' ' | tr '\n' ';')
  echo "vm$i (prefetch $prefetch): $summary"
  if [ "$prefetch" = working_set ] && echo "$summary" | grep -q 'prefetched: 0 pages replayed'; then
    echo "vm$i did not replay the working set"; failed=1
  fi
done

echo "== 4 VMMs map the FUSE memory file MAP_PRIVATE and hold it"
file="$work/state/fuse/snapshots/base/memory"
ls -l "$file"
mkfifo "$work/hold"
file_pids=()
for i in $(seq 1 4); do
  "$bin/synthetic-vmm" --snapshot "$work/memory" --memory-file "$file" --order random \
    verify hold <"$work/hold" >"$work/file$i.out" &
  file_pids+=($!)
done
exec {hold}>"$work/hold"
for i in $(seq 1 4); do
  for _ in $(seq 1 600); do grep -q '"holding"' "$work/file$i.out" && break; sleep 0.1; done
  grep '"verified"' "$work/file$i.out" | sed "s/^/file$i: /" || { echo "file$i FAILED"; failed=1; }
done

echo "== launching Firecracker VMs from a snapshot bundle: pagerd starts them and serves their memory"
vms=()
if [ -e /dev/kvm ] && "$bin/fc-fixture" --out "$work/guest" >/dev/null 2>"$work/fixture.log"; then
  "$bin/pagerctl" snapshot add guest "$work/guest/memory" --vmstate "$work/guest/vmstate" --vmm firecracker
  for i in 1 2 3; do "$bin/pagerctl" vm start guest --id "fc-uffd$i" --backend uffd >/dev/null; vms+=("fc-uffd$i"); done
  for i in 1 2; do "$bin/pagerctl" vm start guest --id "fc-file$i" --backend file >/dev/null; vms+=("fc-file$i"); done
  for vm in "${vms[@]}"; do
    "$bin/pagerctl" vm wait "$vm" running --timeout-ms 60000 >/dev/null
    console=$("$bin/pagerctl" vm get "$vm" --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
    # The guest prints OK after each pass over the memory it filled before the snapshot.
    for _ in $(seq 1 600); do grep -q '^OK' "$console" 2>/dev/null && break; sleep 0.1; done
    if grep -q '^BAD' "$console" || ! grep -q '^OK' "$console"; then
      echo "$vm: its guest did not see its memory"; failed=1
    else
      echo "$vm: guest checked its memory: $(grep -c '^OK' "$console") passes OK"
    fi
  done
  "$bin/pagerctl" vm ls
else
  echo "Firecracker VMs skipped: $(cat "$work/fixture.log" 2>/dev/null)${FIRECRACKER:+ (FIRECRACKER=$FIRECRACKER)}"
fi

echo "== what pagerd did"
"$bin/pagerctl" fork ls
"$bin/pagerctl" stats
echo "== deleting the snapshot while VMMs hold its memory file is refused:"
if "$bin/pagerctl" snapshot rm base; then
  echo "demo FAILED: a held snapshot was deleted" >&2
  exit 1
fi
exec {hold}>&-
for pid in "${file_pids[@]}"; do wait "$pid" || failed=1; done
for i in $(seq 1 12); do "$bin/pagerctl" fork close "vm$i" >/dev/null; done
for _ in $(seq 1 100); do
  "$bin/pagerctl" fork ls --json | grep -q '"file"' || break
  sleep 0.1
done
"$bin/pagerctl" snapshot rm base
for vm in "${vms[@]}"; do "$bin/pagerctl" vm stop "$vm" >/dev/null; done
if ((${#vms[@]})); then "$bin/pagerctl" snapshot rm guest; fi
"$bin/pagerctl" status
if [ "$failed" != 0 ]; then
  echo "demo FAILED: a fork saw wrong memory" >&2
  exit 1
fi
echo "demo OK: 12 uffd forks (3 of them replaying the recorded working set) and 4 FUSE forks read all 256 MiB each, byte for byte equal to the snapshot${vms:+; ${#vms[@]} Firecracker VMs launched by pagerd checked their memory}"
