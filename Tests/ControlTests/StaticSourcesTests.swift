import Control
import Dataplane
import NetnsLab
import Testing

/// A Service with one port `web` (80 on the Service, `8080` on its pods), as bridges need.
func webService(_ name: String, created: String = "2024-01-01T00:00:00Z", udp: Bool = false) -> Service {
    Service(metadata: ObjectMeta(name: name, namespace: "default", uid: "uid-\(name)", creationTimestamp: created),
            spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", protocol: "TCP", port: 80)]
                + (udp ? [Service.Port(name: "dns", protocol: "UDP", port: 53)] : [])))
}

/// The EndpointSlice of `service`: `ready` and `notReady` pods, port `web` on 8080 (and `dns` on 5353).
func webSlice(_ service: String, ready: [String], notReady: [String] = [], udp: Bool = false) -> EndpointSlice {
    EndpointSlice(metadata: ObjectMeta(name: "\(service)-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: service]),
                  endpoints: ready.map { .init(addresses: [$0], conditions: .init(ready: true)) }
                      + notReady.map { .init(addresses: [$0], conditions: .init(ready: false)) },
                  ports: [.init(name: "web", port: 8080, protocol: "TCP")] + (udp ? [.init(name: "dns", port: 5353, protocol: "UDP")] : []))
}

func staticEgressIP(_ name: String, created: String = "2024-01-01T00:00:00Z", rules: [(String, String, String)]) -> StaticEgressIP {
    StaticEgressIP(metadata: ObjectMeta(name: name, namespace: "default", uid: "uid-seip-\(name)", creationTimestamp: created),
                   spec: .init(rules: rules.map { .init(egressip: $0.0, serviceName: $0.1, cidr: $0.2) }))
}

func externalService(_ name: String, created: String = "2024-01-01T00:00:00Z", target: String, sources: [(String, String)],
                     ports: [(String, Int)] = [("TCP", 7000)]) -> ExternalService {
    ExternalService(metadata: ObjectMeta(name: name, namespace: "default", uid: "uid-es-\(name)", creationTimestamp: created),
                    spec: .init(targetIP: target, sources: sources.map { .init(service: .init(namespace: nil, name: $0.0), sourceIP: $0.1) },
                                ports: ports.map { .init(protocol: $0.0, port: $0.1, targetPort: $0.1) }))
}

@Suite("StaticEgressIP resources in the desired state")
struct StaticEgressIPStateTests {
    @Test("each rule's Service pods leave for its cidr with its egressip; a bad rule is a problem on the resource and the others apply")
    func rules() {
        let resource = staticEgressIP("eip", rules: [("198.51.100.10", "app", "192.0.2.0/24"), ("nope", "app", "203.0.113.0/24"),
                                                     ("198.51.100.11", "app", "10.0.0.1/8"), ("198.51.100.12", "ghost", "192.0.2.0/24"),
                                                     ("127.0.0.1", "app", "198.18.0.0/15")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [webService("app")], endpointSlices: [webSlice("app", ready: ["10.244.1.5"], notReady: ["10.244.1.6"])],
                                                           staticEgressIPs: [resource]), options: options)
        #expect(state.forwarding.egress.map { "\($0.source) \($0.destinations) \($0.egress) \($0.label ?? "")" } == [
            "10.244.1.5 [192.0.2.0/24] 198.51.100.10 StaticEgressIP default/eip",
            "10.244.1.6 [192.0.2.0/24] 198.51.100.10 StaticEgressIP default/eip",
        ], "every pod of the Service, ready or not, leaves with the address")
        let ref = ObjectRef(.staticEgressIP, namespace: "default", name: "eip")
        #expect(state.problems.map(\.owner) == Array(repeating: ref, count: 4))
        #expect(state.problems.map(\.reason) == [.invalidEgress, .invalidEgress, .unknownService, .invalidEgress])
        #expect(state.problems[1].message.contains("spec.rules[2]") && state.problems[1].message.contains("did you mean 10.0.0.0/8"))
        #expect(state.problems[3].message.contains("loopback"), "\(state.problems[3].message)")
    }

    @Test("two rules selecting one pod: where their destinations overlap the older resource wins and the other is a conflict; apart, both apply")
    func overlap() {
        let old = staticEgressIP("old", created: "2023-01-01T00:00:00Z", rules: [("198.51.100.10", "app", "192.0.2.0/24")])
        let overlapping = staticEgressIP("overlapping", rules: [("198.51.100.11", "app", "192.0.2.128/25")])
        let apart = staticEgressIP("apart", rules: [("198.51.100.12", "app", "203.0.113.0/24")])
        let annotated = Service(metadata: ObjectMeta(name: "app", namespace: "default", creationTimestamp: "2025-01-01T00:00:00Z",
                                                     annotations: [EpokAnnotation.egressIP: "198.51.100.13", EpokAnnotation.egressDestinations: "0.0.0.0/0"]),
                                spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", port: 80)]))
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [annotated], endpointSlices: [webSlice("app", ready: ["10.244.1.5"])],
                                            staticEgressIPs: [overlapping, apart, old]))
        let state = live.state
        #expect(state.forwarding.egress.map(\.egress.description).sorted() == ["198.51.100.10", "198.51.100.12"])
        #expect(Set(state.problems.compactMap(\.owner?.name)) == ["overlapping", "app"])
        #expect(state.problems.allSatisfy { $0.reason == .portConflict && $0.message.contains("StaticEgressIP default/old") })
        #expect(live.elements["egress4"]?.count == 2, "the held rules' ranges do not overlap in the interval map")

        // The older resource goes: the next in age takes the pod's destinations, flows SNATed by the old rule are stale.
        _ = live.takeStaleEgress()
        let diff = live.remove(ObjectRef(.staticEgressIP, namespace: "default", name: "old"))
        #expect(diff.addedCount == 1 && diff.deletedCount == 1)
        #expect(live.state.forwarding.egress.map(\.egress.description).sorted() == ["198.51.100.11", "198.51.100.12"])
        #expect(live.takeStaleEgress().map(\.egress.description) == ["198.51.100.10"])
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: options).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty })
    }

    /// A relist after a missed delete and create shows the same name with a new creationTimestamp and the same
    /// rules: the object is younger now, and the pod's destinations go to the one that is older now.
    @Test("a resource made again under its name, asking the same, takes the new age: the now older one wins the pod")
    func madeAgain() {
        let slices = [webSlice("app", ready: ["10.244.1.5"])]
        let first = staticEgressIP("first", created: "2024-01-01T00:00:00Z", rules: [("198.51.100.10", "app", "192.0.2.0/24")])
        let second = staticEgressIP("second", created: "2024-01-02T00:00:00Z", rules: [("198.51.100.11", "app", "192.0.2.0/24")])
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [webService("app")], endpointSlices: slices, staticEgressIPs: [first, second]))
        #expect(live.state.forwarding.egress.map(\.egress.description) == ["198.51.100.10"])
        let again = staticEgressIP("first", created: "2024-01-03T00:00:00Z", rules: [("198.51.100.10", "app", "192.0.2.0/24")])
        let diff = live.upsert(again)
        #expect(diff.addedCount == 1 && diff.deletedCount == 1)
        #expect(live.state.forwarding.egress.map(\.egress.description) == ["198.51.100.11"])
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: options).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty })
    }
}

@Suite("ExternalService bridges in the desired state")
struct BridgeStateTests {
    @Test("pods leave for the server's ports with the source's address; the server reaches the ready endpoints through it, on the Service's ports")
    func bridges() {
        let bridge = externalService("db", target: "198.51.100.2", sources: [("app", "198.51.100.9")], ports: [("TCP", 7000), ("UDP", 7001)])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [webService("app", udp: true)],
                                                           endpointSlices: [webSlice("app", ready: ["10.244.1.5", "10.244.2.5"], notReady: ["10.244.3.5"], udp: true)],
                                                           externalServices: [bridge]), options: options)
        #expect(state.problems.isEmpty, "\(state.problems)")
        #expect(state.forwarding.bridgeExits.map { "\($0.pod)>\($0.server):\($0.port)/\($0.proto) as \($0.source)" } == [
            "10.244.1.5>198.51.100.2:7000/tcp as 198.51.100.9", "10.244.1.5>198.51.100.2:7001/udp as 198.51.100.9",
            "10.244.2.5>198.51.100.2:7000/tcp as 198.51.100.9", "10.244.2.5>198.51.100.2:7001/udp as 198.51.100.9",
            "10.244.3.5>198.51.100.2:7000/tcp as 198.51.100.9", "10.244.3.5>198.51.100.2:7001/udp as 198.51.100.9",
        ])
        #expect(state.forwarding.bridgeEntrances.map { "\($0.client)>\($0.address):\($0.port)/\($0.proto) -> \($0.endpoints):\($0.endpointPort)" } == [
            "198.51.100.2>198.51.100.9:53/udp -> [10.244.1.5, 10.244.2.5]:5353", "198.51.100.2>198.51.100.9:80/tcp -> [10.244.1.5, 10.244.2.5]:8080",
        ], "only ready endpoints, on the slice's port for each Service port")
        #expect(state.forwarding.bridgeGuarded.map(\.description) == ["198.51.100.9"])
        let elements = ForwardingRuleset.elements(for: state.forwarding)
        #expect(elements["bridge_in4"]?.count == 2 * Int(Bridge.slots))
        #expect(Set(elements["bridge_in4"]!.compactMap { $0.value?.first?.description }) == ["10.244.1.5", "10.244.2.5"])
        #expect(elements["bridge_clients4"]?.count == 2 && elements["bridge_ports4"]?.count == 2 && elements["bridge_out4"]?.count == 6)
    }

    @Test("a bad targetIP, port or source is a problem on the resource; an entrance two bridges open goes to the older")
    func problems() {
        let bad = ExternalService(metadata: ObjectMeta(name: "bad", namespace: "default"), spec: .init(targetIP: "not-an-ip", sources: [], ports: []))
        let old = externalService("old", created: "2023-01-01T00:00:00Z", target: "198.51.100.2", sources: [("app", "198.51.100.9")])
        let rival = externalService("rival", target: "198.51.100.3", sources: [("app", "198.51.100.9"), ("app", "2001:db8::9"), ("", "198.51.100.8")],
                                    ports: [("SCTP", 7000), ("TCP", 0)])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [webService("app")], endpointSlices: [webSlice("app", ready: ["10.244.1.5"])],
                                                           externalServices: [bad, rival, old]), options: options)
        #expect(state.forwarding.bridgeEntrances.map(\.client.description) == ["198.51.100.2"], "the older bridge holds the entrance")
        let messages = state.problems.map { "\($0.owner!.name): \($0.message)" }
        #expect(messages.contains { $0.hasPrefix("bad: spec.targetIP \"not-an-ip\"") })
        #expect(messages.contains { $0.hasPrefix("rival: spec.ports[0]: SCTP port 7000") })
        #expect(messages.contains { $0.hasPrefix("rival: spec.ports[1]: TCP port 0") })
        #expect(messages.contains { $0.hasPrefix("rival: spec.sources[1]: sourceIP \"2001:db8::9\"") })
        #expect(messages.contains { $0.hasPrefix("rival: spec.sources[2]: service.name is missing") })
        #expect(messages.contains { $0.hasPrefix("rival: entrance 198.51.100.9 80/tcp is already held by ExternalService default/old") })
    }

    @Test("an endpoint leaving or turning unready is an element diff; its bridged flows are stale, the others stay")
    func endpointsChange() {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [webService("app")], endpointSlices: [webSlice("app", ready: ["10.244.1.5", "10.244.2.5"])],
                                            externalServices: [externalService("db", target: "198.51.100.2", sources: [("app", "198.51.100.9")])]))
        _ = live.takeStaleFlows()
        _ = live.takeStaleEgress()
        let diff = live.upsert(webSlice("app", ready: ["10.244.1.5"], notReady: ["10.244.2.5"]))
        #expect(diff.addedCount == 30 && diff.deletedCount == 30, "half the slots move to the endpoint that stays; the exits stay")
        #expect(live.takeStaleFlows() == [StaleFlows(proto: .tcp, hostPort: .p(80), nodePort: .p(8080), reasons: [.backendsRemoved([IPAddress("10.244.2.5")!])], entrance: IPAddress("198.51.100.9")!)])
        #expect(live.takeStaleEgress().isEmpty, "the unready pod still leaves through the bridge")
        let gone = live.upsert(webSlice("app", ready: ["10.244.1.5"]))
        #expect(gone.deletedCount == 1 && gone.addedCount == 0)
        #expect(live.takeStaleEgress() == [StaleEgress(source: IPAddress("10.244.2.5")!, egress: IPAddress("198.51.100.9")!, stillCovered: [],
                                                       server: IPAddress("198.51.100.2")!)])
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: options).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty })
        #expect(live.neededAddresses == [IPAddress("198.51.100.9")!])
    }

    @Test("a Service named before it exists is bridged (and its entrance guarded) once it appears, and unbridged when it goes")
    func serviceAppears() {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [], endpointSlices: [webSlice("app", ready: ["10.244.1.5"])],
                                            externalServices: [externalService("db", target: "198.51.100.2", sources: [("app", "198.51.100.9")])]))
        #expect(live.state.problems.map(\.reason) == [.unknownService])
        #expect(live.elements["bridge_guard4"]?.isEmpty != false, "no bridge stands on the address yet: nothing is guarded")
        #expect(live.neededAddresses.isEmpty, "nor is the address added to an interface")
        let appeared = live.upsert(webService("app"))
        #expect(appeared.addedCount == 1 + 1 + 2 + Int(Bridge.slots), "the guard, one exit, the client and the port, and the slots")
        #expect(live.elements["bridge_guard4"]?.count == 1)
        #expect(live.state.problems.isEmpty)
        let gone = live.remove(ServiceRef(namespace: "default", name: "app"))
        #expect(gone.deletedCount == appeared.addedCount)
    }
}

@Suite("StaticEgressIP and ExternalService in --source files")
struct StaticSourcesFileTests {
    @Test("a kubectl List with both resources decodes them as their seeds define them (service-name, targetIP, sources, ports)")
    func decodes() throws {
        let yaml = """
        apiVersion: v1
        kind: List
        items:
        - apiVersion: staticegressips.nirmata.io/v1alpha1
          kind: StaticEgressIP
          metadata: {name: eip, namespace: default}
          spec:
            rules:
            - {egressip: 100.137.146.100, service-name: frontend, cidr: 4.2.2.2/32}
        - apiVersion: submariner.io/v1alpha1
          kind: ExternalService
          metadata: {name: my-externalservice}
          spec:
            targetIP: 192.168.122.139
            sources:
            - service: {namespace: ns1, name: my-service1}
              sourceIP: 192.168.122.200
            ports:
            - {protocol: TCP, port: 8000, targetPort: 8000}
        """
        let snapshot = try SnapshotFile.decode(yaml)
        #expect(snapshot.staticEgressIPs.first?.spec?.rules == [.init(egressip: "100.137.146.100", serviceName: "frontend", cidr: "4.2.2.2/32")])
        let bridge = try #require(snapshot.externalServices.first)
        #expect(bridge.ref == ObjectRef(.externalService, namespace: "default", name: "my-externalservice"))
        #expect(bridge.spec?.sources?.first?.service == .init(namespace: "ns1", name: "my-service1"))
        #expect(bridge.spec?.ports == [.init(protocol: "TCP", port: 8000, targetPort: 8000)])
    }
}

@Suite("Addresses no tenant may take: the host's and every Node's")
struct ReservedAddressTests {
    static let nodes = [node("n1", addresses: ["10.70.1.1"]), node("n2", ready: false, addresses: ["10.70.2.2"])]

    @Test("a Node's or the host's address as egressip, egress-ip annotation, sourceIP, targetIP or LoadBalancer IP is refused, naming why; other addresses apply")
    func refused() throws {
        var options = options
        options.hostAddresses = [IPAddress("192.0.2.1")!]
        options.firewallInterfaces = ["eth0"]
        let annotated = Service(metadata: ObjectMeta(name: "app", namespace: "default", creationTimestamp: "2024-01-01T00:00:00Z",
                                                     annotations: [EpokAnnotation.egressIP: "192.0.2.1", EpokAnnotation.egressDestinations: "0.0.0.0/0"]),
                                spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", port: 80)]))
        let lb = loadBalancer("lb", ips: ["10.70.1.1", "203.0.113.7"], ports: [(443, "TCP")])
        let snapshot = ClusterSnapshot(
            services: [annotated, webService("db"), lb], nodes: Self.nodes,
            endpointSlices: [webSlice("app", ready: ["10.244.1.5"]), webSlice("db", ready: ["10.244.1.6"])],
            staticEgressIPs: [staticEgressIP("eip", rules: [("10.70.2.2", "db", "0.0.0.0/0"), ("198.51.100.10", "db", "192.0.2.0/24")])],
            externalServices: [externalService("to-node", target: "10.70.1.1", sources: [("db", "198.51.100.20")]),
                               externalService("as-host", target: "198.51.100.2", sources: [("db", "192.0.2.1")])])
        let state = DesiredState(snapshot: snapshot, options: options)
        #expect(state.forwarding.egress.map { "\($0.source) \($0.egress)" } == ["10.244.1.6 198.51.100.10"], "only the rule on an address of no one's")
        #expect(state.forwarding.bridgeExits.isEmpty && state.forwarding.bridgeEntrances.isEmpty && state.forwarding.bridgeGuarded.isEmpty)
        #expect(state.loadBalancers.map(\.address.description) == ["203.0.113.7"])
        let messages = state.problems.map(\.message)
        for expected in ["egress-ip: 192.0.2.1 is an address of this host", "egressip 10.70.2.2 is the address of Node n2",
                         "spec.targetIP 10.70.1.1 is the address of Node n1", "sourceIP 192.0.2.1 is an address of this host",
                         "ingress ip 10.70.1.1 is the address of Node n1"] {
            #expect(messages.contains { $0.contains(expected) }, "missing \(expected) in \(messages)")
        }
    }

    @Test("the host's gateway is no tenant's: refused as an egress address and a bridge target")
    func gateway() throws {
        var options = options
        options.gateways = [IPAddress("192.0.2.254")!]
        let snapshot = ClusterSnapshot(services: [webService("db")], nodes: Self.nodes, endpointSlices: [webSlice("db", ready: ["10.244.1.6"])],
                                       staticEgressIPs: [staticEgressIP("eip", rules: [("192.0.2.254", "db", "0.0.0.0/0")])],
                                       externalServices: [externalService("to-gw", target: "192.0.2.254", sources: [("db", "198.51.100.20")])])
        let state = DesiredState(snapshot: snapshot, options: options)
        #expect(state.forwarding.egress.isEmpty && state.forwarding.bridgeExits.isEmpty)
        #expect(state.problems.filter { $0.message.contains("192.0.2.254 is a gateway of this host") }.count == 2, "\(state.problems)")
    }

    @Test("--address-pools: source addresses outside them are refused; a host address inside them is the operator's to give (as a source only)")
    func pools() throws {
        var options = options
        options.hostAddresses = [IPAddress("192.0.2.1")!, IPAddress("192.0.2.99")!]
        options.addressPools = [try CIDR(parsing: "192.0.2.0/28")]
        options.firewallInterfaces = ["eth0"]
        let snapshot = ClusterSnapshot(
            services: [webService("db"), loadBalancer("lb", ips: ["192.0.2.1"], ports: [(443, "TCP")])], nodes: Self.nodes,
            endpointSlices: [webSlice("db", ready: ["10.244.1.6"])],
            staticEgressIPs: [staticEgressIP("eip", rules: [("192.0.2.1", "db", "203.0.113.0/24"), ("198.51.100.10", "db", "192.0.2.128/25"),
                                                            ("192.0.2.99", "db", "198.18.0.0/15")])],
            externalServices: [externalService("to-host", target: "192.0.2.1", sources: [("db", "192.0.2.2")]),
                               externalService("pooled", target: "198.51.100.2", sources: [("db", "192.0.2.3")])])
        let state = DesiredState(snapshot: snapshot, options: options)
        #expect(state.forwarding.egress.map(\.egress.description) == ["192.0.2.1"], "the host address inside the pool; not the one outside, nor one outside the pools")
        #expect(state.forwarding.bridgeExits.map(\.source.description) == ["192.0.2.3"], "a pooled source; the bridge to the host is refused")
        #expect(state.loadBalancers.isEmpty, "a host address is never a LoadBalancer IP, pools or not")
        let messages = state.problems.map(\.message)
        for expected in ["egressip 198.51.100.10 is outside --address-pools", "egressip 192.0.2.99 is outside --address-pools",
                         "spec.targetIP 192.0.2.1 is an address of this host", "ingress ip 192.0.2.1 is an address of this host"] {
            #expect(messages.contains { $0.contains(expected) }, "missing \(expected) in \(messages)")
        }
        // Without pools, a host address as a source says how to allow it.
        options.addressPools = nil
        #expect(DesiredState(snapshot: snapshot, options: options).problems.contains { $0.message.contains("egressip 192.0.2.1 is an address of this host (list it in --address-pools") })
    }

    @Test("a Node that comes with a tenant's egress address takes it back from the tenant; when it goes, the tenant's rule applies again")
    func nodeArrives() throws {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [webService("db")], nodes: [Self.nodes[0]], endpointSlices: [webSlice("db", ready: ["10.244.1.6"])],
                                            staticEgressIPs: [staticEgressIP("eip", rules: [("10.70.9.9", "db", "0.0.0.0/0")])]))
        #expect(live.state.forwarding.egress.map(\.egress.description) == ["10.70.9.9"])
        let diff = live.upsert(node("n9", addresses: ["10.70.9.9"]))
        #expect(live.state.forwarding.egress.isEmpty && diff.deletedCount > 0, "the rule on n9's address is withdrawn in the node's own diff")
        #expect(live.problems(of: ObjectRef(.staticEgressIP, namespace: "default", name: "eip")).contains { $0.message.contains("the address of Node n9") })
        _ = live.remove(node: "n9")
        #expect(live.state.forwarding.egress.map(\.egress.description) == ["10.70.9.9"])
        #expect(live.neededAddresses.map(\.description) == ["10.70.9.9"])
    }
}

@Suite("A source address belongs to one namespace: its oldest asker's")
struct AddressOwnershipTests {
    static func app(_ namespace: String) -> Service {
        Service(metadata: ObjectMeta(name: "app", namespace: namespace, uid: "uid-\(namespace)", creationTimestamp: "2024-01-01T00:00:00Z"),
                spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", protocol: "TCP", port: 80)]))
    }
    static func slice(_ namespace: String, _ pod: String) -> EndpointSlice {
        EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: namespace, labels: [EndpointSlice.serviceNameLabel: "app"]),
                      endpoints: [.init(addresses: [pod], conditions: .init(ready: true))], ports: [.init(name: "web", port: 8080, protocol: "TCP")])
    }
    static func eip(_ namespace: String, created: String, egress: String = "198.51.100.10") -> StaticEgressIP {
        StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: namespace, uid: "uid-eip-\(namespace)", creationTimestamp: created),
                       spec: .init(rules: [.init(egressip: egress, serviceName: "app", cidr: "0.0.0.0/0")]))
    }
    static let a = eip("team-a", created: "2024-01-01T00:00:00Z"), b = eip("team-b", created: "2025-01-01T00:00:00Z")
    static let base = ClusterSnapshot(services: [app("team-a"), app("team-b")],
                                      endpointSlices: [slice("team-a", "10.244.1.5"), slice("team-b", "10.244.2.5")])

    func egress(_ state: DesiredState) -> [String] { state.forwarding.egress.map { "\($0.source) \($0.egress)" } }

    @Test("two namespaces asking for one egressip: the older keeps it, whatever the order read; the other gets AddressTaken naming only the holder's kind")
    func olderNamespaceHolds() {
        for order in [[Self.a, Self.b], [Self.b, Self.a]] {
            var snapshot = Self.base
            snapshot.staticEgressIPs = order
            let state = DesiredState(snapshot: snapshot, options: options)
            #expect(egress(state) == ["10.244.1.5 198.51.100.10"], "only team-a's pod leaves with it")
            let problem = state.problems.first { $0.reason == .addressTaken }
            #expect(problem?.owner == Self.b.ref && problem?.message.contains("belongs to a StaticEgressIP of another namespace") == true
                    && problem?.message.contains("team-a") == false, "\(state.problems)")
        }
        // A bridge of team-b on team-a's egress address: refused the same way.
        var snapshot = Self.base
        snapshot.staticEgressIPs = [Self.a]
        snapshot.externalServices = [ExternalService(metadata: ObjectMeta(name: "db", namespace: "team-b", creationTimestamp: "2025-01-01T00:00:00Z"),
                                                     spec: .init(targetIP: "198.51.100.2", sources: [.init(service: .init(namespace: nil, name: "app"), sourceIP: "198.51.100.10")],
                                                                 ports: [.init(protocol: "TCP", port: 7000, targetPort: 7000)]))]
        let bridged = DesiredState(snapshot: snapshot, options: options)
        #expect(bridged.forwarding.bridgeExits.isEmpty && bridged.problems.contains { $0.reason == .addressTaken && $0.message.contains("sourceIP 198.51.100.10") })
    }

    @Test("a pod another namespace's EndpointSlice lists too is neither namespace's: no older StaticEgressIP takes it over; it applies again when the slice lets go")
    func podListedByTwoNamespaces() {
        let victim = Self.eip("team-b", created: "2025-01-01T00:00:00Z", egress: "198.51.100.20")
        let attacker = Self.eip("team-a", created: "2023-01-01T00:00:00Z", egress: "198.51.100.10")
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [Self.app("team-a"), Self.app("team-b")],
                                            endpointSlices: [Self.slice("team-b", "10.244.2.5")], staticEgressIPs: [victim, attacker]))
        #expect(egress(live.state) == ["10.244.2.5 198.51.100.20"])
        // team-a lists team-b's pod in a slice of its own.
        let diff = live.upsert(Self.slice("team-a", "10.244.2.5"))
        #expect(egress(live.state).isEmpty && diff.deletedCount > 0, "the pod leaves with its own address, never team-a's")
        #expect(DesiredState(snapshot: live.snapshot, options: options).forwarding.egress.isEmpty, "the same from a snapshot")
        _ = live.remove(endpointSlice: "team-a/app-x")
        #expect(egress(live.state) == ["10.244.2.5 198.51.100.20"], "team-b's rule again once the slice lets go")
    }

    @Test("a LoadBalancer IP is never a source address: an egressip on one is refused, and applies once no Service has it")
    func loadBalancerIPIsNoSource() {
        let live = LiveDesiredState(options: options)
        var snapshot = Self.base
        snapshot.staticEgressIPs = [Self.a]
        let lb = loadBalancer("lb", ips: ["198.51.100.10"], ports: [(443, "TCP")])
        snapshot.services.append(lb)
        _ = live.replaceAll(snapshot)
        #expect(egress(live.state).isEmpty)
        #expect(live.problems(of: Self.a.ref).contains { $0.reason == .addressTaken && $0.message.contains("egressip 198.51.100.10 is a LoadBalancer IP") })
        let diff = live.remove(lb.ref)
        #expect(egress(live.state) == ["10.244.1.5 198.51.100.10"] && diff.addedCount > 0, "the rule applies in the LB Service's own diff")
    }

    @Test("within one namespace an address is shared; across namespaces the first asker holds it (a later ask waits, even an older object's) and it moves when its holder goes")
    func liveHandover() {
        let live = LiveDesiredState(options: options)
        var snapshot = Self.base
        snapshot.staticEgressIPs = [Self.b, Self.eip("team-b", created: "2025-02-01T00:00:00Z").renamed("eip2")]
        _ = live.replaceAll(snapshot)
        #expect(egress(live.state) == ["10.244.2.5 198.51.100.10"], "team-b's two objects share it")
        // team-a's object is older, but asks now: team-b asked first and keeps the address.
        let diff = live.upsert(Self.a)
        #expect(egress(live.state) == ["10.244.2.5 198.51.100.10"] && diff.deletedCount == 0, "team-b keeps it")
        #expect(live.problems(of: Self.a.ref).contains { $0.reason == .addressTaken })
        // team-b's objects go: the address passes to team-a in the same diff.
        _ = live.remove(Self.b.ref)
        let handover = live.remove(ObjectRef(.staticEgressIP, namespace: "team-b", name: "eip2"))
        #expect(egress(live.state) == ["10.244.1.5 198.51.100.10"] && handover.addedCount > 0, "and passes to the waiting namespace when they go")
        #expect(!live.state.problems.contains { $0.reason == .addressTaken })
    }
}

extension StaticEgressIP {
    func renamed(_ name: String) -> StaticEgressIP {
        var copy = self
        copy.metadata.name = name
        return copy
    }
}
