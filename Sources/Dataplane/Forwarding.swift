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

/// Which nodes receive a mapping's new connections.
public enum Backends: Hashable, Sendable {
    /// Every eligible node (the shared group).
    case allNodes
    /// A subset of its own (for `externalTrafficPolicy: Local` or health-checked backends).
    case nodes([NodeAddress])
}

/// One host port forwarded to a node port.
public struct Mapping: Hashable, Sendable {
    public var proto: L4Protocol
    public var hostPort: Port
    public var nodePort: Port
    public var backends: Backends
    /// Never reachable through the external interface.
    public var internalOnly: Bool
    /// Sources allowed to connect; nil admits everyone.
    public var allowedSources: [CIDR]?
    /// Whose mapping this is (`namespace/name`), kept in the kernel as the element's comment.
    public var label: String?

    public init(proto: L4Protocol, hostPort: Port, nodePort: Port, backends: Backends = .allNodes,
                internalOnly: Bool = false, allowedSources: [CIDR]? = nil, label: String? = nil) {
        self.proto = proto
        self.hostPort = hostPort
        self.nodePort = nodePort
        self.backends = backends
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

/// The fixed forwarding ruleset: a handful of rules whose every decision is a lookup in a set or map.
///
/// Per-packet path for a new connection to the host on a managed interface:
/// `guard` (prerouting, before NAT) drops internal services on the external interface and sources
/// outside an allow-range; `dnat` looks up protocol . port in `services` to get the node port and
/// backend group, picks a slot round-robin, and looks up group . slot in `backends4`/`backends6`;
/// `forward` accepts what was DNATed; `input` refuses mapped ports that found no backend.
public enum ForwardingRuleset {
    /// Slots per backend group up to 60 nodes: new connections cycle through them. 60 spreads evenly over
    /// 1 to 6 nodes (and over 10, 12, 15, 20, 30 and 60).
    public static let baseSlots: UInt32 = 60

    /// The slots the skeleton needs for `nodes` nodes: 60 up to 60 nodes, then at least two per node (in
    /// steps of 60), so every node receives traffic and none more than 1.5 times another's share. A change of
    /// the slot count is a change of skeleton (the modulus is in the rule): rare, and one atomic transaction.
    public static func slots(forNodes nodes: Int) -> UInt32 {
        nodes <= Int(baseSlots) ? baseSlots : baseSlots * UInt32((2 * nodes + Int(baseSlots) - 1) / Int(baseSlots))
    }

    /// The slot count of a skeleton made by `skeleton(table:counters:slots:)`.
    public static func slots(of skeleton: Skeleton) -> UInt32 {
        for chain in skeleton.chains {
            for rule in chain.rules {
                for case .roundRobin(let modulus, _) in rule.expressions { return modulus }
            }
        }
        return baseSlots
    }
    /// The group id of "every eligible node".
    public static let sharedGroup: UInt32 = 1

    static let interfaces = NamedSet(name: "interfaces", key: [.ifname])
    static let external = NamedSet(name: "external", key: [.ifname])
    static let services = NamedSet(name: "services", key: [.l4proto, .port], value: [.port, .mark])
    /// The map of forwarded ports (its elements carry the per-mapping counters, when the skeleton has them).
    public static var servicesSet: NamedSet { services }
    static let backends4 = NamedSet(name: "backends4", key: [.mark, .integer], value: [.ipv4])
    static let backends6 = NamedSet(name: "backends6", key: [.mark, .integer], value: [.ipv6])
    static let internalPorts = NamedSet(name: "internal", key: [.l4proto, .port])
    static let restricted = NamedSet(name: "restricted", key: [.l4proto, .port])
    static let allow4 = NamedSet(name: "allow4", key: [.l4proto, .port, .ipv4], interval: true)
    static let allow6 = NamedSet(name: "allow6", key: [.l4proto, .port, .ipv6], interval: true)

    /// The skeleton in table `name` (family inet, so one ruleset serves IPv4 and IPv6).
    ///
    /// With `counters`, every element of `services` carries a packet and byte counter: the forward chain looks
    /// every forwarded packet (both directions) up there, so the counter is that mapping's traffic, plus one
    /// packet per new connection from the DNAT lookup. The kernel allocates a per-CPU counter for each element,
    /// which makes creating tens of thousands of mappings about twice as slow.
    public static func skeleton(table name: String = "epok", counters: Bool = true, slots: UInt32 = baseSlots) -> Skeleton {
        var mapped = services
        mapped.counters = counters
        return Skeleton(
            table: Table(name: name),
            sets: [interfaces, external, mapped, backends4, backends6, internalPorts, restricted, allow4, allow6],
            chains: [
                Chain(name: "guard", hook: .prerouting, priority: -110, rules: [
                    Rule("internal services are unreachable from the external interface",
                         [.meta(.iifname, into: .r(0)), .lookup(set: external.name, from: .r(0))]
                             + originalDirection + mappedPort(internalPorts) + addressedToHost + [.counter, .verdict(.drop)]),
                    Rule("IPv4 sources outside the allow-range are dropped",
                         family(.ipv4) + managedInterface + originalDirection + mappedPort(restricted) + addressedToHost
                             + sourceNotAllowed(allow4, offset: 12, length: 4) + [.counter, .verdict(.drop)]),
                    Rule("IPv6 sources outside the allow-range are dropped",
                         family(.ipv6) + managedInterface + originalDirection + mappedPort(restricted) + addressedToHost
                             + sourceNotAllowed(allow6, offset: 8, length: 16) + [.counter, .verdict(.drop)]),
                ]),
                Chain(name: "dnat", kind: .nat, hook: .prerouting, priority: -100, rules: [
                    Rule("IPv4 host ports to node ports", family(.ipv4) + managedInterface + dnat(.ipv4, slots: slots)),
                    Rule("IPv6 host ports to node ports", family(.ipv6) + managedInterface + dnat(.ipv6, slots: slots)),
                ]),
                Chain(name: "dnat_local", kind: .nat, hook: .output, priority: -100, rules: [
                    Rule("IPv4 connections from the host itself",
                         family(.ipv4) + [.payload(.network, offset: 16, length: 4, into: .r(0)),
                                          .mask(.r(0), [255, 0, 0, 0]), .compare(.r(0), equal: false, [127, 0, 0, 0])] + dnat(.ipv4, slots: slots)),
                    Rule("IPv6 connections from the host itself",
                         family(.ipv6) + [.payload(.network, offset: 24, length: 16, into: .r(0)),
                                          .compare(.r(0), equal: false, IPv6Address("::1")!.bytes)] + dnat(.ipv6, slots: slots)),
                ]),
                Chain(name: "forward", hook: .forward, priority: 0, rules: [
                    Rule("accept connections epokd forwarded", [
                        .ct(.status, into: .r(0)), .mask(.r(0), le32(0x20)), .compare(.r(0), equal: false, le32(0)),
                        .ct(.l4protocol, original: true, into: .r(0)), .ct(.protoDestination, original: true, into: .r(1)),
                        .lookup(set: services.name, from: .r(0)), .counter, .verdict(.accept),
                    ]),
                ]),
                Chain(name: "input", hook: .input, priority: 0, rules: [
                    Rule("mapped ports with no backend are refused, not handed to the host",
                         managedInterface + [
                             .ct(.state, into: .r(0)), .mask(.r(0), le32(0x08)), .compare(.r(0), equal: false, le32(0)),
                             .ct(.status, into: .r(0)), .mask(.r(0), le32(0x20)), .compare(.r(0), equal: true, le32(0)),
                         ] + mappedPort(services) + [.counter, .reject]),
                ]),
            ])
    }

    private static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
    private static func family(_ f: Family) -> [Expression] {
        [.meta(.nfproto, into: .r(0)), .compare(.r(0), equal: true, [f.rawValue])]
    }
    private static let managedInterface: [Expression] = [.meta(.iifname, into: .r(0)), .lookup(set: interfaces.name, from: .r(0))]
    private static let originalDirection: [Expression] = [.ct(.direction, into: .r(0)), .compare(.r(0), equal: true, [0])]
    private static let addressedToHost: [Expression] = [.fibDestinationType(into: .r(10)), .compare(.r(10), equal: true, le32(2))]
    private static func mappedPort(_ set: NamedSet) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)), .lookup(set: set.name, from: .r(0))]
    }
    private static func sourceNotAllowed(_ set: NamedSet, offset: UInt32, length: UInt32) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
         .payload(.network, offset: offset, length: length, into: .r(2)), .lookup(set: set.name, from: .r(0), inverted: true)]
    }
    /// protocol . port → node port (r2) . group (r3); slot (r4); group . slot → address (r5...).
    private static func dnat(_ f: Family, slots: UInt32) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
         .lookup(set: services.name, from: .r(0), into: .r(2))]
            + addressedToHost
            + [.roundRobin(modulus: slots, into: .r(4)),
               .lookup(set: f == .ipv4 ? backends4.name : backends6.name, from: .r(3), into: .r(5)),
               .counter, .dnat(family: f, address: .r(5), port: .r(2))]
    }

    /// The elements that make the skeleton forward `state`.
    public static func elements(for state: ForwardingState) -> TableElements {
        var result: TableElements = [:]
        for set in [interfaces, external, services, backends4, backends6, internalPorts, restricted, allow4, allow6] {
            result[set.name] = []
        }
        let slots = slots(forNodes: state.nodes.count)
        for (set, element) in interfaceElements(state) + groupElements(group: sharedGroup, nodes: state.nodes, slots: slots)
            + state.mappings.flatMap({ mappingElements($0, slots: slots) }) {
            result[set, default: []].insert(element)
        }
        return result
    }

    /// The forwarding a table's elements carry out: the inverse of `elements(for:)`, as far as stale flows
    /// need it (ports, node ports, backends; allow-ranges are not recovered). Nodes are named by address.
    public static func forwarding(from elements: TableElements) -> ForwardingState {
        var groups: [UInt32: [String: NodeAddress]] = [:]
        for e in elements[backends4.name] ?? [] {
            guard case .mark(let g)? = e.key.first, case .ipv4(let a)? = e.value?.first else { continue }
            groups[g, default: [:]][a.description] = NodeAddress(node: a.description, ipv4: a)
        }
        for e in elements[backends6.name] ?? [] {
            guard case .mark(let g)? = e.key.first, case .ipv6(let a)? = e.value?.first else { continue }
            groups[g, default: [:]][a.description] = NodeAddress(node: a.description, ipv6: a)
        }
        let mappings = (elements[services.name] ?? []).compactMap { e -> Mapping? in
            guard case .l4proto(let proto)? = e.key.first, case .port(let port)? = e.key.last,
                  case .port(let nodePort)? = e.value?.first, case .mark(let group)? = e.value?.last else { return nil }
            let backends: Backends = group == sharedGroup ? .allNodes : .nodes(Array((groups[group] ?? [:]).values))
            return Mapping(proto: proto, hostPort: port, nodePort: nodePort, backends: backends, label: e.comment)
        }
        return ForwardingState(interfaces: [], nodes: Array((groups[sharedGroup] ?? [:]).values), mappings: mappings)
    }

    /// The elements naming the interfaces, as (set name, element).
    public static func interfaceElements(_ state: ForwardingState) -> [(String, Element)] {
        state.interfaces.map { (interfaces.name, Element(key: [.ifname($0)])) }
            + state.externalInterfaces.map { (external.name, Element(key: [.ifname($0)])) }
    }

    /// The elements of one mapping (and of its own backend group, if it has one, over `slots` slots), as (set name, element).
    public static func mappingElements(_ m: Mapping, slots: UInt32) -> [(String, Element)] {
        let key: [Field] = [.l4proto(m.proto), .port(m.hostPort)]
        var result: [(String, Element)] = []
        var group = sharedGroup
        if case .nodes(let subset) = m.backends {
            group = ownGroup(m)
            result += groupElements(group: group, nodes: subset, slots: slots)
        }
        result.append((services.name, Element(key: key, value: [.port(m.nodePort), .mark(group)], comment: m.label)))
        if m.internalOnly { result.append((internalPorts.name, Element(key: key))) }
        if let sources = m.allowedSources {
            result.append((restricted.name, Element(key: key)))
            for range in AddressRange.union(of: sources) {
                result.append((range.first.isV4 ? allow4.name : allow6.name,
                               Element(key: key + [field(range.first)], keyEnd: key + [field(range.last)])))
            }
        }
        return result
    }

    /// A group id of a mapping's own: stable, and distinct from the shared group and from every other mapping's.
    public static func ownGroup(_ m: Mapping) -> UInt32 {
        0x0100_0000 | UInt32(m.proto.rawValue) << 16 | UInt32(m.hostPort.rawValue)
    }

    /// The host port whose own group `group` is (the inverse of `ownGroup`); nil for the shared group.
    public static func portKey(ofGroup group: UInt32) -> PortKey? {
        guard group & 0xFF00_0000 == 0x0100_0000, let port = Port(rawValue: UInt16(group & 0xFFFF)) else { return nil }
        return PortKey(proto: L4Protocol(rawValue: UInt8(group >> 16 & 0xFF)), port: port)
    }

    private static func field(_ a: IPAddress) -> Field {
        switch a {
        case .v4(let v): .ipv4(v)
        case .v6(let v): .ipv6(v)
        }
    }

    /// The slots of a backend group: slot s goes to the (s mod n)-th node of that family, nodes in name order.
    public static func groupElements(group: UInt32, nodes: [NodeAddress], slots: UInt32) -> [(String, Element)] {
        let sorted = nodes.sorted()
        let four = sorted.compactMap(\.ipv4), six = sorted.compactMap(\.ipv6)
        var result: [(String, Element)] = []
        for slot in 0..<slots {
            let key: [Field] = [.mark(group), .integer(slot)]
            if !four.isEmpty { result.append((backends4.name, Element(key: key, value: [.ipv4(four[Int(slot) % four.count])]))) }
            if !six.isEmpty { result.append((backends6.name, Element(key: key, value: [.ipv6(six[Int(slot) % six.count])]))) }
        }
        return result
    }
}
