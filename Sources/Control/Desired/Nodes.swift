import Dataplane

// The rules for nodes: which receive traffic, at which address.

/// Addresses no tenant may use as an egress, bridge source or target, or LoadBalancer IP: the host's own (not
/// those epokd added, nor, as a source, those inside `--address-pools`) and every Node's (InternalIP and
/// ExternalIP, ready or not); with `--address-pools`, every source address outside them.
public struct ReservedAddresses: Equatable, Sendable {
    public var host: Set<IPAddress> = []
    /// Each Node address, with the Node's name.
    public var nodes: [IPAddress: String] = [:]
    public var pools: [CIDR]?
    /// Addresses another host answers for (an ARP probe said so), with the interface.
    public var elsewhere: [IPAddress: String] = [:]
    /// The host's gateways.
    public var gateways: Set<IPAddress> = []

    public init(host: Set<IPAddress> = [], nodes: [Node] = [], pools: [CIDR]? = nil, elsewhere: [IPAddress: String] = [:],
                gateways: Set<IPAddress> = []) {
        self.host = host
        self.gateways = gateways
        self.pools = pools
        self.elsewhere = elsewhere
        for node in nodes.sorted(by: { $0.metadata.name < $1.metadata.name }) {
            for a in node.status?.addresses ?? [] where a.type == "InternalIP" || a.type == "ExternalIP" {
                if let ip = IPAddress(a.address), self.nodes[ip] == nil { self.nodes[ip] = node.metadata.name }
            }
        }
    }

    /// Why `ip` is reserved (`an address of this host`, `the address of Node n2`), or nil. A `source` (an egress
    /// address, a bridge's sourceIP) must also lie in the pools, where a host address is allowed.
    public func why(_ ip: IPAddress, source: Bool = false) -> String? {
        if let node = nodes[ip] { return "the address of Node \(Escaped.text(node, limit: 253))" }
        if let interface = elsewhere[ip] { return "an address another host on \(interface) answers for (ARP)" }
        if gateways.contains(ip) { return "a gateway of this host" }
        let pooled = pools?.contains { $0.contains(ip) }
        if source, pooled == false { return "outside --address-pools" }
        if host.contains(ip), !(source && pooled == true) {
            return "an address of this host" + (source ? " (list it in --address-pools to let tenants use it)" : "")
        }
        return nil
    }
}

extension DesiredState {
    /// Ready nodes without the exclude annotation or label, with their first usable InternalIP of each family.
    /// An address that cannot be a backend (loopback, unspecified, link-local, multicast, broadcast, one of the
    /// host's own, or outside `--node-cidrs`) is refused with a problem naming the Node. Nodes with the drain
    /// annotation that would otherwise be eligible go to `draining` instead: no new connections, flows kept.
    static func eligibleNodes(_ nodes: [Node], options: ForwardingOptions, problems: inout [Problem],
                              draining: inout [NodeAddress]) -> [NodeAddress] {
        var result: [NodeAddress] = []
        for node in nodes where node.isReady {
            if node.metadata.annotation(EpokAnnotation.exclude) != nil || node.metadata.labels?[EpokAnnotation.excludeLabel] != nil {
                continue
            }
            let object = "Node \(node.metadata.name)"
            var address = NodeAddress(node: node.metadata.name)
            var refused: [String] = []
            for a in node.status?.addresses ?? [] where a.type == "InternalIP" {
                guard let ip = IPAddress(a.address) else {
                    refused.append("\"\(a.address)\" is not an IP address")
                    continue
                }
                if let why = unusableBackend(ip, options: options) {
                    refused.append("\(ip) is \(why)")
                    continue
                }
                switch ip {
                case .v4(let v4): if address.ipv4 == nil { address.ipv4 = v4 }
                case .v6(let v6): if address.ipv6 == nil { address.ipv6 = v6 }
                }
            }
            if !refused.isEmpty {
                problems.append(Problem(object: object, reason: .invalidNodeAddress,
                                        message: "InternalIP " + refused.prefix(4).joined(separator: "; ") + ": never used as a backend"))
            }
            guard address.ipv4 != nil || address.ipv6 != nil else {
                problems.append(Problem(object: object, reason: .nodeWithoutAddress,
                                        message: "has no usable InternalIP address; it receives no forwarded traffic"))
                continue
            }
            if node.metadata.annotation(EpokAnnotation.drain) != nil {
                draining.append(address)
            } else {
                result.append(address)
            }
        }
        draining.sort()
        return result.sorted()
    }

    /// Why `ip` cannot receive forwarded traffic, or nil if it can.
    static func unusableBackend(_ ip: IPAddress, options: ForwardingOptions) -> String? {
        if let special = specialPurpose(ip) { return special }
        if options.hostAddresses.contains(ip) { return "an address of this host (forwarding there would loop)" }
        if let allowed = options.nodeCIDRs, !allowed.contains(where: { $0.contains(ip) }) {
            return "outside --node-cidrs " + allowed.map(\.description).joined(separator: ",")
        }
        return nil
    }

    /// What `ip` is when no unicast traffic can be forwarded to it (unspecified, loopback, link-local, multicast,
    /// broadcast or reserved, IPv4-mapped), or nil for an ordinary unicast address.
    static func specialPurpose(_ ip: IPAddress) -> String? {
        switch ip {
        case .v4(let a):
            let v = a.value
            if v == 0 { return "the unspecified address" }
            if v >> 24 == 127 { return "a loopback address" }
            if v >> 16 == 0xA9FE { return "a link-local address" }
            if v >> 28 == 0xE { return "a multicast address" }
            if v == .max { return "the broadcast address" }
            if v >> 28 == 0xF { return "in 240.0.0.0/4 (reserved)" }
            if v >> 24 == 0 { return "in 0.0.0.0/8 (this network)" }
        case .v6(let a):
            if a.high == 0 && a.low == 0 { return "the unspecified address" }
            if a.high == 0 && a.low == 1 { return "the loopback address" }
            if a.high >> 54 == 0x3FA { return "a link-local address" }
            if a.high >> 56 == 0xFF { return "a multicast address" }
            if a.high == 0 && a.low >> 32 == 0xFFFF { return "an IPv4-mapped address (give the IPv4 address instead)" }
        }
        return nil
    }
}
