import Control
import Dataplane
import FakeKube
import Foundation
import NetnsLab
import Testing

/// `--ha-address`: the role follows the address, the managed addresses and Events go with the active role,
/// the Lease says which router is active, and a second active router is a split brain.
@Suite("High availability: the role follows --ha-address", .serialized)
struct HighAvailabilityRoleTests {
    static let followed = "192.0.2.100"

    static func holder(_ kubectl: [String]) throws -> String? {
        let got = try run(kubectl + ["get", "lease", "-n", "kube-system", "epokd-epok", "-o", "jsonpath={.spec.holderIdentity}"], check: false)
        return got.status == 0 ? got.output : nil
    }

    static func events(_ kubectl: [String]) throws -> String {
        try run(kubectl + ["get", "events", "-A", "-o", "jsonpath={range .items[*]}{.involvedObject.kind}/{.reason}/{.message};{end}"], check: false).output
    }

    static func egressAddressOnHost(_ lab: ForwardingLab) throws -> Bool {
        try lab.host.exec(["ip", "-o", "addr", "show", "dev", "eth0"]).output.contains(" 198.51.100.9/32 ")
    }

    @Test("standby: the table is programmed, no managed address, no Event, no Lease; active: the address is added and announced, Events are posted, the Lease is held; standby again: the address and the Lease are given up; a second active router is a split brain")
    func roleFollowsTheAddress() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
        // The client's side has both egress addresses cached at another host (the old holder): only an
        // announcement (gratuitous ARP, an unsolicited neighbour advertisement) moves them to this router.
        let elsewhere = "02:00:00:00:00:01"
        for address in ["198.51.100.9", "2001:db8:e::9"] {
            try lab.external.exec(["ip", "neigh", "replace", address, "lladdr", elsewhere, "dev", "eth0", "nud", "stale"])
        }
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        try api.apply(webService("app"), kind: "services")
        try api.apply(webSlice("app", ready: [ForwardingLab.node4(1), ForwardingLab.node6(1)]), kind: "endpointslices")
        try api.apply(StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: "default"),
                                     spec: .init(rules: [.init(egressip: "198.51.100.9", serviceName: "app", cidr: "198.51.100.2/32"),
                                                         .init(egressip: "198.51.100.10", serviceName: "app", cidr: "10.0.0.1/8"),
                                                         .init(egressip: "2001:db8:e::9", serviceName: "app", cidr: "2001:db8:e::2/128")])), kind: "staticegressips")
        let metricsPort = FakeAPIServer.freePort()
        let daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(metricsPort)", "--manage-addresses", "eth0",
                                                                   "--ha-address", Self.followed, "--node-name", "r1"])
        defer { _ = daemon.stop(SIGKILL) }
        let kubectl = ["kubectl", "--kubeconfig", api.kubeconfig]
        /// The value of epokd_ha_active, with the address it follows.
        func metric() -> String? {
            (httpGet(port: metricsPort, path: "/metrics")?.1 ?? "").split(separator: "\n").first { $0.hasPrefix("epokd_ha_active{") }
                .flatMap { line in line.split(separator: " ").last.flatMap { Double($0) }.map { "\(line.prefix { $0 != " " }) \(Int($0))" } }
        }

        // Standby: the egress rule is in the table (hot standby), its address is not on the host.
        try waitUntil("the egress rule in the standby's table", seconds: 30) {
            try lab.host.exec(["nft", "list", "table", "inet", "epok"], check: false).output.contains("198.51.100.9")
        }
        try waitUntil("the bad rule rejected", seconds: 10) { daemon.output.contains("rejected: ") }
        #expect(try !Self.egressAddressOnHost(lab), "a standby router holds no managed address")
        #expect(daemon.output.contains("this router is standby (192.0.2.100 not on this host)"), "\(daemon.output)")
        #expect(try Self.holder(kubectl) == nil, "a standby router takes no Lease")
        #expect(try !Self.events(kubectl).contains("InvalidEgress"), "a standby router posts no Event")
        try waitUntil("epokd_ha_active 0", seconds: 10) { metric() == "epokd_ha_active{follows=\"192.0.2.100\"} 0" }
        #expect(try lab.external.exec(["ip", "neigh", "show", "198.51.100.9"]).output.contains("lladdr \(elsewhere)"), "nothing was announced")

        // The address arrives (keepalived would add it): active.
        try lab.host.exec(["ip", "addr", "add", "\(Self.followed)/32", "dev", "lo"])
        try waitUntil("the egress address on the active router", seconds: 10) { try Self.egressAddressOnHost(lab) }
        let mac = try lab.host.exec(["cat", "/sys/class/net/eth0/address"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        func neighbours() throws -> String {
            try lab.external.exec(["ip", "neigh", "show", "198.51.100.9"]).output + lab.external.exec(["ip", "-6", "neigh", "show", "2001:db8:e::9"]).output
        }
        do {
            try waitUntil("the announcements in the neighbour's cache", seconds: 5) {
                try neighbours().components(separatedBy: "lladdr \(mac)").count == 3
            }
        } catch {
            Issue.record("\(error): the neighbour has \(try neighbours()), the router is \(mac); \(try lab.host.exec(["ip", "-o", "addr", "show", "dev", "eth0"]).output) \(daemon.output.split(separator: "\n").filter { $0.contains("::9") || $0.contains("announce") }.joined(separator: "\n"))")
        }
        try waitUntil("the Lease held by r1", seconds: 10) { try Self.holder(kubectl) == "r1" }
        try waitUntil("epokd_ha_active 1", seconds: 10) { metric() == "epokd_ha_active{follows=\"192.0.2.100\"} 1" }
        let status = try run([epokdBinary, "status", "--netns", lab.host.path, "--metrics-address", "127.0.0.1:\(metricsPort)"]).output
        #expect(status.contains("role: active (follows 192.0.2.100) since "), "\(status)")
        let json = try run([epokdBinary, "status", "--json", "--netns", lab.host.path, "--metrics-address", "127.0.0.1:\(metricsPort)"]).output
        let role = try #require((try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["role"] as? [String: Any], "\(json)")
        #expect(role["active"] as? Bool == true && role["follows"] as? String == Self.followed && role["splitBrain"] as? Bool == false, "\(role)")
        #expect(abs((role["since"] as? Double ?? 0) - Date().timeIntervalSince1970) < 600, "since, in seconds since 1970: \(role)")
        let page = httpGet(port: metricsPort, path: "/status.json")?.1 ?? ""
        #expect(page.contains("\"role\":{") && page.contains("\"active\":true") && page.contains("\"follows\":[\"192.0.2.100\"]"), "\(page.prefix(300))")
        // A new problem now gets its Event.
        try api.apply(StaticEgressIP(metadata: ObjectMeta(name: "eip2", namespace: "default"),
                                     spec: .init(rules: [.init(egressip: "198.51.100.11", serviceName: "app", cidr: "10.0.0.2/8")])), kind: "staticegressips")
        try waitUntil("the active router's Warning Event", seconds: 10) {
            try Self.events(kubectl).contains("StaticEgressIP/InvalidEgress/spec.rules[0]: cidr: \"10.0.0.2/8\" has host bits set")
        }
        #expect(try !Self.events(kubectl).contains("10.0.0.1/8"), "what the standby saw was not posted")
        // The egress path works through the active router.
        let server = try NameServer(in: lab.external, name: "server", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { server.stop() }
        try waitUntil("the pod's flow leaving as the egress address", seconds: 10) {
            "\(try tcpProbe(from: lab.nodes[0], to: ForwardingLab.externalClient4, port: 7000, timeout: 0.5))" == "answered server:7000 from 198.51.100.9"
        }

        // A second router that holds the address too: a split brain, reported by it, the Lease left to r1.
        let other = try NetworkNamespace("r2")
        try other.exec(["ip", "addr", "add", "\(Self.followed)/32", "dev", "lo"])
        let second = try DaemonProcess(arguments: ["--interfaces", "lo", "--kubeconfig", api.kubeconfig, "--netns", other.path, "--metrics-address", "off",
                                                   "--ha-address", Self.followed, "--node-name", "r2"],
                                       log: api.directory + "/r2.log")
        defer { _ = second.stop(SIGKILL) }
        try waitUntil("the split brain reported as an Event on the Lease", seconds: 20) {
            try Self.events(kubectl).contains("Lease/SplitBrain/split brain: this router (r2) holds its --ha-address, and so does r1")
        }
        #expect(try Self.holder(kubectl) == "r1", "the holder keeps the Lease")
        _ = second.stop()

        // The address goes: standby again, the egress address and the Lease are given up.
        try lab.host.exec(["ip", "addr", "del", "\(Self.followed)/32", "dev", "lo"])
        try waitUntil("the egress address given up", seconds: 5) { try !Self.egressAddressOnHost(lab) }
        try waitUntil("the Lease given back", seconds: 10) { try Self.holder(kubectl) == "" }
        try waitUntil("epokd_ha_active 0 again", seconds: 10) { metric() == "epokd_ha_active{follows=\"192.0.2.100\"} 0" }
        #expect(try lab.host.nftList("inet", "epok").contains("198.51.100.9"), "the standby keeps its table")
        #expect(daemon.output.contains("removed 198.51.100.9, 2001:db8:e::9 from eth0: this router is standby"), "\(daemon.output)")
    }

    @Test("--ha-address refuses what is not an address, and --once")
    func refusals() throws {
        let ns = try NetworkNamespace("ha")
        let bad = try run([epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--source", "/dev/null", "--ha-address", "192.0.2.300"], check: false)
        #expect(bad.status != 0 && bad.error.contains("--ha-address 192.0.2.300 is not an IPv4 or IPv6 address"), "\(bad.error)")
        let once = try run([epokdBinary, "--interfaces", "eth0", "--source", "/dev/null", "--once", "--ha-address", "192.0.2.1"], check: false)
        #expect(once.status != 0 && once.error.contains("does not go with --once"), "\(once.error)")
        #expect(try ns.exec(["nft", "list", "tables"]).output.isEmpty, "refused before anything reached the kernel")
    }
}

/// The pair of `deploy/ha/`: keepalived and conntrackd from Debian, configured from the repository's files.
@Suite("A pair of routers with keepalived and conntrackd", .serialized)
struct RouterPairFailoverTests {
    static let deploy = RouterHostTests.repository + "/deploy/ha"

    /// The client's source port of a TCP connection.
    static func sourcePort(_ flow: FlowClient) -> UInt16 {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(flow.fd, $0, &length) } }
        return UInt16(bigEndian: address.sin_port)
    }

    @Test("router-a dies (processes killed, links down) while a TCP connection and a UDP flow run through the front door: with conntrackd both go on through router-b, the UDP flow's gap under 3 s; without it the TCP connection is reset; new connections work, and the pod's egress address moves to router-b within 2 s",
          arguments: [true, false])
    func failover(conntrackd: Bool) throws {
        let lab = try RouterPairLab.pair(epokd: epokdBinary, deploy: Self.deploy, conntrackd: conntrackd)
        defer { lab.stopAll() }
        try waitUntil("the egress address on router-a", seconds: 10) { try lab.holds(0, "192.168.1.50") }
        #expect(try !lab.holds(1, "192.168.1.50") && !lab.holds(1, RouterPairLab.frontDoor), "router-b is standby")

        let tcp = try FlowClient.tcp(from: lab.client, to: RouterPairLab.frontDoor, port: 8080)
        guard case .answered(let first) = tcp.exchange("a") else { Issue.record("no answer through router-a"); return }
        let node = String(first.prefix { $0 != ":" })
        let udp = try UDPFlowWatch(from: lab.client, to: RouterPairLab.frontDoor, port: 5353)
        defer { udp.stop() }
        try waitUntil("the UDP flow answered", seconds: 10) { udp.answerCount >= 5 }
        func egress() throws -> String { "\(try tcpProbe(from: lab.nodes[0], to: RouterPairLab.clientAddress, port: 7000, timeout: 0.5))" }
        #expect(try egress() == "answered client:7000 from 192.168.1.50")
        if conntrackd {
            try waitUntil("the TCP flow replicated to router-b's cache", seconds: 10) {
                try lab.routers[1].exec(["conntrackd", "-C", lab.scratch.path + "/conntrackd-1.conf", "-e"]).output.contains("sport=\(Self.sourcePort(tcp)) dport=8080")
            }
        }

        try lab.crash(0)
        try waitUntil("router-b holding the front door", seconds: 15) { try lab.holds(1, RouterPairLab.frontDoor) }
        try waitUntil("the pod leaving as its egress address through router-b", seconds: 2) {
            try lab.holds(1, "192.168.1.50") && egress() == "answered client:7000 from 192.168.1.50"
        }
        let before = udp.answerCount
        try waitUntil("the UDP flow answered through router-b", seconds: 10) { udp.answerCount > before + 5 }
        #expect(lab.output("epokd", 1).contains("this router is now active (holds 192.168.1.1)"), "\(lab.output("epokd", 1))")
        if conntrackd {
            // The notify command commits the replicated flows to router-b's kernel.
            try waitUntil("the TCP flow in router-b's kernel", seconds: 10) {
                try lab.routers[1].exec(["conntrack", "-L", "-p", "tcp", "--dport", "8080"], check: false).output.contains("sport=\(Self.sourcePort(tcp)) dport=8080")
            }
            #expect(tcp.exchange("b") == .answered("\(node):30080:b"), "the connection goes on, to the same node")
        } else {
            #expect(tcp.exchange("b") == .refused, "without conntrackd router-b knows nothing of the connection: it is reset")
        }
        let gap = udp.gap
        #expect(gap.seconds < 3, "the UDP flow's longest gap: \(gap.seconds) s")
        let fresh = try FlowClient.tcp(from: lab.client, to: RouterPairLab.frontDoor, port: 8080).exchange("c")
        #expect("\(fresh)".hasPrefix("answered n") && "\(fresh)".hasSuffix(":30080:c"), "a new connection through router-b: \(fresh)")
    }
}

/// Several routers active at once behind ECMP: `--spread hash` sends a flow to the same node on every router.
@Suite("Active-active routers with --spread hash", .serialized)
struct ActiveActiveTests {
    @Test("eight TCP connections through router-a, moved to router-b (client and node routes switched): with --spread hash all eight go on; with round-robin they do not")
    func movedBetweenRouters() throws {
        let hashed = try RouterPairLab.movedConnections(epokd: epokdBinary, spread: "hash")
        #expect(hashed.kept == 8, "kept \(hashed.kept) of 8 with --spread hash")
        #expect(hashed.nodes.count == 2, "the connections were spread over both nodes: \(hashed.nodes)")
        let counted = try RouterPairLab.movedConnections(epokd: epokdBinary, spread: "round-robin")
        #expect(counted.kept < 8, "with round-robin, router-b sends some of the moved connections to another node (kept \(counted.kept) of 8)")
    }
}
