/// Host ports DNATed round-robin to node ports: the `services` and `backends` maps, the NAT chains, the forward
/// chain that counts what was DNATed (with counters), and the input rule that refuses a mapped port with no backend.
/// A mapping with a group of its own (`Mapping.group`) is DNATed through `groups4`/`groups6`, keyed by its
/// protocol . port . slot; its port is in `grouped`, so that it never falls back to the shared group.
public enum PortMapping: RulesetFeature {
    public enum Sets {
        /// protocol . host port : node port; its elements carry the per-mapping counters and the owner's name.
        public static let services = NamedSet(name: "services", key: [.l4proto, .port], value: [.port])
        /// slot : node address, one element per slot.
        public static func backends4(slots: UInt32) -> NamedSet {
            NamedSet(name: "backends4", key: [.integer], value: [.ipv4], typeof: .roundRobinSlot(modulus: slots, to: .ipv4))
        }
        public static func backends6(slots: UInt32) -> NamedSet {
            NamedSet(name: "backends6", key: [.integer], value: [.ipv6], typeof: .roundRobinSlot(modulus: slots, to: .ipv6))
        }
        /// protocol . port . slot : node address, for mappings with a group of their own.
        public static func groups(_ family: Family, slots: UInt32) -> NamedSet {
            NamedSet(name: family == .ipv6 ? "groups6" : "groups4", key: [.l4proto, .port, .integer], value: [family == .ipv6 ? .ipv6 : .ipv4],
                     typeof: .portSlot(modulus: slots, to: family))
        }
        /// protocol . port of every mapping with a group of its own.
        public static let grouped = NamedSet(name: "grouped", key: [.l4proto, .port])
        /// protocol . port . node address a failed health check took out of a mapping's group (for people).
        public static let down4 = NamedSet(name: "down4", key: [.l4proto, .port, .ipv4])
        public static let down6 = NamedSet(name: "down6", key: [.l4proto, .port, .ipv6])
        /// Addresses of draining nodes (for people).
        public static let draining4 = NamedSet(name: "draining4", key: [.ipv4])
        public static let draining6 = NamedSet(name: "draining6", key: [.ipv6])
    }

    /// Every key a protocol . port map can hold: TCP's and UDP's ports.
    static let portKeys: UInt32 = 2 * 65_536

    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        var services = Sets.services
        services.counters = p.counters
        services.capacity = portKeys
        return [services, Sets.backends4(slots: p.slots), Sets.backends6(slots: p.slots),
                Sets.groups(.ipv4, slots: p.slots), Sets.groups(.ipv6, slots: p.slots), Sets.grouped,
                Sets.down4, Sets.down6, Sets.draining4, Sets.draining6]
    }

    static var optionalChains: [String: [String]] { ["nat_grouped": [Sets.grouped.name], "nat_output_grouped": [Sets.grouped.name]] }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        let backends4 = Sets.backends4(slots: p.slots), backends6 = Sets.backends6(slots: p.slots)
        // No membership test and no counter before the NAT statement: its own map lookups fail for a port that
        // is not mapped, and the per-mapping counters are in the map's elements. Each costs every new flow. The
        // protocol first, the cheapest test that tells the rules apart, then the family and `scope` (where from).
        func dnat(_ f: Family, _ proto: L4Protocol, _ scope: [Expression]) -> [Expression] {
            [.meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue])] + R.family(f) + scope
                + R.addressedToHost + R.pickSlot(p.spread, f, slots: p.slots, into: .r(0)) + [
                   .lookup(set: (f == .ipv4 ? backends4 : backends6).name, from: .r(0), into: .r(0)),
                   .meta(.l4proto, into: .r(4)), .payload(.transport, offset: 2, length: 2, into: .r(5)),
                   .lookup(set: Sets.services.name, from: .r(4), into: .r(4)),
                   .dnat(family: f, address: .r(0), port: .r(4))]
        }
        // A port's own group: its protocol . port . slot (in chains jumped to only for ports in `grouped`, so
        // that every other new connection pays one hash lookup for groups, and nothing more).
        func groupDnat(_ f: Family, _ proto: L4Protocol, _ scope: [Expression]) -> [Expression] {
            // The slot first: the hash's loads use the registers the group's key is then built in.
            [.meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue])] + R.family(f) + scope
                + R.addressedToHost + R.pickSlot(p.spread, f, slots: p.slots, into: .r(2)) + [
                   .meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
                   .lookup(set: Sets.groups(f, slots: p.slots).name, from: .r(0), into: .r(0)),
                   .meta(.l4proto, into: .r(4)), .payload(.transport, offset: 2, length: 2, into: .r(5)),
                   .lookup(set: Sets.services.name, from: .r(4), into: .r(4)),
                   .dnat(family: f, address: .r(0), port: .r(4))]
        }
        // IPS_CONFIRMED | IPS_DST_NAT: a connection past its first packet, DNATed.
        let confirmedAndDNATed: UInt32 = 0x08 | 0x20
        let noSharedFallback = Rule("a port with its own group and no node in it is not NATed (input refuses it)", [.verdict(.accept)])
        let notLoopback4: [Expression] = [.payload(.network, offset: 16, length: 4, into: .r(0)),
                                           .mask(.r(0), [255, 0, 0, 0]), .compare(.r(0), equal: false, [127, 0, 0, 0])]
        let notLoopback6: [Expression] = [.payload(.network, offset: 24, length: 16, into: .r(0)),
                                           .compare(.r(0), equal: false, IPv6Address("::1")!.bytes)]
        // While no port has a group of its own, the group chains and the jumps to them are left out.
        let grouped = !p.idleChains.contains("nat_grouped"), outputGrouped = !p.idleChains.contains("nat_output_grouped")
        return [
            Chain(name: "nat_grouped", kind: .nat, hook: nil, rules: [
                Rule("IPv4 TCP host ports to their own group", groupDnat(.ipv4, .tcp, R.managedInterface)),
                Rule("IPv4 UDP host ports to their own group", groupDnat(.ipv4, .udp, R.managedInterface)),
                Rule("IPv6 TCP host ports to their own group", groupDnat(.ipv6, .tcp, R.managedInterface)),
                Rule("IPv6 UDP host ports to their own group", groupDnat(.ipv6, .udp, R.managedInterface)),
                noSharedFallback,
            ]),
            Chain(name: "nat_output_grouped", kind: .nat, hook: nil, rules: [
                Rule("IPv4 TCP from the host itself to a port's own group", groupDnat(.ipv4, .tcp, notLoopback4)),
                Rule("IPv4 UDP from the host itself to a port's own group", groupDnat(.ipv4, .udp, notLoopback4)),
                Rule("IPv6 TCP from the host itself to a port's own group", groupDnat(.ipv6, .tcp, notLoopback6)),
                Rule("IPv6 UDP from the host itself to a port's own group", groupDnat(.ipv6, .udp, notLoopback6)),
                noSharedFallback,
            ]),
            Chain(name: "nat_prerouting", kind: .nat, hook: .prerouting, priority: -100, rules: (grouped ? [
                Rule("ports with a group of their own", R.mappedPort(Sets.grouped) + [.verdict(.jump("nat_grouped"))]),
            ] : []) + [
                Rule("IPv4 TCP host ports to node ports", dnat(.ipv4, .tcp, R.managedInterface)),
                Rule("IPv4 UDP host ports to node ports", dnat(.ipv4, .udp, R.managedInterface)),
                Rule("IPv6 TCP host ports to node ports", dnat(.ipv6, .tcp, R.managedInterface)),
                Rule("IPv6 UDP host ports to node ports", dnat(.ipv6, .udp, R.managedInterface)),
            ]),
            Chain(name: "nat_output", kind: .nat, hook: .output, priority: -100, rules: (outputGrouped ? [
                Rule("ports with a group of their own", R.mappedPort(Sets.grouped) + [.verdict(.jump("nat_output_grouped"))]),
            ] : []) + [
                Rule("IPv4 TCP from the host itself", dnat(.ipv4, .tcp, notLoopback4)),
                Rule("IPv4 UDP from the host itself", dnat(.ipv4, .udp, notLoopback4)),
                Rule("IPv6 TCP from the host itself", dnat(.ipv6, .tcp, notLoopback6)),
                Rule("IPv6 UDP from the host itself", dnat(.ipv6, .udp, notLoopback6)),
            ]),
        ] + (p.counters ? [
            // It counts, and only counts: its accept ends no other table's chain. Without counters it is left out.
            // A flow's first packet was counted by the NAT rule's lookup in the same map (a lookup updates the
            // element's counter), so only packets of confirmed connections are counted here: every packet once.
            // That test first: it ends the chain for every new flow. Then the protocol, which nft needs before
            // it reads `ct original proto-dst` as a port.
            Chain(name: "forward", hook: .forward, priority: 0, rules: [L4Protocol.tcp, .udp].map { proto in
                Rule("count \(proto) packets of connections epokd forwarded (their first counted by the DNAT)", [
                    .ct(.status, into: .r(0)), .mask(.r(0), R.le32(confirmedAndDNATed)), .compare(.r(0), equal: true, R.le32(confirmedAndDNATed)),
                    .meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue]),
                    .meta(.l4proto, into: .r(0)), .ct(.protoDestination, original: true, into: .r(1)),
                    .lookup(set: Sets.services.name, from: .r(0)), .verdict(.accept),
                ])
            }),
        ] : []) + [
            Chain(name: "input", hook: .input, priority: 0, rules: [
                Rule("mapped ports with no backend are refused, not handed to the host",
                     R.managedInterface + [
                         .ct(.state, into: .r(0)), .mask(.r(0), R.le32(0x08)), .compare(.r(0), equal: false, R.le32(0)),
                         .ct(.status, into: .r(0)), .mask(.r(0), R.le32(0x20)), .compare(.r(0), equal: true, R.le32(0)),
                     ] + R.mappedPort(Sets.services) + [.counter, .reject]),
            ]),
        ]
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] {
        slotElements(nodes: state.nodes, slots: ForwardingRuleset.slots(forNodes: state.nodes.count)) + drainingElements(state.draining)
    }

    /// The elements naming draining nodes.
    static func drainingElements(_ nodes: [NodeAddress]) -> [(String, Element)] {
        nodes.flatMap { node in
            [node.ipv4.map { (Sets.draining4.name, Element(key: [.ipv4($0)], comment: node.node)) },
             node.ipv6.map { (Sets.draining6.name, Element(key: [.ipv6($0)], comment: node.node)) }].compactMap { $0 }
        }
    }

    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)]) {
        let key = Fields(.l4proto(m.proto), .port(m.hostPort))
        result.append((Sets.services.name, Element(key: key, value: Fields(.port(m.nodePort)), comment: m.label)))
        if let group = m.group {
            result.append((Sets.grouped.name, Element(key: key)))
            let four = group.nodes.compactMap(\.ipv4), six = group.nodes.compactMap(\.ipv6)
            let set4 = Sets.groups(.ipv4, slots: group.slots).name, set6 = Sets.groups(.ipv6, slots: group.slots).name
            for slot in 0..<group.slots {
                let slotKey = key.appending(.integer(slot))
                if !four.isEmpty { result.append((set4, Element(key: slotKey, value: Fields(.ipv4(four[Int(slot) % four.count]))))) }
                if !six.isEmpty { result.append((set6, Element(key: slotKey, value: Fields(.ipv6(six[Int(slot) % six.count]))))) }
            }
            for node in group.down {
                if let a = node.ipv4 { result.append((Sets.down4.name, Element(key: key.appending(.ipv4(a)), comment: node.node))) }
                if let a = node.ipv6 { result.append((Sets.down6.name, Element(key: key.appending(.ipv6(a)), comment: node.node))) }
            }
        }
    }

    /// The slots: slot s goes to the (s mod n)-th node of that family, nodes in name order.
    static func slotElements(nodes: [NodeAddress], slots: UInt32) -> [(String, Element)] {
        let sorted = nodes.sorted()
        let four = sorted.compactMap(\.ipv4), six = sorted.compactMap(\.ipv6)
        let set4 = Sets.backends4(slots: slots).name, set6 = Sets.backends6(slots: slots).name
        var result: [(String, Element)] = []
        for slot in 0..<slots {
            let key: Fields = [.integer(slot)]
            if !four.isEmpty { result.append((set4, Element(key: key, value: [.ipv4(four[Int(slot) % four.count])]))) }
            if !six.isEmpty { result.append((set6, Element(key: key, value: [.ipv6(six[Int(slot) % six.count])]))) }
        }
        return result
    }

    /// The forwarding a table's elements carry out: the inverse of `elements(for:)`, as far as stale flows
    /// need it (ports, node ports, backends; allow-ranges are not recovered). Nodes are named by address.
    static func forwarding(from elements: TableElements) -> ForwardingState {
        var nodes: [String: NodeAddress] = [:]
        for e in elements[Sets.backends4(slots: ForwardingRuleset.baseSlots).name] ?? [] {
            guard case .ipv4(let a)? = e.value?.first else { continue }
            nodes[a.description] = NodeAddress(node: a.description, ipv4: a)
        }
        for e in elements[Sets.backends6(slots: ForwardingRuleset.baseSlots).name] ?? [] {
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
}
