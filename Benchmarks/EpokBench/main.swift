import Control
import Dataplane
import Foundation
import NetnsLab
#if canImport(Glibc)
import Glibc
#endif

// epokd's benchmarks, each in a throwaway network namespace, with the tools epokd replaces measured
// side by side in the same run. `epokd-bench --quick` is what CI runs: smaller N, fewer repetitions,
// and a non-zero exit when a ratio crosses a threshold in Benchmarks/thresholds.json.

let quick = CommandLine.arguments.contains("--quick")
let packetPathOnly = CommandLine.arguments.contains("--packet-path-only")
let sizes = CommandLine.arguments.contains("--conntrack-only") || packetPathOnly ? [] : quick ? [1_000, 10_000] : [1_000, 10_000, 50_000]
let runs = quick ? 7 : 9
let options = ForwardingOptions(interfaces: ["eth0", "wg0"], externalInterface: "eth0")

func nodes(_ count: Int = 3) -> [Node] {
    (1...count).map { i in
        Node(metadata: ObjectMeta(name: "node-\(i)"),
             status: Node.Status(addresses: [Node.Address(type: "InternalIP", address: "10.0.1.\(i)")],
                                 conditions: [Node.Condition(type: "Ready", status: "True")]))
    }
}

func services(_ n: Int, nodePortShift: Int = 0) -> [Service] {
    (0..<n).map { i in
        let nodePort = 30000 + (i + nodePortShift) % 2000
        return Service(
            // A uid and a resourceVersion in the API server's shapes, as `kubectl get -o json` lists them.
            metadata: ObjectMeta(name: "svc-\(i)", namespace: "bench", uid: uid(i), resourceVersion: String(1000 + i),
                                 creationTimestamp: "2024-01-01T00:00:00Z",
                                 annotations: [EpokAnnotation.externalPorts: "\(1 + i):\(nodePort)"]),
            spec: Service.Spec(ports: [Service.Port(protocol: "TCP", port: 80, nodePort: nodePort)]))
    }
}

/// A UUID in lower case, one for each `i`.
func uid(_ i: Int) -> String {
    let hex = String(i, radix: 16)
    return "5f1c7a2e-0b3d-4e8f-9a6b-" + String(repeating: "0", count: max(0, 12 - hex.count)) + hex
}

/// `n` Services and the nodes as `kubectl get services,nodes -A -o json` lists them from a cluster whose Services
/// a Helm chart installed: labels, a selector, cluster IPs, two ports, Helm's annotations beside epok's, and the
/// `managedFields` the API server keeps. The reader must skip all of that; only the annotation and a node port
/// matter to epokd. (Service `i` maps external port `1 + i`.)
func writeSnapshot(_ n: Int, to file: URL) throws {
    try Data().write(to: file)
    let handle = try FileHandle(forWritingTo: file)
    defer { try? handle.close() }
    var chunk = "{\"apiVersion\":\"v1\",\"kind\":\"List\",\"metadata\":{\"resourceVersion\":\"\"},\"items\":["
    for i in 0..<n {
        chunk += (i == 0 ? "" : ",") + clusterShapedService(i)
        if chunk.utf8.count > 1 << 20 {
            try handle.write(contentsOf: Data(chunk.utf8))
            chunk = ""
        }
    }
    for i in 1...3 { chunk += ",\n" + clusterShapedNode(i) }
    try handle.write(contentsOf: Data((chunk + "]}\n").utf8))
}

/// Service `i` of `writeSnapshot`, pretty-printed as kubectl prints it.
func clusterShapedService(_ i: Int) -> String {
    let nodePort = 30000 + i % 2000, metricsPort = 32000 + i % 700, name = "svc-\(i)"
    let ip = "10.96.\(i / 250 % 250).\(1 + i % 250)"
    let time = "2024-01-0\(1 + i % 9)T0\(i % 10):1\(i % 6):2\(i % 10)Z"
    return """
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {
                "\(EpokAnnotation.externalPorts)": "\(1 + i):\(nodePort)",
                "meta.helm.sh/release-name": "release-\(i % 97)",
                "meta.helm.sh/release-namespace": "bench",
                "prometheus.io/port": "9100",
                "prometheus.io/scrape": "true"
            },
            "creationTimestamp": "\(time)",
            "labels": {
                "app.kubernetes.io/instance": "release-\(i % 97)",
                "app.kubernetes.io/managed-by": "Helm",
                "app.kubernetes.io/name": "\(name)",
                "app.kubernetes.io/version": "1.\(i % 30).0",
                "helm.sh/chart": "app-1.\(i % 30).0"
            },
            "managedFields": [
                {
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:annotations": {
                                ".": {},
                                "f:\(EpokAnnotation.externalPorts)": {},
                                "f:meta.helm.sh/release-name": {},
                                "f:meta.helm.sh/release-namespace": {},
                                "f:prometheus.io/port": {},
                                "f:prometheus.io/scrape": {}
                            },
                            "f:labels": {
                                ".": {},
                                "f:app.kubernetes.io/instance": {},
                                "f:app.kubernetes.io/managed-by": {},
                                "f:app.kubernetes.io/name": {},
                                "f:app.kubernetes.io/version": {},
                                "f:helm.sh/chart": {}
                            }
                        },
                        "f:spec": {
                            "f:externalTrafficPolicy": {},
                            "f:internalTrafficPolicy": {},
                            "f:ports": {
                                ".": {},
                                "k:{\\"port\\":80,\\"protocol\\":\\"TCP\\"}": {
                                    ".": {},
                                    "f:name": {},
                                    "f:nodePort": {},
                                    "f:port": {},
                                    "f:protocol": {},
                                    "f:targetPort": {}
                                },
                                "k:{\\"port\\":9100,\\"protocol\\":\\"TCP\\"}": {
                                    ".": {},
                                    "f:name": {},
                                    "f:nodePort": {},
                                    "f:port": {},
                                    "f:protocol": {},
                                    "f:targetPort": {}
                                }
                            },
                            "f:selector": {},
                            "f:sessionAffinity": {},
                            "f:type": {}
                        }
                    },
                    "manager": "helm",
                    "operation": "Update",
                    "time": "\(time)"
                }
            ],
            "name": "\(name)",
            "namespace": "bench",
            "resourceVersion": "\(1000 + i)",
            "uid": "\(uid(i))"
        },
        "spec": {
            "clusterIP": "\(ip)",
            "clusterIPs": [
                "\(ip)"
            ],
            "externalTrafficPolicy": "Cluster",
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": [
                "IPv4"
            ],
            "ipFamilyPolicy": "SingleStack",
            "ports": [
                {
                    "name": "http",
                    "nodePort": \(nodePort),
                    "port": 80,
                    "protocol": "TCP",
                    "targetPort": "http"
                },
                {
                    "name": "metrics",
                    "nodePort": \(metricsPort),
                    "port": 9100,
                    "protocol": "TCP",
                    "targetPort": 9100
                }
            ],
            "selector": {
                "app.kubernetes.io/instance": "release-\(i % 97)",
                "app.kubernetes.io/name": "\(name)"
            },
            "sessionAffinity": "None",
            "type": "NodePort"
        },
        "status": {
            "loadBalancer": {}
        }
    }
    """
}

/// Node `i` (1-3) of `writeSnapshot`, with the conditions, capacity and images a kubelet reports.
func clusterShapedNode(_ i: Int) -> String {
    let conditions = ["MemoryPressure", "DiskPressure", "PIDPressure"].map { type in
        "{\"lastHeartbeatTime\":\"2024-06-01T00:00:00Z\",\"lastTransitionTime\":\"2024-01-01T00:00:00Z\",\"message\":\"kubelet has no \(type)\",\"reason\":\"KubeletHas\(type == "PIDPressure" ? "Sufficient" : "No")\(type)\",\"status\":\"False\",\"type\":\"\(type)\"}"
    } + ["{\"lastHeartbeatTime\":\"2024-06-01T00:00:00Z\",\"lastTransitionTime\":\"2024-01-01T00:00:00Z\",\"message\":\"kubelet is posting ready status\",\"reason\":\"KubeletReady\",\"status\":\"True\",\"type\":\"Ready\"}"]
    let images = (0..<20).map { k in "{\"names\":[\"registry.example/app-\(k)@sha256:\(String(repeating: "ab", count: 32))\",\"registry.example/app-\(k):1.\(k)\"],\"sizeBytes\":\(10_000_000 + k)}" }
    return """
    {"apiVersion":"v1","kind":"Node","metadata":{"annotations":{"node.alpha.kubernetes.io/ttl":"0","volumes.kubernetes.io/controller-managed-attach-detach":"true"},\
    "creationTimestamp":"2024-01-01T00:00:00Z","labels":{"beta.kubernetes.io/arch":"amd64","beta.kubernetes.io/os":"linux","kubernetes.io/arch":"amd64",\
    "kubernetes.io/hostname":"node-\(i)","kubernetes.io/os":"linux"},"name":"node-\(i)","resourceVersion":"\(900 + i)","uid":"\(uid(900_000 + i))"},\
    "spec":{"podCIDR":"10.244.\(i).0/24","podCIDRs":["10.244.\(i).0/24"]},"status":{"addresses":[{"address":"10.0.1.\(i)","type":"InternalIP"},\
    {"address":"node-\(i)","type":"Hostname"}],"allocatable":{"cpu":"4","memory":"16Gi","pods":"110"},"capacity":{"cpu":"4","memory":"16Gi","pods":"110"},\
    "conditions":[\(conditions.joined(separator: ","))],"daemonEndpoints":{"kubeletEndpoint":{"Port":10250}},"images":[\(images.joined(separator: ","))],\
    "nodeInfo":{"architecture":"amd64","containerRuntimeVersion":"containerd://1.7.2","kernelVersion":"6.1.0","kubeProxyVersion":"v1.30.0",\
    "kubeletVersion":"v1.30.0","operatingSystem":"linux","osImage":"Debian GNU/Linux 12 (bookworm)"}}}
    """
}

// `epokd-bench --write-snapshot N FILE`: the benchmarks' input of N Services, to profile epokd on by hand.
if let flag = CommandLine.arguments.firstIndex(of: "--write-snapshot"), CommandLine.arguments.count > flag + 2,
   let n = Int(CommandLine.arguments[flag + 1]) {
    try writeSnapshot(n, to: URL(fileURLWithPath: CommandLine.arguments[flag + 2]))
    exit(0)
}
/// `rows` of each size's snapshot (10k; 50k too in full mode), each written to a file of its own for the run.
func rowsOfSnapshots(_ rows: (String, Int) throws -> [Row]) throws -> [Row] {
    try (quick ? [10_000] : [10_000, 50_000]).flatMap { n in
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-snapshot-\(getpid())-\(n).json")
        try writeSnapshot(n, to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        return try rows(file.path, n)
    }
}
if CommandLine.arguments.contains("--cold-start-only"), let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"] {
    printTable(try rowsOfSnapshots { try coldStartRows(epokd: epokd, snapshotFile: $0, n: $1) })
    exit(0)
}
if CommandLine.arguments.contains("--memory-only"), let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"] {
    printTable(try rowsOfSnapshots { try daemonMemoryRows(epokd: epokd, snapshotFile: $0, n: $1) })
    exit(0)
}
if CommandLine.arguments.contains("--churn-only"), let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"] {
    printTable(try (quick ? [20_000] : [20_000, 50_000]).flatMap { try churnRows(epokd: epokd, n: $0) })
    exit(0)
}
if CommandLine.arguments.contains("--high-availability-only"), let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"] {
    printTable(try highAvailabilityRows(epokd: epokd, deploy: FileManager.default.currentDirectoryPath + "/deploy/ha"))
    exit(0)
}
if CommandLine.arguments.contains("--rule-costs"), let flood = ProcessInfo.processInfo.environment["EPOKD_UDPFLOOD"] {
    printTable(try ruleCostRows(flood: flood, n: 10_000))
    exit(0)
}
if CommandLine.arguments.contains("--egress-only") {
    printTable(try egressRows(runs: runs, sizes: [10_000], flood: ProcessInfo.processInfo.environment["EPOKD_UDPFLOOD"]))
    exit(0)
}
if CommandLine.arguments.contains("--health-only") {
    printTable(try healthRows(seconds: quick ? 5 : 10))
    exit(0)
}
if CommandLine.arguments.contains("--profile-desired") {
    let snapshot = ClusterSnapshot(services: services(10_000), nodes: nodes())
    let time = try median(9) { _ = DesiredState(snapshot: snapshot, options: options) }
    print("desired state of 10k, median of 9: \(format(time)) ms")
    exit(0)
}
if CommandLine.arguments.contains("--profile-commit") {
    let ns = try NetworkNamespace("prof")
    let nft = try Nftables(namespacePath: ns.path)
    let elements = ForwardingRuleset.elements(for: DesiredState(snapshot: ClusterSnapshot(services: services(10_000), nodes: nodes()), options: options).forwarding)
    let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(counters: false), nftables: nft)
    for _ in 0..<10 {
        try firewall.remove()
        try nft.commit(.create(ForwardingRuleset.skeleton(counters: false), elements: elements, existing: nil))
    }
    exit(0)
}
/// Runs `command` in `ns` and returns its wall time, less the cost of `ip netns exec` itself.

func nftText(_ n: Int) -> String {
    var s = "table inet bench {\n map m {\n  type inet_proto . inet_service : ipv4_addr . inet_service\n  elements = {\n"
    s += (0..<n).map { i in "   tcp . \(1 + i) : 10.0.1.\(1 + i % 3) . \(30000 + i % 2000)" }.joined(separator: ",\n")
    s += "\n  }\n }\n chain pre {\n  type nat hook prerouting priority dstnat;\n  meta l4proto tcp dnat ip to meta l4proto . th dport map @m\n }\n}\n"
    return s
}

func iptablesText(_ n: Int) -> String {
    var s = "*nat\n:PREROUTING ACCEPT [0:0]\n"
    for i in 0..<n {
        s += "-A PREROUTING -p tcp --dport \(1 + i) -j DNAT --to-destination 10.0.1.\(1 + i % 3):\(30000 + i % 2000)\n"
    }
    return s + "COMMIT\n"
}

var rows: [Row] = []
let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-bench-\(getpid())")
try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(at: scratch) }

for n in sizes {
    let ns = try NetworkNamespace("bench")
    let nft = try Nftables(namespacePath: ns.path)
    // The baselines keep no per-mapping counters, so neither does epokd here; the cost of counters has its own row.
    let skeleton = ForwardingRuleset.skeleton(counters: false)
    let snapshot = ClusterSnapshot(services: services(n), nodes: nodes())

    // 1. Full sync: snapshot -> desired state -> elements -> one transaction creating everything.
    // Taken in turn with `nft -f`'s and `iptables-restore`'s, so that a slow spell of the shared machine weighs on
    // every side of a ratio; each starts from a namespace with no nftables table.
    var firewall = Firewall(skeleton: skeleton, nftables: nft)
    let nftFile = scratch.appendingPathComponent("rules-\(n).nft")
    try nftText(n).write(to: nftFile, atomically: true, encoding: .utf8)
    let iptFile = scratch.appendingPathComponent("rules-\(n).ipt")
    try iptablesText(n).write(to: iptFile, atomically: true, encoding: .utf8)
    func empty() throws {
        try firewall.remove()
        for table in [["inet", "bench"], ["ip", "nat"]] { _ = try ns.exec(["nft", "delete", "table"] + table, check: false) }
    }
    // More repetitions than elsewhere: this ratio is a CI limit, and each repetition is short.
    var kept: [DesiredState] = []
    let fullSync = try interleavedMedians(max(runs, 11), [{
        try empty()
        // The last state is freed here, untimed: a daemon keeps its state, and `nft -f` exits without freeing.
        kept.removeAll()
        firewall = Firewall(skeleton: skeleton, nftables: nft)
        return try milliseconds {
            let state = DesiredState(snapshot: snapshot, options: options)
            try firewall.synchronize(ForwardingRuleset.elements(for: state.forwarding))
            kept.append(state)
        }
    }, {
        try empty()
        return try processTime(in: ns, ["iptables-restore", iptFile.path])
    }, {
        try empty()
        return try processTime(in: ns, ["nft", "-f", nftFile.path])
    }])
    let (full, iptFull, nftFull) = (fullSync[0], fullSync[1], fullSync[2])
    rows.append(Row(name: "full sync", n: n, epokd: full, baselineName: "nft -f (data map)", baseline: nftFull))
    rows.append(Row(name: "full sync", n: n, epokd: full, baselineName: "iptables-restore (N DNAT rules)", baseline: iptFull))
    let counted = ForwardingRuleset.skeleton(counters: true)
    var countedFirewall = Firewall(skeleton: counted, nftables: nft)
    let fullCounted = try median(runs, prepare: { try firewall.remove(); countedFirewall = Firewall(skeleton: counted, nftables: nft) }) {
        let state = DesiredState(snapshot: snapshot, options: options)
        try countedFirewall.synchronize(ForwardingRuleset.elements(for: state.forwarding))
    }
    rows.append(Row(name: "full sync with per-mapping counters", n: n, epokd: fullCounted, baselineName: "nft -f (data map)", baseline: nftFull))
    try countedFirewall.remove()
    firewall = Firewall(skeleton: skeleton, nftables: nft)

    // 2. One Service changed among N: event to committed transaction.
    let base = DesiredState(snapshot: snapshot, options: options)
    try firewall.synchronize(ForwardingRuleset.elements(for: base.forwarding))
    var changed = snapshot
    var flip = false
    let one = try median(runs) {
        flip.toggle()
        changed.services[n / 2].metadata.annotations?[EpokAnnotation.externalPorts] = "\(1 + n / 2):\(flip ? 31999 : 30000 + (n / 2) % 2000)"
        changed.services[n / 2].spec.ports = [Service.Port(protocol: "TCP", port: 80, nodePort: flip ? 31999 : 30000 + (n / 2) % 2000)]
        let state = DesiredState(snapshot: changed, options: options)
        try firewall.apply(ForwardingRuleset.elements(for: state.forwarding))
    }
    var commitOnly = Transaction()
    let services = skeleton.set(named: "services")!
    let element = Element(key: [.l4proto(.udp), .port(Dataplane.Port(9)!)], value: [.port(Dataplane.Port(30009)!)])
    var present = false
    let oneCommit = try median(runs, prepare: {
        commitOnly = Transaction()
        commitOnly.append(present ? .deleteElements(skeleton.table, services, [element]) : .addElements(skeleton.table, services, [element]))
    }) {
        try nft.commit(commitOnly)
        present.toggle()
    }
    let nftAdd = try processMedian(runs, in: ns, prepare: { _ = try ns.exec(["nft", "delete", "element", "inet", "bench", "m", "{ udp . 9 }"], check: false) },
                                   ["nft", "add", "element", "inet", "bench", "m", "{ udp . 9 : 10.0.1.1 . 30009 }"])
    rows.append(Row(name: "one service changed (snapshot to commit)", n: n, epokd: one, baselineName: "nft add element (process)", baseline: nftAdd))
    rows.append(Row(name: "one element commit (transaction only)", n: n, epokd: oneCommit, baselineName: "nft add element (process)", baseline: nftAdd))
    let iptAppend = try processMedian(runs, in: ns, prepare: { _ = try ns.exec(["iptables", "-t", "nat", "-D", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "DNAT", "--to-destination", "10.0.1.1:30009"], check: false) },
                                      ["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "DNAT", "--to-destination", "10.0.1.1:30009"])
    rows.append(Row(name: "one service changed (snapshot to commit)", n: n, epokd: one, baselineName: "iptables -A (one rule at N)", baseline: iptAppend))

    // 2b. The same change as the daemon makes it: the live state yields the diff, one transaction commits it.
    let live = LiveDesiredState(options: options)
    _ = live.replaceAll(snapshot)
    try firewall.synchronize(live.elements)
    var toggle = false
    let incremental = try median(runs) {
        toggle.toggle()
        var s = snapshot.services[n / 2]
        let nodePort = toggle ? 31999 : 30000 + (n / 2) % 2000
        s.metadata.annotations?[EpokAnnotation.externalPorts] = "\(1 + n / 2):\(nodePort)"
        s.spec.ports = [Service.Port(protocol: "TCP", port: 80, nodePort: nodePort)]
        try firewall.apply(diff: live.upsert(s))
    }
    rows.append(Row(name: "one service changed, incremental (event to commit)", n: n, epokd: incremental,
                    baselineName: "nft add element (process)", baseline: nftAdd))

    // 3. A rollout: 1% of the Services change at once, coalesced into one transaction.
    var rolloutRound = 0
    let rollout = try median(runs) {
        rolloutRound += 1
        var diff = ElementDiff()
        for i in stride(from: 0, to: n, by: 100) {
            var s = snapshot.services[i]
            let nodePort = rolloutRound % 2 == 1 ? 32000 + i % 700 : 30000 + i % 2000
            s.metadata.annotations?[EpokAnnotation.externalPorts] = "\(1 + i):\(nodePort)"
            s.spec.ports = [Service.Port(protocol: "TCP", port: 80, nodePort: nodePort)]
            let change = live.upsert(s)
            diff.merge(change)
        }
        try firewall.apply(diff: diff)
    }
    rows.append(Row(name: "1% of services changed (one transaction)", n: n, epokd: rollout))

    // 4. Desired-state computation alone, and the element sets it becomes.
    let compute = try median(runs) { _ = DesiredState(snapshot: snapshot, options: options) }
    rows.append(Row(name: "desired state (no kernel)", n: n, epokd: compute))
    let elements = try median(runs) { _ = ForwardingRuleset.elements(for: base.forwarding) }
    rows.append(Row(name: "elements of a desired state (no kernel)", n: n, epokd: elements))
    let desiredElements = ForwardingRuleset.elements(for: base.forwarding)
    let createOnly = try median(runs, prepare: { try firewall.remove() }) {
        try nft.commit(.create(skeleton, elements: desiredElements, existing: nil))
    }
    rows.append(Row(name: "full create (transaction only)", n: n, epokd: createOnly))

    // 5. Read-back of the whole table.
    let read = try median(runs) { _ = try nft.read(skeleton) }
    let nftList = try processMedian(runs, in: ns, ["nft", "list", "map", "inet", "bench", "m"])
    rows.append(Row(name: "read-back of the table", n: n, epokd: read, baselineName: "nft list map (process)", baseline: nftList))
}

// 9. The packet path: new UDP flows per second through the host to the last of N mappings, each datagram from
// a new source (so each walks the nat chain), with epokd's table, the same with every chain in place, a bare data
// map, and one iptables rule per port; then datagrams of flows the host already knows (conntrack has them: no NAT
// chain, only the forward hook). Each table is installed in turn for one burst a round.
if let flood = ProcessInfo.processInfo.environment["EPOKD_UDPFLOOD"] {
    for n in quick ? [1_000, 10_000] : [1_000, 10_000, 50_000] {
        let path = try PacketPath()
        let target = 1024 + n - 1, nodePort = 20_000 + (n - 1) % 10_000
        let state = ForwardingState(interfaces: ["r0"], nodes: [NodeAddress(node: "server", ipv4: IPv4Address(10, 10, 2, 2))],
                                    mappings: (0..<n).map { Mapping(proto: .udp, hostPort: Dataplane.Port(1024 + $0)!, nodePort: Dataplane.Port(20_000 + $0 % 10_000)!) })
        let elements = ForwardingRuleset.elements(for: state)
        let nftables = try Nftables(namespacePath: path.router.path)
        let epokd = Firewall(skeleton: ForwardingRuleset.skeleton(for: elements), nftables: nftables)
        let every = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: nftables)
        let uncounted = Firewall(skeleton: ForwardingRuleset.skeleton(ForwardingRuleset.Parameters(counters: false), for: elements), nftables: nftables)
        let hashed = Firewall(skeleton: ForwardingRuleset.skeleton(ForwardingRuleset.Parameters(spread: .hash(seed: 0)), for: elements), nftables: nftables)
        func table(_ firewall: Firewall) -> (install: () throws -> Void, remove: () throws -> Void) {
            ({ try firewall.synchronize(elements) }, { try firewall.remove() })
        }
        let bare: (install: () throws -> Void, remove: () throws -> Void) = (
            { try path.router.exec(["nft", "-f", "-"], input: bareMapText(n)) }, { try path.router.exec(["nft", "delete", "table", "inet", "bare"]) })
        let iptables: (install: () throws -> Void, remove: () throws -> Void) = (
            { try path.router.exec(["iptables-restore"], input: iptablesUDPText(n)) }, { try path.router.exec(["iptables", "-t", "nat", "-F"]) })
        let floor: (install: () throws -> Void, remove: () throws -> Void) = (
            { try path.router.exec(["nft", "-f", "-"], input: semanticFloorText(n, interface: "r0")) }, { try path.router.exec(["nft", "delete", "table", "inet", "bare"]) })
        let newFlows = try path.inTurn([table(epokd), table(hashed), table(every), bare, floor] + (n <= 10_000 ? [iptables] : [])) {
            try path.flowsPerSecond(flood: flood, port: target, expecting: nodePort, bursts: 1)
        }
        let name = "new UDP flows/s to the last of N mappings (higher is better)"
        for (baseline, rate) in Array(zip(["every chain in place, idle or not", "one rule + bare data map"], newFlows.dropFirst(2)))
            + zip(["one iptables DNAT rule per port"], newFlows.dropFirst(5)) {
            rows.append(Row(name: name, n: n, epokd: newFlows[0].divided(by: 1000), baselineName: baseline, baseline: rate.divided(by: 1000), unit: "k/s"))
        }
        // What Epok's meaning costs by itself: the bare map with only its interface and local-address tests.
        rows.append(Row(name: "new UDP flows/s, the bare map with only Epok's interface and local-address tests (higher is better)", n: n,
                        epokd: newFlows[4].divided(by: 1000), baselineName: "one rule + bare data map", baseline: newFlows[3].divided(by: 1000), unit: "k/s"))
        // --spread hash: the same table with the flow hash instead of the counter, against the bare map and round-robin.
        let hashName = "new UDP flows/s to the last of N mappings, --spread hash (higher is better)"
        rows.append(Row(name: hashName, n: n, epokd: newFlows[1].divided(by: 1000), baselineName: "one rule + bare data map", baseline: newFlows[3].divided(by: 1000), unit: "k/s"))
        rows.append(Row(name: hashName, n: n, epokd: newFlows[1].divided(by: 1000), baselineName: "--spread round-robin", baseline: newFlows[0].divided(by: 1000), unit: "k/s"))
        let known = try path.inTurn([table(epokd), table(uncounted), bare]) {
            try path.flowsPerSecond(flood: flood, port: target, expecting: nodePort, flows: (sources: 16, ports: 16), bursts: 1)
        }
        let knownName = "UDP datagrams/s of 256 known flows to the last of N mappings (higher is better)"
        for (baseline, rate) in zip(["epokd's table, --no-counters", "one rule + bare data map"], known.dropFirst()) {
            rows.append(Row(name: knownName, n: n, epokd: known[0].divided(by: 1000), baselineName: baseline, baseline: rate.divided(by: 1000), unit: "k/s"))
        }
        // TCP connects to the last of N TCP mappings: p50 and p99 through epokd's table, the bare map, iptables.
        if let tool = ProcessInfo.processInfo.environment["EPOKD_TCPLATENCY"] {
            var tcp = state
            tcp.mappings = tcp.mappings.map { var m = $0; m.proto = .tcp; return m }
            let serverPort = 20_000 + (n - 1) % 10_000
            let tcpElements = ForwardingRuleset.elements(for: tcp)
            let table = Firewall(skeleton: ForwardingRuleset.skeleton(for: tcpElements), nftables: try Nftables(namespacePath: path.router.path))
            try table.synchronize(tcpElements)
            let ours = try path.connectLatency(tool: tool, port: target, serverPort: serverPort)
            try table.remove()
            try path.router.exec(["nft", "-f", "-"], input: bareMapText(n, proto: "tcp"))
            let bare = try path.connectLatency(tool: tool, port: target, serverPort: serverPort)
            try path.router.exec(["nft", "delete", "table", "inet", "bare"])
            var baselines = [("one rule + bare data map", bare)]
            if n <= 10_000 {
                try path.router.exec(["iptables-restore"], input: iptablesUDPText(n, proto: "tcp"))
                baselines.append(("one iptables DNAT rule per port", try path.connectLatency(tool: tool, port: target, serverPort: serverPort)))
                try path.router.exec(["iptables", "-t", "nat", "-F"])
            }
            for (name, latency) in baselines {
                rows.append(Row(name: "TCP connect p50 to the last of N mappings", n: n, epokd: ours.p50, baselineName: name, baseline: latency.p50, unit: "µs"))
                rows.append(Row(name: "TCP connect p99 to the last of N mappings", n: n, epokd: ours.p99, baselineName: name, baseline: latency.p99, unit: "µs"))
            }
        }
    }
}

// 10. The LoadBalancer firewall: a one-Service change among N, and forwarded flows through it.
if !CommandLine.arguments.contains("--conntrack-only") {
    rows += try firewallRows(runs: runs, sizes: [10_000],
                             flood: ProcessInfo.processInfo.environment["EPOKD_UDPFLOOD"])
}

// 12. Static source addresses: an endpoint change among N pods in egress rules, and SNATed flows.
if !CommandLine.arguments.contains("--conntrack-only") {
    rows += try egressRows(runs: runs, sizes: [10_000], flood: ProcessInfo.processInfo.environment["EPOKD_UDPFLOOD"])
}

// 14. Network programming latency under churn, from the fake API server's change to the kernel's notification.
if let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"], !CommandLine.arguments.contains("--conntrack-only"), !packetPathOnly {
    for n in quick ? [20_000] : [20_000, 50_000] { rows += try churnRows(epokd: epokd, n: n) }
}

// 13. A pair of routers (keepalived, conntrackd) and two active at once (ECMP), from deploy/ha.
if let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"], !CommandLine.arguments.contains("--conntrack-only"), !packetPathOnly {
    rows += try highAvailabilityRows(epokd: epokd, deploy: FileManager.default.currentDirectoryPath + "/deploy/ha")
}

// 11. The health prober's cost.
if !CommandLine.arguments.contains("--conntrack-only") && !packetPathOnly {
    rows += try healthRows(seconds: quick ? 5 : 10)
}

// 7. Peak memory of the daemon holding N mappings (`epokd --once` on a JSON snapshot, as a process).
if let epokd = ProcessInfo.processInfo.environment["EPOKD_BINARY"], !packetPathOnly {
    for n in sizes {
        let ns = try NetworkNamespace("rss")
        let file = scratch.appendingPathComponent("cluster-\(n).json")
        try writeSnapshot(n, to: file)
        let empty = { () throws in _ = try ns.exec(["nft", "delete", "table", "inet", "epok"], check: false) }
        var peaks: [Double] = []
        for _ in 0..<3 {
            try empty()
            let result = try ns.exec(["/usr/bin/time", "-f", "%M", epokd, "--interfaces", "eth0", "--source", file.path, "--once", "--log-level", "error"])
            peaks.append(Double(result.error.split(separator: "\n").last.flatMap { Double($0) } ?? 0) / 1024)
        }
        rows.append(Row(name: "peak RSS of epokd --once holding N mappings", n: n, epokd: Measured(peaks), unit: "MiB"))

        // The whole process, as an operator runs it: start, decode the snapshot, commit, exit. Into an empty
        // namespace (with and without per-mapping counters), and again with nothing to change; `nft -f` of the
        // same data map beside it, one of each in turn.
        let once = [epokd, "--interfaces", "eth0", "--source", file.path, "--once", "--log-level", "error", "--metrics-address", "off"]
        let onceFile = scratch.appendingPathComponent("once-\(n).nft")
        try nftText(n).write(to: onceFile, atomically: true, encoding: .utf8)
        var firstSamples: [Double] = [], countedSamples: [Double] = [], nftSamples: [Double] = []
        for _ in 0..<runs {
            try empty()
            firstSamples.append(try processTime(in: ns, once + ["--no-counters"]))
            try empty()
            countedSamples.append(try processTime(in: ns, once))
            _ = try ns.exec(["nft", "delete", "table", "inet", "bench"], check: false)
            nftSamples.append(try processTime(in: ns, ["nft", "-f", onceFile.path]))
        }
        let first = Measured(firstSamples), counted = Measured(countedSamples), nftOnce = Measured(nftSamples)
        // Once untimed first: the last `nft -f` above was a commit of another table (see below).
        _ = try processTime(in: ns, once)
        let unchanged = try processSamples(runs, in: ns, once)
        // The same, after another table's commit moved the ruleset generation: the stamp vouches for nothing, so the
        // run decodes, computes and reads the kernel back, and finds nothing to change.
        let moved = { () throws in _ = try ns.exec(["nft", "add", "table", "inet", "elsewhere"]); _ = try ns.exec(["nft", "delete", "table", "inet", "elsewhere"]) }
        let readBack = try processSamples(runs, in: ns, prepare: moved, once)
        rows.append(Row(name: "epokd --once from a JSON snapshot, whole process, no counters", n: n, epokd: first,
                        baselineName: "nft -f (data map)", baseline: nftOnce))
        rows.append(Row(name: "epokd --once from a JSON snapshot, whole process, counters", n: n, epokd: counted,
                        baselineName: "nft -f (data map)", baseline: nftOnce))
        rows.append(Row(name: "epokd --once again, nothing to change", n: n, epokd: unchanged,
                        baselineName: "the first --once (counters)", baseline: counted))
        rows.append(Row(name: "epokd --once again, nothing to change, after another table's commit", n: n, epokd: readBack,
                        baselineName: "the first --once (counters)", baseline: counted))
        rows += try coldStartRows(epokd: epokd, snapshotFile: file.path, n: n)
        if n >= 10_000 { rows += try daemonMemoryRows(epokd: epokd, snapshotFile: file.path, n: n) }

        // The daemon holding the same mappings: /healthz while 64 clients scrape /metrics back to back,
        // against /healthz with nobody scraping.
        let port = 20_000 + Int(getpid() % 10_000)
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: epokd)
        daemon.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--source", file.path, "--log-level", "error",
                            "--metrics-address", "127.0.0.1:\(port)"]
        try daemon.run()
        defer {
            kill(daemon.processIdentifier, SIGKILL)
            daemon.waitUntilExit()
        }
        try waitUntil("the daemon's first sync", seconds: 120) { httpStatus(port: port, path: "/readyz") == 200 }
        let idle = try median(runs * 3) { guard httpStatus(port: port, path: "/healthz") == 200 else { throw LabError.timeout("/healthz") } }
        let stop = ScrapeStorm(port: port, clients: 64)
        let stormed = try median(runs * 3) { guard httpStatus(port: port, path: "/healthz") == 200 else { throw LabError.timeout("/healthz") } }
        let scrapes = stop.finish()
        guard scrapes > 0 else { throw LabError.timeout("no scrape was answered") }
        rows.append(Row(name: "/healthz while 64 clients scrape /metrics", n: n, epokd: stormed, baselineName: "/healthz, nobody scraping", baseline: idle))
    }
}

// 8. Removing the Service with the most allow-range elements a Service may have: deleted in key order (as epokd
// sends them) and, as the baseline, in hash order (as it sent them before), each as one transaction.
if !CommandLine.arguments.contains("--conntrack-only") && !packetPathOnly {
    let ns = try NetworkNamespace("delete")
    let nft = try Nftables(namespacePath: ns.path)
    let skeleton = ForwardingRuleset.skeleton(counters: false)
    let allow4 = skeleton.set(named: "allow4")!
    for count in [ServiceLimits.allowElements] {
        // Disjoint single addresses, so that no two merge: `count` elements for one port.
        let key: Fields = [.l4proto(.tcp), .port(Dataplane.Port(443)!)]
        let elements = (0..<count).map { i -> Element in
            let a = IPv4Address(value: 0x0A00_0000 | UInt32(i) << 1)
            return Element(key: key + [.ipv4(a)], keyEnd: key + [.ipv4(a)])
        }
        func create() throws {
            _ = try? nft.commit({ var t = Transaction(); t.append(.deleteTable(skeleton.table)); return t }())
            try nft.commit(.create(skeleton, elements: ["allow4": Set(elements)], existing: nil))
        }
        var diff = ElementDiff()
        elements.forEach { diff.remove($0, from: "allow4") }
        let sorted = try median(runs, prepare: create) { try nft.commit(diff.transaction(for: skeleton)) }
        let hashOrder = try median(quick ? 1 : 3, prepare: create) {
            var tx = Transaction()
            tx.append(.deleteElements(skeleton.table, allow4, ElementBatch(Array(Set(elements)))))
            try nft.commit(tx)
        }
        rows.append(Row(name: "remove a Service's allow-range elements (one transaction, key order)", n: count, epokd: sorted,
                        baselineName: "the same in hash order", baseline: hashOrder))
    }
}

// 6. Conntrack: delete the entries of one remapped port among 10,000 (100 ports x 100 client sockets).
if !packetPathOnly {
    let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
    let conntrack = try Conntrack(namespacePath: lab.host.path)
    let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(counters: false), nftables: try Nftables(namespacePath: lab.host.path))
    let ports = (0..<100).map { Dataplane.Port(10_001 + $0)! }
    let state = ForwardingState(
        interfaces: ["eth0"], nodes: [NodeAddress(node: "n1", ipv4: IPv4Address(10, 0, 1, 1))],
        mappings: ports.map { Mapping(proto: .udp, hostPort: $0, nodePort: Dataplane.Port(20_000 + Int($0.rawValue) - 10_000)!) })
    try firewall.synchronize(ForwardingRuleset.elements(for: state))
    let clients = try (0..<100).map { _ in try openSocket(in: lab.external, family: AF_INET, type: Int32(SOCK_DGRAM.rawValue)) }
    defer { clients.forEach { close($0) } }
    func send(to port: Dataplane.Port) {
        let address = SocketAddress(ForwardingLab.hostExternal4, port: port.rawValue)
        for fd in clients { _ = address.withPointer { sendto(fd, "x", 1, 0, $0, $1) } }
    }
    ports.forEach(send)
    try waitUntil("10,000 conntrack entries") { try conntrack.flows().count >= 10_000 }
    let target = ports[50]
    let stale = [StaleFlows(proto: .udp, hostPort: target, nodePort: Dataplane.Port(20_000 + Int(target.rawValue) - 10_000)!, reasons: [.remapped])]
    func refill() throws {
        send(to: target)
        try waitUntil("entries of the port") { try conntrack.flows(stale[0].filter).count >= 100 }
    }
    let ours = try median(runs, prepare: refill) { try conntrack.delete(stale) }
    let tool = try processMedian(runs, in: lab.host, prepare: refill, ["conntrack", "-D", "-p", "udp", "--dport", String(target.rawValue)], check: false)
    rows.append(Row(name: "conntrack: delete one port's entries among 10k", n: 10_000, epokd: ours, baselineName: "conntrack -D (process)", baseline: tool))
}

print("epokd benchmarks (\(quick ? "quick" : "full") mode, median of \(runs) runs, \(ProcessInfo.processInfo.activeProcessorCount) CPUs)")
printTable(rows)

if let index = CommandLine.arguments.firstIndex(of: "--check"), index + 1 < CommandLine.arguments.count {
    let violations = try Thresholds.check(rows, against: CommandLine.arguments[index + 1])
    if violations > 0 { exit(1) }
}
