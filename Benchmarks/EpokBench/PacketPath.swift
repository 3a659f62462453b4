import Dataplane
import Foundation
import NetnsLab

/// A client, a router and a server namespace: client c0 (10.10.1.2) - r0 (10.10.1.1) router r1 (10.10.2.1) -
/// s0 (10.10.2.2) server. The client sends raw frames from many sources; the server counts and drops what
/// arrives, at ingress, so nothing answers and the router does all the work that is measured.
final class PacketPath {
    let client: NetworkNamespace
    let router: NetworkNamespace
    let server: NetworkNamespace
    private let clientMAC: String
    private let routerMAC: String

    init() throws {
        client = try NetworkNamespace("ppc")
        router = try NetworkNamespace("ppr")
        server = try NetworkNamespace("pps")
        try run(["ip", "link", "add", "c0", "netns", client.name, "type", "veth", "peer", "name", "r0", "netns", router.name])
        try run(["ip", "link", "add", "r1", "netns", router.name, "type", "veth", "peer", "name", "s0", "netns", server.name])
        try client.exec(["ip", "addr", "add", "10.10.1.2/24", "dev", "c0"])
        try client.exec(["ip", "link", "set", "c0", "up"])
        try router.exec(["ip", "addr", "add", "10.10.1.1/24", "dev", "r0"])
        try router.exec(["ip", "addr", "add", "10.10.2.1/24", "dev", "r1"])
        try router.exec(["ip", "link", "set", "r0", "up"])
        try router.exec(["ip", "link", "set", "r1", "up"])
        try server.exec(["ip", "addr", "add", "10.10.2.2/24", "dev", "s0"])
        try server.exec(["ip", "link", "set", "s0", "up"])
        try router.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.r0.rp_filter=0"])
        try router.exec(["ip", "route", "add", "10.11.0.0/16", "via", "10.10.1.2"])
        func mac(_ ns: NetworkNamespace, _ device: String) throws -> String {
            try ns.exec(["cat", "/sys/class/net/\(device)/address"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        clientMAC = try mac(client, "c0")
        routerMAC = try mac(router, "r0")
        try router.exec(["ip", "neigh", "replace", "10.10.2.2", "lladdr", try mac(server, "s0"), "dev", "r1", "nud", "permanent"])
        try router.exec(["ip", "neigh", "replace", "10.10.1.2", "lladdr", clientMAC, "dev", "r0", "nud", "permanent"])
        try server.exec(["nft", "-f", "-"], input: """
            table netdev count {
              chain in {
                type filter hook ingress device s0 priority 0;
                udp dport 20000-29999 counter drop
              }
            }
            """)
    }

    /// The datagrams the server has received.
    private func delivered() throws -> UInt64 {
        let listing = try server.exec(["nft", "list", "chain", "netdev", "count", "in"]).output
        guard let range = listing.range(of: "packets ") else { return 0 }
        return UInt64(listing[range.upperBound...].prefix { $0.isNumber }) ?? 0
    }

    /// Median over `bursts` bursts of 0.8 s (short enough to stay below the conntrack table's limit) of the
    /// datagrams per second delivered to the server (its counter matches only the node ports); none at all is an
    /// error. With `flows`, the client cycles through that many flows (sources x ports) instead of new ones.
    func flowsPerSecond(flood: String, to address: String = "10.10.1.1", port: Int, expecting nodePort: Int, sources: Int? = nil,
                        flows: (sources: Int, ports: Int)? = nil, bursts: Int = 5) throws -> Measured {
        var rates: [Double] = []
        let cycle = flows.map { [String($0.sources), String($0.ports)] } ?? sources.map { [String($0)] } ?? []
        for _ in 0..<bursts {
            try router.exec(["conntrack", "-F"], check: false)
            let before = try delivered()
            let start = Date()
            let sent = try client.exec(["taskset", "-c", "1", flood, "c0", clientMAC, routerMAC, address, String(port), "0.8"] + cycle)
            let elapsed = Date().timeIntervalSince(start)
            guard UInt64(sent.output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 > 0 else {
                throw LabError.commandFailed("udpflood", sent.status, sent.error)
            }
            rates.append(Double(try delivered() - before) / min(elapsed, 0.8 + 0.05))
        }
        let measured = Measured(rates)
        guard measured.median > 0 else { throw LabError.timeout("no datagram to port \(port) reached the server (node port \(nodePort))") }
        return measured
    }
}

extension PacketPath {
    /// The rates of several tables, each installed in turn for one burst a round (`rounds` rounds), so that the
    /// machine's drift weighs on all of them alike.
    func inTurn(rounds: Int = 5, _ tables: [(install: () throws -> Void, remove: () throws -> Void)],
                rate: () throws -> Measured) throws -> [Measured] {
        var samples = [[Double]](repeating: [], count: tables.count)
        for _ in 0..<rounds {
            for (index, table) in tables.enumerated() {
                try table.install()
                samples[index].append(try rate().median)
                try table.remove()
            }
        }
        return samples.map(Measured.init)
    }

    /// TCP connect latency (p50, p99 in µs) of 2,000 connects from the client to the router's `port`, DNATed (by
    /// whatever table the router holds) to the server's `serverPort`; the client pinned to CPU 1.
    func connectLatency(tool: String, port: Int, serverPort: Int) throws -> (p50: Double, p99: Double) {
        try server.exec(["ip", "route", "replace", "default", "via", "10.10.2.1"])
        let listener = Process()
        listener.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        listener.arguments = ["netns", "exec", server.name, tool, "serve", "10.10.2.2", String(serverPort)]
        let ready = Pipe()
        listener.standardOutput = ready
        try listener.run()
        defer {
            kill(listener.processIdentifier, SIGKILL)
            listener.waitUntilExit()
        }
        _ = ready.fileHandleForReading.availableData   // "listening"
        try router.exec(["conntrack", "-F"], check: false)
        let result = try client.exec(["taskset", "-c", "1", tool, "connect", "10.10.1.1", String(port), "2000"])
        let fields = result.output.split(separator: " ").compactMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        guard fields.count == 3, fields[2] == 0 else { throw LabError.commandFailed("tcplatency connect to \(port)", result.status, result.output + result.error) }
        return (fields[0], fields[1])
    }
}

/// The bare data map: one rule, `dnat ip to meta l4proto . th dport map @ports`, the UDP mappings as elements.
func bareMapText(_ n: Int, proto: String = "udp") -> String {
    var s = "table inet bare {\n map ports {\n  typeof meta l4proto . th dport : ip daddr . th dport\n  elements = {\n"
    s += (0..<n).map { "   \(proto) . \(1024 + $0) : 10.10.2.2 . \(20_000 + $0 % 10_000)" }.joined(separator: ",\n")
    s += "\n  }\n }\n chain pre {\n  type nat hook prerouting priority dstnat;\n  meta l4proto \(proto) dnat ip to meta l4proto . th dport map @ports\n }\n}\n"
    return s
}

/// The bare data map with the two tests of Epok's meaning that every mapping rule makes before its lookup: the packet
/// came in on one of the interfaces (`iifname @interfaces`) and is addressed to the host itself (`fib daddr type
/// local`). No spread over nodes, no counters: what no table that keeps Epok's semantics can do less than.
func semanticFloorText(_ n: Int, interface: String) -> String {
    bareMapText(n)
        .replacingOccurrences(of: " map ports {", with: " set interfaces {\n  type ifname\n  elements = { \"\(interface)\" }\n }\n map ports {")
        .replacingOccurrences(of: "  meta l4proto udp dnat", with: "  meta l4proto udp iifname @interfaces fib daddr type local dnat")
}

/// One iptables DNAT rule per UDP port, in the nat table's PREROUTING chain.
func iptablesUDPText(_ n: Int, proto: String = "udp") -> String {
    var s = "*nat\n:PREROUTING ACCEPT [0:0]\n"
    for i in 0..<n { s += "-A PREROUTING -p \(proto) --dport \(1024 + i) -j DNAT --to-destination 10.10.2.2:\(20_000 + i % 10_000)\n" }
    return s + "COMMIT\n"
}
