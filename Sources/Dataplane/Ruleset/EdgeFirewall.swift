/// The firewall for LoadBalancer IPs routed through this host (`--firewall-interface`), and the rate limits.
///
/// Forwarded packets arriving on a firewall interface pass chain `firewall` (forward hook, before epokd's
/// `forward`): over a source's per-source limit, then over the Service's rate limit, dropped; replies and established flows,
/// accepted; connections this host DNATed (epokd's host ports), accepted; to an LB IP . protocol . port from an
/// allowed source, accepted and counted per element; from a source outside its allow-range, dropped and
/// counted; then the operator's chain `local`; then everything else dropped (or only counted, with
/// `--firewall-policy accept`). Chain `firewall_input` does the same for traffic to the host itself on the
/// interfaces listed in `input_interfaces`: established, the ports in `input_ports`, ICMP and ICMPv6, `local`,
/// then drop. Chain `rate_limits` applies the host-port mappings' rate limits to forwarded, DNATed packets.
///
/// The first rule of each chain returns for packets from other interfaces, so the rest need not look again.
/// Rules are fixed except one pair per distinct per-source rate (a dynamic set keyed by source . LB IP .
/// protocol . port can hold only one rate), and those sit in chain `per_source`, which only traffic to an
/// LB IP . protocol . port with a per-source limit enters (set `per_source_limited4`/`6`): the number of rates in
/// use costs nothing to any other traffic. Every LoadBalancer, port, range and rate is a set element.
public enum EdgeFirewall: RulesetFeature {
    public enum Sets {
        public static let interfaces = NamedSet(name: "firewall_interfaces", key: [.ifname])
        /// The firewall interfaces again, each counting what the policy rule drops (or, with policy accept, passes).
        public static let denied = NamedSet(name: "firewall_denied", key: [.ifname], counters: true)
        public static let inputInterfaces = NamedSet(name: "input_interfaces", key: [.ifname])
        public static let inputDenied = NamedSet(name: "input_denied", key: [.ifname], counters: true)
        public static let inputPorts = NamedSet(name: "input_ports", key: [.l4proto, .port])
        /// LB IP . protocol . port admitted (each counts what it admits).
        public static let admitted4 = NamedSet(name: "lb4", key: [.ipv4, .l4proto, .port], counters: true)
        public static let admitted6 = NamedSet(name: "lb6", key: [.ipv6, .l4proto, .port], counters: true)
        /// LB IP . protocol . port with an allow-range (each counts the packets its range drops).
        public static let restricted4 = NamedSet(name: "lb_restricted4", key: [.ipv4, .l4proto, .port], counters: true)
        public static let restricted6 = NamedSet(name: "lb_restricted6", key: [.ipv6, .l4proto, .port], counters: true)
        public static let allow4 = NamedSet(name: "lb_allow4", key: [.ipv4, .l4proto, .port, .ipv4], interval: true)
        public static let allow6 = NamedSet(name: "lb_allow6", key: [.ipv6, .l4proto, .port, .ipv6], interval: true)
        /// LB IP . protocol . port with the Service's own rate limit.
        public static func limits(_ unit: RateLimit.Unit, _ family: Family) -> NamedSet {
            NamedSet(name: "lb_limits_\(unit == .packets ? "packets" : "bytes")\(family == .ipv6 ? 6 : 4)",
                     key: [family == .ipv6 ? .ipv6 : .ipv4, .l4proto, .port], limits: unit)
        }
        /// protocol . host port of a mapping with a rate limit.
        public static func portLimits(_ unit: RateLimit.Unit) -> NamedSet {
            NamedSet(name: "port_limits_\(unit == .packets ? "packets" : "bytes")", key: [.l4proto, .port], limits: unit)
        }
        /// LB IP . protocol . port with any per-source limit: only their traffic enters chain `per_source`.
        public static func perSourceLimited(_ family: Family) -> NamedSet {
            NamedSet(name: "per_source_limited\(family == .ipv6 ? 6 : 4)", key: [family == .ipv6 ? .ipv6 : .ipv4, .l4proto, .port])
        }
        /// LB IP . protocol . port whose sources are each limited to `rate`.
        public static func perSource(_ rate: RateLimit, _ family: Family) -> NamedSet {
            NamedSet(name: "per_source\(family == .ipv6 ? 6 : 4)_\(rate.token)", key: [family == .ipv6 ? .ipv6 : .ipv4, .l4proto, .port])
        }
        /// The per-source buckets at `rate`: source . LB IP . protocol . port, filled by the ruleset.
        public static func meter(_ rate: RateLimit, _ family: Family) -> NamedSet {
            let a: FieldType = family == .ipv6 ? .ipv6 : .ipv4
            var set = NamedSet(name: "meter\(family == .ipv6 ? 6 : 4)_\(rate.token)", key: [a, a, .l4proto, .port])
            set.dynamic = NamedSet.Dynamic(timeout: meterTimeout, size: meterSize)
            return set
        }
    }

    /// The per-source rates whose sets a table holds (by their names), so that a reader can ask for the skeleton
    /// that decodes them.
    public static func perSourceLimits(in setNames: some Sequence<String>) -> [RateLimit] {
        let prefix = "per_source4_"
        return Set(setNames.filter { $0.hasPrefix(prefix) }.compactMap { RateLimit(token: $0.dropFirst(prefix.count)) }).sorted()
    }

    /// How long a source's bucket is kept after its last packet, in seconds.
    public static let meterTimeout: UInt64 = 60
    /// The most sources tracked at once per rate and family; a new source beyond it is not limited.
    public static let meterSize: UInt32 = 65_536
    /// The chain of the per-source limits, one pair of rules per distinct rate.
    public static let perSourceChain = "per_source"
    /// The user chain, jumped to before the policy.
    public static let userChain = "local"

    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        var result = [Sets.interfaces, Sets.denied, Sets.inputInterfaces, Sets.inputDenied, Sets.inputPorts,
                      Sets.admitted4, Sets.admitted6, Sets.restricted4, Sets.restricted6, Sets.allow4, Sets.allow6,
                      Sets.perSourceLimited(.ipv4), Sets.perSourceLimited(.ipv6)]
        for unit in [RateLimit.Unit.packets, .bytes] {
            result += [Sets.limits(unit, .ipv4), Sets.limits(unit, .ipv6), Sets.portLimits(unit)]
        }
        for rate in p.perSourceLimits {
            result += [Sets.perSource(rate, .ipv4), Sets.meter(rate, .ipv4), Sets.perSource(rate, .ipv6), Sets.meter(rate, .ipv6)]
        }
        return result
    }

    static var optionalChains: [String: [String]] {
        ["rate_limits": [Sets.portLimits(.packets).name, Sets.portLimits(.bytes).name], "firewall": [Sets.interfaces.name],
         "firewall_input": [Sets.inputInterfaces.name]]
    }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        let established: [Expression] = [.ct(.state, into: .r(0)), .mask(.r(0), R.le32(0x06)), .compare(.r(0), equal: false, R.le32(0))]
        // Destination . protocol . destination port, from r0 on (r0 for IPv4, r0-r3 for IPv6).
        func service(_ f: Family) -> [Expression] {
            let words: UInt32 = f == .ipv6 ? 4 : 1
            return [.payload(.network, offset: f == .ipv6 ? 24 : 16, length: f == .ipv6 ? 16 : 4, into: .r(0)),
                    .meta(.l4proto, into: .r(words)), .payload(.transport, offset: 2, length: 2, into: .r(words + 1))]
        }
        func source(_ f: Family, into register: Register) -> Expression {
            .payload(.network, offset: f == .ipv6 ? 8 : 12, length: f == .ipv6 ? 16 : 4, into: register)
        }
        func limited(_ unit: RateLimit.Unit, _ f: Family) -> Rule {
            Rule("\(f == .ipv6 ? "IPv6" : "IPv4") LoadBalancer traffic over its Service's \(unit) rate is dropped",
                 R.family(f) + service(f) + [.lookup(set: Sets.limits(unit, f).name, from: .r(0)), .verdict(.drop)])
        }
        func perSource(_ rate: RateLimit, _ f: Family) -> Rule {
            let words: UInt32 = f == .ipv6 ? 4 : 1
            // Source . destination . protocol . port for the bucket: the source first, then the Service's key.
            let key: [Expression] = [source(f, into: .r(0)),
                                     .payload(.network, offset: f == .ipv6 ? 24 : 16, length: f == .ipv6 ? 16 : 4, into: .r(words)),
                                     .meta(.l4proto, into: .r(2 * words)), .payload(.transport, offset: 2, length: 2, into: .r(2 * words + 1))]
            return Rule("\(f == .ipv6 ? "IPv6" : "IPv4") traffic from one source over \(rate) is dropped",
                        R.family(f) + service(f) + [.lookup(set: Sets.perSource(rate, f).name, from: .r(0))]
                            + key + [.limitedUpdate(set: Sets.meter(rate, f).name, from: .r(0), limit: rate), .verdict(.drop)])
        }
        func perSourceLimited(_ f: Family) -> Rule {
            Rule("\(f == .ipv6 ? "IPv6" : "IPv4") LoadBalancer traffic with a per-source limit passes its rate's bucket",
                 R.family(f) + service(f) + [.lookup(set: Sets.perSourceLimited(f).name, from: .r(0)), .verdict(.jump(perSourceChain))])
        }
        func outsideRange(_ f: Family) -> Rule {
            let words: UInt32 = f == .ipv6 ? 4 : 1
            let (allow, restricted) = f == .ipv6 ? (Sets.allow6, Sets.restricted6) : (Sets.allow4, Sets.restricted4)
            return Rule("\(f == .ipv6 ? "IPv6" : "IPv4") sources outside a LoadBalancer's allow-range are dropped",
                        R.family(f) + service(f) + [source(f, into: .r(words + 2)),
                                                                   .lookup(set: allow.name, from: .r(0), inverted: true),
                                                                   .lookup(set: restricted.name, from: .r(0)), .verdict(.drop)])
        }
        func admitted(_ f: Family) -> Rule {
            Rule("\(f == .ipv6 ? "IPv6" : "IPv4") LoadBalancer IP . protocol . port is admitted",
                 R.family(f) + service(f) + [.lookup(set: (f == .ipv6 ? Sets.admitted6 : Sets.admitted4).name, from: .r(0)), .verdict(.accept)])
        }
        func portLimit(_ unit: RateLimit.Unit, _ proto: L4Protocol) -> Rule {
            // The protocol match first: nft needs it to read `ct original proto-dst` as a port.
            Rule("\(proto) host-port traffic over its Service's \(unit) rate is dropped", [
                .meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue]),
                .ct(.status, into: .r(0)), .mask(.r(0), R.le32(0x20)), .compare(.r(0), equal: false, R.le32(0)),
                .ct(.direction, into: .r(0)), .compare(.r(0), equal: true, [0]),
                .meta(.l4proto, into: .r(0)), .ct(.protoDestination, original: true, into: .r(1)),
                .lookup(set: Sets.portLimits(unit).name, from: .r(0)), .verdict(.drop)])
        }
        let policy: [Expression] = p.firewallPolicy == .drop ? [.verdict(.drop)] : []
        let icmp: [Rule] = [(L4Protocol.icmp, "ICMP"), (.icmpv6, "ICMPv6")].map { proto, name in
            Rule("\(name) (errors, echo, neighbour discovery) is admitted",
                 [.meta(.l4proto, into: .r(0)), .compare(.r(0), equal: true, [proto.rawValue]), .verdict(.accept)])
        }
        return [
            // Not `limits`: nft 1.0 reads that name as a keyword, so `nft list chain inet epok limits` would fail.
            Chain(name: "rate_limits", hook: .forward, priority: -20, rules: [
                portLimit(.packets, .tcp), portLimit(.packets, .udp), portLimit(.bytes, .tcp), portLimit(.bytes, .udp),
            ]),
            // Before `firewall`, which jumps to it.
            Chain(name: perSourceChain, hook: nil, rules: p.perSourceLimits.flatMap { [perSource($0, .ipv4), perSource($0, .ipv6)] }),
            Chain(name: "firewall", hook: .forward, priority: -10, rules: [
                Rule("only traffic from the firewall interfaces is filtered here",
                     [.meta(.iifname, into: .r(0)), .lookup(set: Sets.interfaces.name, from: .r(0), inverted: true), .verdict(.return)]),
                // Each source's limit before the Service's: a flooder's excess is dropped by its own bucket and never
                // spends the Service's, so a polite source keeps its share.
                perSourceLimited(.ipv4), perSourceLimited(.ipv6),
                limited(.packets, .ipv4), limited(.bytes, .ipv4), limited(.packets, .ipv6), limited(.bytes, .ipv6),
                Rule("established and related flows are admitted", established + [.verdict(.accept)]),
                Rule("connections this host DNATed (its host ports) are admitted", [
                    .ct(.status, into: .r(0)), .mask(.r(0), R.le32(0x20)), .compare(.r(0), equal: false, R.le32(0)), .verdict(.accept)]),
                outsideRange(.ipv4), outsideRange(.ipv6), admitted(.ipv4), admitted(.ipv6),
                Rule("the operator's rules", [.verdict(.jump(userChain))]),
                Rule(p.firewallPolicy == .drop ? "everything else is dropped" : "everything else is counted (policy accept)",
                     [.meta(.iifname, into: .r(0)), .lookup(set: Sets.denied.name, from: .r(0))] + policy),
            ]),
            Chain(name: "firewall_input", hook: .input, priority: -10, rules: [
                Rule("only traffic from the input-filtered interfaces is filtered here",
                     [.meta(.iifname, into: .r(0)), .lookup(set: Sets.inputInterfaces.name, from: .r(0), inverted: true), .verdict(.return)]),
                Rule("established and related flows are admitted", established + [.verdict(.accept)]),
                Rule("the host's admitted ports", R.mappedPort(Sets.inputPorts) + [.verdict(.accept)]),
            ] + icmp + [
                Rule("the operator's rules", [.verdict(.jump(userChain))]),
                Rule("everything else to the host is dropped", [.meta(.iifname, into: .r(0)), .lookup(set: Sets.inputDenied.name, from: .r(0)), .verdict(.drop)]),
            ]),
        ]
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] {
        var result: [(String, Element)] = []
        for name in state.firewallInterfaces {
            result += [(Sets.interfaces.name, Element(key: [.ifname(name)])), (Sets.denied.name, Element(key: [.ifname(name)]))]
        }
        for name in state.inputInterfaces {
            result += [(Sets.inputInterfaces.name, Element(key: [.ifname(name)])), (Sets.inputDenied.name, Element(key: [.ifname(name)]))]
        }
        result += state.inputPorts.map { (Sets.inputPorts.name, Element(key: [.l4proto($0.proto), .port($0.port)])) }
        return result
    }

    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)]) {
        guard let limit = m.limit else { return }
        result.append((Sets.portLimits(limit.unit).name, Element(key: [.l4proto(m.proto), .port(m.hostPort)], comment: m.label, limit: limit)))
    }

    static func loadBalancerElements(_ e: LoadBalancerEntry, into result: inout [(String, Element)]) {
        let family: Family = e.address.isV4 ? .ipv4 : .ipv6
        let key: Fields = [Field(e.address), .l4proto(e.proto), .port(e.port)]
        result.append(((family == .ipv4 ? Sets.admitted4 : Sets.admitted6).name, Element(key: key, comment: e.label)))
        if let sources = e.allowedSources {
            result.append(((family == .ipv4 ? Sets.restricted4 : Sets.restricted6).name, Element(key: key, comment: e.label)))
            for range in AddressRange.union(of: sources) where range.first.isV4 == e.address.isV4 {
                result.append(((family == .ipv4 ? Sets.allow4 : Sets.allow6).name,
                               Element(key: key + [Field(range.first)], keyEnd: key + [Field(range.last)])))
            }
        }
        if let limit = e.limit {
            result.append((Sets.limits(limit.unit, family).name, Element(key: key, comment: e.label, limit: limit)))
        }
        if let rate = e.perSourceLimit {
            result.append((Sets.perSourceLimited(family).name, Element(key: key, comment: e.label)))
            result.append((Sets.perSource(rate, family).name, Element(key: key, comment: e.label)))
        }
    }

}

/// What `--firewall-policy` does with forwarded traffic from a firewall interface that nothing admitted.
public enum FirewallPolicy: String, Hashable, Sendable, CaseIterable {
    case drop, accept
}

/// One LoadBalancer IP . protocol . port that the firewall admits, with the Service's allow-range and limits.
public struct LoadBalancerEntry: Hashable, Sendable {
    public var address: IPAddress
    public var proto: L4Protocol
    public var port: Port
    /// Sources allowed; nil admits everyone.
    public var allowedSources: [CIDR]?
    /// The Service's aggregate rate limit.
    public var limit: RateLimit?
    /// What any one source may send.
    public var perSourceLimit: RateLimit?
    /// The Service (`namespace/name`), kept in the kernel as the element's comment.
    public var label: String?

    public init(address: IPAddress, proto: L4Protocol, port: Port, allowedSources: [CIDR]? = nil,
                limit: RateLimit? = nil, perSourceLimit: RateLimit? = nil, label: String? = nil) {
        self.address = address
        self.proto = proto
        self.port = port
        self.allowedSources = allowedSources
        self.limit = limit
        self.perSourceLimit = perSourceLimit
        self.label = label
    }

    /// What identifies the entry: one Service at a time may hold an address . protocol . port.
    public var key: LoadBalancerKey { LoadBalancerKey(address: address, proto: proto, port: port) }
}

/// An LB IP . protocol . port.
public struct LoadBalancerKey: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var proto: L4Protocol
    public var port: Port

    public init(address: IPAddress, proto: L4Protocol, port: Port) {
        self.address = address
        self.proto = proto
        self.port = port
    }

    public static func < (a: LoadBalancerKey, b: LoadBalancerKey) -> Bool { (a.address, a.proto, a.port) < (b.address, b.proto, b.port) }
    public var description: String {
        (address.isV4 ? address.description : "[\(address)]") + ":\(port)/\(proto)"
    }
}
