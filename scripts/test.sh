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
# Namespaces a crashed earlier run could not delete (the tests name theirs epk-*): nothing else is touched.
for ns in $(ip netns list | awk '$1 ~ /^epk-/ {print $1}'); do ip netns del "$ns"; done

log=$(mktemp)
trap 'rm -f "$log"' EXIT
swift build --build-tests 2>&1 | tee "$log"
if grep -E "^$(pwd)/(Sources|Tests)/.*warning:" "$log"; then
  echo "test: the build has warnings (listed above)" >&2
  exit 1
fi
# First the suites that need no privilege at all (pure logic, and the reconcile loop against an in-memory
# kernel), run as nobody to prove it; then everything, as root, including the real-kernel and packet tests.
unprivileged='AddressOwnershipTests|TraceExplanationTests|NodeViewTests|ReservedAddressTests|CoalescingTests|SlipTests|MultiDocumentTests|ReferenceGrantTests|FlowOwnershipTests|YAMLSnapshotTests|KubernetesReadingTests|DNSNameTests|DNSRecordsTests|HostsFileTests|FieldListTests|StringMapTests|PackedTextTests|StringScanTests|SnapshotStampTests|NewerRefusalTests|JSONReaderTests|EgressStateTests|StaticEgressIPStateTests|BridgeStateTests|StaticSourcesFileTests|LoadBalancerStateTests|LocalPolicyTests|HealthStateTests|KubeProxyHealthTests|HealthViewLifecycleTests|ReconcileLoopTests|ReconcileReportTests|HostileInputTests|DesiredStateTests|LiveDesiredStateTests|AnnotationParserTests|StaleFlowsTests|AddressRangeTests|JSONStreamTests|SnapshotStreamTests'
bundle="$(swift build --show-bin-path)/epokdPackageTests.xctest"
as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all)
if [ $# -eq 0 ] && command -v setpriv >/dev/null && ! "${as_nobody[@]}" test -x "$bundle"; then
  echo "test: $bundle is out of nobody's reach (a private checkout directory); the unprivileged suites run with the rest, as root"
elif [ $# -eq 0 ] && command -v setpriv >/dev/null; then
  start=$(date +%s%N)
  status=0
  "${as_nobody[@]}" "$bundle" --testing-library swift-testing --filter "$unprivileged" >"$log" 2>&1 || status=$?
  grep -E "Test run with|✘|recorded an issue" "$log" || true
  echo "test: the unprivileged suites ran as nobody in $(( ($(date +%s%N) - start) / 1000000 )) ms (exit $status)"
  [ "$status" -eq 0 ] || exit "$status"
fi
# A test process that crashes must not leave the run waiting forever on children that still hold its pipes (the
# fake API server, a daemon): the tests run in a session of their own, for at most 20 minutes (they take about
# 2), and whatever is left of that session is killed when they end.
setsid swift test --skip-build --disable-xctest "$@" &
tests=$!
(
  for _ in $(seq 1200); do sleep 1; kill -0 "$tests" 2>/dev/null || exit 0; done
  echo "test: still running after 20 minutes; stopped" >&2
  pkill -KILL -s "$tests"
) &
watchdog=$!
status=0
wait "$tests" || status=$?
wait "$watchdog" || true
pkill -KILL -s "$tests" 2>/dev/null || true
[ "$status" -eq 0 ] || exit "$status"
# The status page in a real browser (Playwright driving chromium), against the daemon in a namespace of its own.
if [ $# -eq 0 ]; then
  timeout 300 python3 Tests/Browser/status_page_test.py "$(swift build --show-bin-path)/epokd"
fi
