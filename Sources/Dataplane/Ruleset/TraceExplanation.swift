/// One traced packet in epokd's words: its flow, what epokd's rules did with it, for whom, and why.
public struct TracedPacket: Sendable, Encodable, Equatable {
    /// When it was seen, in seconds since 1970.
    public var time: Double
    /// `ip` or `ip6`.
    public var family: String
    /// `tcp`, `udp`, or the protocol number.
    public var proto: String
    public var saddr: String
    public var sport: Int?
    public var daddr: String
    public var dport: Int?
    /// The interface it arrived on.
    public var iif: String?
    /// `accept`, `drop` or `reject`.
    public var verdict: String
    /// The Service (`namespace/name`) whose host port, LoadBalancer IP or bridge entrance it was sent to.
    public var service: String?
    /// The address it was DNATed to (the node, or a bridge's endpoint).
    public var node: String?
    /// Why it was dropped: `internal`, `allow-range`, `firewall`, `rate-limit`, `no-backend`, `bridge`, or another
    /// table's chain; nil when accepted.
    public var reason: String?
    /// The rules it met, by chain and comment (`guard: internal services are ...`), in order (another table's by
    /// table, chain and handle).
    public var rules: [String]

    public init(time: Double, family: String, proto: String, saddr: String, sport: Int?, daddr: String, dport: Int?, iif: String?,
                verdict: String, service: String?, node: String?, reason: String?, rules: [String]) {
        (self.time, self.family, self.proto, self.saddr, self.sport, self.daddr, self.dport) = (time, family, proto, saddr, sport, daddr, dport)
        (self.iif, self.verdict, self.service, self.node, self.reason, self.rules) = (iif, verdict, service, node, reason, rules)
    }

    private enum Keys: String, CodingKey { case time, family, proto, saddr, sport, daddr, dport, iif, verdict, service, node, reason, rules }

    /// Every key, null when unknown.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(time, forKey: .time)
        try c.encode(family, forKey: .family)
        try c.encode(proto, forKey: .proto)
        try c.encode(saddr, forKey: .saddr)
        try c.encode(sport, forKey: .sport)
        try c.encode(daddr, forKey: .daddr)
        try c.encode(dport, forKey: .dport)
        try c.encode(iif, forKey: .iif)
        try c.encode(verdict, forKey: .verdict)
        try c.encode(service, forKey: .service)
        try c.encode(node, forKey: .node)
        try c.encode(reason, forKey: .reason)
        try c.encode(rules, forKey: .rules)
    }
}

/// Turns a packet's trace events into a `TracedPacket`, knowing epokd's table: its rules' comments (by chain and
/// handle) and who owns each host port, LoadBalancer IP . port and bridge entrance (its elements' labels).
public struct TraceExplainer: Sendable {
    public var table: String
    public var comments: [String: [UInt64: String]]
    private var owners: [String: String] = [:]

    public init(table: String, comments: [String: [UInt64: String]], elements: TableElements) {
        self.table = table
        self.comments = comments
        // Host ports (`services`), LoadBalancer IP . ports (`lb4`, `lb6`) and bridge entrances (`bridge_ports4/6`).
        let owning: Set = [PortMapping.Sets.services.name, EdgeFirewall.Sets.admitted4.name, EdgeFirewall.Sets.admitted6.name,
                           Bridge.Sets.ports4.name, Bridge.Sets.ports6.name]
        for (set, elements) in elements where owning.contains(set) {
            for element in elements {
                guard let label = element.comment else { continue }
                owners[Self.key(element.key)] = label
            }
        }
    }

    /// Whether a rule met by these events is one the explainer cannot name (the table changed since it was read).
    public func needsComments(_ events: [TraceEvent]) -> Bool {
        events.contains { event in
            event.table == table && event.kind == .rule && event.ruleHandle.map { comments[event.chain]?[$0] == nil } == true
        }
    }

    /// The packet the events (one trace id's, in order) describe; nil without a header to read it from.
    public func explain(_ events: [TraceEvent], interfaces: [UInt32: String], time: Double) -> TracedPacket? {
        guard let first = events.first(where: { !$0.network.isEmpty }), let flow = Flow(first) else { return nil }
        var packet = TracedPacket(time: time, family: flow.v6 ? "ip6" : "ip", proto: Self.protocolName(flow.proto), saddr: flow.source,
                                  sport: flow.sourcePort, daddr: flow.destination, dport: flow.destinationPort,
                                  iif: first.inputInterface.map { interfaces[$0] ?? "if\($0)" }, verdict: "accept", service: nil, node: nil,
                                  reason: nil, rules: [])
        for event in events where event.chain != Tracing.chain || event.table != table {
            if event.kind == .rule, let handle = event.ruleHandle {
                packet.rules.append(event.table == table ? "\(event.chain): " + (comments[event.chain]?[handle].flatMap { $0.isEmpty ? nil : $0 } ?? "handle \(handle)")
                                    : "table \(event.table) chain \(event.chain) handle \(handle)")
            }
            // Where NAT sent it: a later header with another destination.
            if let now = Flow(event), now.destination != flow.destination || now.destinationPort != flow.destinationPort {
                packet.node = now.destination
            }
            guard event.verdict == .drop else { continue }
            let comment = event.table == table ? event.ruleHandle.flatMap { comments[event.chain]?[$0] } ?? "" : ""
            packet.verdict = comment.contains("refused") ? "reject" : "drop"
            packet.reason = event.table == table ? Self.reason(chain: event.chain, comment: comment)
                : "table \(event.table) chain \(event.chain)" + (event.kind == .policy ? " policy" : "")
            break
        }
        let proto = Self.protocolName(flow.proto)
        if let port = flow.destinationPort {
            packet.service = owners["\(flow.destination) \(proto) \(port)"] ?? owners["\(proto) \(port)"]
        }
        return packet
    }

    /// The reason for a drop by one of epokd's rules, from its chain and comment.
    static func reason(chain: String, comment: String) -> String {
        switch chain {
        case "guard": return comment.contains("internal") ? "internal" : "allow-range"
        case "input": return "no-backend"
        case "rate_limits", EdgeFirewall.perSourceChain: return "rate-limit"
        case "firewall", "firewall_input":
            if comment.contains(" rate ") || comment.contains(" over ") { return "rate-limit" }
            if comment.contains("allow-range") { return "allow-range" }
            return "firewall"
        default:
            if comment.contains("bridge") { return "bridge" }
            return "chain \(chain): \(comment)"
        }
    }

    static func protocolName(_ number: UInt8) -> String {
        switch number {
        case 6: "tcp"
        case 17: "udp"
        case 1: "icmp"
        case 58: "icmpv6"
        default: "\(number)"
        }
    }

    /// An element key as the owners table spells it: `tcp 8080`, `203.0.113.10 tcp 443`.
    private static func key(_ fields: Fields) -> String { fields.map(\.description).joined(separator: " ") }

    /// The addresses and ports in a trace event's headers.
    struct Flow {
        var v6: Bool
        var proto: UInt8
        var source: String
        var destination: String
        var sourcePort: Int?
        var destinationPort: Int?

        init?(_ event: TraceEvent) {
            let n = event.network
            if event.nfproto == 10 || (n.first.map { $0 >> 4 == 6 } ?? false) {
                guard n.count >= 40 else { return nil }
                v6 = true
                proto = n[6]
                source = IPAddress.v6(IPv6Address(bytes: Array(n[8..<24]))).description
                destination = IPAddress.v6(IPv6Address(bytes: Array(n[24..<40]))).description
            } else {
                guard n.count >= 20 else { return nil }
                v6 = false
                proto = n[9]
                func v4(_ at: Int) -> String { IPAddress.v4(IPv4Address(value: n[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) })).description }
                source = v4(12)
                destination = v4(16)
            }
            let t = event.transport
            if (proto == 6 || proto == 17), t.count >= 4 {
                sourcePort = Int(t[0]) << 8 | Int(t[1])
                destinationPort = Int(t[2]) << 8 | Int(t[3])
            }
        }
    }
}
