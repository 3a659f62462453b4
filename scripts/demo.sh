#!/usr/bin/env bash
# A demo that needs no cluster: throwaway network namespaces play the host, a client and two
# nodes; epokd programs the host namespace from examples/demo-cluster.yaml; the client's
# connections to the host's port 80 and 53/udp come back from the nodes. Everything it creates
# is removed on exit. Needs root; never touches this machine's own ruleset.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
export PATH="/opt/swift/usr/bin:$PATH"
bash scripts/setup.sh >/dev/null
echo "== building epokd"
swift build --product epokd 2>&1 | tail -1
epokd=$(swift build --show-bin-path)/epokd

p="epokd-demo-$$"
work=$(mktemp -d)
cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  for ns in host client n1 n2; do ip netns del "$p-$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for ns in host client n1 n2; do
  ip netns add "$p-$ns"
  ip -n "$p-$ns" link set lo up
  ip netns exec "$p-$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ip link add eth0 netns "$p-host" type veth peer name eth0 netns "$p-client"
ip -n "$p-host" addr add 198.51.100.1/24 dev eth0; ip -n "$p-host" link set eth0 up
ip -n "$p-client" addr add 198.51.100.2/24 dev eth0; ip -n "$p-client" link set eth0 up
ip -n "$p-client" route add default via 198.51.100.1
ip -n "$p-host" link add br0 type bridge; ip -n "$p-host" link set br0 up
ip -n "$p-host" addr add 10.0.1.254/24 dev br0
for i in 1 2; do
  ip link add "n$i" netns "$p-host" type veth peer name eth0 netns "$p-n$i"
  ip -n "$p-host" link set "n$i" master br0 up
  ip -n "$p-n$i" addr add "10.0.1.$i/24" dev eth0; ip -n "$p-n$i" link set eth0 up
  ip -n "$p-n$i" route add default via 10.0.1.254
  ip netns exec "$p-n$i" socat TCP-LISTEN:30080,fork,reuseaddr SYSTEM:"echo HTTP from node-$i" &
  ip netns exec "$p-n$i" socat UDP-RECVFROM:30053,fork SYSTEM:"echo DNS answer from node-$i" &
done
# Wait until every node server listens (the UDP one binds anew after each datagram it answers: waited for
# before each query too).
wait_udp() {
  for i in 1 2; do
    for _ in $(seq 100); do ip netns exec "$p-n$i" ss -lun | grep -q ':30053 ' && break; sleep 0.05; done
  done
}
for i in 1 2; do
  for _ in $(seq 100); do ip netns exec "$p-n$i" ss -ltn | grep -q ':30080' && break; sleep 0.05; done
done
wait_udp

cp examples/demo-cluster.yaml "$work/cluster.yaml"
host() { ip netns exec "$p-host" "$@"; }

echo; echo "== epokd --dry-run: what it would do"
host "$epokd" --interfaces eth0 --external-interface eth0 --source "$work/cluster.yaml" --dry-run --enable-forwarding
echo; echo "== epokd --once: apply it (one netlink transaction); the Service with a typo (tpc) is refused and listed, which alone would make the exit status 2 (--allow-problems: 0)"
host "$epokd" --interfaces eth0 --external-interface eth0 --source "$work/cluster.yaml" --once --allow-problems --enable-forwarding
echo; echo "== client -> host 198.51.100.1:80 (tcp), four new connections"
for _ in 1 2 3 4; do ip netns exec "$p-client" socat -T2 - TCP:198.51.100.1:80 </dev/null; done
echo "== client -> host 198.51.100.1:53 (udp)"
for _ in 1 2; do wait_udp; echo q | ip netns exec "$p-client" socat -T1 - UDP:198.51.100.1:53; done
echo "== client -> host 198.51.100.1:8443 (internal service, from the external interface: dropped)"
ip netns exec "$p-client" socat -T1 - TCP:198.51.100.1:8443,connect-timeout=1 </dev/null 2>/dev/null && echo "reached?!" || echo "no answer (dropped), as it should be"

echo; echo "== node-2 goes NotReady: epokd applies only the element diff"
sed -i '/name: node-2/,/Ready/ s/status: "True"/status: "False"/' "$work/cluster.yaml"
host "$epokd" --interfaces eth0 --external-interface eth0 --source "$work/cluster.yaml" --once --allow-problems
for _ in 1 2 3 4; do ip netns exec "$p-client" socat -T2 - TCP:198.51.100.1:80 </dev/null; done

echo; echo "== epokd status: the mappings the kernel holds, with their Services and counters"
host "$epokd" status

echo; echo "== the kernel's table, as nft prints it (the daemon itself never runs nft)"
host nft list table inet epok | awk '/^\t\t\t     [0-9]+ : /{if(!cut){print "\t\t\t     ... (one element per slot)"; cut=1}; next} {cut=0; print}'

echo; echo "== a MetalLB router: LoadBalancer IP 203.0.113.10 is routed to node-1; epokd --firewall-interface eth0"
ip -n "$p-n1" addr add 203.0.113.10/32 dev lo
ip -n "$p-host" route add 203.0.113.10/32 via 10.0.1.1
ip netns exec "$p-n1" socat TCP-LISTEN:443,fork,reuseaddr SYSTEM:"echo HTTPS from node-1 via its LoadBalancer IP" &
for _ in $(seq 100); do ip netns exec "$p-n1" ss -ltn | grep -q ':443' && break; sleep 0.05; done
cat >> "$work/cluster.yaml" <<'YAML'
- apiVersion: v1
  kind: Service
  metadata:
    name: web
    namespace: default
    creationTimestamp: "2024-03-04T12:00:00Z"
    annotations:
      ratelimit: "2 mbytes/second burst 512 kbytes"
  spec:
    type: LoadBalancer
    ports:
    - {name: https, protocol: TCP, port: 443, nodePort: 30444}
  status:
    loadBalancer:
      ingress: [{ip: 203.0.113.10}]
YAML
host "$epokd" --interfaces eth0 --external-interface eth0 --firewall-interface eth0 --source "$work/cluster.yaml" --once --allow-problems
echo "== client -> 203.0.113.10:443 (the LoadBalancer IP and port: admitted)"
ip netns exec "$p-client" socat -T2 - TCP:203.0.113.10:443 </dev/null
echo "== client -> 10.0.1.1:30080 (a node's own address, from the public side: dropped)"
ip netns exec "$p-client" socat -T1 - TCP:10.0.1.1:30080,connect-timeout=1 </dev/null 2>/dev/null && echo "reached?!" || echo "no answer (dropped), as it should be"
echo "== client -> host 198.51.100.1:80 (epokd's own host port still works behind the firewall)"
ip netns exec "$p-client" socat -T2 - TCP:198.51.100.1:80 </dev/null
echo; echo "== epokd status with the LoadBalancer firewall"
host "$epokd" status

echo; echo "== epokd trace: what epokd did with a packet, in its own words (a connection to port 80, then one to the internal 8443)"
traced() {
  host "$epokd" trace --proto tcp --port "$1" --count 1 --timeout 10 > "$work/trace.txt" &
  local trace=$!
  # Traced once its selector is in the table.
  for _ in $(seq 200); do host nft list set inet epok trace4 | grep -q "epokd trace" && break; sleep 0.05; done
  ip netns exec "$p-client" socat -T1 - "TCP:198.51.100.1:$1,connect-timeout=1" </dev/null >/dev/null 2>&1 || true
  wait "$trace" || true
  cat "$work/trace.txt"
}
traced 80
traced 8443
