#!/usr/bin/env bash
# Runs test suites again under the sanitizers (CI does, after scripts/test.sh):
#   - AddressSanitizer for Swift and C, with UndefinedBehaviorSanitizer for the C code (the netfilter shim,
#     libyaml, SwiftNIO's C parts; Swift has no UBSan and traps on overflow itself): the unprivileged suites, and
#     the kernel suites that drive the C shim hardest (batches, element encodings, hostile input into the kernel);
#   - ThreadSanitizer: the threaded components (the reconcile loop, the informers and cluster watch, the health
#     prober, the event recorder, the drift checker beside the loop, a large snapshot read in two parts at once,
#     a large first snapshot filed while another thread makes its Services' own parts).
# Each build has a scratch folder of its own (.build-asan, .build-tsan); any sanitizer report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "sanitize: run as root (the kernel suites create network namespaces)" >&2; exit 1; }
export PATH="/opt/swift/usr/bin:$PATH"
bash scripts/setup.sh >/dev/null
unprivileged=$(sed -n "s/^unprivileged='\(.*\)'$/\1/p" scripts/test.sh)
[ -n "$unprivileged" ] || { echo "sanitize: no unprivileged suites found in scripts/test.sh" >&2; exit 1; }

# Runs the suites matching $3 from bundle $2 under sanitizer $1; fails on a failed test or any report.
check() {
  local name=$1 bundle=$2 filter=$3 log status=0 reports
  log=$(mktemp)
  "$bundle" --testing-library swift-testing --filter "$filter" >"$log" 2>&1 || status=$?
  grep -E "Test run with" "$log" || true
  reports=$(grep -cE "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer" "$log" || true)
  if [ "$status" -ne 0 ] || [ "$reports" -ne 0 ]; then
    grep -E -A20 "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer|✘" "$log" | head -120
    echo "sanitize: $name: exit $status, $reports reports" >&2
    rm -f "$log"
    exit 1
  fi
  echo "sanitize: $name: no reports"
  rm -f "$log"
}

export LSAN_OPTIONS="suppressions=$(pwd)/scripts/lsan.supp"
swift build --build-tests --sanitize=address -Xcc -fsanitize=undefined -Xcc -fno-sanitize-recover=undefined \
  --scratch-path .build-asan 2>&1 | grep -E "error:|Compiling epokd|Build complete" | tail -2
check "AddressSanitizer + UBSan" .build-asan/debug/epokdPackageTests.xctest "$unprivileged|TransactionTests|HardeningTests|HostileInputTests|StaleFlowsTests|ComparedReadTests"

swift build --build-tests --sanitize=thread --scratch-path .build-tsan 2>&1 | grep -E "error:|Build complete" | tail -2
check "ThreadSanitizer" .build-tsan/debug/epokdPackageTests.xctest "ReconcileLoopTests|ReconcileReportTests|KubeClientTests|WatchRobustnessTests|HealthProberTests|DriftCheckTests|SnapshotStreamTests/(twoParts|largeListInTwoParts)|LiveDesiredStateTests/largeFirstSnapshot"
