#!/usr/bin/env bash
# Runs epokd's whole test suite: builds (failing on any warning in the project's own code),
# then runs the unit tests and the real-kernel tests, each in throwaway network namespaces.
# Needs root (network namespaces, nftables); never touches the root namespace's ruleset.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test: run as root (the tests create network namespaces and program nftables inside them)" >&2
  exit 1
fi
bash scripts/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
swift build --build-tests 2>&1 | tee "$log"
if grep -E "^$(pwd)/(Sources|Tests)/.*warning:" "$log"; then
  echo "test: the build has warnings (listed above)" >&2
  exit 1
fi
swift test --skip-build "$@"
