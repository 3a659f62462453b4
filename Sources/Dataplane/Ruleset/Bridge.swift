/// Two-way bridges between pods and one external server (ExternalService): the pods of a source Service leave
/// for the server's address and ports with the source's address (`bridge_out*`, SNAT at postrouting before the
/// egress rules), and the server, and only it, reaches the Service's ready endpoints through that address
/// (`bridge_clients*` admits it, `bridge_in*` spreads over the endpoints by round-robin slot, `bridge_ports*`
/// gives their port). An entrance address reached any other way is dropped (`bridge_guard*`).
public enum Bridge: RulesetFeature {
    /// Round-robin slots of an entrance: 60 spreads evenly over 1 to 6 endpoints (and 10, 12, 15, 20, 30, 60).
    public static let slots = ForwardingRuleset.baseSlots

    public enum Sets {
        /// pod . server . protocol . port : source address.
        public static let exits4 = NamedSet(name: "bridge_out4", key: [.ipv4, .ipv4, .l4proto, .port], value: [.ipv4])
        public static let exits6 = NamedSet(name: "bridge_out6", key: [.ipv6, .ipv6, .l4proto, .port], value: [.ipv6])
        /// server . entrance address . protocol . port: who may use an entrance.
        public static let clients4 = NamedSet(name: "bridge_clients4", key: [.ipv4, .ipv4, .l4proto, .port])
        public static let clients6 = NamedSet(name: "bridge_clients6", key: [.ipv6, .ipv6, .l4proto, .port])
        /// entrance address . protocol . port . slot : endpoint address.
        public static let entrances4 = NamedSet(name: "bridge_in4", key: [.ipv4, .l4proto, .port, .integer], value: [.ipv4],
                                                typeof: .addressPortSlot(modulus: slots, to: .ipv4))
        public static let entrances6 = NamedSet(name: "bridge_in6", key: [.ipv6, .l4proto, .port, .integer], value: [.ipv6],
                                                typeof: .addressPortSlot(modulus: slots, to: .ipv6))
        /// entrance address . protocol . port : the endpoints' port.
        public static let ports4 = NamedSet(name: "bridge_ports4", key: [.ipv4, .l4proto, .port], value: [.port])
        public static let ports6 = NamedSet(name: "bridge_ports6", key: [.ipv6, .l4proto, .port], value: [.port])
        /// Entrance addresses: what still goes to them after NAT did not come through a bridge, and is dropped.
        public static let guard4 = NamedSet(name: "bridge_guard4", key: [.ipv4])
        public static let guard6 = NamedSet(name: "bridge_guard6", key: [.ipv6])
    }

    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        [Sets.exits4, Sets.exits6].map { var set = $0; set.counters = p.counters; return set } + [Sets.clients4, Sets.clients6, Sets.entrances4, Sets.entrances6, Sets.ports4, Sets.ports6,
         Sets.guard4, Sets.guard6]
    }

    static var optionalChains: [String: [String]] {
        ["bridge_in": [Sets.clients4.name, Sets.clients6.name], "bridge_guard": [Sets.guard4.name, Sets.guard6.name],
         "bridge_out": [Sets.exits4.name, Sets.exits6.name]]
    }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        func layout(_ f: Family) -> (source: UInt32, destination: UInt32, length: UInt32, words: UInt32) {
            f == .ipv6 ? (8, 24, 16, 4) : (12, 16, 4, 1)
        }
        func name(_ f: Family) -> String { f == .ipv6 ? "IPv6" : "IPv4" }
        func entrance(_ f: Family) -> Rule {
            let (source, destination, length, w) = layout(f)
            let v6 = f == .ipv6
            return Rule("\(name(f)) the server of a bridge reaches its Service's endpoints through the entrance",
                        R.family(f) + [
                            .payload(.network, offset: source, length: length, into: .r(0)),
                            .payload(.network, offset: destination, length: length, into: .r(w)),
                            .meta(.l4proto, into: .r(2 * w)), .payload(.transport, offset: 2, length: 2, into: .r(2 * w + 1)),
                            .lookup(set: (v6 ? Sets.clients6 : Sets.clients4).name, from: .r(0)),
                            .payload(.network, offset: destination, length: length, into: .r(0)),
                            .meta(.l4proto, into: .r(w)), .payload(.transport, offset: 2, length: 2, into: .r(w + 1)),
                            .lookup(set: (v6 ? Sets.ports6 : Sets.ports4).name, from: .r(0), into: .r(8)),
                            .roundRobin(modulus: slots, into: .r(w + 2)),
                            .lookup(set: (v6 ? Sets.entrances6 : Sets.entrances4).name, from: .r(0), into: .r(0)),
                            .dnat(family: f, address: .r(0), port: .r(8))])
        }
        func exit(_ f: Family) -> Rule {
            let (source, destination, length, w) = layout(f)
            return Rule("\(name(f)) pods of a bridge leave for its server with the bridge's address",
                        R.family(f) + [
                            .payload(.network, offset: source, length: length, into: .r(0)),
                            .payload(.network, offset: destination, length: length, into: .r(w)),
                            .meta(.l4proto, into: .r(2 * w)), .payload(.transport, offset: 2, length: 2, into: .r(2 * w + 1)),
                            .lookup(set: (f == .ipv6 ? Sets.exits6 : Sets.exits4).name, from: .r(0), into: .r(0)),
                            .snat(family: f, address: .r(0))])
        }
        // ICMP passes (IPv6 neighbour discovery to the entrance address must, or its replies stop coming back).
        func guardRule(_ f: Family) -> Rule {
            let (_, destination, length, _) = layout(f)
            let icmp = f == .ipv6 ? L4Protocol.icmpv6 : .icmp
            return Rule("\(name(f)) an entrance reached other than through its bridge is dropped (ICMP passes)",
                        R.family(f) + [.meta(.l4proto, into: .r(0)), .compare(.r(0), equal: false, [icmp.rawValue]),
                                       .payload(.network, offset: destination, length: length, into: .r(0)),
                                       .lookup(set: (f == .ipv6 ? Sets.guard6 : Sets.guard4).name, from: .r(0)),
                                       .counter, .verdict(.drop)])
        }
        return [
            Chain(name: "bridge_in", kind: .nat, hook: .prerouting, priority: -101, rules: [entrance(.ipv4), entrance(.ipv6)]),
            Chain(name: "bridge_guard", hook: .prerouting, priority: 0, rules: [guardRule(.ipv4), guardRule(.ipv6)]),
            Chain(name: "bridge_out", kind: .nat, hook: .postrouting, priority: 99, rules: [exit(.ipv4), exit(.ipv6)]),
        ]
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] {
        state.bridgeExits.flatMap(exitElements) + state.bridgeEntrances.flatMap(entranceElements)
            + state.bridgeGuarded.map(guardElement)
    }

    /// The element of one pod's exit to a bridge's server.
    static func exitElements(_ exit: BridgeExit) -> [(String, Element)] {
        guard exit.pod.isV4 == exit.server.isV4, exit.source.isV4 == exit.pod.isV4 else { return [] }
        return [(exit.pod.isV4 ? Sets.exits4.name : Sets.exits6.name,
                 Element(key: [Field(exit.pod), Field(exit.server), .l4proto(exit.proto), .port(exit.port)],
                         value: [Field(exit.source)], comment: exit.label))]
    }

    /// The elements of one entrance: its client, its port and a slot for each of `slots`, over its endpoints.
    static func entranceElements(_ e: BridgeEntrance) -> [(String, Element)] {
        let v4 = e.address.isV4
        guard e.client.isV4 == v4, !e.endpoints.isEmpty, e.endpoints.allSatisfy({ $0.isV4 == v4 }) else { return [] }
        let key: Fields = [Field(e.address), .l4proto(e.proto), .port(e.port)]
        var result: [(String, Element)] = [
            (v4 ? Sets.clients4.name : Sets.clients6.name, Element(key: [Field(e.client)] + key, comment: e.label)),
            (v4 ? Sets.ports4.name : Sets.ports6.name, Element(key: key, value: [.port(e.endpointPort)], comment: e.label)),
        ]
        for slot in 0..<slots {
            result.append((v4 ? Sets.entrances4.name : Sets.entrances6.name,
                           Element(key: key + [.integer(slot)], value: [Field(e.endpoints[Int(slot) % e.endpoints.count])])))
        }
        return result
    }

    /// The element that guards one entrance address.
    static func guardElement(_ address: IPAddress) -> (String, Element) {
        (address.isV4 ? Sets.guard4.name : Sets.guard6.name, Element(key: [Field(address)]))
    }
}

/// A pod's way out to a bridge's server: to `server`, `proto`/`port`, it leaves as `source`.
public struct BridgeExit: Hashable, Sendable {
    public var pod: IPAddress
    public var server: IPAddress
    public var proto: L4Protocol
    public var port: Port
    public var source: IPAddress
    /// Whose bridge this is, kept as the element's comment.
    public var label: String?

    public init(pod: IPAddress, server: IPAddress, proto: L4Protocol, port: Port, source: IPAddress, label: String? = nil) {
        self.pod = pod
        self.server = server
        self.proto = proto
        self.port = port
        self.source = source
        self.label = label
    }

    /// What only one bridge may hold.
    public var key: BridgeExitKey { BridgeExitKey(pod: pod, server: server, proto: proto, port: port) }
}

public struct BridgeExitKey: Hashable, Sendable {
    public var pod: IPAddress
    public var server: IPAddress
    public var proto: L4Protocol
    public var port: Port

    public init(pod: IPAddress, server: IPAddress, proto: L4Protocol, port: Port) {
        self.pod = pod
        self.server = server
        self.proto = proto
        self.port = port
    }
}

/// The way in to a Service from a bridge's server: `client` connecting to `address` on `proto`/`port` reaches
/// `endpoints` (in round-robin) on `endpointPort`.
public struct BridgeEntrance: Hashable, Sendable {
    public var client: IPAddress
    public var address: IPAddress
    public var proto: L4Protocol
    public var port: Port
    public var endpoints: [IPAddress]
    public var endpointPort: Port
    public var label: String?

    public init(client: IPAddress, address: IPAddress, proto: L4Protocol, port: Port, endpoints: [IPAddress], endpointPort: Port,
                label: String? = nil) {
        self.client = client
        self.address = address
        self.proto = proto
        self.port = port
        self.endpoints = endpoints
        self.endpointPort = endpointPort
        self.label = label
    }

    /// What only one bridge may hold.
    public var key: BridgeEntranceKey { BridgeEntranceKey(address: address, proto: proto, port: port) }
}

public struct BridgeEntranceKey: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var proto: L4Protocol
    public var port: Port

    public init(address: IPAddress, proto: L4Protocol, port: Port) {
        self.address = address
        self.proto = proto
        self.port = port
    }

    public var description: String { "\(address) \(port)/\(proto)" }
}
