#!/usr/bin/env bash
# Writes Sources/epokd/function-order.txt, the order in which a release link lays out the functions epokd runs
# (see Package.swift): the functions executed by `--once` from a snapshot file, and by the daemon from a file and
# from the fake API server (first commit, drift checks, /metrics, /status.json, the page, `epokd status`), as
# valgrind's callgrind saw them, sorted by name (so that a new list differs from the old by what changed). The
# kernel maps a binary's code 64 KiB around each page a process touches; with the code a run needs side by side,
# fewer of those runs are resident.
# Run it after changes that move much code (a new Swift toolchain, a new dependency); a stale list only costs
# memory, never correctness. Needs root (network namespaces) and valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "function-order: run as root (it creates a network namespace)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "function-order: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
export PATH="/opt/swift/usr/bin:$PATH"
swift build -c release --static-swift-stdlib --product epokd 2>&1 | tail -1
swift build -c release --static-swift-stdlib --product epokd-bench 2>&1 | tail -1
bin=$(swift build -c release --static-swift-stdlib --show-bin-path)

work=$(mktemp -d)
ns="epk-order-$$"
cleanup() {
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth0 type veth peer name eth1
in_ns() { ip netns exec "$ns" "$@"; }
# valgrind cannot read the DWARF this toolchain writes; the symbol table is all it needs.
objcopy --strip-debug "$bin/epokd" "$work/epokd"
# More Services than a first fold files one by one (LiveDesiredState.upsertFirst), so that its pieces run too.
"$bin/epokd-bench" --write-snapshot 2500 "$work/services.json" >/dev/null
profile() { local name=$1; shift; in_ns valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/$name.out" "$@"; }

# Polls the daemon on PORT until it has made two clean drift checks, then asks everything it serves.
exercise() {
  local port=$1 count=""
  for _ in $(seq 600); do
    count=$( (in_ns curl -s "127.0.0.1:$port/metrics" || true) | awk '/^epokd_drift_checks_total\{result="clean"\}/ {print int($2)}')
    [ "${count:-0}" -ge 2 ] && break
    sleep 0.5
  done
  [ "${count:-0}" -ge 2 ] || { echo "function-order: the daemon on port $port made no two drift checks" >&2; exit 1; }
  in_ns curl -s "127.0.0.1:$port/status.json" >/dev/null
  in_ns curl -s "127.0.0.1:$port/" >/dev/null
  in_ns curl -s "127.0.0.1:$port/readyz" >/dev/null
  profile "status-$port" "$work/epokd" status --metrics-address "127.0.0.1:$port" >/dev/null
}

# SIGTERM to the daemon under valgrind (not to the shell that started it), which writes its profile as it exits.
stop() {
  pkill -TERM -f -- "--callgrind-out-file=$work/$2.out"
  wait "$1" || true
  [ -s "$work/$2.out" ] || { echo "function-order: no profile of the daemon ($2 source)" >&2; exit 1; }
}

profile once "$work/epokd" --interfaces eth0 --source "$work/services.json" --once --log-level error --metrics-address off
in_ns nft flush ruleset

profile file "$work/epokd" --interfaces eth0 --source "$work/services.json" --log-level error --drift-interval 1 \
  --metrics-address 127.0.0.1:9877 &
daemon=$!
exercise 9877
stop "$daemon" file
in_ns nft flush ruleset

SEED="$work/services.json" PORT=6443 in_ns bash scripts/fake-apiserver.sh "$work/api" >/dev/null 2>&1 &
for _ in $(seq 100); do [ -f "$work/api/kubeconfig" ] && break; sleep 0.2; done
profile api "$work/epokd" --interfaces eth0 --kubeconfig "$work/api/kubeconfig" --log-level error --drift-interval 1 \
  --metrics-address 127.0.0.1:9878 &
daemon=$!
exercise 9878
stop "$daemon" api

# Each function once, if the binary defines it (callgrind also names libc's).
nm --defined-only "$bin/epokd" | awk '{print $3}' | LC_ALL=C sort -u > "$work/defined"
cat "$work"/once.out "$work"/file.out "$work"/status-9877.out "$work"/api.out "$work"/status-9878.out \
  | sed -n 's/^c\{0,1\}fn=([0-9]*) //p' | LC_ALL=C sort -u \
  | LC_ALL=C join - "$work/defined" > Sources/epokd/function-order.txt
echo "function-order: Sources/epokd/function-order.txt lists $(wc -l < Sources/epokd/function-order.txt) functions"
# SwiftPM does not know the linker reads the list: without its binary, the next build links with the new one.
rm -f "$bin/epokd"
