import Control
import Dataplane
import NetnsLab
import Testing

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
