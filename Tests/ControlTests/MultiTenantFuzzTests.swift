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

        init(_ namespace: String, index: Int, _ rng: inout SeededGenerator) {
            func pick() -> String { MultiTenantFuzzTests.pool.randomElement(using: &rng)! }
            func created() -> String { "2024-0\(Int.random(in: 1...9, using: &rng))-01T00:00:00Z" }
            var annotations: StringMap = [:]
            if Bool.random(using: &rng) {
                annotations[EpokAnnotation.egressIP] = pick()
                annotations[EpokAnnotation.egressDestinations] = "203.0.113.0/24"
            }
            let lb = Bool.random(using: &rng)
            // Rates and health checks a tenant may ask for: a new per-source rate changes epokd's skeleton.
            if lb && Bool.random(using: &rng) { annotations[EpokAnnotation.rateLimitPerSource] = ["100/second", "\(index)00/second", "7/second"].randomElement(using: &rng)! }
            if Bool.random(using: &rng) {
                annotations[EpokAnnotation.externalPorts] = "\(2000 + index):\(30080 + index)"
                annotations[EpokAnnotation.healthCheck] = ["tcp", "http:/a", "http:/b\(Int.random(in: 0...9, using: &rng))"].randomElement(using: &rng)!
            }
            service = Service(metadata: ObjectMeta(name: "app", namespace: namespace, uid: "uid-\(namespace)", creationTimestamp: created(), annotations: annotations),
                              spec: Service.Spec(type: lb ? "LoadBalancer" : "ClusterIP", ports: [Service.Port(name: "web", protocol: "TCP", port: 8000 + index, nodePort: 30080 + index)]),
                              status: lb ? Service.Status(loadBalancer: .init(ingress: [.init(ip: pick(), hostname: nil)])) : nil)
            slice = EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: namespace, labels: [EndpointSlice.serviceNameLabel: "app"]),
                                  endpoints: [.init(addresses: ["10.244.\(index).5"], conditions: .init(ready: true))],
                                  ports: [.init(name: "web", port: 8080, protocol: "TCP")])
            if Bool.random(using: &rng) {
                staticEgressIP = StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: namespace, uid: "uid-eip-\(namespace)", creationTimestamp: created()),
                                                spec: .init(rules: [.init(egressip: pick(), serviceName: "app", cidr: "198.18.0.0/15")]))
            }
            if Bool.random(using: &rng) {
                externalService = ExternalService(metadata: ObjectMeta(name: "db", namespace: namespace, uid: "uid-es-\(namespace)", creationTimestamp: created()),
                                                  spec: .init(targetIP: pick(), sources: [.init(service: .init(namespace: nil, name: "app"), sourceIP: pick())],
                                                              ports: [.init(protocol: "TCP", port: 5432, targetPort: 5432)]))
            }
        }
    }

    @Test("after every step the kernel holds the desired state; no host or Node address is an egress, bridge or LoadBalancer address, no LoadBalancer IP a source; each source address and LoadBalancer IP serves one namespace; commits never stop")
    func tenantsFuzz() throws {
        let ns = try NetworkNamespace("tenants")
        var options = ForwardingOptions(interfaces: ["eth0"], externalInterface: "eth0", firewallInterfaces: ["eth0"])
        options.hostAddresses = [IPAddress(Self.host)!]
        var rng = SeededGenerator()
        let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: try Nftables(namespacePath: ns.path))
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options, logger: quiet)
        let nodes = Self.nodeAddresses.enumerated().map { node("n\($0.offset + 1)", addresses: [$0.element]) }
        var tenants: [String: Tenant] = [:]
        func snapshot() -> ClusterSnapshot {
            let all = tenants.values.sorted { $0.service.ref < $1.service.ref }
            return ClusterSnapshot(services: all.map(\.service), nodes: nodes, endpointSlices: all.map(\.slice),
                                   staticEgressIPs: all.compactMap(\.staticEgressIP), externalServices: all.compactMap(\.externalService))
        }
        for (index, namespace) in Self.namespaces.enumerated() { tenants[namespace] = Tenant(namespace, index: index + 1, &rng) }
        try loop.apply([.snapshot(snapshot())])
        let reserved = Set(([Self.host] + Self.nodeAddresses).map { IPAddress($0)! })
        for step in 0..<80 {
            // One tenant rewrites its objects, one at a time, as watch events arrive.
            let index = Int.random(in: 0..<Self.namespaces.count, using: &rng)
            let namespace = Self.namespaces[index]
            let old = tenants[namespace]!, new = Tenant(namespace, index: index + 1, &rng)
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
            let state = DesiredState(snapshot: snapshot(), options: options)
            let held = try #require(try Nftables(namespacePath: ns.path).read(firewall.skeleton)).elements
            let expected = ForwardingRuleset.elements(for: state.forwarding)
            guard held == expected else {
                let diff = ElementDiff(from: held, to: expected)
                Issue.record("\(rng) step \(step): the kernel differs from the desired state: missing \(diff.added), extra \(diff.deleted)")
                return
            }
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
