/// epokd's ruleset: one table whose skeleton is fixed and whose every decision is a lookup in a set or map,
/// laid out so that `nft list ruleset` prints every rule as what it does and `nft -f` loads the listing again.
///
/// It is composed of features, each in a file of its own that owns its sets, its rules and the elements it
/// derives from a `ForwardingState`: `PortMapping` (host ports DNATed round-robin to node ports, forwarded,
/// counted, refused without a backend) and `AccessControl` (internal Services and allow-ranges). A new feature
/// is one more such file, added to `features`: its sets and chains join the one skeleton, its elements the one
/// transaction.
///
/// Per-packet path for a new connection to the host on a managed interface: `guard` (prerouting, before NAT)
/// drops internal services on the external interface and sources outside an allow-range; `nat_prerouting`
/// (and `nat_output` for the host's own connections) DNATs a mapped port to
/// `numgen inc mod SLOTS map @backends4 : meta l4proto . th dport map @services`, that is to the next slot's
/// node and the mapping's node port; `forward` accepts what was DNATed (and counts it per mapping); `input`
/// refuses mapped ports that found no backend.
public enum ForwardingRuleset {
    /// What every feature's skeleton part depends on.
    public struct Parameters: Hashable, Sendable {
        /// Per-mapping packet and byte counters in the `services` map.
        public var counters: Bool
        /// Round-robin slots (the modulus in the DNAT rules).
        public var slots: UInt32
        /// What the LoadBalancer firewall does with what it does not admit.
        public var firewallPolicy: FirewallPolicy
        /// The distinct per-source rates in use (one pair of rules each).
        public var perSourceLimits: [RateLimit]
        /// Chains left out because they can do nothing (see `idleChains(in:)`).
        public var idleChains: Set<String>
        /// How a new connection picks its slot.
        public var spread: Spread

        public init(counters: Bool = true, slots: UInt32 = ForwardingRuleset.baseSlots, firewallPolicy: FirewallPolicy = .drop,
                    perSourceLimits: [RateLimit] = [], idleChains: Set<String> = [], spread: Spread = .roundRobin) {
            self.counters = counters
            self.spread = spread
            self.slots = slots
            self.firewallPolicy = firewallPolicy
            self.perSourceLimits = perSourceLimits
            self.idleChains = idleChains
        }
    }

    /// Chains that can do nothing while the sets they act on are all empty, with those sets. Every base chain costs
    /// every packet of its hook, matched or not (a NAT chain on postrouting also costs each new flow a second
    /// conntrack lookup, for its null binding), and every jump to a chain costs a lookup first, so a chain is left
    /// out of the skeleton (with any rule that jumps to it) while it is idle, and put back, by replacing epokd's
    /// chains around the sets (`Transaction.replaceChains`), when its feature is used.
    public static let optionalChains: [String: [String]] =
        features.reduce(into: [:]) { all, feature in all.merge(feature.optionalChains) { first, _ in first } }

    /// The optional chains that `elements` leave idle.
    public static func idleChains(in elements: TableElements) -> Set<String> {
        Set(optionalChains.filter { _, sets in sets.allSatisfy { elements[$0]?.isEmpty ?? true } }.keys)
    }

    /// The features, in the order their chains are created.
    static let features: [any RulesetFeature.Type] = [Tracing.self, AccessControl.self, PortMapping.self, EdgeFirewall.self, EgressSNAT.self, Bridge.self]

    /// Sets every feature may use: the interfaces epokd forwards from, and the external one.
    public enum Sets {
        public static let interfaces = NamedSet(name: "interfaces", key: [.ifname])
        public static let external = NamedSet(name: "external", key: [.ifname])
    }

    /// Slots up to 60 nodes: new connections cycle through them. 60 spreads evenly over 1 to 6 nodes (and over
    /// 10, 12, 15, 20, 30 and 60).
    public static let baseSlots: UInt32 = 60

    /// The slots the skeleton needs for `nodes` nodes: 60 up to 60 nodes, then at least two per node (in
    /// steps of 60), so every node receives traffic and none more than 1.5 times another's share. A change of
    /// the slot count is a change of skeleton (the modulus is in the rule): rare, and one atomic transaction.
    public static func slots(forNodes nodes: Int) -> UInt32 {
        nodes <= Int(baseSlots) ? baseSlots : baseSlots * UInt32((2 * nodes + Int(baseSlots) - 1) / Int(baseSlots))
    }

    /// How new connections pick a slot: in turn (`round-robin`, each router its own counter), or by a hash of
    /// the flow (its addresses and source port) with a seed, the same on every router with the same seed (`hash`): a flow that
    /// ECMP moves to another router keeps its node there, with no state shared.
    public enum Spread: Hashable, Sendable {
        case roundRobin
        case hash(seed: UInt32)
    }

    /// The slot count of a skeleton made by `skeleton(table:counters:slots:)`.
    public static func slots(of skeleton: Skeleton) -> UInt32 {
        for chain in skeleton.chains {
            for rule in chain.rules {
                for expression in rule.expressions {
                    if case .roundRobin(let modulus, _) = expression { return modulus }
                    if case .hash(_, _, let modulus, _, _) = expression { return modulus }
                }
            }
        }
        return baseSlots
    }

    /// The spread of a skeleton's port-mapping rules.
    public static func spread(of skeleton: Skeleton) -> Spread {
        for chain in skeleton.chains where chain.name.hasPrefix("nat") {
            for rule in chain.rules {
                for case .hash(_, _, _, let seed, _) in rule.expressions { return .hash(seed: seed) }
            }
        }
        return .roundRobin
    }

    /// Loads the flow into registers and picks its slot into `slot` (`numgen inc`, or `jhash ip saddr . ip daddr .
    /// th sport mod SLOTS seed S`: the source and destination address and the source port, each padded to a
    /// register; the destination port is left out, as the Service's own: nft cannot reload an IPv6 hash of all
    /// four inside a group's key).
    static func pickSlot(_ spread: Spread, _ family: Family, slots: UInt32, into slot: Register) -> [Expression] {
        guard case .hash(let seed) = spread else { return [.roundRobin(modulus: slots, into: slot)] }
        let (offset, width): (UInt32, UInt32) = family == .ipv4 ? (12, 4) : (8, 16)
        let words = width / 4
        return [.payload(.network, offset: offset, length: width, into: .r(0)),
                .payload(.network, offset: offset + width, length: width, into: .r(words)),
                .payload(.transport, offset: 0, length: 2, into: .r(2 * words)),
                .hash(from: .r(0), length: 8 * words + 4, modulus: slots, seed: seed, into: slot)]
    }

    /// The map of forwarded ports (its elements carry the per-mapping counters, when the skeleton has them).
    public static var servicesSet: NamedSet { PortMapping.Sets.services }

    /// The skeleton in table `name` (family inet, so one ruleset serves IPv4 and IPv6).
    ///
    /// With `counters`, every element of `services` carries a packet and byte counter: a connection's first packet
    /// is counted by the DNAT's lookup, every later one (both directions) by the forward chain's, so the counter
    /// is that mapping's traffic, each packet once. The kernel allocates a per-CPU counter for each element,
    /// which makes creating tens of thousands of mappings about twice as slow.
    public static func skeleton(table name: String = "epok", counters: Bool = true, slots: UInt32 = baseSlots) -> Skeleton {
        skeleton(table: name, Parameters(counters: counters, slots: slots))
    }

    /// The skeleton in table `name` with every parameter given.
    public static func skeleton(table name: String, _ parameters: Parameters) -> Skeleton {
        Skeleton(table: Table(name: name),
                 sets: [Sets.interfaces, Sets.external, Firewall.stampSet] + features.flatMap { $0.sets(parameters) },
                 chains: features.flatMap { $0.chains(parameters) }.filter { !parameters.idleChains.contains($0.name) },
                 userChains: [EdgeFirewall.userChain])
    }

    /// The skeleton epokd keeps for `elements`: `parameters` with the chains that `elements` leave idle left out.
    public static func skeleton(table name: String = "epok", _ parameters: Parameters = Parameters(), for elements: TableElements) -> Skeleton {
        var parameters = parameters
        parameters.idleChains = idleChains(in: elements)
        return skeleton(table: name, parameters)
    }

    /// The parameters a skeleton was made with (see `skeleton(table:_:)`).
    public static func parameters(of skeleton: Skeleton) -> Parameters {
        // An idle firewall chain applies no policy: the default is as good as any.
        let policyDrops = skeleton.chains.first { $0.name == "firewall" }.map { $0.rules.last?.expressions.last == .verdict(.drop) } ?? true
        return Parameters(counters: skeleton.set(named: servicesSet.name)?.counters ?? true, slots: slots(of: skeleton),
                          firewallPolicy: policyDrops ? .drop : .accept, perSourceLimits: EdgeFirewall.perSourceLimits(in: skeleton.sets.map(\.name)),
                          idleChains: Set(optionalChains.keys).subtracting(skeleton.chains.map(\.name)), spread: spread(of: skeleton))
    }

    /// The elements that make the skeleton forward `state`: every set present, empty or not.
    public static func elements(for state: ForwardingState) -> TableElements {
        var result: TableElements = [:]
        for set in skeleton(table: "epok", Parameters(perSourceLimits: state.perSourceLimits)).sets { result[set.name] = [] }
        // Inserted as they are made (a list of every element first would be one more copy of them all at the peak),
        // each mapping's and entry's through one buffer.
        var made: [(String, Element)] = []
        func insert(_ pairs: [(String, Element)]) {
            for (set, element) in pairs { result[set, default: []].insert(element) }
        }
        insert(interfaceElements(state))
        for feature in features { insert(feature.elements(for: state)) }
        if let services = result.index(forKey: servicesSet.name) { result.values[services].reserveCapacity(state.mappings.count) }
        for mapping in state.mappings {
            for feature in features { feature.mappingElements(mapping, into: &made) }
            insert(made)
            made.removeAll(keepingCapacity: true)
        }
        for entry in state.loadBalancers {
            for feature in features { feature.loadBalancerElements(entry, into: &made) }
            insert(made)
            made.removeAll(keepingCapacity: true)
        }
        return result
    }

    /// The elements naming the interfaces, as (set name, element).
    public static func interfaceElements(_ state: ForwardingState) -> [(String, Element)] {
        state.interfaces.map { (Sets.interfaces.name, Element(key: [.ifname($0)])) }
            + state.externalInterfaces.map { (Sets.external.name, Element(key: [.ifname($0)])) }
    }

    /// The elements of one mapping, from every feature, as (set name, element).
    public static func mappingElements(_ m: Mapping) -> [(String, Element)] {
        var result: [(String, Element)] = []
        for feature in features { feature.mappingElements(m, into: &result) }
        return result
    }

    /// The elements of one pod's egress rule.
    public static func egressElements(_ rule: EgressRule) -> [(String, Element)] { EgressSNAT.egressElements(rule) }

    /// The elements of one pod's way out to a bridge's server.
    public static func bridgeExitElements(_ exit: BridgeExit) -> [(String, Element)] { Bridge.exitElements(exit) }

    /// The elements of one bridge entrance.
    public static func bridgeEntranceElements(_ entrance: BridgeEntrance) -> [(String, Element)] { Bridge.entranceElements(entrance) }

    /// The element that guards one entrance address.
    public static func bridgeGuardElement(_ address: IPAddress) -> (String, Element) { Bridge.guardElement(address) }

    /// The elements naming draining nodes.
    public static func drainingElements(_ nodes: [NodeAddress]) -> [(String, Element)] {
        PortMapping.drainingElements(nodes)
    }

    /// The elements of one LoadBalancer entry, from every feature, as (set name, element).
    public static func loadBalancerElements(_ e: LoadBalancerEntry) -> [(String, Element)] {
        var result: [(String, Element)] = []
        for feature in features { feature.loadBalancerElements(e, into: &result) }
        return result
    }

    /// The elements of the round-robin slots over `nodes`.
    public static func slotElements(nodes: [NodeAddress], slots: UInt32) -> [(String, Element)] {
        PortMapping.slotElements(nodes: nodes, slots: slots)
    }

    /// The forwarding a table's elements carry out (see `PortMapping.forwarding(from:)`).
    public static func forwarding(from elements: TableElements) -> ForwardingState {
        PortMapping.forwarding(from: elements)
    }

    // Expressions the features share.
    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
    static func family(_ f: Family) -> [Expression] {
        [.meta(.nfproto, into: .r(0)), .compare(.r(0), equal: true, [f.rawValue])]
    }
    static let managedInterface: [Expression] = [.meta(.iifname, into: .r(0)), .lookup(set: Sets.interfaces.name, from: .r(0))]
    static let originalDirection: [Expression] = [.ct(.direction, into: .r(0)), .compare(.r(0), equal: true, [0])]
    static let addressedToHost: [Expression] = [.fibDestinationType(into: .r(0)), .compare(.r(0), equal: true, le32(2))]
    static func mappedPort(_ set: NamedSet) -> [Expression] {
        [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)), .lookup(set: set.name, from: .r(0))]
    }
}

/// One feature of the ruleset: the sets and chains it adds to the skeleton, and the elements it derives.
protocol RulesetFeature: Sendable {
    static func sets(_ parameters: ForwardingRuleset.Parameters) -> [NamedSet]
    static func chains(_ parameters: ForwardingRuleset.Parameters) -> [Chain]
    /// Its chains that do nothing while the sets named are all empty (see `ForwardingRuleset.optionalChains`).
    static var optionalChains: [String: [String]] { get }
    /// Elements that belong to no mapping and no LoadBalancer entry (the round-robin slots, the interfaces).
    static func elements(for state: ForwardingState) -> [(String, Element)]
    /// Adds the elements of one mapping to `result`.
    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)])
    /// Adds the elements of one LoadBalancer IP . protocol . port to `result`.
    static func loadBalancerElements(_ e: LoadBalancerEntry, into result: inout [(String, Element)])
}

extension RulesetFeature {
    static var optionalChains: [String: [String]] { [:] }
    static func elements(for state: ForwardingState) -> [(String, Element)] { [] }
    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)]) {}
    static func loadBalancerElements(_ e: LoadBalancerEntry, into result: inout [(String, Element)]) {}
}
