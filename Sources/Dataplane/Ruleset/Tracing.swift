#if canImport(Glibc)
import Glibc
#endif

/// Packet tracing for `epokd trace`: chain `trace` (prerouting, priority -300, before every other chain of
/// epokd's and before conntrack) sets `meta nftrace` on packets whose protocol . destination port . source
/// address is in `trace4` or `trace6`; the kernel then reports each rule such a packet meets, in every table, to
/// the nftables trace group. The sets are part of the skeleton and external: `epokd trace` adds its selector and
/// removes it when it ends, and epokd's own commits never read or change them. The chain is the trace's, not the
/// skeleton's: the first trace adds it and the last one removes it (each at a ruleset generation it read, so two
/// traces never race), so no packet pays for it while nobody traces. It carries no skeleton mark, so the
/// daemon's chain replacements leave it alone.
public enum Tracing: RulesetFeature {
    public enum Sets {
        /// protocol . destination port range . source range, each element a trace's selector (commented with its pid).
        public static let trace4: NamedSet = {
            var set = NamedSet(name: "trace4", key: [.l4proto, .port, .ipv4], interval: true)
            set.external = true
            return set
        }()
        public static let trace6: NamedSet = {
            var set = NamedSet(name: "trace6", key: [.l4proto, .port, .ipv6], interval: true)
            set.external = true
            return set
        }()
    }

    /// The chain's name.
    public static let chain = "trace"

    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] { [Sets.trace4, Sets.trace6] }

    /// None in the skeleton: the trace chain exists only while a trace runs (`chainDefinition`).
    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] { [] }

    /// The comment that marks the trace chain as the traces' own.
    public static let chainComment = "epokd trace: exists while a trace runs"

    /// The trace chain, as a trace adds it.
    public static var chainDefinition: Chain {
        typealias R = ForwardingRuleset
        func traced(_ f: Family) -> Rule {
            let set = f == .ipv6 ? Sets.trace6 : Sets.trace4
            return Rule("\(f == .ipv6 ? "IPv6" : "IPv4") packets a running epokd trace selects are traced", R.family(f) + [
                .meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
                .payload(.network, offset: f == .ipv6 ? 8 : 12, length: f == .ipv6 ? 16 : 4, into: .r(2)),
                .lookup(set: set.name, from: .r(0)), .immediate([1], into: .r(0)), .metaSet(.nftrace, from: .r(0)),
            ])
        }
        return Chain(name: chain, hook: .prerouting, priority: -300, rules: [traced(.ipv4), traced(.ipv6)])
    }

    static func elements(for state: ForwardingState) -> [(String, Element)] { [] }
    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)]) {}
    static func loadBalancerElements(_ e: LoadBalancerEntry, into result: inout [(String, Element)]) {}

    /// What a trace selects: TCP, UDP or both, a destination port or all, sources in `sources` (all when nil).
    public struct Selector: Hashable, Sendable {
        public var protocols: [L4Protocol]
        public var port: Port?
        public var sources: CIDR?

        public init(protocols: [L4Protocol] = [.tcp, .udp], port: Port? = nil, sources: CIDR? = nil) {
            self.protocols = protocols
            self.port = port
            self.sources = sources
        }

        /// The elements of the selector, per set, each commented with `owner` (`epokd trace PID`).
        public func elements(owner: String) -> [(NamedSet, Element)] {
            var result: [(NamedSet, Element)] = []
            let ports = port.map { ($0, $0) } ?? (Port(1)!, Port(65535)!)
            let ranges: [AddressRange] = sources.map { [AddressRange(first: $0.range.first, last: $0.range.last)] }
                ?? [AddressRange(first: IPAddress("0.0.0.0")!, last: IPAddress("255.255.255.255")!),
                    AddressRange(first: IPAddress("::")!, last: IPAddress("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")!)]
            for proto in protocols {
                for range in ranges {
                    result.append((range.first.isV4 ? Sets.trace4 : Sets.trace6,
                                   Element(key: [.l4proto(proto), .port(ports.0), Field(range.first)],
                                           keyEnd: [.l4proto(proto), .port(ports.1), Field(range.last)], comment: owner)))
                }
            }
            return result
        }
    }

    /// The selectors in `table`, each with the pid of the trace that added it (nil for one no trace commented).
    public static func selectors(_ nftables: Nftables, table: Table) throws(NetlinkError) -> [(NamedSet, Element, Int32?)] {
        var result: [(NamedSet, Element, Int32?)] = []
        for set in [Sets.trace4, Sets.trace6] {
            for element in try nftables.elements(of: set, in: table) { result.append((set, element, pid(in: element.comment))) }
        }
        return result
    }

    /// Adds `elements` to the trace sets, with the trace chain when it is not there yet, in one transaction.
    public static func start(_ nftables: Nftables, table: Table, _ elements: [(NamedSet, Element)]) throws(NetlinkError) {
        var diff = ElementDiff()
        for (set, element) in elements { diff.added[set.name, default: []].insert(element) }
        try atOneGeneration(nftables) { () throws(NetlinkError) in
            var transaction = Transaction()
            if try !hasChain(nftables, table: table) { transaction.append(.addChain(table, chainDefinition, comment: chainComment)) }
            for operation in diff.transaction(for: skeleton(table)).operations { transaction.append(operation) }
            return transaction
        }
    }

    /// Removes `elements` from the trace sets, and the trace chain once no trace's selector is left.
    public static func stop(_ nftables: Nftables, table: Table, _ elements: [(NamedSet, Element)]) throws(NetlinkError) {
        let gone = Set(elements.map { "\($0.0.name) \($0.1)" })
        try atOneGeneration(nftables) { () throws(NetlinkError) in
            var transaction = Transaction()
            var diff = ElementDiff()
            var left = false
            for (set, element, _) in try selectors(nftables, table: table) {
                if gone.contains("\(set.name) \(element)") { diff.deleted[set.name, default: []].insert(element) } else { left = true }
            }
            for operation in diff.transaction(for: skeleton(table)).operations { transaction.append(operation) }
            if !left, try hasChain(nftables, table: table) { transaction.append(.deleteChain(table, chain)) }
            return transaction
        }
    }

    /// Removes the selectors of traces whose process is gone (what a `kill -9` of a trace left), and the trace
    /// chain when no selector is left; returns how many selectors went.
    @discardableResult
    public static func removeStale(_ nftables: Nftables, table: Table) throws(NetlinkError) -> Int {
        let stale = try selectors(nftables, table: table).filter { _, _, pid in
            guard let pid else { return true }
            return kill(pid, 0) != 0 && errno == ESRCH
        }
        try stop(nftables, table: table, stale.map { ($0.0, $0.1) })
        return stale.count
    }

    /// Whether the trace chain is in `table`.
    public static func hasChain(_ nftables: Nftables, table: Table) throws(NetlinkError) -> Bool {
        try nftables.ruleComments(in: table)[chain] != nil
    }

    private static func skeleton(_ table: Table) -> Skeleton { Skeleton(table: table, sets: [Sets.trace4, Sets.trace6], chains: []) }

    /// Commits what `make` reads and builds, at the ruleset generation it was read at: another trace's change in
    /// between makes it read and build again (at most 20 times).
    private static func atOneGeneration(_ nftables: Nftables, _ make: () throws(NetlinkError) -> Transaction) throws(NetlinkError) {
        for attempt in 1... {
            let generation = try nftables.generation()
            let transaction = try make()
            guard !transaction.isEmpty else { return }
            do {
                return try nftables.commit(transaction, atGeneration: generation)
            } catch where error.code == ERESTART && attempt < 20 {
                continue
            }
        }
    }

    /// How a trace's elements are commented: `epokd trace PID`.
    public static func owner(pid: Int32) -> String { "epokd trace \(pid)" }

    /// The pid in an element's comment, if it is a trace's.
    public static func pid(in comment: String?) -> Int32? {
        guard let comment, comment.hasPrefix("epokd trace ") else { return nil }
        return Int32(comment.dropFirst("epokd trace ".count))
    }
}
