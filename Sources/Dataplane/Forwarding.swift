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

/// The fixed forwarding ruleset: a handful of rules whose every decision is a lookup in a set or map, laid out
/// so that `nft list ruleset` prints every rule as what it does and `nft -f` can load the listing again.
///
/// Per-packet path for a new connection to the host on a managed interface:
/// `guard` (prerouting, before NAT) drops internal services on the external interface and sources
/// outside an allow-range; `nat_prerouting` (and `nat_output` for the host's own connections) DNATs a mapped
/// port to `numgen inc mod SLOTS map @backends4 : meta l4proto . th dport map @services`, that is to the next
/// slot's node and the mapping's node port; `forward` accepts what was DNATed (and counts it per mapping);
/// `input` refuses mapped ports that found no backend.
public enum ForwardingRuleset {
    /// Slots up to 60 nodes: new connections cycle through them. 60 spreads evenly over 1 to 6 nodes (and over
    /// 10, 12, 15, 20, 30 and 60).
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

    /// The sets and maps, named once.
    public enum Sets {
        public static let interfaces = NamedSet(name: "interfaces", key: [.ifname])
        public static let external = NamedSet(name: "external", key: [.ifname])
        /// protocol . host port : node port; its elements carry the per-mapping counters and the owner's name.
        public static let services = NamedSet(name: "services", key: [.l4proto, .port], value: [.port])
        /// slot : node address, one element per slot.
        public static func backends4(slots: UInt32) -> NamedSet {
            NamedSet(name: "backends4", key: [.integer], value: [.ipv4], typeof: .roundRobinSlot(modulus: slots, to: .ipv4))
        }
        public static func backends6(slots: UInt32) -> NamedSet {
            NamedSet(name: "backends6", key: [.integer], value: [.ipv6], typeof: .roundRobinSlot(modulus: slots, to: .ipv6))
        }
        public static let internalPorts = NamedSet(name: "internal", key: [.l4proto, .port])
        public static let restricted = NamedSet(name: "restricted", key: [.l4proto, .port])
        public static let allow4 = NamedSet(name: "allow4", key: [.l4proto, .port, .ipv4], interval: true)
        public static let allow6 = NamedSet(name: "allow6", key: [.l4proto, .port, .ipv6], interval: true)
    }

    /// The map of forwarded ports (its elements carry the per-mapping counters, when the skeleton has them).
    public static var servicesSet: NamedSet { Sets.services }

    /// The skeleton in table `name` (family inet, so one ruleset serves IPv4 and IPv6).
    ///
    /// With `counters`, every element of `services` carries a packet and byte counter: the forward chain looks
    /// every forwarded packet (both directions) up there, so the counter is that mapping's traffic, plus one
    /// packet per new connection from the DNAT lookups. The kernel allocates a per-CPU counter for each element,
    /// which makes creating tens of thousands of mappings about twice as slow.
    public static func skeleton(table name: String = "epok", counters: Bool = true, slots: UInt32 = baseSlots) -> Skeleton {
        var mapped = Sets.services
        mapped.counters = counters
        let backends4 = Sets.backends4(slots: slots), backends6 = Sets.backends6(slots: slots)
        func dnat(_ f: Family, _ proto: L4Protocol) -> [Expression] {
            [.meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue])]
                + addressedToHost + mappedPort(Sets.services) + [.counter,
                   .roundRobin(modulus: slots, into: .r(0)),
                   .lookup(set: (f == .ipv4 ? backends4 : backends6).name, from: .r(0), into: .r(0)),
                   .meta(.l4proto, into: .r(4)), .payload(.transport, offset: 2, length: 2, into: .r(5)),
                   .lookup(set: Sets.services.name, from: .r(4), into: .r(4)),
                   .dnat(family: f, address: .r(0), port: .r(4))]
        }
        let notLoopback4: [Expression] = [.payload(.network, offset: 16, length: 4, into: .r(0)),
                                           .mask(.r(0), [255, 0, 0, 0]), .compare(.r(0), equal: false, [127, 0, 0, 0])]
        let notLoopback6: [Expression] = [.payload(.network, offset: 24, length: 16, into: .r(0)),
                                           .compare(.r(0), equal: false, IPv6Address("::1")!.bytes)]
        return Skeleton(
            table: Table(name: name),
            sets: [Sets.interfaces, Sets.external, mapped, backends4, backends6, Sets.internalPorts, Sets.restricted, Sets.allow4, Sets.allow6],
            chains: [
                Chain(name: "guard", hook: .prerouting, priority: -110, rules: [
                    Rule("internal services are unreachable from the external interface",
                         [.meta(.iifname, into: .r(0)), .lookup(set: Sets.external.name, from: .r(0))]
                             + originalDirection + mappedPort(Sets.internalPorts) + addressedToHost + [.counter, .verdict(.drop)]),
                    Rule("IPv4 sources outside the allow-range are dropped",
                         family(.ipv4) + managedInterface + originalDirection + mappedPort(Sets.restricted) + addressedToHost
                             + sourceNotAllowed(Sets.allow4, offset: 12, length: 4) + [.counter, .verdict(.drop)]),
                    Rule("IPv6 sources outside the allow-range are dropped",
                         family(.ipv6) + managedInterface + originalDirection + mappedPort(Sets.restricted) + addressedToHost
                             + sourceNotAllowed(Sets.allow6, offset: 8, length: 16) + [.counter, .verdict(.drop)]),
                ]),
                Chain(name: "nat_prerouting", kind: .nat, hook: .prerouting, priority: -100, rules: [
                    Rule("IPv4 TCP host ports to node ports", family(.ipv4) + managedInterface + dnat(.ipv4, .tcp)),
                    Rule("IPv4 UDP host ports to node ports", family(.ipv4) + managedInterface + dnat(.ipv4, .udp)),
                    Rule("IPv6 TCP host ports to node ports", family(.ipv6) + managedInterface + dnat(.ipv6, .tcp)),
                    Rule("IPv6 UDP host ports to node ports", family(.ipv6) + managedInterface + dnat(.ipv6, .udp)),
                ]),
                Chain(name: "nat_output", kind: .nat, hook: .output, priority: -100, rules: [
                    Rule("IPv4 TCP from the host itself", family(.ipv4) + notLoopback4 + dnat(.ipv4, .tcp)),
                    Rule("IPv4 UDP from the host itself", family(.ipv4) + notLoopback4 + dnat(.ipv4, .udp)),
                    Rule("IPv6 TCP from the host itself", family(.ipv6) + notLoopback6 + dnat(.ipv6, .tcp)),
                    Rule("IPv6 UDP from the host itself", family(.ipv6) + notLoopback6 + dnat(.ipv6, .udp)),
                ]),
                Chain(name: "forward", hook: .forward, priority: 0, rules: [L4Protocol.tcp, .udp].map { proto in
                    // The protocol match first: nft needs it to read `ct original proto-dst` as a port.
                    Rule("accept \(proto) connections epokd forwarded", [
                        .meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue]),
                        .ct(.status, into: .r(0)), .mask(.r(0), le32(0x20)), .compare(.r(0), equal: false, le32(0)),
                        .meta(.l4proto, into: .r(0)), .ct(.protoDestination, original: true, into: .r(1)),
                        .lookup(set: Sets.services.name, from: .r(0)), .counter, .verdict(.accept),
                    ])
                }),
                Chain(name: "input", hook: .input, priority: 0, rules: [
                    Rule("mapped ports with no backend are refused, not handed to the host",
                         managedInterface + [
                             .ct(.state, into: .r(0)), .mask(.r(0), le32(0x08)), .compare(.r(0), equal: false, le32(0)),
                             .ct(.status, into: .r(0)), .mask(.r(0), le32(0x20)), .compare(.r(0), equal: true, le32(0)),
                         ] + mappedPort(Sets.services) + [.counter, .reject]),
                ]),
            ])
    }

    private static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
    private static func family(_ f: Family) -> [Expression] {
        [.meta(.nfproto, into: .r(0)), .compare(.r(0), equal: true, [f.rawValue])]
    }
    private static let managedInterface: [Expression] = [.meta(.iifname, into: .r(0)), .lookup(set: Sets.interfaces.name, from: .r(0))]
    private static let originalDirection: [Expression] = [.ct(.direction, into: .r(0)), .compare(.r(0), equal: true, [0])]
    private static let addressedToHost: [Expression] = [.fibDestinationType(into: .r(0)), .compare(.r(0), equal: true, le32(2))]
    private static func mappedPort(_ set: NamedSet) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)), .lookup(set: set.name, from: .r(0))]
    }
    private static func sourceNotAllowed(_ set: NamedSet, offset: UInt32, length: UInt32) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
         .payload(.network, offset: offset, length: length, into: .r(2)), .lookup(set: set.name, from: .r(0), inverted: true)]
    }

    /// The elements that make the skeleton forward `state`.
    public static func elements(for state: ForwardingState) -> TableElements {
        var result: TableElements = [:]
        for set in [Sets.interfaces, Sets.external, Sets.services, Sets.backends4(slots: baseSlots), Sets.backends6(slots: baseSlots),
                    Sets.internalPorts, Sets.restricted, Sets.allow4, Sets.allow6] {
            result[set.name] = []
        }
        let slots = slots(forNodes: state.nodes.count)
        for (set, element) in interfaceElements(state) + slotElements(nodes: state.nodes, slots: slots) + state.mappings.flatMap(mappingElements) {
            result[set, default: []].insert(element)
        }
        return result
    }

    /// The forwarding a table's elements carry out: the inverse of `elements(for:)`, as far as stale flows
    /// need it (ports, node ports, backends; allow-ranges are not recovered). Nodes are named by address.
    public static func forwarding(from elements: TableElements) -> ForwardingState {
        var nodes: [String: NodeAddress] = [:]
        for e in elements[Sets.backends4(slots: baseSlots).name] ?? [] {
            guard case .ipv4(let a)? = e.value?.first else { continue }
            nodes[a.description] = NodeAddress(node: a.description, ipv4: a)
        }
        for e in elements[Sets.backends6(slots: baseSlots).name] ?? [] {
            guard case .ipv6(let a)? = e.value?.first else { continue }
            nodes[a.description] = NodeAddress(node: a.description, ipv6: a)
        }
        let mappings = (elements[Sets.services.name] ?? []).compactMap { e -> Mapping? in
            guard case .l4proto(let proto)? = e.key.first, case .port(let port)? = e.key.last,
                  case .port(let nodePort)? = e.value?.first else { return nil }
            return Mapping(proto: proto, hostPort: port, nodePort: nodePort, label: e.comment)
        }
        return ForwardingState(interfaces: [], nodes: Array(nodes.values), mappings: mappings)
    }

    /// The elements naming the interfaces, as (set name, element).
    public static func interfaceElements(_ state: ForwardingState) -> [(String, Element)] {
        state.interfaces.map { (Sets.interfaces.name, Element(key: [.ifname($0)])) }
            + state.externalInterfaces.map { (Sets.external.name, Element(key: [.ifname($0)])) }
    }

    /// The elements of one mapping, as (set name, element).
    public static func mappingElements(_ m: Mapping) -> [(String, Element)] {
        let key: [Field] = [.l4proto(m.proto), .port(m.hostPort)]
        var result: [(String, Element)] = [(Sets.services.name, Element(key: key, value: [.port(m.nodePort)], comment: m.label))]
        if m.internalOnly { result.append((Sets.internalPorts.name, Element(key: key))) }
        if let sources = m.allowedSources {
            result.append((Sets.restricted.name, Element(key: key)))
            for range in AddressRange.union(of: sources) {
                result.append((range.first.isV4 ? Sets.allow4.name : Sets.allow6.name,
                               Element(key: key + [field(range.first)], keyEnd: key + [field(range.last)])))
            }
        }
        return result
    }

    private static func field(_ a: IPAddress) -> Field {
        switch a {
        case .v4(let v): .ipv4(v)
        case .v6(let v): .ipv6(v)
        }
    }

    /// The slots: slot s goes to the (s mod n)-th node of that family, nodes in name order.
    public static func slotElements(nodes: [NodeAddress], slots: UInt32) -> [(String, Element)] {
        let sorted = nodes.sorted()
        let four = sorted.compactMap(\.ipv4), six = sorted.compactMap(\.ipv6)
        var result: [(String, Element)] = []
        for slot in 0..<slots {
            let key: [Field] = [.integer(slot)]
            if !four.isEmpty { result.append(("backends4", Element(key: key, value: [.ipv4(four[Int(slot) % four.count])]))) }
            if !six.isEmpty { result.append(("backends6", Element(key: key, value: [.ipv6(six[Int(slot) % six.count])]))) }
        }
        return result
    }
}
