import ArgumentParser
import Control
import Dataplane
import Foundation
import Synchronization

/// `epokd trace`: what epokd did with each packet of a flow, in its own words, from the kernel's trace events.
struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Trace packets through epokd's rules and say what was done with each: its Service, node, verdict and reason.",
        usage: "epokd trace [--netns <path>] [--table <name>] [--proto tcp|udp] [--port <n>] [--source <cidr>] [--count <n>] [--timeout <s>] [--json]",
        discussion: """
        The trace adds its selector to epokd's trace sets, read by chain trace (before every other chain; there \
        only while a trace runs), which sets nftrace on the packets it selects; it reads the kernel's nftables trace events over netlink, and prints one line per \
        packet: the flow, the Service whose host port, LoadBalancer IP or bridge entrance it reached, the node it \
        was sent to, the verdict and, for a drop, why (internal, allow-range, firewall, rate-limit, no-backend, \
        bridge), then the rules it met by their comments. Its selector is removed when it ends (SIGINT, SIGTERM, \
        --count, --timeout); one left by a killed trace is removed by the next trace or the daemon's start. \
        Tracing changes no verdict, and works whether the daemon runs or not (its table must exist).

          epokd trace --proto tcp --port 8080 --count 5
          epokd trace --source 192.0.2.0/24 --json --timeout 30
        """)

    @Option(name: .long, help: ArgumentHelp("Trace in the network namespace at this path instead of epokd's own [env: EPOK_NETNS].", valueName: "path"))
    var netns: String?

    @Option(name: .long, help: "nftables table (family inet) [env: EPOK_TABLE].")
    var table: String?

    @Option(name: .long, help: ArgumentHelp("Only this protocol (default: both).", valueName: "tcp|udp"))
    var proto: String?

    @Option(name: .long, help: ArgumentHelp("Only packets to this destination port (default: every port).", valueName: "n"))
    var port: Int?

    @Option(name: .long, help: ArgumentHelp("Only packets from this source prefix (default: every source).", valueName: "cidr"))
    var source: String?

    @Option(name: .long, help: ArgumentHelp("Stop after this many packets.", valueName: "n"))
    var count: Int?

    @Option(name: .long, help: ArgumentHelp("Stop after this many seconds.", valueName: "s"))
    var timeout: Double?

    @Flag(name: .long, help: "One JSON object a line: time, family, proto, saddr, sport, daddr, dport, iif, verdict, service, node, reason, rules.")
    var json = false

    func validate() throws {
        if let proto, !["tcp", "udp"].contains(proto) { throw ValidationError("--proto: \"\(proto)\" is not tcp or udp") }
        if let port, Port(port) == nil { throw ValidationError("--port: \(port) is not a port (1-65535)") }
        if let source, (try? CIDR(parsing: source)) == nil { throw ValidationError("--source: \"\(source)\" is not an IPv4 or IPv6 prefix") }
        if let count, count < 1 { throw ValidationError("--count: at least 1") }
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout: a number of seconds above 0") }
    }

    func run() throws {
        let namespace = netns ?? Environment.value("EPOK_NETNS")
        let name = table ?? Environment.value("EPOK_TABLE") ?? "epok"
        let table = Table(name: name)
        let nftables = try Nftables(namespacePath: namespace)
        guard let kernel = try StatusReport.readTable(name, nftables) else {
            throw TraceFailure("table inet \(name) does not exist: epokd has not programmed this host yet (nothing to trace through)")
        }
        guard kernel.sets[Tracing.Sets.trace4.name] != nil, kernel.sets[Tracing.Sets.trace6.name] != nil else {
            throw TraceFailure("table inet \(name) has no trace sets: it was made by an older epokd; start this version's daemon (or epokd --once) first")
        }
        // Subscribed before the selector goes in, so that no traced packet is missed.
        let monitor = try TraceMonitor(namespacePath: namespace)
        let removed = try Tracing.removeStale(nftables, table: table)
        if removed > 0 { FileHandle.standardError.write(Data("epokd trace: removed \(removed) selectors left by a trace that was killed\n".utf8)) }
        let selector = Tracing.Selector(protocols: proto.map { [$0 == "tcp" ? .tcp : .udp] } ?? [.tcp, .udp], port: port.flatMap { Port($0) },
                                        sources: try source.map { try CIDR(parsing: $0) })
        let mine = selector.elements(owner: Tracing.owner(pid: getpid()))
        do throws(NetlinkError) {
            try Tracing.start(nftables, table: table, mine)
        } catch {
            guard error.code == EEXIST else { throw error }
            // The kernel keeps one selector per range: a running trace holds one that overlaps this one.
            let others = try Tracing.selectors(nftables, table: table).map { set, element, pid in
                "\(element.keyEnd.map { Field.range(element.key[2], $0[2]) } ?? "\(element.key[2])") \(element.key[0]) port " +
                    "\(element.keyEnd.map { Field.range(element.key[1], $0[1]) } ?? "\(element.key[1])")" + (pid.map { " (epokd trace, pid \($0))" } ?? " (no trace's)")
            }
            throw TraceFailure("another trace's selector overlaps this one: \(Set(others).sorted().joined(separator: "; ")); stop it, or trace what it does not")
        }
        let stop = StopSignal()
        let signals = [SIGINT, SIGTERM].map { number -> DispatchSourceSignal in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { stop.stop() }
            source.resume()
            return source
        }
        defer {
            signals.forEach { $0.cancel() }
            do { try Tracing.stop(nftables, table: table, mine) } catch {
                FileHandle.standardError.write(Data("epokd trace: could not remove its selector (the next trace or the daemon's start will): \(error)\n".utf8))
            }
        }
        if !json {
            let what = [proto ?? "tcp and udp", port.map { "port \($0)" } ?? "every port", source.map { "from \($0)" } ?? "from anywhere"]
            FileHandle.standardOutput.write(Data("tracing \(what.joined(separator: " ")) through table inet \(name); Ctrl-C to stop\n".utf8))
        }
        try follow(monitor, nftables: nftables, namespace: namespace, table: table, kernel: kernel, selector: selector, until: stop)
    }

    /// Prints each traced packet once its events have stopped coming (0.2 s after its last), until `stop`,
    /// `--count` or `--timeout`.
    private func follow(_ monitor: TraceMonitor, nftables: Nftables, namespace: String?, table: Table, kernel: KernelTable,
                        selector: Tracing.Selector, until stop: StopSignal) throws {
        var explainer = TraceExplainer(table: table.name, comments: try nftables.ruleComments(in: table), elements: kernel.elements)
        var interfaces = (try? HostAddresses.interfacesByIndex(namespacePath: namespace)) ?? [:]
        var pending: [UInt32: (events: [TraceEvent], first: Date, last: Date)] = [:]
        var order: [UInt32] = []
        var printed = 0
        var warnedLost = false
        let deadline = timeout.map { Date().addingTimeInterval($0) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        func finish(_ id: UInt32) throws {
            guard let (events, first, _) = pending.removeValue(forKey: id) else { return }
            order.removeAll { $0 == id }
            if let count, printed >= count { return }
            if explainer.needsComments(events) {
                explainer.comments = try nftables.ruleComments(in: table)
                if let fresh = try StatusReport.readTable(table.name, nftables) {
                    explainer = TraceExplainer(table: table.name, comments: explainer.comments, elements: fresh.elements)
                }
            }
            if events.contains(where: { $0.inputInterface.map { interfaces[$0] == nil } ?? false }) {
                interfaces = (try? HostAddresses.interfacesByIndex(namespacePath: namespace)) ?? interfaces
            }
            // Another trace's packets come to every subscriber: only this one's are printed.
            guard let packet = explainer.explain(events, interfaces: interfaces, time: first.timeIntervalSince1970),
                  Self.selects(selector, packet) else { return }
            printed += 1
            // Written at once, not buffered: a trace is read as it happens, often through a pipe.
            let line = json ? String(decoding: try encoder.encode(packet), as: UTF8.self) : Self.words(packet)
            FileHandle.standardOutput.write(Data((line + "\n").utf8))
        }
        while !stop.isStopped {
            if let count, printed >= count { break }
            if let deadline, Date() >= deadline { break }
            var lost = false
            let events = try monitor.next(timeout: 0.05, lost: &lost)
            if lost, !warnedLost {
                warnedLost = true
                FileHandle.standardError.write(Data("epokd trace: the kernel dropped trace events (too many packets at once); narrow the selector\n".utf8))
            }
            let now = Date()
            for event in events {
                // The kernel's trace id comes from the packet's buffer, which the next packet may reuse: a packet's
                // events begin with the trace chain's rule, so one seen again starts the next packet.
                if event.table == table.name, event.chain == Tracing.chain, event.kind == .rule, event.ruleHandle != nil, pending[event.id] != nil { try finish(event.id) }
                if pending[event.id] == nil { order.append(event.id) }
                pending[event.id, default: ([], now, now)].events.append(event)
                pending[event.id]?.last = now
            }
            for id in order where now.timeIntervalSince(pending[id]!.last) >= 0.2 {
                try finish(id)
                if let count, printed >= count { break }
            }
        }
        for id in order {
            if let count, printed >= count { break }
            try finish(id)
        }
    }

    /// Whether `packet` is one of the selector's (and not another trace's).
    static func selects(_ selector: Tracing.Selector, _ packet: TracedPacket) -> Bool {
        guard selector.protocols.map(\.description).contains(packet.proto) else { return false }
        if let port = selector.port, packet.dport != Int(port.rawValue) { return false }
        if let sources = selector.sources, let address = IPAddress(packet.saddr), !sources.contains(address) { return false }
        return true
    }

    /// A packet in words: the flow, then what epokd did, then the rules it met.
    static func words(_ p: TracedPacket) -> String {
        let time = Date(timeIntervalSince1970: p.time).formatted(.iso8601.time(includingFractionalSeconds: true))
        func endpoint(_ address: String, _ port: Int?) -> String {
            (address.contains(":") ? "[\(address)]" : address) + (port.map { ":\($0)" } ?? "")
        }
        var line = "\(time) \(p.proto) \(endpoint(p.saddr, p.sport)) -> \(endpoint(p.daddr, p.dport))" + (p.iif.map { " in \($0)" } ?? "")
        line += p.service.map { ": \(Escaped.text($0, limit: 300))" } ?? ": no Service"
        if let node = p.node { line += ", sent to \(node)" }
        switch p.verdict {
        case "accept": line += ", accepted"
        default: line += ", \(p.verdict == "reject" ? "rejected" : "dropped") (\(p.reason ?? "?"))"
        }
        return line + p.rules.map { "\n    \(Escaped.text($0, limit: 300))" }.joined()
    }
}

/// A trace that cannot start, with the reason.
struct TraceFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
