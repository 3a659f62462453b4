#!/usr/bin/env bash
# High availability without a cluster: two routers (network namespaces) run epokd, keepalived and conntrackd
# from deploy/ha/ (only the paths changed); a client holds a TCP connection and a UDP flow through the front
# door; router-a dies (its processes killed, its links down) and router-b goes on with them. Everything it
# creates is removed on exit. Needs root; never touches this machine's own ruleset, addresses or services.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo-ha: run as root (it creates network namespaces)" >&2; exit 1; }
export PATH="/opt/swift/usr/bin:$PATH"
bash scripts/setup.sh >/dev/null
echo "== building epokd"
swift build --product epokd 2>&1 | tail -1
epokd=$(swift build --show-bin-path)/epokd
repo=$(pwd)

p="epokd-ha-$$"
work=$(mktemp -d)
cleanup() {
  for f in "$work"/*.pid; do kill -9 "$(cat "$f")" 2>/dev/null || true; done
  for ns in seg client ra rb n1 n2; do ip netns del "$p-$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for ns in seg client ra rb n1 n2; do ip netns add "$p-$ns"; ip -n "$p-$ns" link set lo up; done
ip -n "$p-seg" link add lan type bridge; ip -n "$p-seg" link add nodes type bridge
ip -n "$p-seg" link set lan up; ip -n "$p-seg" link set nodes up
plug() { # namespace interface bridge address
  local end="${1}${2}"
  ip link add "$end" netns "$p-seg" type veth peer name "$2" netns "$p-$1"
  ip -n "$p-seg" link set "$end" master "$3" up
  ip -n "$p-$1" link set "$2" up
  ip -n "$p-$1" addr add "$4" dev "$2"
}
plug client eth0 lan 192.168.1.10/24; ip -n "$p-client" route add default via 192.168.1.1
plug ra eth0 lan 192.168.1.2/24; plug ra eth1 nodes 10.0.0.2/24
plug rb eth0 lan 192.168.1.3/24; plug rb eth1 nodes 10.0.0.3/24
ip link add eth2 netns "$p-ra" type veth peer name eth2 netns "$p-rb"
ip -n "$p-ra" addr add 172.16.0.1/30 dev eth2; ip -n "$p-rb" addr add 172.16.0.2/30 dev eth2
ip -n "$p-ra" link set eth2 up; ip -n "$p-rb" link set eth2 up
i=11
for n in n1 n2; do
  plug "$n" eth0 nodes "10.0.0.$i/24"; ip -n "$p-$n" route add default via 10.0.0.1; i=$((i + 1))
  # TCP 30080 echoes each line with the node's name; UDP 30053 answers with it.
  ip netns exec "$p-$n" python3 -c '
import socket, sys, threading
name = sys.argv[1]
def serve(c):
    for line in c.makefile("rb"):
        c.sendall(name.encode() + b": " + line)
def tcp():
    s = socket.create_server(("", 30080), reuse_port=True)
    while True: threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", 30053))
while True:
    d, a = u.recvfrom(100); u.sendto(name.encode(), a)
' "$n" &
  echo $! > "$work/server-$n.pid"; disown
done

cat > "$work/cluster.json" <<'J'
{"kind": "List", "apiVersion": "v1", "items": [
 {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "8080:30080"}},
  "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}},
 {"kind": "Service", "metadata": {"name": "dns", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "5353:30053:udp"}},
  "spec": {"type": "NodePort", "ports": [{"port": 53, "nodePort": 30053, "protocol": "UDP"}]}},
 {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}], "conditions": [{"type": "Ready", "status": "True"}]}},
 {"kind": "Node", "metadata": {"name": "n2"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.12"}], "conditions": [{"type": "Ready", "status": "True"}]}}]}
J
echo "== deploy/ha/ on both routers (paths changed only; router-b swaps conntrackd's two sync addresses)"
for r in a b; do
  sed -e "s|/usr/local/bin/epokd|$epokd|; s|/etc/keepalived/conntrackd-notify.sh|$repo/deploy/ha/conntrackd-notify.sh|; s|/etc/conntrackd/conntrackd.conf|$work/conntrackd-$r.conf|" \
    deploy/ha/keepalived.conf > "$work/keepalived-$r.conf"
  sed -e "s|/var/log/conntrackd.log|$work/conntrackd-$r.log|; s|/var/lock/conntrackd.lock|$work/conntrackd-$r.lock|; s|/var/run/conntrackd.ctl|$work/conntrackd-$r.ctl|" \
    deploy/ha/conntrackd.conf > "$work/conntrackd-$r.conf"
done
python3 - "$work/conntrackd-b.conf" <<'P'
import sys
path = sys.argv[1]; text = open(path).read()
text = text.replace("IPv4_address 172.16.0.1\n        IPv4_Destination_Address 172.16.0.2", "IPv4_address 172.16.0.2\n        IPv4_Destination_Address 172.16.0.1")
open(path, "w").write(text)
P
for r in a b; do
  ip netns exec "$p-r$r" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$p-r$r" "$epokd" --interfaces eth0 --external-interface eth0 --source "$work/cluster.json" --ha-address 192.168.1.1 > "$work/epokd-$r.log" 2>&1 &
  echo $! > "$work/epokd-$r.pid"; disown
  ip netns exec "$p-r$r" conntrackd -C "$work/conntrackd-$r.conf" > "$work/conntrackd-$r.out" 2>&1 &
  echo $! > "$work/conntrackd-$r.pid"; disown
  ip netns exec "$p-r$r" keepalived --dont-fork --log-console --vrrp --config-id "router-$r" --use-file "$work/keepalived-$r.conf" \
    --pid "$work/keepalived-$r.pid" --vrrp_pid "$work/vrrp-$r.pid" > "$work/keepalived-$r.log" 2>&1 &
  disown
done
for _ in $(seq 300); do ip -n "$p-ra" -o addr show dev eth0 | grep -q ' 192.168.1.1/' && break; sleep 0.1; done
echo "== router-a holds the front door 192.168.1.1; both tables are the same (router-b is a hot standby)"
for r in a b; do echo "router-$r: $(ip netns exec "$p-r$r" "$epokd" status | grep '^role:')"; done

echo; echo "== the client holds a TCP connection and a UDP flow through the front door; router-a dies after 2 s"
ip netns exec "$p-client" python3 -c '
import socket, time
t = socket.create_connection(("192.168.1.1", 8080)); t.settimeout(3); f = t.makefile("rb")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("192.168.1.1", 5353)); u.settimeout(0.05)
t.sendall(b"hello\n"); print("tcp before:", f.readline().decode().strip())
last, gap, start = None, 0.0, time.time()
while time.time() - start < 7:
    try:
        u.send(b"q"); answer = u.recv(100); now = time.time()
        if last: gap = max(gap, now - last)
        last = now
    except (socket.timeout, ConnectionRefusedError): pass
    time.sleep(0.02)
print("udp: longest gap without an answer %.2f s; last answer from %s" % (gap, answer.decode()))
t.sendall(b"still there?\n"); print("tcp after, the same connection:", f.readline().decode().strip())
' &
client=$!
sleep 2
# Links down first: nothing router-a says on the way out (keepalived's priority-0 advertisement) gets out.
for i in eth0 eth1 eth2; do ip -n "$p-ra" link set "$i" down; done
for f in vrrp-a keepalived-a conntrackd-a epokd-a; do kill -9 "$(cat "$work/$f.pid")" 2>/dev/null || true; done
echo "   router-a: links down, keepalived, conntrackd and epokd killed"
wait "$client"
echo; echo "== router-b took over: keepalived moved both addresses, conntrackd committed the flows, epokd follows"
echo "router-b: $(ip netns exec "$p-rb" "$epokd" status | grep '^role:')"
grep -h 'this router is now' "$work/epokd-b.log" | sed 's/^/   /'
ip netns exec "$p-rb" conntrack -L -p tcp --dport 8080 2>/dev/null | sed 's/^/   kernel: /'
