import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Two epokd routers in front of two nodes, as `deploy/ha/` describes them, with the real keepalived and
/// conntrackd (or, active-active, with routes that pick the router as ECMP would):
///
/// ```
///  client 192.168.1.10 ── lan ─┬─ eth0 router-a .2 ─┐ eth2 172.16.0.1 ┐     ┌─ n1 10.0.0.11
///                              │   front door .1    ├── nodes ─────────┼─────┤
///                              └─ eth0 router-b .3 ─┘ eth2 172.16.0.2 ┘     └─ n2 10.0.0.12
/// ```
/// The lan and nodes segments are bridges in a namespace of their own; eth2 is a cable between the routers.
/// Every node answers TCP 30080 (echo, `nX:30080:MESSAGE`) and UDP 30053 (`nX:30053`); the client serves
/// TCP 7000, answering with the address it was called from.
public final class RouterPairLab: @unchecked Sendable {
    public let client: NetworkNamespace
    public let routers: [NetworkNamespace]
    public let nodes: [NetworkNamespace]
    private let segments: NetworkNamespace
    public let scratch: ScratchDirectory
    private var servers: [NameServer] = []
    private var processes: [String: [Process]] = [:]

    public static let frontDoor = "192.168.1.1", nodeGateway = "10.0.0.1", clientAddress = "192.168.1.10"
    public static let routerLAN = ["192.168.1.2", "192.168.1.3"], routerNodes = ["10.0.0.2", "10.0.0.3"]
    public static let nodeAddresses = ["10.0.0.11", "10.0.0.12"]
    public static let names = ["router-a", "router-b"]
    /// TCP 8080 to the nodes' 30080, UDP 5353 to their 30053; a pod on n1 (`app`) leaves for the client as 192.168.1.50.
    public static let source = """
    {"kind": "List", "apiVersion": "v1", "items": [
     {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "8080:30080"}},
      "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}},
     {"kind": "Service", "metadata": {"name": "dns", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "5353:30053:udp"}},
      "spec": {"type": "NodePort", "ports": [{"port": 53, "nodePort": 30053, "protocol": "UDP"}]}},
     {"kind": "Service", "metadata": {"name": "app", "namespace": "default"}, "spec": {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"}]}},
     {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"name": "app-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "app"}},
      "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.11"], "conditions": {"ready": true}}]},
     {"kind": "StaticEgressIP", "apiVersion": "staticegressips.nirmata.io/v1alpha1", "metadata": {"name": "eip", "namespace": "default"},
      "spec": {"rules": [{"egressip": "192.168.1.50", "service-name": "app", "cidr": "192.168.1.10/32"}]}},
     {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}], "conditions": [{"type": "Ready", "status": "True"}]}},
     {"kind": "Node", "metadata": {"name": "n2"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.12"}], "conditions": [{"type": "Ready", "status": "True"}]}}]}
    """

    public init() throws {
        segments = try NetworkNamespace("seg")
        client = try NetworkNamespace("cl")
        routers = try ["ra", "rb"].map { try NetworkNamespace($0) }
        nodes = try ["n1", "n2"].map { try NetworkNamespace($0) }
        scratch = try ScratchDirectory("pair")
        for bridge in ["lan", "nodes"] {
            try segments.exec(["ip", "link", "add", bridge, "type", "bridge"])
            try segments.exec(["ip", "link", "set", bridge, "up"])
        }
        try plug(client, "eth0", "lan", "cl", address: "\(Self.clientAddress)/24")
        try client.exec(["ip", "route", "add", "default", "via", Self.frontDoor])
        for (i, router) in routers.enumerated() {
            try plug(router, "eth0", "lan", "r\(i)l", address: "\(Self.routerLAN[i])/24")
            try plug(router, "eth1", "nodes", "r\(i)n", address: "\(Self.routerNodes[i])/24")
            try router.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        }
        try run(["ip", "link", "add", "eth2", "netns", routers[0].name, "type", "veth", "peer", "name", "eth2", "netns", routers[1].name])
        for (i, router) in routers.enumerated() {
            try router.exec(["ip", "addr", "add", "172.16.0.\(i + 1)/30", "dev", "eth2"])
            try router.exec(["ip", "link", "set", "eth2", "up"])
        }
        for (i, node) in nodes.enumerated() {
            try plug(node, "eth0", "nodes", "n\(i)", address: "\(Self.nodeAddresses[i])/24")
            try node.exec(["ip", "route", "add", "default", "via", Self.nodeGateway])
            servers.append(try NameServer(in: node, name: "n\(i + 1)", tcpPorts: [], udpPorts: [30053], echoPorts: [30080]))
        }
        servers.append(try NameServer(in: client, name: "client", tcpPorts: [7000], udpPorts: [], reportingPeer: true))
        try scratch.write("source.json", Self.source)
    }

    private func plug(_ ns: NetworkNamespace, _ interface: String, _ bridge: String, _ end: String, address: String) throws {
        try run(["ip", "link", "add", end, "netns", segments.name, "type", "veth", "peer", "name", interface, "netns", ns.name])
        try segments.exec(["ip", "link", "set", end, "master", bridge, "up"])
        try ns.exec(["ip", "link", "set", interface, "up"])
        try ns.exec(["ip", "addr", "add", address, "dev", interface])
    }

    /// Starts `arguments` inside router `index`'s namespace (as the host's own process would run there), its
    /// output in `NAME-<index>.log`.
    @discardableResult
    public func start(_ name: String, on index: Int, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["ip", "netns", "exec", routers[index].name] + arguments
        let log = log(name, index)
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = FileHandle(forWritingAtPath: log)!
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        processes[name + "\(index)", default: []].append(process)
        return process
    }

    public func log(_ name: String, _ index: Int) -> String { scratch.path + "/\(name)-\(index).log" }

    public func output(_ name: String, _ index: Int) -> String { (try? String(contentsOfFile: log(name, index), encoding: .utf8)) ?? "" }

    /// epokd on router `index`, from the lab's source file, following the front door.
    public func startEpokd(on index: Int, binary: String, manageAddresses: Bool = true, extra: [String] = []) throws {
        try start("epokd", on: index, [binary, "--interfaces", "eth0", "--external-interface", "eth0", "--source", scratch.path + "/source.json",
                                      "--log-level", "debug"] + (manageAddresses ? ["--manage-addresses", "eth0"] : []) + extra)
    }

    /// The address both routers hold at once (active-active), outside the LAN: ECMP, as BGP would announce it,
    /// is stood in for by the client's route to it and the nodes' route back, through one router at a time.
    public static let anycast = "198.51.100.1"

    /// Both routers hold `anycast`; the client reaches it, and the nodes reach the client, through router `index`.
    public func anycast(through index: Int) throws {
        for router in routers where !(try router.exec(["ip", "-o", "addr", "show", "dev", "lo"]).output.contains(Self.anycast)) {
            try router.exec(["ip", "addr", "add", "\(Self.anycast)/32", "dev", "lo"])
        }
        try route(through: index)
    }

    /// Moves the client's route to `anycast` and the nodes' route to the LAN to router `index` (as ECMP would
    /// move the flows when a router is added or removed).
    public func route(through index: Int) throws {
        try client.exec(["ip", "route", "replace", "\(Self.anycast)/32", "via", Self.routerLAN[index]])
        for node in nodes { try node.exec(["ip", "route", "replace", "192.168.1.0/24", "via", Self.routerNodes[index]]) }
    }

    /// keepalived and (with `conntrackd`) conntrackd on both routers, configured from `deploy` (the repository's
    /// deploy/ha) with only the paths changed (and without conntrackd, without its notify commands), and epokd
    /// found at `epokd`.
    public func startPair(deploy: String, epokd: String, conntrackd: Bool) throws {
        var keepalived = try String(contentsOfFile: deploy + "/keepalived.conf", encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/epokd", with: epokd)
            .replacingOccurrences(of: "/etc/keepalived/conntrackd-notify.sh", with: deploy + "/conntrackd-notify.sh")
        if !conntrackd { keepalived = keepalived.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains("notify_") }.joined(separator: "\n") }
        let sync = try String(contentsOfFile: deploy + "/conntrackd.conf", encoding: .utf8)
        for index in routers.indices {
            let ctConfig = scratch.path + "/conntrackd-\(index).conf"
            var config = sync.replacingOccurrences(of: "/var/log/conntrackd.log", with: scratch.path + "/conntrackd-file-\(index).log")
                .replacingOccurrences(of: "/var/lock/conntrackd.lock", with: scratch.path + "/conntrackd-\(index).lock")
                .replacingOccurrences(of: "/var/run/conntrackd.ctl", with: scratch.path + "/conntrackd-\(index).ctl")
            if index == 1 {
                let own = "IPv4_address 172.16.0.1\n        IPv4_Destination_Address 172.16.0.2"
                guard config.contains(own) else { throw LabError.commandFailed("deploy/ha/conntrackd.conf has no UDP addresses to swap", 1, "") }
                config = config.replacingOccurrences(of: own, with: "IPv4_address 172.16.0.2\n        IPv4_Destination_Address 172.16.0.1")
            }
            try config.write(toFile: ctConfig, atomically: true, encoding: .utf8)
            let kaConfig = scratch.path + "/keepalived-\(index).conf"
            try keepalived.replacingOccurrences(of: "/etc/conntrackd/conntrackd.conf", with: ctConfig).write(toFile: kaConfig, atomically: true, encoding: .utf8)
            if conntrackd { try start("conntrackd", on: index, ["conntrackd", "-C", ctConfig]) }
            try start("keepalived", on: index, ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp", "--config-id", Self.names[index],
                                                "--use-file", kaConfig, "--pid", scratch.path + "/keepalived-\(index).pid",
                                                "--vrrp_pid", scratch.path + "/vrrp-\(index).pid"])
        }
    }

    /// Whether router `index` holds `address` on an interface.
    public func holds(_ index: Int, _ address: String) throws -> Bool {
        try routers[index].exec(["ip", "-o", "addr", "show"]).output.contains(" \(address)/")
    }

    /// Router `index` dies: its links go down first (so that nothing it says on the way out, such as
    /// keepalived's priority-0 advertisement, reaches the other), then every process of its own is killed.
    public func crash(_ index: Int) throws {
        for interface in ["eth0", "eth1", "eth2"] { try routers[index].exec(["ip", "link", "set", interface, "down"]) }
        killKeepalived(index)
        for (key, list) in processes where key.hasSuffix("\(index)") { list.forEach { kill($0.processIdentifier, SIGKILL) } }
    }

    /// Kills router `index`'s keepalived, its VRRP child first (its pid files name both).
    private func killKeepalived(_ index: Int) {
        for pidFile in ["vrrp-\(index).pid", "keepalived-\(index).pid"] {
            if let text = try? String(contentsOfFile: scratch.path + "/" + pidFile, encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                kill(pid, SIGKILL)
            }
        }
    }

    /// Stops every process the lab started (keepalived's children too).
    public func stopAll() {
        routers.indices.forEach(killKeepalived)
        for list in processes.values { for process in list where process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() } }
        processes = [:]
    }

    deinit {
        stopAll()
        servers.forEach { $0.stop() }
    }
}

extension RouterPairLab {
    /// What a failover did to the flows through the front door.
    public struct FailoverOutcome: Sendable {
        /// The UDP flow's longest time without an answer.
        public var udpGap: TimeInterval
        /// The TCP connections that answered from the same node after the failover, of `connections`.
        public var kept: Int
        public var connections: Int
    }

    /// A new lab with the pair of `deploy` running (keepalived, with or without conntrackd, and epokd following
    /// the front door on both), once router-a holds both addresses. The routers reset a flow they have no state
    /// for instead of picking it up mid-stream, so that a kept connection tells from a lost one.
    public static func pair(epokd: String, deploy: String, conntrackd: Bool) throws -> RouterPairLab {
        let lab = try RouterPairLab()
        for router in lab.routers { try router.exec(["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]) }
        for index in 0...1 { try lab.startEpokd(on: index, binary: epokd, extra: ["--ha-address", frontDoor]) }
        try lab.startPair(deploy: deploy, epokd: epokd, conntrackd: conntrackd)
        try waitUntil("router-a holding the front door", seconds: 30) { try lab.holds(0, frontDoor) && lab.holds(0, nodeGateway) }
        return lab
    }

    /// A pair from `deploy` (with or without conntrackd) in a new lab: `connections` TCP connections and a UDP flow
    /// run through router-a, router-a crashes, and each connection is tried again once router-b holds the front
    /// door and (with conntrackd) has committed the replicated flows.
    public static func failover(epokd: String, deploy: String, conntrackd: Bool, connections: Int) throws -> FailoverOutcome {
        let lab = try pair(epokd: epokd, deploy: deploy, conntrackd: conntrackd)
        defer { lab.stopAll() }
        var flows: [(FlowClient, String)] = []
        for i in 0..<connections {
            let flow = try FlowClient.tcp(from: lab.client, to: frontDoor, port: 8080)
            guard case .answered(let answer) = flow.exchange("a\(i)") else { throw LabError.commandFailed("connection \(i) through router-a", 1, "") }
            flows.append((flow, String(answer.prefix { $0 != ":" })))
        }
        let udp = try UDPFlowWatch(from: lab.client, to: frontDoor, port: 5353)
        defer { udp.stop() }
        try waitUntil("the UDP flow answered", seconds: 10) { udp.answerCount >= 5 }
        if conntrackd {
            try waitUntil("every connection in router-b's cache", seconds: 10) {
                let cache = try lab.routers[1].exec(["conntrackd", "-C", lab.scratch.path + "/conntrackd-1.conf", "-e"]).output
                return cache.split(separator: "\n").filter { $0.contains("dport=8080") && $0.contains("ESTABLISHED") }.count >= connections
            }
        }
        try lab.crash(0)
        try waitUntil("router-b holding the front door", seconds: 15) { try lab.holds(1, frontDoor) }
        let before = udp.answerCount
        try waitUntil("the UDP flow answered through router-b", seconds: 10) { udp.answerCount > before + 5 }
        if conntrackd {
            try waitUntil("the connections in router-b's kernel", seconds: 10) {
                try lab.routers[1].exec(["conntrack", "-L", "-p", "tcp", "--dport", "8080"], check: false).output
                    .split(separator: "\n").filter { $0.contains("ESTABLISHED") }.count >= connections
            }
        }
        let kept = flows.enumerated().filter { i, flow in flow.0.exchange("b\(i)") == .answered("\(flow.1):30080:b\(i)") }.count
        return FailoverOutcome(udpGap: udp.gap.seconds, kept: kept, connections: connections)
    }

    /// A new lab with epokd on both routers (`--spread spread`, active-active): eight TCP connections through
    /// router-a are moved to router-b (met there in the reverse order); returns how many went on to the same
    /// node, and the nodes they were spread over.
    public static func movedConnections(epokd: String, spread: String) throws -> (kept: Int, nodes: Set<String>) {
        let lab = try RouterPairLab()
        defer { lab.stopAll() }
        for index in 0...1 { try lab.startEpokd(on: index, binary: epokd, manageAddresses: false, extra: ["--spread", spread]) }
        try lab.anycast(through: 0)
        try waitUntil("both tables programmed", seconds: 30) {
            try lab.routers.allSatisfy { try $0.exec(["nft", "list", "table", "inet", "epok"], check: false).output.contains("8080") }
        }
        var flows: [(FlowClient, String)] = []
        for i in 0..<8 {
            let flow = try FlowClient.tcp(from: lab.client, to: anycast, port: 8080)
            guard case .answered(let answer) = flow.exchange("a\(i)") else { throw LabError.commandFailed("connection \(i) through router-a", 1, "") }
            flows.append((flow, String(answer.prefix { $0 != ":" })))
        }
        try lab.route(through: 1)
        // Router-b meets them in the reverse order: a per-router counter has no reason to agree with router-a's.
        let kept = flows.enumerated().reversed().filter { i, flow in flow.0.exchange("b\(i)", timeout: 1) == .answered("\(flow.1):30080:b\(i)") }.count
        return (kept, Set(flows.map(\.1)))
    }
}

/// A UDP flow that sends a datagram every 20 ms and measures the longest time without an answer.
public final class UDPFlowWatch: @unchecked Sendable {
    private let flow: FlowClient
    private let lock = NSLock()
    private var lastAnswer: Date?
    private var longestGap: TimeInterval = 0
    private var answers: [String] = []
    private var stopped = false
    private let done = DispatchSemaphore(value: 0)

    public init(from ns: NetworkNamespace, to address: String, port: UInt16) throws {
        flow = try FlowClient.udp(from: ns, to: address, port: port)
        Thread { [self] in
            while !lock.withLock({ stopped }) {
                if case .answered(let text) = flow.exchange("x", timeout: 0.02) {
                    let now = Date()
                    lock.withLock {
                        if let lastAnswer { longestGap = max(longestGap, now.timeIntervalSince(lastAnswer)) }
                        lastAnswer = now
                        answers.append(text)
                    }
                }
                usleep(20_000)
            }
            done.signal()
        }.start()
    }

    /// The longest time between two answers so far, and how many answers came.
    public var gap: (seconds: TimeInterval, answers: Int) { lock.withLock { (longestGap, answers.count) } }

    /// How many answers came so far.
    public var answerCount: Int { lock.withLock { answers.count } }

    public func stop() {
        lock.withLock { stopped = true }
        done.wait()
    }
}
