import Dataplane
import Foundation
import Testing

@Suite("A traced packet in epokd's words")
struct TraceExplanationTests {
    /// An IPv4 header from `source` to `destination` (protocol `proto`) and a transport header with the ports.
    static func headers(_ source: [UInt8], _ destination: [UInt8], proto: UInt8 = 6, ports: (UInt16, UInt16)) -> (network: [UInt8], transport: [UInt8]) {
        var network = [UInt8](repeating: 0, count: 20)
        network[0] = 0x45
        network[9] = proto
        network.replaceSubrange(12..<16, with: source)
        network.replaceSubrange(16..<20, with: destination)
        return (network, [UInt8(ports.0 >> 8), UInt8(ports.0 & 0xff), UInt8(ports.1 >> 8), UInt8(ports.1 & 0xff)])
    }

    static let explainer = TraceExplainer(
        table: "epok",
        comments: ["trace": [2: "IPv4 packets a running epokd trace selects are traced"],
                   "guard": [7: "internal services are unreachable from the external interface"],
                   "nat_prerouting": [9: "IPv4 TCP host ports to node ports"]],
        elements: [PortMapping.Sets.services.name: [Element(key: [.l4proto(.tcp), .port(Port(8443)!)], value: [.port(Port(30443)!)], comment: "shop/admin")]])

    @Test("a packet dropped by an internal Service's rule: its flow, interface, Service, reason and rules; null where nothing is known")
    func dropped() throws {
        let h = Self.headers([198, 51, 100, 2], [198, 51, 100, 1], ports: (40000, 8443))
        let events = [
            TraceEvent(id: 1, kind: .rule, table: "epok", chain: "trace", ruleHandle: 2, verdict: .continue, nfproto: 2, inputInterface: 3, network: h.network, transport: h.transport),
            TraceEvent(id: 1, kind: .rule, table: "epok", chain: "guard", ruleHandle: 7, verdict: .drop, nfproto: 2, inputInterface: 3, network: h.network, transport: h.transport),
        ]
        let packet = try #require(Self.explainer.explain(events, interfaces: [3: "eth0"], time: 1))
        #expect(packet == TracedPacket(time: 1, family: "ip", proto: "tcp", saddr: "198.51.100.2", sport: 40000, daddr: "198.51.100.1", dport: 8443,
                                       iif: "eth0", verdict: "drop", service: "shop/admin", node: nil, reason: "internal",
                                       rules: ["guard: internal services are unreachable from the external interface"]))
        let json = String(decoding: try JSONEncoder().encode(packet), as: UTF8.self)
        #expect(json.contains("\"node\":null"), "every key is there, null when unknown: \(json)")
    }

    @Test("a DNATed packet names the node its later headers go to; another table's drop is named by table and chain")
    func forwardedAndForeign() throws {
        let before = Self.headers([198, 51, 100, 2], [198, 51, 100, 1], ports: (40000, 8443))
        let after = Self.headers([198, 51, 100, 2], [10, 0, 1, 2], ports: (40000, 30443))
        let forwarded = [
            TraceEvent(id: 1, kind: .rule, table: "epok", chain: "nat_prerouting", ruleHandle: 9, verdict: .accept, nfproto: 2, network: before.network, transport: before.transport),
            TraceEvent(id: 1, kind: .policy, table: "epok", chain: "forward", verdict: .accept, nfproto: 2, network: after.network, transport: after.transport),
        ]
        let packet = try #require(Self.explainer.explain(forwarded, interfaces: [:], time: 1))
        #expect(packet.verdict == "accept" && packet.node == "10.0.1.2" && packet.reason == nil && packet.rules == ["nat_prerouting: IPv4 TCP host ports to node ports"])
        let foreign = [TraceEvent(id: 2, kind: .policy, table: "filter", chain: "input", verdict: .drop, nfproto: 2, network: before.network, transport: before.transport)]
        #expect(Self.explainer.explain(foreign, interfaces: [:], time: 1)?.reason == "table filter chain input policy")
    }
}
