#!/usr/bin/env bash
# Checks the container image's contents without a registry: builds the tree the Containerfile's final stage
# copies (scripts/build.sh --bundle) and runs epokd from it in a chroot, with its own /proc as a container has,
# in a throwaway network namespace: it must start, read a snapshot and program the table with only those files.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "container-check: run as root (chroot, network namespaces)" >&2; exit 1; }
root=.build/rootfs
bash scripts/build.sh --bundle "$root"
mkdir -p "$root/proc"
cat > "$root/cluster.json" <<'JSON'
{"kind": "List", "items": [
  {"kind": "Service", "metadata": {"name": "ssh", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "22:30022"}},
   "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}},
  {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}],
   "conditions": [{"type": "Ready", "status": "True"}]}}]}
JSON
ns="epk-container-$$"
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
in_image() { ip netns exec "$ns" unshare --mount --pid --fork --mount-proc="$root/proc" chroot "$root" /usr/local/bin/epokd "$@"; }
version=$(in_image --version)
[[ "$version" =~ ^epokd\ [0-9]+\.[0-9]+\.[0-9]+\ \(commit\ [0-9a-f]{12} ]] || { echo "container-check: --version said: $version" >&2; exit 1; }
in_image --interfaces lo --once --metrics-address off --source /cluster.json
table=$(ip netns exec "$ns" nft list table inet epok)
grep -q 'comment "default/ssh"' <<<"$table" || { echo "container-check: the table has no element for default/ssh:" >&2; echo "$table" >&2; exit 1; }
echo "container-check: $version runs from $root alone ($(du -sm "$root" | cut -f1) MiB) and programmed its table"
