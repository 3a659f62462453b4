import Control
import Dataplane
import FakeKube
import Foundation
import Logging
import NetnsLab
import Testing

/// Drives the lab's host namespace from cluster snapshots, as the daemon does: desired state, elements, one diff transaction.
final class Harness {
    let lab: ForwardingLab
    let loop: ReconcileLoop
    var nodes: [Node]

    init(tcpPorts: [UInt16] = [22, 30022, 30080], udpPorts: [UInt16] = [30053], echoPorts: [UInt16] = []) throws {
        lab = try ForwardingLab(tcpPorts: tcpPorts, udpPorts: udpPorts, echoPorts: echoPorts)
        loop = ReconcileLoop(
            firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: lab.host.path)),
            conntrack: try Conntrack(namespacePath: lab.host.path), events: nil, options: options, logger: Logger(label: "test"))
        nodes = (1...3).map { node("n\($0)", addresses: [ForwardingLab.node4($0), ForwardingLab.node6($0)]) }
    }

    /// Reconciles the lab's host to `services` and the harness's nodes, as the daemon does.
    @discardableResult
    func apply(_ services: [Service]) throws -> Firewall.Outcome {
        try loop.apply([.snapshot(ClusterSnapshot(services: services, nodes: nodes))])
    }

    /// The host's conntrack entries for `proto` to `port`, as the conntrack tool lists them.
    func conntrackEntries(_ proto: String, port: UInt16) throws -> [String] {
        try lab.host.exec(["conntrack", "-L", "-p", proto, "--dport", String(port)]).output.split(separator: "\n").map(String.init)
    }

    /// The node names answering `count` new TCP connections.
    func tcpAnswers(_ count: Int, from ns: NetworkNamespace, to address: String, port: UInt16, source: String? = nil) throws -> [String] {
        try (0..<count).map { _ in
            let probe = try tcpProbe(from: ns, to: address, port: port, source: source)
            guard case .answered(let who) = probe else { return "\(probe)" }
            return who
        }
    }

    func udpAnswers(_ count: Int, from ns: NetworkNamespace, to address: String, port: UInt16) throws -> [String] {
        try (0..<count).map { _ in
            let probe = try udpProbe(from: ns, to: address, port: port)
            guard case .answered(let who) = probe else { return "\(probe)" }
            return who
        }
    }
}

let sshAndDNS = service("ssh", annotations: [EpokAnnotation.externalPorts: "22:30022,53:30053:udp"],
                        nodePorts: [(30022, "TCP"), (30053, "UDP")])

@Suite("Forwarding real packets through the host namespace")
struct ForwardingEndToEndTests {
    @Test("TCP and UDP reach node ports from both interfaces, IPv4 and IPv6, spread over every node")
    func forwardsAndSpreads() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        let all: Set = ["n1:30022", "n2:30022", "n3:30022"]
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22)) == all)
        #expect(Set(try h.tcpAnswers(6, from: h.lab.internal, to: ForwardingLab.hostInternal4, port: 22)) == all)
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal6, port: 22)) == all)
        #expect(Set(try h.tcpAnswers(6, from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 22)) == all)
        #expect(Set(try h.udpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53)) == ["n1:30053", "n2:30053", "n3:30053"])
        #expect(Set(try h.udpAnswers(6, from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 53)) == ["n1:30053", "n2:30053", "n3:30053"])
    }

    @Test("a mapping's counter counts every packet forwarded for it once, both directions, TCP and UDP")
    func countersCountEveryPacketOnce() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        try h.lab.host.exec(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"])
        func counted(_ proto: L4Protocol, _ port: Int) throws -> (packets: UInt64, bytes: UInt64) {
            let counters = try Nftables(namespacePath: h.lab.host.path).counters(of: ForwardingRuleset.servicesSet, in: Table(name: "epok"))
            let counter = counters[Element(key: [.l4proto(proto), .port(Port(port)!)]).identity]
            return (counter?.packets ?? 0, counter?.bytes ?? 0)
        }
        // Ten UDP flows of one datagram each way: "ping" (32 bytes over IPv4, 52 over IPv6), "nK:30053" (36, 56).
        #expect(try h.udpAnswers(5, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53).allSatisfy { $0.hasSuffix(":30053") })
        #expect(try h.udpAnswers(5, from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 53).allSatisfy { $0.hasSuffix(":30053") })
        let udp = try counted(.udp, 53)
        #expect(udp.packets == 20 && udp.bytes == 5 * (32 + 36) + 5 * (52 + 56), "UDP counted \(udp)")
        // TCP connections: the counter equals the kernel's own accounting of them (conntrack's, both directions).
        #expect(try h.tcpAnswers(4, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22).allSatisfy { $0.hasSuffix(":30022") })
        func accounted() throws -> (packets: UInt64, bytes: UInt64) {
            let fields = try h.conntrackEntries("tcp", port: 22).flatMap { $0.split(separator: " ") }
            func sum(_ name: String) -> UInt64 { fields.compactMap { $0.hasPrefix(name) ? UInt64($0.dropFirst(name.count)) : nil }.reduce(0, +) }
            return (sum("packets="), sum("bytes="))
        }
        try waitUntil("the counter equals conntrack's accounting of the connections") {
            let (tcp, conntrack) = (try counted(.tcp, 22), try accounted())
            return conntrack.packets >= 4 * 5 && tcp == conntrack
        }
    }

    @Test("nft list prints the table without an error, and nft -f of that listing recreates a table that forwards the same way")
    func printableAndReloadable() throws {
        let h = try Harness()
        var guarded = sshAndDNS
        guarded.metadata.annotations?[EpokAnnotation.allowRange] = "198.51.100.0/24,2001:db8:e::/64"
        try h.apply([guarded, service("web", annotations: [EpokAnnotation.externalPorts: "80:30080", EpokAnnotation.internal: ""],
                                      nodePorts: [(30080, "TCP")])])
        let listed = try h.lab.host.exec(["nft", "list", "table", "inet", "epok"])
        #expect(listed.error.isEmpty, "nft printed errors: \(listed.error)")
        for statement in ["dnat ip to numgen inc mod 60 map @backends4:meta l4proto . tcp dport map @services",
                          "dnat ip6 to numgen inc mod 60 map @backends6:meta l4proto . udp dport map @services",
                          "typeof numgen inc mod 60 : ip daddr", "meta l4proto . ct original proto-dst @services accept",
                          "comment \"default/ssh\" : 30022"] {
            #expect(listed.output.contains(statement), "the listing says \(statement)")
        }
        try h.lab.host.exec(["nft", "delete", "table", "inet", "epok"])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 0.5) != .answered("n1:30022"),
                "without the table nothing is forwarded")
        try run(["ip", "netns", "exec", h.lab.host.name, "nft", "-f", "-"], input: listed.output)
        #expect(try h.lab.host.nftList("inet", "epok") == listed.output, "nft reloads exactly what it printed")
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22)) == ["n1:30022", "n2:30022", "n3:30022"])
        #expect(Set(try h.udpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal6, port: 53)) == ["n1:30053", "n2:30053", "n3:30053"])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 80, timeout: 1) == .timedOut, "internal stays internal")
        // epokd recognises the reloaded table as its own and finds nothing to change.
        let outcome = try h.loop.apply([], repair: true)
        #expect(outcome == Firewall.Outcome(rebuilt: false, added: 0, deleted: 0))
    }

    @Test("an internal Service is dropped on the external interface and reachable on the internal one")
    func internalServiceIsDroppedOnExternalInterface() throws {
        let h = try Harness()
        var s = sshAndDNS
        s.metadata.annotations?[EpokAnnotation.internal] = "true"
        try h.apply([s])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 1) == .timedOut)
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal6, port: 22, timeout: 1) == .timedOut)
        #expect(try udpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53, timeout: 1) == .timedOut)
        // The external client cannot sneak in through the host's internal address either.
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostInternal4, port: 22, timeout: 1) == .timedOut)
        #expect(try h.tcpAnswers(1, from: h.lab.internal, to: ForwardingLab.hostInternal4, port: 22).first?.hasSuffix(":30022") == true)
        #expect(try h.udpAnswers(1, from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 53).first?.hasSuffix(":30053") == true)
    }

    @Test("allow-range admits sources inside it and drops the others, IPv4 and IPv6")
    func allowRangeFiltersBySource() throws {
        let h = try Harness()
        var s = sshAndDNS
        s.metadata.annotations?[EpokAnnotation.allowRange] = "\(ForwardingLab.externalClient4)/32, \(ForwardingLab.externalClient6)/128"
        try h.apply([s])
        let lab = h.lab
        #expect(try h.tcpAnswers(1, from: lab.external, to: ForwardingLab.hostExternal4, port: 22, source: ForwardingLab.externalClient4).first?.hasSuffix(":30022") == true)
        #expect(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22, source: ForwardingLab.otherExternalClient4, timeout: 1) == .timedOut)
        #expect(try h.tcpAnswers(1, from: lab.external, to: ForwardingLab.hostExternal6, port: 22, source: ForwardingLab.externalClient6).first?.hasSuffix(":30022") == true)
        #expect(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal6, port: 22, source: ForwardingLab.otherExternalClient6, timeout: 1) == .timedOut)
        #expect(try tcpProbe(from: lab.internal, to: ForwardingLab.hostInternal4, port: 22, timeout: 1) == .timedOut)
    }

    @Test("a node that goes NotReady or is excluded receives no new connection after the change")
    func ineligibleNodesStopReceiving() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        h.nodes[1] = node("n2", ready: false, addresses: [ForwardingLab.node4(2), ForwardingLab.node6(2)])
        h.nodes[2] = node("n3", addresses: [ForwardingLab.node4(3), ForwardingLab.node6(3)], labels: [EpokAnnotation.excludeLabel: ""])
        let outcome = try h.apply([sshAndDNS])
        #expect(!outcome.rebuilt)
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22)) == ["n1:30022"])
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal6, port: 22)) == ["n1:30022"])
        #expect(Set(try h.udpAnswers(6, from: h.lab.internal, to: ForwardingLab.hostInternal4, port: 53)) == ["n1:30053"])
        h.nodes[0] = node("n1", addresses: [ForwardingLab.node4(1), ForwardingLab.node6(1)], annotations: [EpokAnnotation.exclude: "yes"])
        try h.apply([sshAndDNS])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 1) == .refused,
                "with no eligible node the port is refused, not handed to the host")
    }

    @Test("removing the annotation removes the forwarding")
    func removedAnnotationRemovesForwarding() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        #expect(try h.tcpAnswers(1, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22).first?.hasSuffix(":30022") == true)
        var plain = sshAndDNS
        plain.metadata.annotations = [:]
        let outcome = try h.apply([plain])
        #expect(outcome.deleted > 0 && outcome.added == 0)
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 1) == .refused)
        #expect(try udpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53, timeout: 1) == .refused)
    }

    @Test("transit traffic to a node's own address is routed untouched, even on a mapped port")
    func transitTrafficIsUntouched() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        for _ in 0..<3 {
            #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(1), port: 22) == .answered("n1:22"))
            #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node6(2), port: 22) == .answered("n2:22"))
        }
    }

    @Test("the host's own connections to its addresses are forwarded; loopback is left alone")
    func hostConnectionsToItself() throws {
        let h = try Harness()
        try h.apply([sshAndDNS])
        #expect(try h.tcpAnswers(1, from: h.lab.host, to: ForwardingLab.hostExternal4, port: 22).first?.hasSuffix(":30022") == true)
        #expect(try h.tcpAnswers(1, from: h.lab.host, to: ForwardingLab.hostInternal6, port: 22).first?.hasSuffix(":30022") == true)
        #expect(try tcpProbe(from: h.lab.host, to: "127.0.0.1", port: 22, timeout: 1) == .refused)
        #expect(try tcpProbe(from: h.lab.host, to: "::1", port: 22, timeout: 1) == .refused)
    }
}

@Suite("A mapping with a group of its own, with real packets")
struct OwnGroupTests {
    @Test("a grouped port goes only to its group's nodes, an empty group is refused, the shared ports are unaffected; nft prints and reloads it")
    func ownGroup() throws {
        let lab = try ForwardingLab(tcpPorts: [30022, 30080], udpPorts: [30053])
        let nft = try Nftables(namespacePath: lab.host.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: nft)
        let nodes = (1...3).map { NodeAddress(node: "n\($0)", ipv4: IPv4Address(ForwardingLab.node4($0))!, ipv6: IPv6Address(ForwardingLab.node6($0))!) }
        func state(_ group: [NodeAddress]) -> ForwardingState {
            ForwardingState(interfaces: ["eth0", "wg0"], nodes: nodes, mappings: [
                Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!, group: NodeGroup(nodes: group, slots: ForwardingRuleset.baseSlots)),
                Mapping(proto: .udp, hostPort: Port(53)!, nodePort: Port(30053)!, group: NodeGroup(nodes: group, slots: ForwardingRuleset.baseSlots)),
                Mapping(proto: .tcp, hostPort: Port(80)!, nodePort: Port(30080)!),
            ])
        }
        try firewall.synchronize(ForwardingRuleset.elements(for: state([nodes[1]])))
        func answers(_ port: UInt16, _ address: String = ForwardingLab.hostExternal4, udp: Bool = false) throws -> Set<String> {
            Set(try (0..<6).map { _ in "\(udp ? try udpProbe(from: lab.external, to: address, port: port) : try tcpProbe(from: lab.external, to: address, port: port))" })
        }
        #expect(try answers(22) == ["answered n2:30022"])
        #expect(try answers(22, ForwardingLab.hostExternal6) == ["answered n2:30022"])
        #expect(try answers(53, udp: true) == ["answered n2:30053"])
        #expect(try answers(80) == ["answered n1:30080", "answered n2:30080", "answered n3:30080"])

        try firewall.apply(ForwardingRuleset.elements(for: state([nodes[0], nodes[2]])))
        #expect(try answers(22) == ["answered n1:30022", "answered n3:30022"])

        try firewall.apply(ForwardingRuleset.elements(for: state([])))
        #expect(try answers(22) == ["refused"], "no node in the group: refused, never the shared group")
        #expect(try answers(80).count == 3)

        try firewall.apply(ForwardingRuleset.elements(for: state([nodes[2]])))
        let listing = try lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty)
        #expect(listing.output.contains("dnat ip to meta l4proto . tcp dport . numgen inc mod 60 map @groups4:meta l4proto . tcp dport map @services"), "\(listing.output)")
        #expect(listing.output.contains("typeof meta l4proto . th dport . numgen inc mod 60 : ip daddr"))
        try lab.host.exec(["nft", "flush", "ruleset"])
        let reload = try lab.host.exec(["nft", "-f", "-"], input: listing.output)
        #expect(reload.error.isEmpty)
        #expect(try lab.host.exec(["nft", "list", "ruleset"]).output == listing.output)
        #expect(try answers(22) == ["answered n3:30022"], "the reloaded table forwards the same way")
    }
}

@Suite("externalTrafficPolicy: Local with real packets")
struct LocalPolicyEndToEndTests {
    @Test("every new connection lands on the node with the endpoint, with the client's own source address; the endpoint moves, traffic follows; none: refused")
    func local() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        let whoami = try h.lab.nodes.enumerated().map { try NameServer(in: $0.element, name: "n\($0.offset + 1)", tcpPorts: [30600], udpPorts: [], reportingPeer: true) }
        defer { whoami.forEach { $0.stop() } }
        var web = service("web", annotations: [EpokAnnotation.externalPorts: "600:30600"], nodePorts: [(30600, "TCP")])
        web.spec.externalTrafficPolicy = "Local"
        func slice(_ node: String?) -> EndpointSlice {
            EndpointSlice(metadata: ObjectMeta(name: "web-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: "web"]),
                          endpoints: node.map { [EndpointSlice.Endpoint(addresses: ["10.244.2.7"], conditions: .init(ready: true), nodeName: $0)] } ?? [])
        }
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: h.nodes, endpointSlices: [slice("n2")]))])
        let answers = try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 600)
        #expect(Set(answers) == ["n2:30600 from \(ForwardingLab.externalClient4)"], "only n2, and the client's address unchanged: \(answers)")
        let fromOther = try h.tcpAnswers(3, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 600, source: ForwardingLab.otherExternalClient4)
        #expect(Set(fromOther) == ["n2:30600 from \(ForwardingLab.otherExternalClient4)"])

        try h.loop.apply([.endpointSliceChanged(slice("n3"))])
        #expect(Set(try h.tcpAnswers(6, from: h.lab.internal, to: ForwardingLab.hostInternal4, port: 600)) == ["n3:30600 from \(ForwardingLab.internalClient4)"])

        try h.loop.apply([.endpointSliceChanged(slice(nil))])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 600) == .refused, "no endpoint: refused")
    }
}

@Suite("externalTrafficPolicy: Local in the daemon, watching the fake API server")
struct LocalPolicyDaemonTests {
    @Test("EndpointSlices from the API steer a Local Service's connections; kubectl lists them; a moved endpoint is followed")
    func daemon() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [])
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        var web = makeService("web", annotation: "22:30022")
        web.spec.externalTrafficPolicy = "Local"
        try api.apply(web, kind: "services")
        func slice(_ node: String) -> EndpointSlice {
            EndpointSlice(metadata: ObjectMeta(name: "web-abcde", namespace: "default", labels: [EndpointSlice.serviceNameLabel: "web"]),
                          endpoints: [EndpointSlice.Endpoint(addresses: ["10.244.1.9"], conditions: .init(ready: true), nodeName: node)])
        }
        try api.apply(slice("n3"), kind: "endpointslices")
        let daemon = try DaemonProcess(lab: lab, api: api)
        defer { _ = daemon.stop(SIGKILL) }
        func answers() throws -> Set<String> {
            Set(try (0..<6).map { _ in "\(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 0.5))" })
        }
        try waitUntil("connections only to n3", seconds: 30) { try answers() == ["answered n3:30022"] }
        let listed = try run(["kubectl", "--kubeconfig", api.kubeconfig, "get", "endpointslices", "-A", "-o", "name"], check: false)
        #expect(listed.output.contains("endpointslice.discovery.k8s.io/web-abcde"), "\(listed.output)\(listed.error)")
        try api.apply(slice("n1"), kind: "endpointslices")
        try waitUntil("the moved endpoint", seconds: 30) { try answers() == ["answered n1:30022"] }
    }
}

@Suite("Static egress addresses, with real packets")
struct EgressEndToEndTests {
    @Test("a selected pod reaches a selected destination with the egress address; others keep theirs; the pod moves, the rule follows; removed, sources are the pods' own")
    func egress() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        // The egress address on the host (what --manage-addresses would add), and a server outside that says who called.
        try h.lab.host.exec(["ip", "addr", "add", "198.51.100.9/32", "dev", "eth0"])
        let outside = try NameServer(in: h.lab.external, name: "outside", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { outside.stop() }
        var app = service("app", annotations: [EpokAnnotation.egressIP: "198.51.100.9", EpokAnnotation.egressDestinations: "198.51.100.2/32"])
        func slice(_ pod: String) -> EndpointSlice {
            EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: "app"]),
                          endpoints: [EndpointSlice.Endpoint(addresses: [pod], conditions: .init(ready: true))])
        }
        func source(from node: Int, to address: String = ForwardingLab.externalClient4) throws -> String {
            "\(try tcpProbe(from: h.lab.nodes[node - 1], to: address, port: 7000))"
        }
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [app], nodes: h.nodes, endpointSlices: [slice(ForwardingLab.node4(1))]))])
        #expect(try source(from: 1) == "answered outside:7000 from 198.51.100.9")
        #expect(try source(from: 2) == "answered outside:7000 from \(ForwardingLab.node4(2))", "an unselected pod keeps its address")
        #expect(try source(from: 1, to: ForwardingLab.otherExternalClient4) == "answered outside:7000 from \(ForwardingLab.node4(1))",
                "another destination sees the pod's own address")
        let listing = try h.lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty && listing.output.contains("snat ip to ip saddr . ip daddr map @egress4"), "\(listing.output)")

        // A UDP flow from the pod, SNATed while the rule applies.
        let udpOutside = try NameServer(in: h.lab.external, name: "outside", tcpPorts: [], udpPorts: [7001])
        defer { udpOutside.stop() }
        let flow = try FlowClient.udp(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 7001)
        #expect(flow.exchange("q") == .answered("outside:7001"))
        func snatted() throws -> Bool {
            try h.lab.host.exec(["conntrack", "-L", "-p", "udp", "-s", ForwardingLab.node4(1)]).output.contains("dst=198.51.100.9 ")
        }
        #expect(try snatted())

        try h.loop.apply([.endpointSliceChanged(slice(ForwardingLab.node4(2)))])
        #expect(try !snatted(), "the flow SNATed to an address that no longer applies is flushed")
        #expect(try source(from: 2) == "answered outside:7000 from 198.51.100.9", "the moved pod's new address is SNATed")
        #expect(try source(from: 1) == "answered outside:7000 from \(ForwardingLab.node4(1))", "the old one is not")

        app.metadata.annotations = [:]
        try h.loop.apply([.serviceChanged(app)])
        #expect(try source(from: 2) == "answered outside:7000 from \(ForwardingLab.node4(2))")
    }
}

@Suite("--spread hash: a flow keeps its node on any router with the same seed")
struct SpreadHashTests {
    /// The node each of `flows` reaches, in `order`, through a table made anew (another router, or this one
    /// after a restart with its flows gone) with `spread`.
    func nodes(_ lab: ForwardingLab, _ flows: [FlowClient], order: [Int], spread: ForwardingRuleset.Spread) throws -> [Int: String] {
        _ = try lab.host.exec(["nft", "delete", "table", "inet", "epok"], check: false)
        try lab.host.exec(["conntrack", "-F"])
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok", .init(spread: spread)), nftables: try Nftables(namespacePath: lab.host.path))
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options,
                                 logger: Logger(label: "spread", factory: { _ in SwiftLogNoOpLogHandler() }))
        try loop.apply([.snapshot(ClusterSnapshot(services: [sshAndDNS], nodes: (1...3).map { node("n\($0)", addresses: [ForwardingLab.node4($0)]) }))])
        var reached: [Int: String] = [:]
        for i in order {
            guard case .answered(let who) = flows[i].exchange("q") else { continue }
            reached[i] = who
        }
        return reached
    }

    @Test("the same UDP flows reach the same nodes through two tables with one seed, in any order; round-robin moves them")
    func sameNodeAnywhere() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [30053])
        let flows = try (0..<12).map { _ in try FlowClient.udp(from: lab.external, to: ForwardingLab.hostExternal4, port: 53) }
        let forward = Array(0..<12), rotated = Array(1..<12) + [0]
        let first = try nodes(lab, flows, order: forward, spread: .hash(seed: 7))
        #expect(first.count == 12 && Set(first.values).count > 1, "every flow answered, spread over nodes: \(first)")
        #expect(try nodes(lab, flows, order: rotated, spread: .hash(seed: 7)) == first, "another router, flows in another order: the same nodes")
        // Round-robin: each table counts on its own, so the same flows in another order land elsewhere.
        let counted = try nodes(lab, flows, order: forward, spread: .roundRobin)
        #expect(try nodes(lab, flows, order: rotated, spread: .roundRobin) != counted)
        // The table stays printable and reloadable by nft with the hash in it, own groups' rules too (a checked Service).
        _ = try nodes(lab, flows, order: forward, spread: .hash(seed: 7))
        var local = sshAndDNS
        local.spec.type = "NodePort"
        local.spec.externalTrafficPolicy = "Local"
        let ready = EndpointSlice(metadata: ObjectMeta(name: "ssh-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: "ssh"]),
                                  endpoints: [.init(addresses: ["10.244.1.5"], conditions: .init(ready: true), nodeName: "n1")], ports: [])
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok", .init(spread: .hash(seed: 7))),
                                                    nftables: try Nftables(namespacePath: lab.host.path)),
                                 conntrack: nil, events: nil, options: options, logger: Logger(label: "spread", factory: { _ in SwiftLogNoOpLogHandler() }))
        try loop.apply([.snapshot(ClusterSnapshot(services: [local], nodes: (1...3).map { node("n\($0)", addresses: [ForwardingLab.node4($0)]) },
                                                  endpointSlices: [ready]))])
        let listing = try lab.host.exec(["nft", "list", "table", "inet", "epok"]).output
        #expect(listing.contains("chain nat_grouped") && listing.contains("udp dport . jhash ip saddr . ip daddr . udp sport mod 60 seed 0x7"), "\(listing)")
        #expect(listing.contains("jhash ip saddr . ip daddr . udp sport mod 60 seed 0x7"), "\(listing.split(separator: "\n").filter { $0.contains("hash") })")
        try lab.host.exec(["nft", "delete", "table", "inet", "epok"])
        try lab.host.exec(["nft", "-f", "-"], input: listing)
        #expect(try lab.host.exec(["nft", "list", "table", "inet", "epok"]).output == listing)
    }
}
