import Control
import Dataplane
import NetnsLab
import Testing

@Suite("Flows belong to their entrance: a change selects only its own owner's stale flows")
struct FlowOwnershipTests {
    /// Tracked flows of every entrance and host port `state` forwards, each a connection epokd DNATed.
    static func flows(of state: ForwardingState, host: IPAddress) -> [TrackedFlow] {
        var result: [TrackedFlow] = []
        var id: UInt32 = 0
        func add(_ proto: L4Protocol, from source: IPAddress, to destination: IPAddress, _ port: Port, backend: IPAddress, _ backendPort: Port) {
            id += 1
            result.append(TrackedFlow(proto: proto, source: source, sourcePort: UInt16(40000 + id % 1000), destination: destination,
                                      destinationPort: port.rawValue, replySource: backend, replySourcePort: backendPort.rawValue,
                                      destinationNAT: true, id: id))
        }
        for entrance in state.bridgeEntrances {
            for endpoint in entrance.endpoints { add(entrance.proto, from: entrance.client, to: entrance.address, entrance.port, backend: endpoint, entrance.endpointPort) }
        }
        for mapping in state.mappings {
            for node in state.nodes { if let v4 = node.ipv4 { add(mapping.proto, from: IPAddress("192.0.2.7")!, to: host, mapping.hostPort, backend: .v4(v4), mapping.nodePort) } }
        }
        return result
    }

    /// The reference: a flow is stale when `state` no longer sends it where it went.
    static func stillForwarded(_ flow: TrackedFlow, in state: ForwardingState, host: IPAddress) -> Bool {
        if flow.destination == host {
            return state.mappings.contains { $0.proto == flow.proto && $0.hostPort.rawValue == flow.destinationPort && $0.nodePort.rawValue == flow.replySourcePort }
                && state.nodes.contains { $0.ipv4.map(IPAddress.v4) == flow.replySource }
        }
        return state.bridgeEntrances.contains {
            $0.address == flow.destination && $0.proto == flow.proto && $0.port.rawValue == flow.destinationPort
                && $0.endpointPort.rawValue == flow.replySourcePort && $0.endpoints.contains(flow.replySource) && $0.client == flow.source
        }
    }

    @Test("random overlapping bridges (shared entrance ports and endpoint ports, other entrance addresses) and host ports on the same port: no other owner's flow is ever selected, and every stale one is")
    func noOtherOwnersFlows() {
        var rng = SeededGenerator()
        let host = IPAddress("198.51.100.1")!
        let nodes = (1...3).map { node("n\($0)", addresses: ["10.0.1.\($0)"]) }
        // Pods listen on 30080, the node port of the host port 80 too, and some pods are nodes' addresses.
        func slice(_ service: String, ready: [String]) -> EndpointSlice {
            EndpointSlice(metadata: ObjectMeta(name: "\(service)-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: service]),
                          endpoints: ready.map { .init(addresses: [$0], conditions: .init(ready: true)) },
                          ports: [.init(name: "web", port: 30080, protocol: "TCP")])
        }
        let pods = ["10.0.1.1", "10.0.1.2", "10.244.1.5", "10.244.1.6"]
        let entrances = ["198.51.100.9", "198.51.100.10", "198.51.100.11"]
        let targets = ["198.51.100.2", "198.51.100.3"]
        func hostPort(_ i: Int) -> Service {
            var s = webService("host\(i)")
            s.spec.type = "NodePort"
            s.spec.ports = [Service.Port(name: "web", protocol: "TCP", port: 80, nodePort: 30080)]
            s.metadata.annotations = [EpokAnnotation.externalPorts: "80:30080"]
            return s
        }
        let live = LiveDesiredState(options: ForwardingOptions(interfaces: ["eth0"]))
        var services = (0..<3).map { webService("app\($0)") } + [hostPort(0)]
        var slices = (0..<3).map { slice("app\($0)", ready: pods.shuffled(using: &rng).prefix(2).map { $0 }) }
        var bridges: [ExternalService] = (0..<4).map { i in
            externalService("b\(i)", created: "2024-01-0\(i + 1)T00:00:00Z", target: targets.randomElement(using: &rng)!,
                            sources: [("app\(i % 3)", entrances.randomElement(using: &rng)!)])
        }
        _ = live.replaceAll(ClusterSnapshot(services: services, nodes: nodes, endpointSlices: slices, externalServices: bridges))
        _ = live.takeStaleFlows()
        var checked = 0, selected = 0
        for step in 0..<500 {
            let before = live.state.forwarding
            let flows = Self.flows(of: before, host: host)
            switch Int.random(in: 0..<6, using: &rng) {
            case 0:
                let i = Int.random(in: 0..<bridges.count, using: &rng)
                _ = live.remove(bridges[i].ref)
                bridges[i] = externalService("b\(i)", created: bridges[i].metadata.creationTimestamp!, target: targets.randomElement(using: &rng)!,
                                             sources: [("app\(Int.random(in: 0..<3, using: &rng))", entrances.randomElement(using: &rng)!)])
            case 1:
                let i = Int.random(in: 0..<bridges.count, using: &rng)
                bridges[i].spec?.sources = [.init(service: .init(namespace: nil, name: "app\(Int.random(in: 0..<3, using: &rng))"),
                                                  sourceIP: entrances.randomElement(using: &rng)!)]
                _ = live.upsert(bridges[i])
            case 2:
                let i = Int.random(in: 0..<slices.count, using: &rng)
                slices[i] = slice("app\(i)", ready: pods.shuffled(using: &rng).prefix(Int.random(in: 0...3, using: &rng)).map { $0 })
                _ = live.upsert(slices[i])
            case 3:
                let on = services.contains { $0.metadata.name == "host0" }
                if on {
                    services.removeAll { $0.metadata.name == "host0" }
                    _ = live.remove(ServiceRef(namespace: "default", name: "host0"))
                } else {
                    services.append(hostPort(0))
                    _ = live.upsert(hostPort(0))
                }
            case 4:
                _ = live.upsert(node("n\(Int.random(in: 1...3, using: &rng))", ready: Bool.random(using: &rng), addresses: ["10.0.1.\(Int.random(in: 1...3, using: &rng))"]))
            default:
                // Older or younger than the others now: a claim on a shared entrance changes hands.
                let i = Int.random(in: 0..<bridges.count, using: &rng)
                bridges[i].metadata.creationTimestamp = "202\(Int.random(in: 3...5, using: &rng))-01-01T00:00:00Z"
                _ = live.upsert(bridges[i])
            }
            let after = live.state.forwarding
            let stale = live.takeStaleFlows()
            for flow in flows {
                let matched = stale.contains { $0.matches(flow) }
                let expected = !Self.stillForwarded(flow, in: after, host: host)
                checked += 1
                if matched { selected += 1 }
                if matched && !expected {
                    Issue.record("\(rng) step \(step): \(flow) is still forwarded the same way, yet selected by \(stale.filter { $0.matches(flow) })")
                    return
                }
                if expected && !matched && flow.destination != host {
                    Issue.record("\(rng) step \(step): \(flow) is no longer forwarded so, yet not selected (\(stale))")
                    return
                }
            }
        }
        #expect(checked > 300 && selected > 20, "the steps touched flows: \(checked) checked, \(selected) selected")
    }
}
