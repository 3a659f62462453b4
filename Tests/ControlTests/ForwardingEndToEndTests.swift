import Control
import Dataplane
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
                          "typeof numgen inc mod 60 : ip daddr", "meta l4proto . ct original proto-dst @services counter",
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
