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
        // The client's side learns addresses from gratuitous ARP (it creates entries for them).
        try lab.external.exec(["sysctl", "-qw", "net.ipv4.conf.all.arp_accept=1", "net.ipv4.conf.eth0.arp_accept=1"])
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        try api.apply(webService("app"), kind: "services")
        try api.apply(webSlice("app", ready: [ForwardingLab.node4(1)]), kind: "endpointslices")
        try api.apply(StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: "default"),
                                     spec: .init(rules: [.init(egressip: "198.51.100.9", serviceName: "app", cidr: "198.51.100.2/32"),
                                                         .init(egressip: "198.51.100.10", serviceName: "app", cidr: "10.0.0.1/8")])), kind: "staticegressips")
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
        #expect(try !lab.external.exec(["ip", "neigh", "show", "198.51.100.9"]).output.contains("lladdr"))

        // The address arrives (keepalived would add it): active.
        try lab.host.exec(["ip", "addr", "add", "\(Self.followed)/32", "dev", "lo"])
        try waitUntil("the egress address on the active router", seconds: 10) { try Self.egressAddressOnHost(lab) }
        let mac = try lab.host.exec(["cat", "/sys/class/net/eth0/address"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        try waitUntil("the announcement in the neighbour's cache", seconds: 5) {
            try lab.external.exec(["ip", "neigh", "show", "198.51.100.9"]).output.contains("lladdr \(mac)")
        }
        try waitUntil("the Lease held by r1", seconds: 10) { try Self.holder(kubectl) == "r1" }
        try waitUntil("epokd_ha_active 1", seconds: 10) { metric() == "epokd_ha_active{follows=\"192.0.2.100\"} 1" }
        let status = try run([epokdBinary, "status", "--netns", lab.host.path, "--metrics-address", "127.0.0.1:\(metricsPort)"]).output
        #expect(status.contains("role: active (follows 192.0.2.100) since "), "\(status)")
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
        #expect(daemon.output.contains("removed 198.51.100.9 from eth0: this router is standby"), "\(daemon.output)")
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
