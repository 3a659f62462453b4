import Control
import Dataplane
import FakeKube
import Foundation
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

@Suite("Draining a node")
struct DrainTests {
    func answer(_ probe: Probe) -> String? {
        if case .answered(let who) = probe { return who }
        return nil
    }

    @Test("a drained node gets no new connections while its open TCP connection and UDP flow keep working; undrained, it gets them again")
    func drain() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [30053], echoPorts: [30432])
        let db = service("db", annotations: [EpokAnnotation.externalPorts: "5432:30432, 53:30053:udp"], nodePorts: [(30432, "TCP"), (30053, "UDP")])
        try h.apply([db])
        let open = try FlowClient.tcp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 5432)
        let first = try #require(answer(open.exchange("a")))
        let drained = try #require(first.split(separator: ":").first.map(String.init))
        // A UDP flow to the same node: new sources until one lands there.
        var udp: FlowClient?
        for _ in 0..<12 where udp == nil {
            let flow = try FlowClient.udp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 53)
            if answer(flow.exchange("u"))?.hasPrefix(drained + ":") == true { udp = flow }
        }
        let udpFlow = try #require(udp, "a UDP flow to \(drained)")

        let index = try #require(h.nodes.firstIndex { $0.metadata.name == drained })
        h.nodes[index].metadata.annotations = [EpokAnnotation.drain: "maintenance"]
        try h.apply([db])
        let others = Set(h.lab.nodeNames.filter { $0 != drained }.map { "\($0):30432" })
        let fresh = try (0..<8).map { _ in try #require(answer(try FlowClient.tcp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 5432).exchange("n"))) }
        #expect(Set(fresh.map { String($0.dropLast(2)) }) == others, "new connections avoid \(drained): \(fresh)")
        #expect(answer(open.exchange("b")) == "\(drained):30432:b", "the open connection keeps working")
        #expect(answer(udpFlow.exchange("v"))?.hasPrefix(drained + ":") == true, "the UDP flow is not flushed")
        let status = try run([epokdBinary, "status", "--netns", h.lab.host.path]).output
        #expect(status.contains("\(drained) draining"), "\(status)")

        h.nodes[index].metadata.annotations = nil
        try h.apply([db])
        let again = try (0..<9).map { _ in try #require(answer(try FlowClient.tcp(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 5432).exchange("m"))) }
        #expect(again.contains { $0.hasPrefix(drained + ":") }, "undrained, \(drained) gets new connections again: \(again)")
    }
}

@Suite("Active health checks, in the daemon")
struct HealthCheckDaemonTests {
    @Test("a node whose node port stops answering (its Node still Ready) gets no new TCP connection or UDP flow within fall × interval + 1 s; answering again, it is back within rise × interval + 1 s")
    func nodePortDown() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [30053])
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        var web = makeService("web", annotation: "22:30022, 53:30053:udp")
        web.spec.ports = [Service.Port(protocol: "TCP", port: 22, nodePort: 30022), Service.Port(protocol: "UDP", port: 53, nodePort: 30053)]
        web.metadata.annotations?[EpokAnnotation.healthCheck] = "tcp interval=300ms timeout=200ms fall=2 rise=2"
        try api.apply(web, kind: "services")
        let daemon = try DaemonProcess(lab: lab, api: api)
        defer { _ = daemon.stop(SIGKILL) }
        func tcp() throws -> Set<String> { Set(try (0..<9).map { _ in "\(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 0.5))" }) }
        func udp() throws -> Set<String> { Set(try (0..<9).map { _ in "\(try udpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 53, timeout: 0.5))" }) }
        try waitUntil("every node answering", seconds: 30) { try tcp() == ["answered n1:30022", "answered n2:30022", "answered n3:30022"] }
        // A UDP flow that lands on n2, kept open across the failure.
        var held: FlowClient?
        for _ in 0..<12 where held == nil {
            let flow = try FlowClient.udp(from: lab.external, to: ForwardingLab.hostExternal4, port: 53)
            if case .answered(let who) = flow.exchange("q"), who.hasPrefix("n2:") { held = flow }
        }
        let flow = try #require(held)

        lab.stopServers(1)
        try waitUntil("n2 out of the group", seconds: 2 * 0.3 + 1) { try tcp() == ["answered n1:30022", "answered n3:30022"] }
        #expect(try udp() == ["answered n1:30053", "answered n3:30053"], "UDP flows follow the Service's healthy nodes too")
        // The commit lets new connections avoid n2 at once; the flush of its flows follows it.
        try waitUntil("the held flow's entry flushed") {
            !(try lab.host.exec(["conntrack", "-L", "-p", "udp", "--dport", "53"]).output.contains("src=\(ForwardingLab.node4(2)) "))
        }
        let moved = flow.exchange("again")
        #expect(moved == .answered("n1:30053") || moved == .answered("n3:30053"), "the held flow was flushed and follows: \(moved)")
        let status = try run([epokdBinary, "status", "--json", "--netns", lab.host.path]).output
        let report = try #require(try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any])
        let ssh = try #require((report["mappings"] as? [[String: Any]])?.first { $0["hostPort"] as? Int == 22 })
        #expect(ssh["down"] as? [String] == ["n2"] && ssh["ownGroup"] as? Bool == true && ssh["nodes"] as? [String] == ["10.0.1.1", "10.0.1.3"], "\(ssh)")
        try waitUntil("the Warning Event", seconds: 10) {
            String(decoding: try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/events"), as: UTF8.self).contains("\"reason\": \"BackendDown\"")
        }

        try lab.restartServers(1)
        try waitUntil("n2 back in the group", seconds: 2 * 0.3 + 1) { try tcp().contains("answered n2:30022") }
        #expect(daemon.output.contains("node n2 failed 2 tcp checks of tcp 10.0.1.2:30022 (last: connection refused)"), "\(daemon.output)")
    }
}
