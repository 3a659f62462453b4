import Control
import Dataplane
import Foundation
import NetnsLab
import Testing

/// `epokd trace` running as it is shipped, against the router of `EdgeHarness`, while real packets cross it.
@Suite("epokd trace with real packets")
struct TraceEndToEndTests {
    /// A running `epokd trace --json` in the router's namespace.
    final class RunningTrace: @unchecked Sendable {
        let process = Process()
        private let output = Pipe()
        private let errors = Pipe()
        /// What it wrote, read as it writes (a flood's lines would fill the pipe and stop it).
        private var text = Data()
        private let reading = DispatchGroup()

        init(_ h: EdgeHarness, _ arguments: [String]) throws {
            process.executableURL = URL(fileURLWithPath: epokdBinary)
            process.arguments = ["trace", "--netns", h.lab.host.path, "--json"] + arguments
            process.standardOutput = output
            process.standardError = errors
            try process.run()
            reading.enter()
            Thread { [self] in
                text = output.fileHandleForReading.readDataToEndOfFile()
                reading.leave()
            }.start()
            // Its selector is in the table once it traces.
            let nftables = try Nftables(namespacePath: h.lab.host.path), pid = process.processIdentifier
            try waitUntil("the trace's selector is in the table") {
                try Tracing.selectors(nftables, table: Table(name: "epok")).contains { $0.2 == pid } || !process.isRunning
            }
        }

        /// What it wrote to standard error so far, when it has ended (for a failure's message).
        var errorText: String {
            process.isRunning ? "(still running)" : String(decoding: errors.fileHandleForReading.readDataToEndOfFile().prefix(2000), as: UTF8.self)
        }

        /// Waits for it to end (--count or --timeout); its packets, one object each.
        func packets() throws -> [[String: Any]] {
            process.waitUntilExit()
            reading.wait()
            let text = String(decoding: self.text, as: UTF8.self)
            let failure = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(process.terminationStatus == 0, "epokd trace failed: \(failure)")
            return try text.split(separator: "\n").map { line in
                try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line)")
            }
        }
    }

    static func selectors(_ h: EdgeHarness) throws -> Int {
        try Tracing.selectors(try Nftables(namespacePath: h.lab.host.path), table: Table(name: "epok")).count
    }

    /// Whether the trace chain is in the router's table: only while a trace runs (or a killed one left it).
    static func chain(_ h: EdgeHarness) throws -> Bool {
        try Tracing.hasChain(try Nftables(namespacePath: h.lab.host.path), table: Table(name: "epok"))
    }

    @Test("a forwarded connection is named by Service and node, and still works; an internal Service from the external interface, a source outside an allow-range, an LB port not admitted and a flood over a rate limit are dropped with their reasons; nothing of a trace stays in the table, also after kill -9")
    func reasons() throws {
        let h = try EdgeHarness()
        let services = [
            loadBalancer("web", ips: [EdgeHarness.web4], ports: [(443, "TCP")]),
            loadBalancer("office", ips: [EdgeHarness.office4], ports: [(8443, "TCP")], sourceRanges: ["198.51.100.2/32"]),
            loadBalancer("limited", ips: [EdgeHarness.flood4], ports: [(443, "UDP")], annotations: [EpokAnnotation.rateLimit: "20/second burst 5 packets"]),
            // Host ports on the router: 8080 to the nodes' 443, and 8081, internal, to their 8443.
            service("mapped", annotations: [EpokAnnotation.externalPorts: "8080:443"], ports: [(443, 443)]),
            service("private", annotations: [EpokAnnotation.externalPorts: "8081:8443", EpokAnnotation.`internal`: "true"], ports: [(8443, 8443)]),
        ]
        try h.apply(try h.loop(), services)
        let ext = h.lab.external
        #expect(try !Self.chain(h), "no trace, no trace chain: no packet pays for tracing")

        // A connection to a host port: accepted, its Service and the node it went to named, the connection answered.
        let forwarded = try RunningTrace(h, ["--proto", "tcp", "--port", "8080", "--count", "1", "--timeout", "20"])
        #expect(try Self.chain(h), "a running trace has its chain")
        // nft prints the table with the trace chain in it, and would load that listing again.
        let listing = try h.lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty && listing.output.contains("meta nftrace set 1"), "\(listing.error)")
        #expect(try h.lab.host.exec(["nft", "-c", "-f", "-"], input: listing.output, check: false).status == 0)
        let answer = try tcpProbe(from: ext, to: ForwardingLab.hostExternal4, port: 8080)
        let first = try #require(try forwarded.packets().first)
        #expect(first["verdict"] as? String == "accept" && first["service"] as? String == "default/mapped", "\(first)")
        #expect(first["reason"] is NSNull && first["iif"] as? String == "eth0" && first["saddr"] as? String == ForwardingLab.externalClient4)
        let node = try #require(first["node"] as? String)
        #expect((1...3).map(ForwardingLab.node4).contains(node), "\(first)")
        #expect(answer == .answered("n\(node.split(separator: ".").last!):443"), "the traced connection went where the trace says")
        #expect((first["rules"] as? [String])?.isEmpty == false)
        #expect(try Self.selectors(h) == 0 && !Self.chain(h), "the selector and the chain are gone with the trace")

        // Drops, each with its reason.
        for (what, proto, port, source, address, reason) in [
            ("internal", "tcp", 8081, ForwardingLab.externalClient4, ForwardingLab.hostExternal4, "internal"),
            ("allow-range", "tcp", 8443, ForwardingLab.otherExternalClient4, EdgeHarness.office4, "allow-range"),
            ("port not admitted", "tcp", 8443, ForwardingLab.externalClient4, EdgeHarness.web4, "firewall"),
        ] {
            let trace = try RunningTrace(h, ["--proto", proto, "--port", "\(port)", "--source", "\(source)/32", "--count", "1", "--timeout", "20"])
            #expect(try tcpProbe(from: ext, to: address, port: UInt16(port), source: source, timeout: 0.5) == .timedOut, "\(what)")
            let packet = try #require(try trace.packets().first, "\(what)")
            #expect(packet["verdict"] as? String == "drop" && packet["reason"] as? String == reason, "\(what): \(packet)")
            #expect(try Self.selectors(h) == 0)
        }

        // A flood over the Service's rate: the packets over it are dropped for the rate limit.
        let flood = try RunningTrace(h, ["--proto", "udp", "--port", "443", "--timeout", "4"])
        _ = try udpFlood(from: ext, to: EdgeHarness.flood4, port: 443, packetsPerSecond: 400, seconds: 1)
        let flooded = try flood.packets()
        #expect(flooded.contains { $0["verdict"] as? String == "drop" && $0["reason"] as? String == "rate-limit" && $0["service"] as? String == "default/limited" },
                "\(flooded.prefix(3))")
        #expect(flooded.contains { $0["verdict"] as? String == "accept" }, "the packets under the rate pass")

        // A trace killed with -9 leaves its selector; the next trace removes it, and its own when it ends.
        let killed = try RunningTrace(h, ["--timeout", "60"])
        kill(killed.process.processIdentifier, SIGKILL)
        killed.process.waitUntilExit()
        #expect(try Self.selectors(h) > 0 && Self.chain(h), "a killed trace cannot clean up")
        let next = try RunningTrace(h, ["--proto", "udp", "--port", "9", "--timeout", "0.5"])
        _ = try next.packets()
        #expect(try Self.selectors(h) == 0 && !Self.chain(h), "the next trace removed what the killed one left, and its own")
        // Two traces at once: the chain stays while either runs; SIGTERM ends each cleanly.
        let one = try RunningTrace(h, ["--proto", "udp", "--port", "9", "--timeout", "60"])
        let two = try RunningTrace(h, ["--proto", "udp", "--port", "10", "--timeout", "60"])
        two.process.terminate()
        _ = try two.packets()
        let (selectorsLeft, chainLeft) = (try Self.selectors(h), try Self.chain(h))
        #expect(selectorsLeft > 0 && chainLeft,
                "the other trace still runs (running: \(one.process.isRunning); selectors \(selectorsLeft), chain \(chainLeft); it said: \(one.errorText))")
        one.process.terminate()
        _ = try one.packets()
        #expect(try Self.selectors(h) == 0 && !Self.chain(h), "the last trace took the chain with it")
        // Tracing changed nothing epokd holds: the connection still works without it.
        #expect(try tcpProbe(from: ext, to: ForwardingLab.hostExternal4, port: 8080) != .timedOut)

        // The daemon's start removes what a killed trace left too.
        let again = try RunningTrace(h, ["--timeout", "60"])
        kill(again.process.processIdentifier, SIGKILL)
        again.process.waitUntilExit()
        #expect(try Self.selectors(h) > 0)
        let source = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-trace-\(getpid()).yaml").path
        try "apiVersion: v1\nkind: List\nitems: []\n".write(toFile: source, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: source) }
        _ = try run([epokdBinary, "--interfaces", "eth0,wg0", "--external-interface", "eth0", "--netns", h.lab.host.path,
                     "--source", source, "--once", "--allow-problems", "--metrics-address", "off"])
        #expect(try Self.selectors(h) == 0 && !Self.chain(h), "the daemon's start removed the killed trace's selector and chain")
    }

    /// A NodePort Service of `default` with `ports` as (port, nodePort), TCP.
    private func service(_ name: String, annotations: StringMap, ports: [(Int, Int)]) -> Service {
        Service(metadata: ObjectMeta(name: name, namespace: "default", uid: "uid-\(name)", creationTimestamp: "2024-01-01T00:00:00Z", annotations: annotations),
                spec: Service.Spec(type: "NodePort", ports: ports.enumerated().map { Service.Port(name: "p\($0.offset)", protocol: "TCP", port: $0.element.0, nodePort: $0.element.1) }))
    }
}
