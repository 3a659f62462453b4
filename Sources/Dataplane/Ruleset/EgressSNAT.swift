/// Static source addresses for workloads: forwarded packets from a selected pod address to a destination in its
/// rule's ranges leave with the rule's egress address (SNAT at postrouting). One map per family, keyed by
/// source . destination range; no rule per pod or per rule.
public enum EgressSNAT: RulesetFeature {
    public enum Sets {
        public static let egress4 = NamedSet(name: "egress4", key: [.ipv4, .ipv4], value: [.ipv4], interval: true)
        public static let egress6 = NamedSet(name: "egress6", key: [.ipv6, .ipv6], value: [.ipv6], interval: true)
    }

    /// Each element counts the flows it SNATed (NAT sees a flow's first packet only), with counters on.
    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        [Sets.egress4, Sets.egress6].map { var set = $0; set.counters = p.counters; return set }
    }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        func snat(_ f: Family) -> Rule {
            let (offset, length): (UInt32, UInt32) = f == .ipv6 ? (8, 16) : (12, 4)
            let words: UInt32 = f == .ipv6 ? 4 : 1
            return Rule("\(f == .ipv6 ? "IPv6" : "IPv4") selected pods to selected destinations leave with their egress address",
                        R.family(f) + [.payload(.network, offset: offset, length: length, into: .r(0)),
                                       .payload(.network, offset: offset + length, length: length, into: .r(words)),
                                       .lookup(set: (f == .ipv6 ? Sets.egress6 : Sets.egress4).name, from: .r(0), into: .r(0)),
                                       .snat(family: f, address: .r(0))])
        }
        return [Chain(name: "egress", kind: .nat, hook: .postrouting, priority: 100, rules: [snat(.ipv4), snat(.ipv6)])]
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] { state.egress.flatMap(egressElements) }

    static func mappingElements(_ m: Mapping) -> [(String, Element)] { [] }

    /// The elements of one pod's egress rule.
    static func egressElements(_ rule: EgressRule) -> [(String, Element)] {
        AddressRange.union(of: rule.destinations).compactMap { range -> (String, Element)? in
            guard range.first.isV4 == rule.source.isV4, rule.egress.isV4 == rule.source.isV4 else { return nil }
            let source = Field(rule.source)
            return ((rule.source.isV4 ? Sets.egress4 : Sets.egress6).name,
                    Element(key: [source, Field(range.first)], keyEnd: [source, Field(range.last)],
                            value: [Field(rule.egress)], comment: rule.label))
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
