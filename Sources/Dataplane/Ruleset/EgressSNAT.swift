/// Static source addresses for workloads: forwarded packets from a selected pod address to a destination in its
/// rule's ranges leave with the rule's egress address (SNAT at postrouting). No rule per pod or per rule: per
/// family, three maps, each looked up by one rule, by what the destinations are:
///
/// - `egress_all*`, keyed by pod: the rule covers every destination of the family (`0.0.0.0/0`);
/// - `egress_hosts*`, keyed by pod . destination: single addresses (`4.2.2.2/32`);
/// - `egress*`, keyed by pod . destination range (an interval map): everything else.
///
/// The first two are hash maps: a pod coming or going costs the kernel O(1). The interval map is a pipapo set,
/// whose element removal costs the kernel time in proportion to its size (about 25 ms at 10k elements on this
/// machine kind), so it holds only what needs ranges. A pod's held rules never overlap (see `EgressTable`), so at
/// most one of the three matches a packet.
public enum EgressSNAT: RulesetFeature {
    public enum Sets {
        public static let egressAll4 = NamedSet(name: "egress_all4", key: [.ipv4], value: [.ipv4])
        public static let egressAll6 = NamedSet(name: "egress_all6", key: [.ipv6], value: [.ipv6])
        public static let egressHosts4 = NamedSet(name: "egress_hosts4", key: [.ipv4, .ipv4], value: [.ipv4])
        public static let egressHosts6 = NamedSet(name: "egress_hosts6", key: [.ipv6, .ipv6], value: [.ipv6])
        public static let egress4 = NamedSet(name: "egress4", key: [.ipv4, .ipv4], value: [.ipv4], interval: true)
        public static let egress6 = NamedSet(name: "egress6", key: [.ipv6, .ipv6], value: [.ipv6], interval: true)

        /// Every egress map.
        public static let all = [egressAll4, egressAll6, egressHosts4, egressHosts6, egress4, egress6]
    }

    /// Each element counts the flows it SNATed (NAT sees a flow's first packet only), with counters on.
    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        Sets.all.map { var set = $0; set.counters = p.counters; return set }
    }

    static var optionalChains: [String: [String]] { ["egress": Sets.all.map(\.name)] }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        func snat(_ f: Family, _ set: NamedSet, _ what: String) -> Rule {
            let (offset, length): (UInt32, UInt32) = f == .ipv6 ? (8, 16) : (12, 4)
            let words: UInt32 = f == .ipv6 ? 4 : 1
            let destination: [Expression] = set.key.count == 2 ? [.payload(.network, offset: offset + length, length: length, into: .r(words))] : []
            return Rule("\(f == .ipv6 ? "IPv6" : "IPv4") selected pods to \(what) leave with their egress address",
                        R.family(f) + [.payload(.network, offset: offset, length: length, into: .r(0))] + destination
                            + [.lookup(set: set.name, from: .r(0), into: .r(0)), .snat(family: f, address: .r(0))])
        }
        return [Chain(name: "egress", kind: .nat, hook: .postrouting, priority: 100, rules: [
            snat(.ipv4, Sets.egressAll4, "every destination"), snat(.ipv4, Sets.egressHosts4, "selected addresses"),
            snat(.ipv4, Sets.egress4, "selected ranges"),
            snat(.ipv6, Sets.egressAll6, "every destination"), snat(.ipv6, Sets.egressHosts6, "selected addresses"),
            snat(.ipv6, Sets.egress6, "selected ranges"),
        ])]
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] { state.egress.flatMap(egressElements) }

    /// The elements of one pod's egress rule: one per disjoint destination range, in the map for its kind.
    static func egressElements(_ rule: EgressRule) -> [(String, Element)] {
        let v4 = rule.source.isV4
        guard rule.egress.isV4 == v4 else { return [] }
        let source = Field(rule.source), egress: Fields = [Field(rule.egress)]
        return AddressRange.union(of: rule.destinations).compactMap { range -> (String, Element)? in
            guard range.first.isV4 == v4 else { return nil }
            if range.first == (v4 ? .v4(IPv4Address(value: 0)) : .v6(IPv6Address(bytes: Array(repeating: 0, count: 16)))),
               range.last == (v4 ? .v4(IPv4Address(value: .max)) : .v6(IPv6Address(bytes: Array(repeating: 0xff, count: 16)))) {
                return ((v4 ? Sets.egressAll4 : Sets.egressAll6).name, Element(key: [source], value: egress, comment: rule.label))
            }
            if range.first == range.last {
                return ((v4 ? Sets.egressHosts4 : Sets.egressHosts6).name, Element(key: [source, Field(range.first)], value: egress, comment: rule.label))
            }
            return ((v4 ? Sets.egress4 : Sets.egress6).name,
                    Element(key: [source, Field(range.first)], keyEnd: [source, Field(range.last)], value: egress, comment: rule.label))
        }
    }
}

/// One pod address's static source: to `destinations` it leaves as `egress`.
public struct EgressRule: Hashable, Sendable {
    public var source: IPAddress
    public var destinations: [CIDR]
    public var egress: IPAddress
    /// Whose rule this is (`namespace/name`), kept as the elements' comment.
    public var label: String?

    public init(source: IPAddress, destinations: [CIDR], egress: IPAddress, label: String? = nil) {
        self.source = source
        self.destinations = destinations
        self.egress = egress
        self.label = label
    }
}
