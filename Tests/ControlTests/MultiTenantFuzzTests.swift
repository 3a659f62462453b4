import Control
import Dataplane
import Foundation
import Logging
import NetnsLab
import Testing

@Suite("Kernel fuzz with tenants of several namespaces writing hostile objects, rates and health checks")
struct MultiTenantFuzzTests {
    static let namespaces = ["team-a", "team-b", "team-c"]
    /// The host's own address and the Nodes' addresses, among the addresses tenants pick from.
    static let host = "192.0.2.1", nodeAddresses = ["10.70.1.1", "10.70.2.2"]
    static let pool = [host] + nodeAddresses + ["198.51.100.10", "198.51.100.11", "198.51.100.12"]

    /// A tenant's objects: a Service with pods (and sometimes an egress annotation or a LoadBalancer IP), a
    /// StaticEgressIP, an ExternalService, each with addresses drawn from `pool`, in one namespace.
    struct Tenant {
        var service: Service
        var slice: EndpointSlice
        var staticEgressIP: StaticEgressIP?
        var externalService: ExternalService?

        /// `previous`: the namespace's objects before this rewrite (an object that stays keeps its creation time);
        /// `clock`: counts the objects made, so that a new one is newer than every other, as the API server makes them.
        init(_ namespace: String, index: Int, previous: Tenant?, clock: inout Int, _ rng: inout SeededGenerator) {
            func pick() -> String { MultiTenantFuzzTests.pool.randomElement(using: &rng)! }
            func created(_ before: ObjectMeta?) -> String {
                if let kept = before?.creationTimestamp { return kept }
                clock += 1
                return "2025-01-01T\(String(format: "%02d:%02d:%02d", clock / 3600, clock / 60 % 60, clock % 60))Z"
            }
            var annotations: StringMap = [:]
            if Bool.random(using: &rng) {
                annotations[EpokAnnotation.egressIP] = pick()
                annotations[EpokAnnotation.egressDestinations] = "203.0.113.0/24"
            }
            let lb = Bool.random(using: &rng)
            // Every tenant's Service has port 8000 (bridges of several namespaces share a port and endpoint port).
            // Rates and health checks a tenant may ask for: a new per-source rate changes epokd's skeleton.
            if lb && Bool.random(using: &rng) { annotations[EpokAnnotation.rateLimitPerSource] = ["100/second", "\(index)00/second", "7/second"].randomElement(using: &rng)! }
            if Bool.random(using: &rng) {
                annotations[EpokAnnotation.externalPorts] = "\(2000 + index):\(30080 + index)"
                annotations[EpokAnnotation.healthCheck] = ["tcp", "http:/a", "http:/b\(Int.random(in: 0...9, using: &rng))"].randomElement(using: &rng)!
            }
            service = Service(metadata: ObjectMeta(name: "app", namespace: namespace, uid: "uid-\(namespace)", creationTimestamp: "2024-01-0\(index)T00:00:00Z", annotations: annotations),
                              spec: Service.Spec(type: lb ? "LoadBalancer" : "ClusterIP", ports: [Service.Port(name: "web", protocol: "TCP", port: 8000, nodePort: 30080 + index)]),
                              status: lb ? Service.Status(loadBalancer: .init(ingress: [.init(ip: pick(), hostname: nil)])) : nil)
            slice = EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: namespace, labels: [EndpointSlice.serviceNameLabel: "app"]),
                                  endpoints: [.init(addresses: ["10.244.\(index).5"], conditions: .init(ready: true))],
                                  ports: [.init(name: "web", port: 8080, protocol: "TCP")])
            if Bool.random(using: &rng) {
                staticEgressIP = StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: namespace, uid: "uid-eip-\(namespace)", creationTimestamp: created(previous?.staticEgressIP?.metadata)),
                                                spec: .init(rules: [.init(egressip: pick(), serviceName: "app", cidr: "198.18.0.0/15")]))
            }
            if Bool.random(using: &rng) {
                externalService = ExternalService(metadata: ObjectMeta(name: "db", namespace: namespace, uid: "uid-es-\(namespace)", creationTimestamp: created(previous?.externalService?.metadata)),
                                                  spec: .init(targetIP: pick(), sources: [.init(service: .init(namespace: nil, name: "app"), sourceIP: pick())],
                                                              ports: [.init(protocol: "TCP", port: 5432, targetPort: 5432)]))
            }
        }
    }

    /// Each egress address the table SNATs to, with its rule's owner.
    static func egressSources(in table: KernelTable) -> [String] {
        EgressSNAT.Sets.all.flatMap { table.elements[$0.name, default: []] }.map { "\($0.value!) \($0.comment!)" }.sorted()
    }

    @Test("a restart keeps each LoadBalancer IP with the Service the table held it for, and each egress address with its namespace, though older objects name them by then")
    func restartKeepsTheHolders() throws {
        let ns = try NetworkNamespace("lbholder")
        let options = ForwardingOptions(interfaces: ["eth0"], externalInterface: "eth0", firewallInterfaces: ["eth0"])
        let quiet = Logger(label: "restart", factory: { _ in SwiftLogNoOpLogHandler() })
        func daemon() throws -> ReconcileLoop {
            ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: try Nftables(namespacePath: ns.path)),
                          conntrack: nil, events: nil, options: options, logger: quiet)
        }
        struct NoTable: Error {}
        func table() throws -> KernelTable {
            guard let found = try Nftables(namespacePath: ns.path).read(ForwardingRuleset.skeleton(table: "epok")) else { throw NoTable() }
            return found
        }
        func holders() throws -> [String] {
            try table().elements[EdgeFirewall.Sets.admitted4.name, default: []].compactMap(\.comment).sorted()
        }
        func egressSources() throws -> [String] { try Self.egressSources(in: table()) }
        let nodes = [node("n1", addresses: ["10.70.1.1"])]
        let victim = loadBalancer("victim", ips: ["198.51.100.10"], ports: [(443, "TCP")])
        var older = loadBalancer("older", ips: [], ports: [(443, "TCP")], created: "2020-01-01T00:00:00Z")
        older.metadata.namespace = "team-b"
        // Each namespace's pods leave by a StaticEgressIP of its own; team-b's is the older object.
        func tenant(_ namespace: String, pod: String, egressip: String, created: String) -> (Service, EndpointSlice, StaticEgressIP) {
            (Service(metadata: ObjectMeta(name: "app", namespace: namespace, uid: "uid-\(namespace)", creationTimestamp: created),
                     spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", protocol: "TCP", port: 80)])),
             EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: namespace, labels: [EndpointSlice.serviceNameLabel: "app"]),
                           endpoints: [.init(addresses: [pod], conditions: .init(ready: true))], ports: [.init(name: "web", port: 8080, protocol: "TCP")]),
             StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: namespace, uid: "uid-eip-\(namespace)", creationTimestamp: created),
                            spec: .init(rules: [.init(egressip: egressip, serviceName: "app", cidr: "203.0.113.0/24")])))
        }
        let a = tenant("team-a", pod: "10.244.1.5", egressip: "198.51.100.50", created: "2024-01-01T00:00:00Z")
        var b = tenant("team-b", pod: "10.244.2.5", egressip: "198.51.100.51", created: "2020-01-01T00:00:00Z")
        func snapshot() -> ClusterSnapshot {
            ClusterSnapshot(services: [older, victim, a.0, b.0], nodes: nodes, endpointSlices: [a.1, b.1], staticEgressIPs: [b.2, a.2])
        }
        let first = try daemon()
        try first.apply([.snapshot(snapshot())])
        #expect(try holders() == ["default/victim"])
        let both = try egressSources()
        #expect(both == ["198.51.100.50 StaticEgressIP team-a/eip", "198.51.100.51 StaticEgressIP team-b/eip"], "\(both)")
        // team-b's older StaticEgressIP is edited to name team-a's address: refused while epokd runs.
        b.2.spec?.rules?[0].egressip = "198.51.100.50"
        try first.apply([.staticEgressIPs(.upserted(b.2))])
        #expect(try egressSources() == ["198.51.100.50 StaticEgressIP team-a/eip"])
        // While epokd is down, team-b's Service status is written to name the victim's IP too.
        older.status = Service.Status(loadBalancer: .init(ingress: [.init(ip: "198.51.100.10", hostname: nil)]))
        let restarted = try daemon()
        try restarted.apply([.snapshot(snapshot())])
        #expect(try holders() == ["default/victim"])
        #expect(try egressSources() == ["198.51.100.50 StaticEgressIP team-a/eip"])
        #expect(restarted.problems.contains { $0.reason == .addressTaken && $0.object == "Service team-b/older" }, "\(restarted.problems)")
    }

    @Test("after every step the kernel holds the desired state; no host or Node address is an egress, bridge or LoadBalancer address, no LoadBalancer IP a source; each source address and LoadBalancer IP serves one namespace; commits never stop")
    func tenantsFuzz() throws {
        let ns = try NetworkNamespace("tenants")
        var options = ForwardingOptions(interfaces: ["eth0"], externalInterface: "eth0", firewallInterfaces: ["eth0"])
        options.hostAddresses = [IPAddress(Self.host)!]
        var rng = SeededGenerator()
        let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: try Nftables(namespacePath: ns.path))
        let conntrack = try Conntrack(namespacePath: ns.path)
        let loop = ReconcileLoop(firewall: firewall, conntrack: conntrack, events: nil, options: options, logger: quiet)
        let nodes = Self.nodeAddresses.enumerated().map { node("n\($0.offset + 1)", addresses: [$0.element]) }
        var tenants: [String: Tenant] = [:]
        func snapshot() -> ClusterSnapshot {
            let all = tenants.values.sorted { $0.service.ref < $1.service.ref }
            return ClusterSnapshot(services: all.map(\.service), nodes: nodes, endpointSlices: all.map(\.slice),
                                   staticEgressIPs: all.compactMap(\.staticEgressIP), externalServices: all.compactMap(\.externalService))
        }
        var clock = 0
        for (index, namespace) in Self.namespaces.enumerated() { tenants[namespace] = Tenant(namespace, index: index + 1, previous: nil, clock: &clock, &rng) }
        try loop.apply([.snapshot(snapshot())])
        // What the kernel must hold: the state the same changes make, computed whole (the loop commits diffs). Not
        // a computation from the snapshot: a claim made later waits behind an earlier one, whatever the ages.
        let oracle = LiveDesiredState(options: options)
        _ = oracle.replaceAll(snapshot())
        // Every counted element gets one packet, as traffic would give it: an element that stays must keep it.
        let counted = firewall.skeleton.sets.filter(\.counters)
        func countTraffic() throws {
            var script = ""
            for set in counted {
                let listing = try ns.exec(["nft", "list", set.value == nil ? "set" : "map", "inet", "epok", set.name]).output
                guard listing.contains("counter packets 0 bytes 0"), let start = listing.range(of: "elements = {"),
                      let end = listing[start.upperBound...].firstIndex(of: "}") else { continue }
                let elements = listing[start.upperBound..<end].replacingOccurrences(of: "counter packets 0 bytes 0", with: "counter packets 1 bytes 1")
                script += "flush \(set.value == nil ? "set" : "map") inet epok \(set.name)\nadd element inet epok \(set.name) { \(elements) }\n"
            }
            if !script.isEmpty { try ns.exec(["nft", "-f", "-"], input: script) }
        }
        func countedElements() throws -> [String: [Element: UInt64]] {
            let nft = try Nftables(namespacePath: ns.path)
            let held = try #require(try nft.read(firewall.skeleton)).elements
            var result: [String: [Element: UInt64]] = [:]
            for set in counted {
                let counters = try nft.counters(of: set, in: firewall.skeleton.table)
                for element in held[set.name] ?? [] { result[set.name, default: [:]][element] = counters[element.identity]?.packets ?? 0 }
            }
            return result
        }
        try countTraffic()
        let reserved = Set(([Self.host] + Self.nodeAddresses).map { IPAddress($0)! })
        // A connection through every host port and bridge entrance, as the kernel tracks one epokd DNATed, by owner.
        var sourcePort = 40000
        func connect(_ state: DesiredState) throws -> [String: Set<String>] {
            try ns.exec(["conntrack", "-F"], check: false)
            var flows: [String: Set<String>] = [:]
            func add(_ owner: String?, _ proto: L4Protocol, from client: IPAddress, to address: IPAddress, _ port: Dataplane.Port, backend: IPAddress, _ backendPort: Dataplane.Port) throws {
                sourcePort += 1
                try ns.exec(["conntrack", "-I", "-p", "\(proto)", "-s", "\(client)", "-d", "\(address)", "--sport", "\(sourcePort)", "--dport", "\(port.rawValue)",
                             "--dst-nat", "\(backend):\(backendPort.rawValue)", "--state", "ESTABLISHED", "-t", "600", "-u", "ASSURED,SEEN_REPLY"])
                flows[Self.namespace(of: owner), default: []].insert("\(client):\(sourcePort) -> \(address):\(port.rawValue)")
            }
            let f = state.forwarding
            for mapping in f.mappings {
                for node in f.nodes { if let v4 = node.ipv4 { try add(mapping.label, mapping.proto, from: IPAddress("203.0.113.7")!, to: IPAddress(Self.host)!, mapping.hostPort, backend: .v4(v4), mapping.nodePort) } }
            }
            for entrance in f.bridgeEntrances {
                for endpoint in entrance.endpoints { try add(entrance.label, entrance.proto, from: entrance.client, to: entrance.address, entrance.port, backend: endpoint, entrance.endpointPort) }
            }
            return flows
        }
        func tracked() throws -> Set<String> {
            Set(try conntrack.flows().map { "\($0.source):\($0.sourcePort) -> \($0.destination):\($0.destinationPort)" })
        }
        var ownFlushed = 0
        defer { #expect(ownFlushed > 0, "a tenant's own change flushed some of its own flows: the selection works") }
        var countersKept = 0
        defer { #expect(countersKept > 0, "some counted elements stayed through a step") }
        for step in 0..<80 {
            // One tenant rewrites its objects, one at a time, as watch events arrive.
            let index = Int.random(in: 0..<Self.namespaces.count, using: &rng)
            let namespace = Self.namespaces[index]
            let old = tenants[namespace]!, new = Tenant(namespace, index: index + 1, previous: old, clock: &clock, &rng)
            let flowsBefore = try connect(oracle.state)
            let countedBefore = try countedElements()
            let heldBefore = try #require(try Nftables(namespacePath: ns.path).read(firewall.skeleton)).elements
            tenants[namespace] = new
            var updates: [ClusterUpdate] = [.serviceChanged(new.service), .endpointSliceChanged(new.slice)]
            if let resource = new.staticEgressIP { updates.append(.staticEgressIPs(.upserted(resource))) }
            else if let gone = old.staticEgressIP { updates.append(.staticEgressIPs(.deleted(gone))) }
            if let resource = new.externalService { updates.append(.externalServices(.upserted(resource))) }
            else if let gone = old.externalService { updates.append(.externalServices(.deleted(gone))) }
            updates.shuffle(using: &rng)
            do {
                try loop.apply(updates)
            } catch {
                Issue.record("\(rng) step \(step): the commit failed: \(error)")
                return
            }
            for update in updates {
                switch update {
                case .serviceChanged(let service): _ = oracle.upsert(service)
                case .endpointSliceChanged(let slice): _ = oracle.upsert(slice)
                case .staticEgressIPs(.upserted(let resource)): _ = oracle.upsert(resource)
                case .staticEgressIPs(.deleted(let resource)): _ = oracle.remove(resource.ref)
                case .externalServices(.upserted(let resource)): _ = oracle.upsert(resource)
                case .externalServices(.deleted(let resource)): _ = oracle.remove(resource.ref)
                default: Issue.record("the fuzz makes no \(update)")
                }
            }
            let state = oracle.state
            let held = try #require(try Nftables(namespacePath: ns.path).read(firewall.skeleton)).elements
            let expected = ForwardingRuleset.elements(for: state.forwarding)
            guard held == expected else {
                let diff = ElementDiff(from: held, to: expected)
                Issue.record("\(rng) step \(step): the kernel differs from the desired state: missing \(diff.added), extra \(diff.deleted)")
                return
            }
            // Another namespace's forwarding, egress, bridges and LoadBalancer entries (the elements it owns) stay as they
            // were: one tenant's objects take nothing from another (what another gives up may pass to it). The one
            // exception is by design: an address that becomes a LoadBalancer IP (its Service's status, which MetalLB
            // writes) is routed to the nodes, and stops being anyone's egress or bridge address.
            let ownLoadBalancerIPs = Set(state.forwarding.loadBalancers.filter { Self.namespace(of: $0.label) == namespace }.map(\.address))
            func onOwnLoadBalancerIP(_ element: Element) -> Bool {
                (Array(element.key) + Array(element.value ?? [])).contains {
                    switch $0 {
                    case .ipv4(let a): ownLoadBalancerIPs.contains(.v4(a))
                    case .ipv6(let a): ownLoadBalancerIPs.contains(.v6(a))
                    default: false
                    }
                }
            }
            for (set, elements) in heldBefore {
                let after = held[set] ?? []
                if let taken = elements.first(where: { $0.comment != nil && Self.namespace(of: $0.comment) != namespace && !after.contains($0) && !onOwnLoadBalancerIP($0) }) {
                    Issue.record("\(rng) step \(step): \(namespace)'s change took \(set) element \(taken.key) (\(taken.comment!)) from its namespace")
                    return
                }
            }
            // Another namespace's connections stay; the changed namespace's may go (those its change made stale).
            let flowsAfter = try tracked()
            for (owner, flows) in flowsBefore {
                let gone = flows.subtracting(flowsAfter)
                if owner == namespace { ownFlushed += gone.count; continue }
                // (Or those to or from an address that became this namespace's LoadBalancer IP, as above.)
                let kept = gone.filter { flow in !ownLoadBalancerIPs.contains { flow.contains("\($0):") } }
                if !kept.isEmpty {
                    Issue.record("\(rng) step \(step): \(namespace)'s change flushed \(owner)'s connections \(kept.sorted())")
                    return
                }
            }
            // An element that stayed as it was (key, value, owner) kept its counter: no set or element was made anew.
            let countedAfter = try countedElements()
            for (set, before) in countedBefore {
                if let reset = before.first(where: { $0.value > 0 && countedAfter[set]?[$0.key] == 0 }) {
                    Issue.record("\(rng) step \(step): \(namespace)'s change reset the counter of \(set) element \(reset.key.key) (\(reset.key.comment ?? "-"))")
                    return
                }
                countersKept += before.count { $0.value > 0 && countedAfter[set]?[$0.key] != nil }
            }
            try countTraffic()
            let f = state.forwarding
            let used = f.egress.map(\.egress) + f.bridgeExits.flatMap { [$0.source, $0.server] } + f.bridgeEntrances.map(\.address)
                + f.bridgeGuarded + f.loadBalancers.map(\.address)
            guard reserved.isDisjoint(with: used) else {
                Issue.record("\(rng) step \(step): a host or Node address is in use: \(reserved.intersection(used))")
                return
            }
            let loadBalancerIPs = Set(tenants.values.flatMap { $0.service.status?.loadBalancer?.ingress ?? [] }.compactMap { $0.ip.flatMap(IPAddress.init) })
            let sources = Set(f.egress.map(\.egress) + f.bridgeExits.map(\.source))
            guard loadBalancerIPs.isDisjoint(with: sources) else {
                Issue.record("\(rng) step \(step): a LoadBalancer IP is a source address: \(loadBalancerIPs.intersection(sources))")
                return
            }
            var namespacesOf: [IPAddress: Set<String>] = [:]
            for rule in f.egress { namespacesOf[rule.egress, default: []].insert(Self.namespace(of: rule.label)) }
            for exit in f.bridgeExits { namespacesOf[exit.source, default: []].insert(Self.namespace(of: exit.label)) }
            // No tenant here shares with MetalLB's key: a LoadBalancer IP serves one Service's namespace.
            var lbNamespaces: [IPAddress: Set<String>] = [:]
            for entry in f.loadBalancers { lbNamespaces[entry.address, default: []].insert(Self.namespace(of: entry.label)) }
            if let shared = lbNamespaces.first(where: { $0.value.count > 1 }) {
                Issue.record("\(rng) step \(step): LoadBalancer IP \(shared.key) serves \(shared.value.sorted())")
                return
            }
            if let shared = namespacesOf.first(where: { $0.value.count > 1 }) {
                Issue.record("\(rng) step \(step): \(shared.key) serves \(shared.value.sorted())")
                return
            }
        }
    }

    /// The namespace in a rule's label (`StaticEgressIP team-a/eip`, `team-a/app`).
    static func namespace(of label: String?) -> String {
        let ref = label?.split(separator: " ").last ?? ""
        return String(ref.split(separator: "/").first ?? "")
    }
}

@Suite("--manage-addresses asks the link first")
struct AddressProbeTests {
    @Test("an egress address another host answers for is not added and its rule is withheld, with the reason on the resource; once the host is gone, the next read-back takes it")
    func answeredElsewhere() throws {
        let router = try NetworkNamespace("probe-r"), lan = try NetworkNamespace("probe-l")
        try router.link(to: lan, address: "192.0.2.1/24", otherAddress: "192.0.2.50/24")
        var options = ForwardingOptions(interfaces: ["eth0"])
        options.hostAddresses = [IPAddress("192.0.2.1")!]
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: try Nftables(namespacePath: router.path))
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options,
                                 logger: Logger(label: "probe", factory: { _ in SwiftLogNoOpLogHandler() }))
        loop.addresses = try ManagedAddresses(interface: "eth0", namespacePath: router.path)
        let eip = StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: "default", creationTimestamp: "2024-01-01T00:00:00Z"),
                                 spec: .init(rules: [.init(egressip: "192.0.2.50", serviceName: "app", cidr: "203.0.113.0/24"),
                                                     .init(egressip: "192.0.2.51", serviceName: "app", cidr: "198.18.0.0/15")]))
        try loop.apply([.snapshot(ClusterSnapshot(services: [AddressOwnershipTests.app("default")], nodes: [node("n1", addresses: ["10.0.1.1"])],
                                                  endpointSlices: [AddressOwnershipTests.slice("default", "10.244.1.5")], staticEgressIPs: [eip]))])
        func egress() throws -> Set<String> {
            let table = try #require(try Nftables(namespacePath: router.path).read(firewall.skeleton))
            return Set((table.elements["egress4"] ?? []).compactMap { $0.value?.first?.description })
        }
        #expect(try egress() == ["192.0.2.51"], "only the free address is SNATed to")
        let listing = try router.exec(["ip", "addr", "show", "dev", "eth0"]).output
        #expect(listing.contains("192.0.2.51/32") && !listing.contains("192.0.2.50/32"), "\(listing)")
        #expect(loop.problems.contains { $0.message.contains("egressip 192.0.2.50 is an address another host on eth0 answers for (ARP)") }, "\(loop.problems)")
        // The other host lets it go: the next read-back asks again and takes it.
        try lan.exec(["ip", "addr", "flush", "dev", "eth0"])
        try loop.apply([], repair: true)
        #expect(try egress() == ["192.0.2.50", "192.0.2.51"])
        #expect(try router.exec(["ip", "addr", "show", "dev", "eth0"]).output.contains("192.0.2.50/32"))
    }
}
