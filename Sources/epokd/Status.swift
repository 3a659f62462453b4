import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Prints what the kernel forwards, read from the table over netlink.
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the active mappings, read from the kernel.")

    @Option(name: .long, help: "nftables table (family inet) [env: EPOK_TABLE].")
    var table: String?

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    @Option(name: .long, help: ArgumentHelp("Read the network namespace at this path instead of epokd's own [env: EPOK_NETNS].", valueName: "path"))
    var netns: String?

    @Option(name: .long, help: ArgumentHelp("Also list the names in this hosts file, as the daemon's --dns-hosts writes them [env: EPOK_DNS_HOSTS].", valueName: "file"))
    var dnsHosts: String?

    @Option(name: .long, help: ArgumentHelp("Where the daemon serves /metrics, for its programming latency (default: 127.0.0.1:9877; off: do not ask) [env: EPOK_METRICS_ADDRESS].", valueName: "host:port"))
    var metricsAddress: String?

    @Flag(name: .long, help: "Only ask the daemon whether it is ready (its /readyz): exit 0 if it is, 1 with the reason if not; for keepalived's vrrp_script.")
    var ready = false

    func run() throws {
        let address = metricsAddress ?? Environment.value("EPOK_METRICS_ADDRESS") ?? "127.0.0.1:9877"
        if ready {
            guard let answer = DaemonEndpoint.get(address, "/readyz") else {
                print("not ready: no epokd answers on \(address)")
                throw ExitCode.failure
            }
            print(answer.status == 200 ? "ready" : "not ready: \(answer.body.trimmingCharacters(in: .whitespacesAndNewlines))")
            if answer.status != 200 { throw ExitCode.failure }
            return
        }
        let names = (dnsHosts ?? Environment.value("EPOK_DNS_HOSTS")).map { HostsFile.read($0) ?? [] }?
            .map { ActiveName(name: $0.name, addresses: $0.addresses) }
        let skeleton = ForwardingRuleset.skeleton(table: table ?? Environment.value("EPOK_TABLE") ?? "epok")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .secondsSince1970
        let nftables = try Nftables(namespacePath: netns ?? Environment.value("EPOK_NETNS"))
        guard let kernel = try StatusReport.readTable(skeleton.table.name, nftables) else {
            let reason = "table inet \(skeleton.table.name) does not exist: epokd has not run here (or was cleaned up)"
            print(json ? String(decoding: try encoder.encode(StatusReport(table: skeleton.table.name, mappings: [], loadBalancers: [], firewallDropped: [:], reason: reason)), as: UTF8.self) : reason)
            throw ExitCode(3)
        }
        var report = StatusReport(table: skeleton.table.name, kernel: kernel, names: names)
        let (mappings, loadBalancers, dropped) = (report.mappings, report.loadBalancers, report.firewallDropped)
        let (egress, entrances) = (report.egress, report.entrances)
        let metrics = address == "off" ? nil : DaemonEndpoint.get(address, "/metrics").flatMap { $0.status == 200 ? $0.body : nil }
        let latency = metrics.flatMap(ProgrammingLatency.parse)
        let role = metrics.flatMap(RoleReport.parse)
        if json {
            report.programming = latency
            report.role = role
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
            return
        }
        if !kernel.isEpokds || !skeleton.sets.allSatisfy({ kernel.sets[$0.name]?.decodable == true }) {
            print("warning: the table does not hold this version's skeleton; epokd will rebuild it on start")
        }
        let header = ["HOST PORT", "PROTO", "SERVICE", "NODE PORT", "NODES", "OUT", "ACCESS", "PACKETS", "BYTES"]
        let rows = mappings.map { (m: ActiveMapping) -> [String] in
            let nodes: String = (m.ownGroup ? "own: " : "") + (m.nodes.isEmpty ? "none" : m.nodes.joined(separator: ","))
            let out: [String] = m.down.map { "\($0) down" } + m.draining.map { "\($0) draining" }
            let access: String = (m.internalOnly ? "internal " : "") + (m.allowedSources.map { "allow " + $0.joined(separator: ",") } ?? "any")
            return [String(m.hostPort), m.proto, shown(m.service), String(m.nodePort), nodes, out.isEmpty ? "-" : out.joined(separator: ", "),
                    access, String(m.packets), String(m.bytes)]
        }
        printTable(header, rows)
        if let role { print(role.line) }
        if let latency {
            print("programming latency (watch event or file change to the kernel's acknowledgement): p50 \(latency.p50Seconds.milliseconds), p99 \(latency.p99Seconds.milliseconds), over \(latency.changes) changes")
        }
        if !egress.isEmpty {
            print("")
            printTable(["POD", "TO", "LEAVES AS", "RULE", "NEW FLOWS"],
                       egress.map { [$0.pod, $0.destinations.joined(separator: ","), $0.egress, shown($0.rule), String($0.flows)] })
        }
        if !entrances.isEmpty {
            print("")
            printTable(["ENTRANCE", "FROM", "TO ENDPOINTS", "BRIDGE"],
                       entrances.map { [$0.entrance, $0.client, $0.endpoints.joined(separator: ","), shown($0.bridge)] })
        }
        if let names, !names.isEmpty {
            print("")
            printTable(["NAME", "ADDRESSES"], names.map { [shown($0.name), shown($0.addresses.joined(separator: ","))] })
        }
        guard !loadBalancers.isEmpty || !dropped.isEmpty else { return }
        print("")
        let lbHeader = ["LOADBALANCER", "PROTO", "SERVICE", "ACCESS", "LIMIT", "PER SOURCE", "NEW FLOWS", "DENIED BY RANGE"]
        printTable(lbHeader, loadBalancers.map {
            [$0.address.contains(":") ? "[\($0.address)]:\($0.port)" : "\($0.address):\($0.port)", $0.proto, shown($0.service),
             $0.allowedSources.map { "allow " + $0.joined(separator: ",") } ?? "any", $0.limit ?? "-", $0.perSourceLimit ?? "-",
             String($0.admittedFlows), String($0.deniedPackets)]
        })
        for (interface, packets) in dropped.sorted(by: { $0.key < $1.key }) {
            print("firewall on \(interface): \(packets) packets not admitted (dropped, or counted with --firewall-policy accept)")
        }
    }

    /// A comment read back from the kernel (an owner's name), escaped for the terminal: anyone with the right to
    /// write the table may have written it.
    private func shown(_ text: String?) -> String { text.map { Escaped.text($0, limit: 300) } ?? "-" }

    private func printTable(_ header: [String], _ rows: [[String]]) {
        let widths = header.indices.map { c in ([header] + rows).map { $0[c].count }.max() ?? 0 }
        for row in [header] + rows {
            print(row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  "))
        }
    }
}

/// What `epokd status --json` prints: the mappings, or none and why.
struct StatusReport: Encodable {
    /// epokd's table `name` as the kernel holds it (with the sets of every per-source rate in use), or nil when
    /// there is none.
    static func readTable(_ name: String, _ nftables: Nftables) throws(NetlinkError) -> KernelTable? {
        let skeleton = ForwardingRuleset.skeleton(table: name)
        guard let found = try nftables.read(skeleton) else { return nil }
        let rates = EdgeFirewall.perSourceLimits(in: found.sets.keys)
        guard !rates.isEmpty else { return found }
        // Per-source rates add sets of their own: read again with the skeleton that knows them.
        return try nftables.read(ForwardingRuleset.skeleton(table: name, .init(perSourceLimits: rates)))
    }


    var table: String
    var mappings: [ActiveMapping]
    var loadBalancers: [ActiveLoadBalancer]
    /// Packets the LoadBalancer firewall did not admit, per interface.
    var firewallDropped: [String: UInt64]
    /// Static source addresses: egress rules and bridge exits per pod; bridge entrances.
    var egress: [ActiveEgress] = []
    var entrances: [ActiveEntrance] = []
    /// With `--dns-hosts`: the names in the router's DNS.
    var names: [ActiveName]?
    var reason: String?
    /// The daemon's programming latency, when its /metrics answered.
    var programming: ProgrammingLatency?
    /// This router's role among several (`--ha-address`), when the daemon's /metrics answered with one.
    var role: RoleReport?
}

extension StatusReport {
    /// The report of `kernel`, epokd's table.
    init(table: String, kernel: KernelTable, names: [ActiveName]? = nil) {
        self.init(table: table, mappings: ActiveMapping.all(in: kernel), loadBalancers: ActiveLoadBalancer.all(in: kernel),
                  firewallDropped: ActiveLoadBalancer.dropped(in: kernel), egress: ActiveEgress.all(in: kernel),
                  entrances: ActiveEntrance.all(in: kernel), names: names, reason: nil)
    }
}

/// A name in the `--dns-hosts` file, with its addresses.
struct ActiveName: Encodable {
    var name: String
    var addresses: [String]
}

/// One pod's static source as the kernel holds it: to these destinations (ranges, or a server and port) it
/// leaves with `egress`.
struct ActiveEgress: Encodable {
    var pod: String
    var destinations: [String]
    var egress: String
    var rule: String?
    /// Flows SNATed (NAT sees their first packets only).
    var flows: UInt64

    static func all(in kernel: KernelTable) -> [ActiveEgress] {
        var rows: [String: ActiveEgress] = [:]
        for set in EgressSNAT.Sets.all + [Bridge.Sets.exits4, Bridge.Sets.exits6] {
            guard let held = kernel.sets[set.name] else { continue }
            for element in held.elements {
                guard let egress = element.value?.first, !element.key.isEmpty else { continue }
                let destination: String
                if element.key.count == 1 {
                    destination = "all"
                } else if element.key.count == 4 {
                    destination = "\(element.key[1]) \(element.key[3])/\(element.key[2])"
                } else {
                    destination = element.keyEnd.map { Field.range(element.key[1], $0[1]) } ?? "\(element.key[1])"
                }
                let id = "\(element.key[0]) \(egress) \(element.comment ?? "")"
                var row = rows[id] ?? ActiveEgress(pod: "\(element.key[0])", destinations: [], egress: "\(egress)", rule: element.comment, flows: 0)
                row.destinations.append(destination)
                row.flows += held.counters[element.identity]?.packets ?? 0
                rows[id] = row
            }
        }
        return rows.values.sorted { ($0.pod, $0.egress) < ($1.pod, $1.egress) }
    }
}

/// One bridge entrance as the kernel holds it: `client` reaches `endpoints` through `entrance`.
struct ActiveEntrance: Encodable {
    var client: String
    var entrance: String
    var endpoints: [String]
    var bridge: String?

    static func all(in kernel: KernelTable) -> [ActiveEntrance] {
        var endpoints: [String: Set<String>] = [:]
        for set in [Bridge.Sets.entrances4, Bridge.Sets.entrances6] {
            for element in kernel.sets[set.name]?.elements ?? [] where element.key.count == 4 {
                guard let address = element.value?.first else { continue }
                endpoints["\(element.key[0]) \(element.key[2])/\(element.key[1])", default: []].insert("\(address)")
            }
        }
        var ports: [String: String] = [:]
        for set in [Bridge.Sets.ports4, Bridge.Sets.ports6] {
            for element in kernel.sets[set.name]?.elements ?? [] where element.key.count == 3 {
                ports["\(element.key[0]) \(element.key[2])/\(element.key[1])"] = element.value?.first.map { "\($0)" }
            }
        }
        return [Bridge.Sets.clients4, Bridge.Sets.clients6].flatMap { set in
            (kernel.sets[set.name]?.elements ?? []).compactMap { element -> ActiveEntrance? in
                guard element.key.count == 4 else { return nil }
                let entrance = "\(element.key[1]) \(element.key[3])/\(element.key[2])"
                let port = ports[entrance].map { ":\($0)" } ?? ""
                return ActiveEntrance(client: "\(element.key[0])", entrance: entrance,
                                      endpoints: (endpoints[entrance] ?? []).sorted().map { $0 + port }, bridge: element.comment)
            }
        }.sorted { ($0.entrance, $0.client) < ($1.entrance, $1.client) }
    }
}

/// One LoadBalancer IP . protocol . port the firewall admits, as the kernel holds it, with its counters.
struct ActiveLoadBalancer: Encodable {
    var address: String
    var port: UInt16
    var proto: String
    var service: String?
    var allowedSources: [String]?
    var limit: String?
    var perSourceLimit: String?
    /// New flows admitted (established packets pass before the lookup that counts).
    var admittedFlows: UInt64
    /// Packets dropped because their source is outside the allow-range.
    var deniedPackets: UInt64

    static func all(in kernel: KernelTable) -> [ActiveLoadBalancer] {
        typealias S = EdgeFirewall.Sets
        let elements = kernel.elements
        var limits: [Fields: String] = [:], perSource: [Fields: String] = [:], allowed: [Fields: [String]] = [:]
        for (name, set) in elements {
            for e in set {
                if let limit = e.limit { limits[e.key] = limit.description }
                if name.hasPrefix("per_source"), let rate = name.split(separator: "_").last.flatMap({ RateLimit(token: $0) }) {
                    perSource[e.key] = rate.description
                }
                if name == S.allow4.name || name == S.allow6.name, let first = e.key.last, let last = e.keyEnd?.last {
                    allowed[Fields(e.key.prefix(3)), default: []].append(Field.range(first, last))
                }
            }
        }
        var result: [ActiveLoadBalancer] = []
        for (admitted, restricted) in [(S.admitted4, S.restricted4), (S.admitted6, S.restricted6)] {
            let counters = kernel.sets[admitted.name]?.counters ?? [:], denied = kernel.sets[restricted.name]?.counters ?? [:]
            let restrictedKeys = Set((elements[restricted.name] ?? []).map(\.key))
            for e in elements[admitted.name] ?? [] {
                guard e.key.count == 3, case .l4proto(let proto) = e.key[1], case .port(let port) = e.key[2] else { continue }
                let counter = counters[e.identity]
                result.append(ActiveLoadBalancer(
                    address: e.key[0].description, port: port.rawValue, proto: proto.description, service: e.comment,
                    allowedSources: restrictedKeys.contains(e.key) ? (allowed[e.key] ?? []).sorted() : nil,
                    limit: limits[e.key], perSourceLimit: perSource[e.key],
                    admittedFlows: counter?.packets ?? 0, deniedPackets: denied[e.identity]?.packets ?? 0))
            }
        }
        return result.sorted { ($0.address, $0.proto, $0.port) < ($1.address, $1.proto, $1.port) }
    }

    /// What the firewall's last rule counted, per interface.
    static func dropped(in kernel: KernelTable) -> [String: UInt64] {
        var result: [String: UInt64] = [:]
        for (key, counter) in kernel.sets[EdgeFirewall.Sets.denied.name]?.counters ?? [:] {
            if case .ifname(let name)? = key.key.first { result[name] = counter.packets }
        }
        return result
    }
}

/// One mapping as the kernel holds it.
struct ActiveMapping: Encodable {
    var hostPort: UInt16
    var proto: String
    var service: String?
    var nodePort: UInt16
    /// The nodes new connections go to (the mapping's own group, when it has one).
    var nodes: [String]
    /// Whether the mapping has a group of its own (`externalTrafficPolicy: Local`, or health checks).
    var ownGroup: Bool
    /// Nodes a failed health check took out of the mapping's group.
    var down: [String]
    /// Nodes that get no new connections but keep their flows.
    var draining: [String]
    var internalOnly: Bool
    var allowedSources: [String]?
    /// The Service's rate limit on what the mapping forwards (nft's spelling).
    var limit: String?
    var packets: UInt64
    var bytes: UInt64

    static func all(in kernel: KernelTable) -> [ActiveMapping] {
        let elements = kernel.elements
        let forwarding = ForwardingRuleset.forwarding(from: elements)
        var counters: [PortKey: ElementCounter] = [:]
        for (key, counter) in kernel.sets[PortMapping.Sets.services.name]?.counters ?? [:] {
            guard case .l4proto(let p)? = key.key.first, case .port(let port)? = key.key.last else { continue }
            counters[PortKey(proto: p, port: port)] = counter
        }
        var allowed: [Fields: [String]] = [:]
        for set in [AccessControl.Sets.allow4.name, AccessControl.Sets.allow6.name] {
            for e in elements[set] ?? [] {
                guard let first = e.key.last, let last = e.keyEnd?.last else { continue }
                allowed[Fields(e.key.prefix(2)), default: []].append(Field.range(first, last))
            }
        }
        // Mappings with a group of their own: its nodes, and the ones a failed health check took out.
        var groups: [Fields: Set<String>] = [:], down: [Fields: [String]] = [:]
        for set in ["groups4", "groups6"] {
            for e in elements[set] ?? [] { if let address = e.value?.first { groups[Fields(e.key.prefix(2)), default: []].insert(address.description) } }
        }
        for set in [PortMapping.Sets.down4.name, PortMapping.Sets.down6.name] {
            for e in elements[set] ?? [] { down[Fields(e.key.prefix(2)), default: []].append(e.comment ?? e.key.last!.description) }
        }
        var limits: [Fields: String] = [:]
        for unit in [RateLimit.Unit.packets, .bytes] {
            for e in elements[EdgeFirewall.Sets.portLimits(unit).name] ?? [] { if let limit = e.limit { limits[e.key] = limit.description } }
        }
        let draining = Set([PortMapping.Sets.draining4.name, PortMapping.Sets.draining6.name].flatMap { elements[$0] ?? [] }
            .map { $0.comment ?? $0.key[0].description }).sorted()
        return forwarding.mappings.map { m -> ActiveMapping in
            let key: Fields = [.l4proto(m.proto), .port(m.hostPort)]
            func contains(_ set: String) -> Bool { elements[set]?.contains(Element(key: key)) ?? false }
            let counter = counters[PortKey(m)]
            let own = contains(PortMapping.Sets.grouped.name)
            return ActiveMapping(hostPort: m.hostPort.rawValue, proto: m.proto.description, service: m.label, nodePort: m.nodePort.rawValue,
                                 nodes: own ? (groups[key] ?? []).sorted() : forwarding.nodes.map(\.node).sorted(), ownGroup: own,
                                 down: Set(down[key] ?? []).sorted(), draining: draining,
                                 internalOnly: contains(AccessControl.Sets.internalPorts.name),
                                 allowedSources: contains(AccessControl.Sets.restricted.name) ? (allowed[key] ?? []).sorted() : nil,
                                 limit: limits[key], packets: counter?.packets ?? 0, bytes: counter?.bytes ?? 0)
        }.sorted { ($0.proto, $0.hostPort) < ($1.proto, $1.hostPort) }
    }
}

/// The daemon's network programming latency, read from its `/metrics` histogram: the quantiles are the upper
/// bounds of the buckets they fall in.
struct ProgrammingLatency: Encodable, Equatable {
    var changes: Int
    var p50Seconds: Double
    var p99Seconds: Double

    static let metric = "epokd_network_programming_duration_seconds"

    /// From Prometheus text; nil when the histogram is absent or empty.
    static func parse(_ text: String) -> ProgrammingLatency? {
        var buckets: [(bound: Double, count: Int)] = []
        var total: Int?
        for line in text.split(separator: "\n") where line.hasPrefix(metric) {
            let parts = line.split(separator: " ")
            guard parts.count >= 2, let value = Double(parts[parts.count - 1]) else { continue }
            if line.hasPrefix(metric + "_count") { total = Int(value) }
            if line.hasPrefix(metric + "_bucket"), let le = line.firstRange(of: "le=\"").map({ line[$0.upperBound...] }),
               let end = le.firstIndex(of: "\""), let bound = Double(le[..<end]) {
                buckets.append((bound, Int(value)))
            }
        }
        guard let total, total > 0 else { return nil }
        buckets.sort { $0.bound < $1.bound }
        func quantile(_ q: Double) -> Double { buckets.first { Double($0.count) >= q * Double(total) }?.bound ?? .infinity }
        return ProgrammingLatency(changes: total, p50Seconds: quantile(0.5), p99Seconds: quantile(0.99))
    }

}

/// This router's role as the daemon's `/metrics` says it (`--ha-address`).
struct RoleReport: Encodable, Equatable {
    var active: Bool
    var follows: String
    var since: Date
    var splitBrain: Bool

    /// From Prometheus text; nil without `epokd_ha_active` (no --ha-address).
    static func parse(_ text: String) -> RoleReport? {
        var report: RoleReport?
        var since: Double?, split = false
        for line in text.split(separator: "\n") where line.hasPrefix("epokd_ha_") {
            guard let value = line.split(separator: " ").last.flatMap({ Double($0) }) else { continue }
            if line.hasPrefix("epokd_ha_active{"), let start = line.firstRange(of: "follows=\"")?.upperBound,
               let end = line[start...].firstIndex(of: "\"") {
                report = RoleReport(active: value == 1, follows: String(line[start..<end]), since: Date(), splitBrain: false)
            }
            if line.hasPrefix("epokd_ha_role_changed_timestamp_seconds ") { since = value }
            if line.hasPrefix("epokd_ha_split_brain ") { split = value == 1 }
        }
        report?.since = Date(timeIntervalSince1970: since ?? 0)
        report?.splitBrain = split
        return report
    }

    var line: String {
        let when = Timestamp.text(since.timeIntervalSince1970)
        return "role: \(active ? "active" : "standby") (follows \(follows)) since \(when)\(splitBrain ? "; SPLIT BRAIN: another router holds the Lease while this one is active too" : "")"
    }
}

/// The daemon's HTTP endpoints (`/metrics`, `/readyz`), asked directly.
enum DaemonEndpoint {
    /// GET `path` from the daemon's metrics server at `address` (HOST:PORT, or [IPv6]:PORT), in at most a second:
    /// the status and the body, or nil when it did not answer.
    static func get(_ address: String, _ path: String) -> (status: Int, body: String)? {
        guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...]) else { return nil }
        let host = address[..<colon].trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var found: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &found) == 0, let info = found else { return nil }
        defer { freeaddrinfo(found) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 else { return nil }
        let request = "GET \(path) HTTP/1.0\r\nHost: \(address)\r\n\r\n"
        guard request.withCString({ send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }) > 0 else { return nil }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while response.count < 16 << 20 {
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n > 0 else { break }
            response += buffer[0..<n]
        }
        let text = String(decoding: response, as: UTF8.self)
        guard text.hasPrefix("HTTP/"), let status = text.split(separator: " ", maxSplits: 2).dropFirst().first.flatMap({ Int($0) }) else { return nil }
        return (status, text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? "")
    }
}

extension Double {
    /// Seconds as milliseconds for people (`≤ 5 ms`, `≤ 0.5 ms`; `> the largest bucket` for infinity).
    fileprivate var milliseconds: String {
        guard isFinite else { return "above the largest bucket" }
        let ms = self * 1000
        return "≤ " + (ms >= 1 ? String(format: "%.0f ms", ms) : String(format: "%.2f ms", ms))
    }
}
