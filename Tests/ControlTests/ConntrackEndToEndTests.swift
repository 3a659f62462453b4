import Control
import Dataplane
import NetnsLab
import Testing

@Suite("Stale conntrack entries are flushed on remap, and only those")
struct ConntrackEndToEndTests {
    static let dns = service("dns", annotations: [EpokAnnotation.externalPorts: "53:30053:udp"], nodePorts: [(30053, "UDP"), (30054, "UDP")])
    static let syslog = service("syslog", annotations: [EpokAnnotation.externalPorts: "514:30514:udp"], nodePorts: [(30514, "UDP")])

    func answer(_ probe: Probe) -> String? {
        if case .answered(let who) = probe { return who }
        return nil
    }

    @Test("a UDP stream follows a node removal without changing its socket; an unrelated stream keeps its entry")
    func udpFollowsNodeRemoval() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [30053, 30514])
        try h.apply([Self.dns, Self.syslog])
        let stream = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53)
        let first = try #require(answer(stream.exchange("q1")))
        let other = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 514)
        let otherNode = try #require(answer(other.exchange("log1")))
        #expect(answer(stream.exchange("q2")) == first, "without a change the stream sticks to its node")
        let removed = String(first.prefix(2))
        try #require(removed != String(otherNode.prefix(2)), "round-robin sent the two streams to different nodes")
        let otherEntriesBefore = try h.conntrackEntries("udp", port: 514)

        let index = Int(removed.dropFirst())! - 1
        h.nodes[index] = node(removed, ready: false, addresses: [ForwardingLab.node4(index + 1), ForwardingLab.node6(index + 1)])
        try h.apply([Self.dns, Self.syslog])

        let next = try #require(answer(stream.exchange("q3")))
        #expect(!next.hasPrefix(removed), "the same socket now reaches another node (\(next))")
        #expect(next.hasSuffix(":30053"))
        #expect(try h.conntrackEntries("udp", port: 514) == otherEntriesBefore, "the unrelated stream's entry is untouched")
        #expect(answer(other.exchange("log2")) == otherNode)
    }

    @Test("the kernel-filtered dump returns exactly the selected flows, IPv4 and IPv6")
    func filteredDump() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [30053, 30514])
        try h.apply([Self.dns, Self.syslog])
        let a = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53)
        let b = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal6, port: 53)
        let c = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 514)
        for client in [a, b, c] { #expect(answer(client.exchange("x")) != nil) }
        let conntrack = try Conntrack(namespacePath: h.lab.host.path)
        let dns = try conntrack.flows(ConntrackFilter(proto: .udp, destinationPort: .p(53)))
        #expect(Set(dns.map(\.destination)) == [.v4(IPv4Address(198, 51, 100, 1)), .v6(IPv6Address("2001:db8:e::1")!)])
        #expect(dns.allSatisfy { $0.destinationNAT && $0.replySourcePort == 30053 })
        #expect(try conntrack.flows(ConntrackFilter(proto: .tcp, destinationPort: .p(53))).isEmpty)
        #expect(try conntrack.flows(ConntrackFilter(proto: .udp, destinationPort: .p(514))).count == 1)
        #expect(try conntrack.flows().count == 3)
    }

    @Test("a UDP stream follows a repointed node port")
    func udpFollowsRepoint() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [30053, 30054, 30514])
        try h.apply([Self.dns, Self.syslog])
        let stream = try FlowClient.udp(from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 53)
        #expect(try #require(answer(stream.exchange("q1"))).hasSuffix(":30053"))
        let other = try FlowClient.udp(from: h.lab.internal, to: ForwardingLab.hostInternal6, port: 514)
        #expect(answer(other.exchange("log1")) != nil)
        let otherEntriesBefore = try h.conntrackEntries("udp", port: 514)

        var moved = Self.dns
        moved.metadata.annotations?[EpokAnnotation.externalPorts] = "53:30054:udp"
        try h.apply([moved, Self.syslog])
        #expect(try #require(answer(stream.exchange("q2"))).hasSuffix(":30054"))
        #expect(try h.conntrackEntries("udp", port: 514) == otherEntriesBefore)
    }

    @Test("a TCP connection whose source leaves the allow-range is cut; an allowed one stays up")
    func tcpCutWhenSourceNoLongerAllowed() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [], echoPorts: [30432])
        var db = service("db", annotations: [EpokAnnotation.externalPorts: "5432:30432", EpokAnnotation.allowRange: "198.51.100.0/24"],
                         nodePorts: [(30432, "TCP")])
        try h.apply([db])
        let leaving = try FlowClient.tcp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 5432, source: ForwardingLab.otherExternalClient4)
        let staying = try FlowClient.tcp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 5432, source: ForwardingLab.externalClient4)
        #expect(answer(leaving.exchange("a"))?.hasSuffix(":30432:a") == true)
        #expect(answer(staying.exchange("b"))?.hasSuffix(":30432:b") == true)
        #expect(try h.conntrackEntries("tcp", port: 5432).contains { $0.contains("src=\(ForwardingLab.otherExternalClient4) ") })

        db.metadata.annotations?[EpokAnnotation.allowRange] = "\(ForwardingLab.externalClient4)/32"
        try h.apply([db])
        #expect(!(try h.conntrackEntries("tcp", port: 5432).contains { $0.contains("src=\(ForwardingLab.otherExternalClient4) ") }),
                "the refused source's entry is deleted")
        #expect(answer(leaving.exchange("c", timeout: 1)) == nil, "the refused connection gets nothing back")
        #expect(answer(staying.exchange("d"))?.hasSuffix(":30432:d") == true, "the allowed connection carries on")
    }
}

@Suite("Which flows a change makes stale")
struct StaleFlowsTests {
    let n1 = NodeAddress(node: "n1", ipv4: IPv4Address(10, 0, 1, 1))
    let n2 = NodeAddress(node: "n2", ipv4: IPv4Address(10, 0, 1, 2))
    let ssh = Mapping(proto: .tcp, hostPort: .p(22), nodePort: .p(30022))
    let web = Mapping(proto: .tcp, hostPort: .p(80), nodePort: .p(30080))

    func flow(_ port: UInt16, to backend: IPv4Address, nodePort: UInt16, from source: IPv4Address = IPv4Address(198, 51, 100, 2), dnat: Bool = true) -> TrackedFlow {
        TrackedFlow(proto: .tcp, source: .v4(source), sourcePort: 40000, destination: .v4(IPv4Address(198, 51, 100, 1)), destinationPort: port,
                    replySource: .v4(backend), replySourcePort: nodePort, destinationNAT: dnat, id: 1)
    }

    @Test("no change, no stale flows")
    func unchanged() {
        let state = ForwardingState(interfaces: ["eth0"], nodes: [n1, n2], mappings: [ssh, web])
        #expect(StaleFlows.between(state, state).isEmpty)
    }

    @Test("a removed node makes only its own flows stale, in every mapping")
    func nodeRemoved() {
        let before = ForwardingState(interfaces: ["eth0"], nodes: [n1, n2], mappings: [ssh, web])
        let after = ForwardingState(interfaces: ["eth0"], nodes: [n1], mappings: [ssh, web])
        let stale = StaleFlows.between(before, after)
        #expect(stale.count == 2)
        #expect(stale.contains { $0.matches(flow(22, to: IPv4Address(10, 0, 1, 2), nodePort: 30022)) })
        #expect(!stale.contains { $0.matches(flow(22, to: IPv4Address(10, 0, 1, 1), nodePort: 30022)) })
        #expect(!stale.contains { $0.matches(flow(22, to: IPv4Address(10, 0, 1, 2), nodePort: 22, dnat: false)) },
                "a flow epokd did not DNAT is never touched")
    }

    @Test("a removed or repointed mapping makes all its flows stale, and nothing else")
    func remapped() {
        let before = ForwardingState(interfaces: ["eth0"], nodes: [n1], mappings: [ssh, web])
        var moved = web
        moved.nodePort = .p(30081)
        let stale = StaleFlows.between(before, ForwardingState(interfaces: ["eth0"], nodes: [n1], mappings: [moved]))
        #expect(stale.map(\.hostPort) == [.p(22), .p(80)])
        #expect(stale.allSatisfy { $0.reasons == [.remapped] })
        #expect(stale[1].matches(flow(80, to: IPv4Address(10, 0, 1, 1), nodePort: 30080)))
        #expect(!stale[1].matches(flow(80, to: IPv4Address(10, 0, 1, 1), nodePort: 30081)), "flows already on the new node port stay")
    }

    @Test("a narrowed allow-range makes only the refused sources stale")
    func allowRangeNarrowed() throws {
        var open = ssh
        open.allowedSources = [try CIDR(parsing: "198.51.100.0/24")]
        var narrow = ssh
        narrow.allowedSources = [try CIDR(parsing: "198.51.100.2/32")]
        let stale = StaleFlows.between(ForwardingState(interfaces: [], nodes: [n1], mappings: [open]),
                                       ForwardingState(interfaces: [], nodes: [n1], mappings: [narrow]))
        #expect(stale.count == 1)
        #expect(!stale[0].matches(flow(22, to: IPv4Address(10, 0, 1, 1), nodePort: 30022, from: IPv4Address(198, 51, 100, 2))))
        #expect(stale[0].matches(flow(22, to: IPv4Address(10, 0, 1, 1), nodePort: 30022, from: IPv4Address(198, 51, 100, 3))))
    }
}
