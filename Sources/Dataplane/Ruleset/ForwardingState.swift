/// A node's addresses that forwarded traffic is sent to.
public struct NodeAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var node: String
    public var ipv4: IPv4Address?
    public var ipv6: IPv6Address?

    public init(node: String, ipv4: IPv4Address? = nil, ipv6: IPv6Address? = nil) {
        self.node = node
        self.ipv4 = ipv4
        self.ipv6 = ipv6
    }

    public var description: String {
        node + "(" + [ipv4?.description, ipv6?.description].compactMap { $0 }.joined(separator: ", ") + ")"
    }

    public static func < (a: NodeAddress, b: NodeAddress) -> Bool { a.node < b.node }
}

/// One host port forwarded to a node port.
public struct Mapping: Hashable, Sendable {
    public var proto: L4Protocol
    public var hostPort: Port
    public var nodePort: Port
    /// Never reachable through the external interface.
    public var internalOnly: Bool
    /// Whose mapping this is (`namespace/name`), kept in the kernel as the element's comment.
    public var label: String?
    /// What few mappings have, held apart so that the many kept (per Service, per claim) stay small.
    private var rare: Boxed<Rare>?

    private struct Rare: Hashable, Sendable {
        var allowedSources: [CIDR]?
        var limit: RateLimit?
        var group: NodeGroup?
    }

    public init(proto: L4Protocol, hostPort: Port, nodePort: Port,
                internalOnly: Bool = false, allowedSources: [CIDR]? = nil, label: String? = nil, limit: RateLimit? = nil,
                group: NodeGroup? = nil) {
        self.proto = proto
        self.hostPort = hostPort
        self.nodePort = nodePort
        self.internalOnly = internalOnly
        self.label = label
        rare = Optional(boxing: Rare(allowedSources: allowedSources, limit: limit, group: group), unlessEqualTo: Rare())
    }

    /// Sources allowed to connect; nil admits everyone.
    public var allowedSources: [CIDR]? {
        get { rare?.value.allowedSources }
        set { rare = Optional(boxing: Rare(allowedSources: newValue, limit: limit, group: group), unlessEqualTo: Rare()) }
    }

    /// The Service's rate limit, applied to what is forwarded through this host port.
    public var limit: RateLimit? {
        get { rare?.value.limit }
        set { rare = Optional(boxing: Rare(allowedSources: allowedSources, limit: newValue, group: group), unlessEqualTo: Rare()) }
    }

    /// This mapping's own group of nodes (its Service's nodes with a ready endpoint, for
    /// `externalTrafficPolicy: Local`); nil: the shared group of every eligible node.
    public var group: NodeGroup? {
        get { rare?.value.group }
        set { rare = Optional(boxing: Rare(allowedSources: allowedSources, limit: limit, group: newValue), unlessEqualTo: Rare()) }
    }
}

/// The nodes one mapping sends new connections to, over `slots` round-robin slots (the skeleton's modulus,
/// the same as the shared group's). No node: the mapping's port is refused.
public struct NodeGroup: Hashable, Sendable {
    public var nodes: [NodeAddress]
    public var slots: UInt32
    /// Nodes left out because a health check failed (kept in the table for `epokd status` and `nft list`).
    public var down: [NodeAddress]

    public init(nodes: [NodeAddress], slots: UInt32, down: [NodeAddress] = []) {
        self.nodes = nodes.sorted()
        self.slots = slots
        self.down = down.sorted()
    }
}

/// A host port and protocol: what a mapping claims, and what identifies it.
public struct PortKey: Hashable, Comparable, Sendable {
    public var proto: L4Protocol
    public var port: Port

    public init(proto: L4Protocol, port: Port) {
        self.proto = proto
        self.port = port
    }

    public init(_ m: Mapping) { self.init(proto: m.proto, port: m.hostPort) }

    public static func < (a: PortKey, b: PortKey) -> Bool { (a.proto, a.port) < (b.proto, b.port) }
}

/// Everything the host forwards: the data the ruleset's sets and maps hold.
public struct ForwardingState: Hashable, Sendable {
    /// Interfaces traffic is forwarded from (`--interfaces`).
    public var interfaces: [String]
    /// Interfaces that internal services are unreachable from (`--external-interface`).
    public var externalInterfaces: [String]
    /// The nodes of the shared group.
    public var nodes: [NodeAddress]
    public var mappings: [Mapping]
    /// Interfaces whose forwarded traffic passes the LoadBalancer firewall (`--firewall-interface`).
    public var firewallInterfaces: [String]
    /// Interfaces whose traffic to the host itself is filtered (`--firewall-input`), and the ports admitted there.
    public var inputInterfaces: [String]
    public var inputPorts: [PortKey]
    /// The LoadBalancer IPs, protocols and ports the firewall admits.
    public var loadBalancers: [LoadBalancerEntry]
    /// Nodes that get no new connections but keep their flows (kept in the table for `epokd status`).
    public var draining: [NodeAddress] = []
    /// Static source addresses of selected pods.
    public var egress: [EgressRule] = []
    /// Bridges to external servers: the pods' ways out, the servers' ways in, and the entrance addresses.
    public var bridgeExits: [BridgeExit] = []
    public var bridgeEntrances: [BridgeEntrance] = []
    public var bridgeGuarded: [IPAddress] = []

    public init(interfaces: [String], externalInterfaces: [String] = [], nodes: [NodeAddress] = [], mappings: [Mapping] = [],
                firewallInterfaces: [String] = [], inputInterfaces: [String] = [], inputPorts: [PortKey] = [],
                loadBalancers: [LoadBalancerEntry] = []) {
        self.interfaces = interfaces
        self.externalInterfaces = externalInterfaces
        self.nodes = nodes
        self.mappings = mappings
        self.firewallInterfaces = firewallInterfaces
        self.inputInterfaces = inputInterfaces
        self.inputPorts = inputPorts
        self.loadBalancers = loadBalancers
    }

    /// The distinct per-source rates in use, in order: each is one pair of rules in the skeleton.
    public var perSourceLimits: [RateLimit] {
        Set(loadBalancers.compactMap(\.perSourceLimit)).sorted()
    }
}
