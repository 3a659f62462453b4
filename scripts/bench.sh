#!/usr/bin/env bash
# Runs epokd's benchmarks (release build), each in throwaway network namespaces, with the tools epokd
# replaces (nft -f, iptables-restore, nft add element, conntrack -D) measured side by side.
#   scripts/bench.sh           full mode: N = 1k, 10k, 50k (a few minutes)
#   scripts/bench.sh --quick   what CI runs: N = 1k, 10k, checked against Benchmarks/thresholds.json
#   scripts/bench.sh --rule-costs   what each rule of the skeleton costs new forwarded flows (a few minutes)
#   scripts/bench.sh --high-availability-only   the failover and ECMP rows (keepalived, conntrackd; a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (it creates network namespaces)" >&2; exit 1; }
export PATH="/opt/swift/usr/bin:$PATH"
bash scripts/setup.sh >/dev/null
# The binary an operator installs (see "Installing" in README.md): the Swift runtime linked in.
swift build -c release --static-swift-stdlib --product epokd 2>&1 | tail -1
swift build -c release --static-swift-stdlib --product epokd-bench 2>&1 | tail -1
bin=$(swift build -c release --static-swift-stdlib --show-bin-path)
# The packet-path benchmark's traffic generator (C, raw frames from many sources).
gcc -O2 -Wall -o "$bin/udpflood" Benchmarks/packetpath/udpflood.c
export EPOKD_UDPFLOOD="$bin/udpflood"
gcc -O2 -Wall -o "$bin/tcplatency" Benchmarks/packetpath/tcplatency.c
export EPOKD_TCPLATENCY="$bin/tcplatency"
if [ "${1:-}" = "--quick" ]; then
  EPOKD_BINARY="$bin/epokd" "$bin/epokd-bench" --quick --check Benchmarks/thresholds.json
else
  EPOKD_BINARY="$bin/epokd" "$bin/epokd-bench" "$@"
fi
