import Dataplane

/// How epokd was told to forward (`--interfaces`, `--external-interface`).
public struct ForwardingOptions: Hashable, Sendable {
    public var interfaces: [String]
    public var externalInterface: String?

    public init(interfaces: [String], externalInterface: String? = nil) {
        self.interfaces = interfaces
        self.externalInterface = externalInterface
    }
}

/// Something in the cluster's state that epokd refused, with the reason a Kubernetes Event carries.
public struct Problem: Hashable, Sendable, CustomStringConvertible {
    public enum Reason: String, Sendable {
        case invalidAnnotation = "InvalidAnnotation"
        case invalidAllowRange = "InvalidAllowRange"
        case unknownNodePort = "UnknownNodePort"
        case portConflict = "PortConflict"
        case nodeWithoutAddress = "NodeWithoutInternalIP"
    }

    /// `Service namespace/name` or `Node name`.
    public var object: String
    public var reason: Reason
    public var message: String
    /// The Service concerned, when it is one.
    public var service: ServiceRef?

    public var description: String { "\(object): \(message)" }
}

/// A host port that a Service was granted.
public struct ForwardedPort: Hashable, Sendable {
    public var service: ServiceRef
    public var mapping: Mapping
}

/// What the host should forward, computed from a snapshot: plain values, no I/O.
public struct DesiredState: Hashable, Sendable {
    public var forwarding: ForwardingState
    /// Every granted host port with its Service, sorted by protocol and port.
    public var ports: [ForwardedPort]
    public var problems: [Problem]
    /// Ready, not excluded nodes with an InternalIP.
    public var nodes: [NodeAddress]

    /// Computes the desired forwarding of `snapshot` under `options`.
    ///
    /// Each Service's annotations are parsed strictly: a malformed annotation or allow-range gives that Service
    /// no ports at all (never stale ones, never an open port that was meant to be restricted), an entry whose
    /// node port the Service lacks is dropped alone, and when two Services claim one host port and protocol the
    /// older one (creationTimestamp, then namespace/name) keeps it. Problems are reported, never thrown.
    public init(snapshot: ClusterSnapshot, options: ForwardingOptions) {
        var problems: [Problem] = []
        nodes = DesiredState.eligibleNodes(snapshot.nodes, problems: &problems)

        // Oldest first; sort indices, not the (large) Service values.
        let services = snapshot.services
        let order = services.indices.sorted { i, j in
            let a = services[i].metadata, b = services[j].metadata
            let ta = a.creationTimestamp ?? "~", tb = b.creationTimestamp ?? "~"
            if ta != tb { return ta < tb }
            let na = a.namespace ?? "default", nb = b.namespace ?? "default"
            return na != nb ? na < nb : a.name < b.name
        }
        var owners: [PortKey: ServiceRef] = [:]
        var ports: [ForwardedPort] = []
        for index in order {
            let service = services[index]
            for mapping in DesiredState.mappings(of: service, options: options, problems: &problems) {
                let key = PortKey(mapping)
                if let owner = owners[key] {
                    problems.append(Problem(
                        object: "Service \(service.ref)", reason: .portConflict,
                        message: "host port \(mapping.hostPort)/\(mapping.proto) is already forwarded for Service \(owner), which is older; this entry is ignored",
                        service: service.ref))
                    continue
                }
                owners[key] = service.ref
                ports.append(ForwardedPort(service: service.ref, mapping: mapping))
            }
        }
        ports.sort { PortKey($0.mapping) < PortKey($1.mapping) }
        self.ports = ports
        self.problems = problems
        forwarding = ForwardingState(
            interfaces: options.interfaces,
            externalInterfaces: options.externalInterface.map { [$0] } ?? [],
            nodes: nodes,
            mappings: ports.map(\.mapping))
    }

    /// The Service's requested mappings that are valid on their own (conflicts are settled by the caller).
    static func mappings(of service: Service, options: ForwardingOptions, problems: inout [Problem]) -> [Mapping] {
        let annotations = service.metadata.annotations ?? [:]
        guard let text = annotations[EpokAnnotation.externalPorts] else { return [] }
        let object = "Service \(service.ref)"
        func report(_ reason: Problem.Reason, _ message: String) {
            problems.append(Problem(object: object, reason: reason, message: message, service: service.ref))
        }

        let requests: [PortRequest]
        do {
            requests = try AnnotationParser.externalPorts(text)
        } catch {
            report(.invalidAnnotation, "\(error); no ports are forwarded for this Service")
            return []
        }

        var allowed: [CIDR]?
        do {
            if let range = annotations[EpokAnnotation.allowRange] {
                allowed = try AnnotationParser.cidrs(range)
            }
            if let ranges = service.spec.loadBalancerSourceRanges, !ranges.isEmpty {
                let more = try AnnotationParser.cidrs(ranges, annotation: "spec.loadBalancerSourceRanges")
                allowed = Array(Set((allowed ?? []) + more)).sorted()
            }
        } catch {
            report(.invalidAllowRange, "\(error); no ports are forwarded for this Service until it is fixed")
            return []
        }

        let internalOnly = annotations[EpokAnnotation.internal] != nil
        let nodePorts = (service.spec.ports ?? []).compactMap { p -> (L4Protocol, Port)? in
            guard let n = p.nodePort, let port = Dataplane.Port(n), let proto = L4Protocol(p.protocol ?? "TCP") else { return nil }
            return (proto, port)
        }
        var result: [Mapping] = []
        for request in requests {
            guard nodePorts.contains(where: { $0 == (request.proto, request.nodePort) }) else {
                let known = nodePorts.isEmpty
                    ? "it has none (type \(service.spec.type ?? "ClusterIP"); epokd forwards to NodePort and LoadBalancer Services)"
                    : "it has " + nodePorts.map { "\($0.1)/\($0.0)" }.joined(separator: ", ")
                report(.unknownNodePort, "\(EpokAnnotation.externalPorts): entry \(request): node port \(request.nodePort)/\(request.proto) is not a node port of this Service; \(known)")
                continue
            }
            result.append(Mapping(proto: request.proto, hostPort: request.hostPort, nodePort: request.nodePort,
                                  internalOnly: internalOnly, allowedSources: allowed, label: service.ref.description))
        }
        return result
    }

    /// Ready nodes without the exclude annotation or label, with their first InternalIP of each family.
    static func eligibleNodes(_ nodes: [Node], problems: inout [Problem]) -> [NodeAddress] {
        var result: [NodeAddress] = []
        for node in nodes where node.isReady {
            if node.metadata.annotations?[EpokAnnotation.exclude] != nil || node.metadata.labels?[EpokAnnotation.excludeLabel] != nil {
                continue
            }
            var address = NodeAddress(node: node.metadata.name)
            for a in node.status?.addresses ?? [] where a.type == "InternalIP" {
                switch IPAddress(a.address) {
                case .v4(let v4)?: if address.ipv4 == nil { address.ipv4 = v4 }
                case .v6(let v6)?: if address.ipv6 == nil { address.ipv6 = v6 }
                case nil: break
                }
            }
            guard address.ipv4 != nil || address.ipv6 != nil else {
                problems.append(Problem(object: "Node \(node.metadata.name)", reason: .nodeWithoutAddress,
                                        message: "has no InternalIP address; it receives no forwarded traffic"))
                continue
            }
            result.append(address)
        }
        return result.sorted()
    }
}
