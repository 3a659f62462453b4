/// Connections whose NAT binding a change of forwarding made wrong, for one mapping.
///
/// A tracked flow is stale when epokd DNATed it for this mapping (protocol, host port, old node port, and the
/// address it was sent to) and the change removed the mapping, moved it to another node port, took its backend
/// away, or no longer admits its source. Flows of unchanged mappings, flows to another owner's address (a bridge
/// entrance of the same port), and flows epokd did not DNAT, never match.
public struct StaleFlows: Hashable, Sendable, CustomStringConvertible {
    public enum Reason: Hashable, Sendable {
        /// The mapping is gone or points at another node port: every flow of it.
        case remapped
        /// These backends no longer serve the mapping.
        case backendsRemoved(Set<IPAddress>)
        /// Only these sources are admitted now.
        case sourcesRestricted([CIDR])
    }

    public var proto: L4Protocol
    public var hostPort: Port
    /// The node port the stale flows were DNATed to.
    public var nodePort: Port
    public var reasons: [Reason]
    /// The address the flows were sent to, for a bridge's entrance: only flows to it match. nil for a host port,
    /// reached at the host's own addresses: then flows to any of `otherEntrances` never match.
    public var entrance: IPAddress?
    /// The entrance addresses of bridges, which a host port's flows are never sent to.
    public var otherEntrances: Set<IPAddress> = []

    public init(proto: L4Protocol, hostPort: Port, nodePort: Port, reasons: [Reason], entrance: IPAddress? = nil) {
        self.proto = proto
        self.hostPort = hostPort
        self.nodePort = nodePort
        self.reasons = reasons
        self.entrance = entrance
    }

    /// The kernel-side filter that narrows a dump to this mapping's flows.
    public var filter: ConntrackFilter { ConntrackFilter(proto: proto, destinationPort: hostPort) }

    /// Whether `flow` is one of the stale flows.
    public func matches(_ flow: TrackedFlow) -> Bool {
        guard flow.destinationNAT, flow.proto == proto, flow.destinationPort == hostPort.rawValue,
              flow.replySourcePort == nodePort.rawValue else { return false }
        if let entrance { guard flow.destination == entrance else { return false } } else if otherEntrances.contains(flow.destination) { return false }
        return reasons.contains { reason in
            switch reason {
            case .remapped: true
            case .backendsRemoved(let gone): gone.contains(flow.replySource)
            case .sourcesRestricted(let allowed): !allowed.contains { $0.contains(flow.source) }
            }
        }
    }

    public var description: String {
        (entrance.map { "\($0) " } ?? "") + "\(hostPort)/\(proto) (node port \(nodePort)): \(reasons)"
    }

    /// The stale flows of every mapping that changed from `old` to `new`; flows to the nodes in `keeping`
    /// (draining ones) are never stale for having lost their node.
    public static func between(_ old: ForwardingState, _ new: ForwardingState, keeping: [NodeAddress] = []) -> [StaleFlows] {
        var current: [PortKey: Mapping] = [:]
        for m in new.mappings { current[PortKey(m)] = m }
        return between(old, nodes: new.nodes, mappings: { current[$0] }, keeping: keeping)
    }

    /// `between(_:_:keeping:)`, the new state given by its nodes and its mapping of each host port (a table the
    /// caller keeps already, rather than a new one of every mapping).
    public static func between(_ old: ForwardingState, nodes: [NodeAddress], mappings current: (PortKey) -> Mapping?,
                               keeping: [NodeAddress] = []) -> [StaleFlows] {
        // The shared group's nodes that left are the same for every mapping in it; a mapping's own group has its own.
        let kept = addresses(keeping)
        let shared = addresses(old.nodes).subtracting(addresses(nodes)).subtracting(kept)
        var result: [StaleFlows] = []
        for before in old.mappings {
            var stale = StaleFlows(proto: before.proto, hostPort: before.hostPort, nodePort: before.nodePort, reasons: [])
            guard let after = current(PortKey(before)), after.nodePort == before.nodePort else {
                stale.reasons = [.remapped]
                result.append(stale)
                continue
            }
            let gone = before.group == nil && after.group == nil ? shared
                : addresses(before.group?.nodes ?? old.nodes).subtracting(addresses(after.group?.nodes ?? nodes)).subtracting(kept)
            if !gone.isEmpty { stale.reasons.append(.backendsRemoved(gone)) }
            if let allowed = after.allowedSources, allowed != before.allowedSources { stale.reasons.append(.sourcesRestricted(allowed)) }
            if !stale.reasons.isEmpty { result.append(stale) }
        }
        return result
    }

    /// Every address of `nodes`.
    private static func addresses(_ nodes: [NodeAddress]) -> Set<IPAddress> {
        Set(nodes.flatMap { n in [n.ipv4.map(IPAddress.v4), n.ipv6.map(IPAddress.v6)].compactMap { $0 } })
    }
}

/// Flows a pod's egress rule SNATed to an address that no longer applies to them.
public struct StaleEgress: Hashable, Sendable, CustomStringConvertible {
    /// The pod.
    public var source: IPAddress
    /// The address its flows left with.
    public var egress: IPAddress
    /// Destinations to which the pod still leaves with `egress`: flows to them stay.
    public var stillCovered: [CIDR]
    /// Only flows to this address (a bridge's server), when given.
    public var server: IPAddress?

    public init(source: IPAddress, egress: IPAddress, stillCovered: [CIDR], server: IPAddress? = nil) {
        self.source = source
        self.egress = egress
        self.stillCovered = stillCovered
        self.server = server
    }

    /// Whether `flow` is one of them.
    public func matches(_ flow: TrackedFlow) -> Bool {
        flow.sourceNAT && flow.source == source && flow.replyDestination == egress && !stillCovered.contains { $0.contains(flow.destination) }
            && (server == nil || flow.destination == server)
    }

    /// The stale SNATed flows when `old` becomes `new` (nil: the pod has no rule any more).
    public static func between(_ old: EgressRule, _ new: EgressRule?) -> StaleEgress? {
        let covered = new.flatMap { $0.egress == old.egress ? $0.destinations : nil } ?? []
        guard Set(covered) != Set(old.destinations) else { return nil }
        return StaleEgress(source: old.source, egress: old.egress, stillCovered: covered)
    }

    /// The stale flows of a bridge exit that changed (nil: it is gone).
    public static func between(_ old: BridgeExit, _ new: BridgeExit?) -> StaleEgress? {
        new?.source == old.source ? nil : StaleEgress(source: old.pod, egress: old.source, stillCovered: [], server: old.server)
    }

    public var description: String { "\(source) as \(egress)" + (server.map { " to \($0)" } ?? "") }
}

/// What the reconcile loop needs of conntrack: delete the flows a change made stale. `Conntrack` is the kernel.
public protocol StaleFlowRemover: AnyObject {
    /// Deletes the entries `stale` describes; returns how many were deleted.
    func delete(_ stale: [StaleFlows]) throws(NetlinkError) -> Int
    /// Deletes the SNATed entries `stale` describes; returns how many were deleted.
    func delete(egress stale: [StaleEgress]) throws(NetlinkError) -> Int
}

extension Conntrack: StaleFlowRemover {}

extension Conntrack {
    /// Deletes every flow `stale` describes (one dump per egress address, filtered by the kernel on the reply's
    /// destination) and returns how many were deleted.
    @discardableResult
    public func delete(egress stale: [StaleEgress]) throws(NetlinkError) -> Int {
        var doomed: [TrackedFlow] = []
        for (egress, group) in Dictionary(grouping: stale, by: \.egress) {
            doomed += try flows(ConntrackFilter(replyDestination: egress)).filter { flow in group.contains { $0.matches(flow) } }
        }
        return try delete(doomed)
    }

    /// Above this many changed mappings one unfiltered dump is cheaper than one filtered dump each.
    static let filteredDumpLimit = 8

    /// Deletes every flow that `stale` describes and returns how many were deleted. A few mappings are
    /// dumped one by one with a kernel-side filter; many are matched against a single dump.
    @discardableResult
    public func delete(_ stale: [StaleFlows]) throws(NetlinkError) -> Int {
        guard !stale.isEmpty else { return 0 }
        var doomed: [TrackedFlow] = []
        if stale.count <= Self.filteredDumpLimit {
            for s in stale { doomed += try flows(s.filter).filter(s.matches) }
        } else {
            var byPort: [ConntrackFilter: [StaleFlows]] = [:]
            for s in stale { byPort[s.filter, default: []].append(s) }
            for flow in try flows() {
                guard let port = Port(rawValue: flow.destinationPort),
                      let candidates = byPort[ConntrackFilter(proto: flow.proto, destinationPort: port)] else { continue }
                if candidates.contains(where: { $0.matches(flow) }) { doomed.append(flow) }
            }
        }
        return try delete(doomed)
    }
}
