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
    /// Sources allowed to connect; nil admits everyone.
    public var allowedSources: [CIDR]?
    /// Whose mapping this is (`namespace/name`), kept in the kernel as the element's comment.
    public var label: String?

    public init(proto: L4Protocol, hostPort: Port, nodePort: Port,
                internalOnly: Bool = false, allowedSources: [CIDR]? = nil, label: String? = nil) {
        self.proto = proto
        self.hostPort = hostPort
        self.nodePort = nodePort
        self.internalOnly = internalOnly
        self.allowedSources = allowedSources
        self.label = label
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

    public init(interfaces: [String], externalInterfaces: [String] = [], nodes: [NodeAddress] = [], mappings: [Mapping] = []) {
        self.interfaces = interfaces
        self.externalInterfaces = externalInterfaces
        self.nodes = nodes
        self.mappings = mappings
    }
}
