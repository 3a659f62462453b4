import Control
import Dataplane
import FakeKube
import Foundation
import Logging
import NetnsLab
import Testing

/// The lab as a MetalLB router: LoadBalancer IPs routed to nodes (as BGP would), the public side on eth0.
///
/// ```
///  ext (198.51.100.2, .3) ── eth0 ┐ host: routes 203.0.113.10 → n1, .11 → n2, .12 → n3, 2001:db8:5::10 → n1
///  int (100.64.0.2) ──────── wg0 ┘        listens on tcp/22 and tcp/2222 itself
/// ```
final class EdgeHarness {
    static let web4 = "203.0.113.10", office4 = "203.0.113.11", flood4 = "203.0.113.12", web6 = "2001:db8:5::10"
    let lab: ForwardingLab
    let nodes: [Node]
    private var hostServer: NameServer?
    private var outsideServer: NameServer?

    init() throws {
        lab = try ForwardingLab(tcpPorts: [443, 8443], udpPorts: [443])
        nodes = (1...3).map { node("n\($0)", addresses: [ForwardingLab.node4($0)]) }
        for (i, address) in [Self.web4, Self.office4, Self.flood4].enumerated() {
            try lab.nodes[i].exec(["ip", "addr", "add", "\(address)/32", "dev", "lo"])
            try lab.host.exec(["ip", "route", "add", "\(address)/32", "via", ForwardingLab.node4(i + 1)])
        }
        try lab.nodes[0].exec(["ip", "addr", "add", "\(Self.web6)/128", "dev", "lo"])
        // n1 answers UDP from its LB addresses (a server bound to [::] replies from the route's source address).
        try lab.nodes[0].exec(["ip", "route", "replace", "default", "via", "10.0.1.254", "src", Self.web4])
        try lab.nodes[0].exec(["ip", "-6", "route", "replace", "default", "via", "fd00:1::fe", "src", Self.web6])
        try lab.host.exec(["ip", "-6", "route", "add", "\(Self.web6)/128", "via", ForwardingLab.node6(1)])
        hostServer = try NameServer(in: lab.host, name: "router", tcpPorts: [22, 2222], udpPorts: [])
        outsideServer = try NameServer(in: lab.external, name: "outside", tcpPorts: [9000], udpPorts: [])
    }

    /// A reconcile loop programming the router, as a fresh daemon would (`--firewall-interface eth0`).
    func loop(policy: FirewallPolicy = .drop, inputPorts: [PortKey]? = [PortKey(proto: .tcp, port: Port(22)!)],
              counters: Bool = true) throws -> ReconcileLoop {
        var options = ForwardingOptions(interfaces: ["eth0", "wg0"], externalInterface: "eth0", firewallInterfaces: ["eth0"], inputPorts: inputPorts)
        options.hostAddresses = []
        let skeleton = ForwardingRuleset.skeleton(table: "epok", .init(counters: counters, firewallPolicy: policy))
        return ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: try Nftables(namespacePath: lab.host.path)),
                             conntrack: try Conntrack(namespacePath: lab.host.path), events: nil, options: options, logger: Logger(label: "test"))
    }

    func apply(_ loop: ReconcileLoop, _ services: [Service]) throws {
        try loop.apply([.snapshot(ClusterSnapshot(services: services, nodes: nodes))])
    }

    /// The packets the kernel admitted to an IPv4 LB address . UDP . port (its `lb4` element's counter).
    func admitted(_ address: String, udp port: UInt16) throws -> Int {
        let key = Element(key: [.ipv4(IPv4Address(address)!), .l4proto(.udp), .port(Port(Int(port))!)]).identity
        let counters = try Nftables(namespacePath: lab.host.path).counters(of: EdgeFirewall.Sets.admitted4, in: Table(name: "epok"))
        return Int(counters[key]?.packets ?? 0)
    }

    /// Waits until `counter` has received every datagram the kernel admitted to `address`:`port` (the
    /// receiving thread may still be reading when the sender stops).
    func settle(_ counters: [DatagramCounter], _ address: String, udp port: UInt16, sources: [String]) throws {
        try waitUntil("every admitted datagram to \(address):\(port) is received") {
            let received = counters.flatMap { c in sources.map { c.received(from: $0).packets } }.reduce(0, +)
            return received >= (try admitted(address, udp: port))
        }
    }

    /// Floods `flood4`:`port` over UDP from the external client on a thread of its own; the function returned
    /// waits for the flood and gives what it sent, in how long.
    func floodInBackground(port: UInt16, packetsPerSecond: Int, seconds: Double) -> () throws -> (sent: Int, elapsed: Double) {
        let done = DispatchGroup()
        nonisolated(unsafe) var result: Result<(sent: Int, elapsed: Double), any Error> = .success((0, 0))
        let client = lab.external
        done.enter()
        Thread {
            defer { done.leave() }
            result = Result { try udpFlood(from: client, to: Self.flood4, port: port, source: ForwardingLab.externalClient4,
                                           packetsPerSecond: packetsPerSecond, seconds: seconds) }
        }.start()
        return {
            done.wait()
            return try result.get()
        }
    }

    deinit {
        hostServer?.stop()
        outsideServer?.stop()
    }
}

private let web = loadBalancer("web", ips: [EdgeHarness.web4, EdgeHarness.web6], ports: [(443, "TCP"), (443, "UDP")])
private let office = loadBalancer("office", ips: [EdgeHarness.office4], ports: [(8443, "TCP")], sourceRanges: ["198.51.100.2/32"])

@Suite("The LoadBalancer firewall with real packets")
struct EdgeFirewallEndToEndTests {
    @Test("admitted LB IP . port passes; other ports, addresses and node IPs are dropped from the public side; replies flow; ranges hold; input is filtered")
    func admitsOnlyLoadBalancers() throws {
        let h = try EdgeHarness()
        let loop = try h.loop()
        try h.apply(loop, [web, office])
        let ext = h.lab.external
        #expect(try tcpProbe(from: ext, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        #expect(try udpProbe(from: ext, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        #expect(try tcpProbe(from: ext, to: EdgeHarness.web6, port: 443) == .answered("n1:443"))
        #expect(try tcpProbe(from: ext, to: EdgeHarness.web4, port: 8443, timeout: 0.5) == .timedOut, "another port of an LB IP")
        #expect(try tcpProbe(from: ext, to: ForwardingLab.node4(1), port: 443, timeout: 0.5) == .timedOut, "a node's own address")
        #expect(try tcpProbe(from: ext, to: ForwardingLab.node6(2), port: 443, timeout: 0.5) == .timedOut, "a node's own IPv6 address")
        // loadBalancerSourceRanges: .2 is allowed, .3 is not.
        #expect(try tcpProbe(from: ext, to: EdgeHarness.office4, port: 8443, source: ForwardingLab.externalClient4) == .answered("n2:8443"))
        #expect(try tcpProbe(from: ext, to: EdgeHarness.office4, port: 8443, source: ForwardingLab.otherExternalClient4, timeout: 0.5) == .timedOut)
        // Connections from inside out get their replies back through the public side.
        #expect(try tcpProbe(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 9000) == .answered("outside:9000"))
        // The other interface is not filtered.
        #expect(try tcpProbe(from: h.lab.internal, to: ForwardingLab.node4(1), port: 443) == .answered("n1:443"))
        // --firewall-input tcp/22: the router's SSH stays reachable, its other ports do not, except from wg0.
        #expect(try tcpProbe(from: ext, to: ForwardingLab.hostExternal4, port: 22) == .answered("router:22"))
        #expect(try tcpProbe(from: ext, to: ForwardingLab.hostExternal4, port: 2222, timeout: 0.5) == .timedOut)
        #expect(try tcpProbe(from: h.lab.internal, to: ForwardingLab.hostInternal4, port: 2222) == .answered("router:2222"))
        #expect(try h.lab.external.exec(["ping", "-c", "1", "-W", "2", ForwardingLab.hostExternal4], check: false).status == 0, "ICMP echo")

        // Counted per LB IP . port (admitted, and dropped by the range), and per interface (the policy).
        let kernel = try #require(try Nftables(namespacePath: h.lab.host.path).read(ForwardingRuleset.skeleton(table: "epok")))
        let webKey = Element(key: [.ipv4(IPv4Address(203, 0, 113, 10)), .l4proto(.tcp), .port(Port(443)!)]).identity
        #expect((kernel.sets["lb4"]?.counters[webKey]?.packets ?? 0) > 0)
        let officeKey = Element(key: [.ipv4(IPv4Address(203, 0, 113, 11)), .l4proto(.tcp), .port(Port(8443)!)]).identity
        #expect((kernel.sets["lb_restricted4"]?.counters[officeKey]?.packets ?? 0) > 0)
        #expect((kernel.sets["firewall_denied"]?.counters[Element(key: [.ifname("eth0")]).identity]?.packets ?? 0) >= 3)

        // A Service that stops being a LoadBalancer closes its IP at once.
        var plain = web
        plain.spec.type = "NodePort"
        try h.apply(loop, [plain, office])
        #expect(try tcpProbe(from: ext, to: EdgeHarness.web4, port: 443, timeout: 0.5) == .timedOut)
    }

    @Test("a rule in local that names epokd's set lb4 does not freeze updates: a skeleton change keeps lb4 (its elements and counters) and commits")
    func operatorRuleNamingASet() throws {
        let h = try EdgeHarness()
        let first = try h.loop()
        try h.apply(first, [web])
        try h.lab.host.exec(["nft", "add", "rule", "inet", "epok", "local", "ip", "daddr", ".", "meta", "l4proto", ".", "th", "dport", "@lb4", "counter", "accept"])
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        func lb4Packets() throws -> Int {
            try Nftables(namespacePath: h.lab.host.path).counters(of: EdgeFirewall.Sets.admitted4, in: Table(name: "epok")).values
                .map { Int($0.packets) }.reduce(0, +)
        }
        let admitted = try lb4Packets()
        #expect(admitted > 0, "the TCP probe was counted on its lb4 element")

        // A tenant asks for a per-source rate no Service had: new sets and rules, lb4 unchanged.
        var limited = office
        limited.metadata.annotations = [EpokAnnotation.rateLimitPerSource: "1000/second"]
        try h.apply(first, [web, limited])
        #expect(try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "per_source"]).output.contains("limit rate over 1000/second"))
        #expect(try lb4Packets() >= admitted, "lb4's counters survive the skeleton change")
        let listing = try h.lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty)
        #expect(listing.output.contains("ip daddr . meta l4proto . th dport @lb4 counter packets"), "the operator's rule is intact:\n\(listing.output)")
        // The rate goes again: the sets it added are deleted, lb4 still stays.
        try h.apply(first, [web])
        #expect(!(try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "per_source"]).output.contains("limit rate over")))
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
    }

    @Test("a tenant's rate change resets nobody: another Service's lb4 counters and per-source buckets stay; only the changed rate's sets are new; a drift repair keeps the buckets too")
    func rateChangeResetsNobody() throws {
        let h = try EdgeHarness()
        let a = loadBalancer("a", ips: [EdgeHarness.flood4], ports: [(5001, "UDP")], annotations: [EpokAnnotation.rateLimitPerSource: "100/second", EpokAnnotation.allowSharedIP: "flood"])
        let b = loadBalancer("b", ips: [EdgeHarness.flood4], ports: [(5002, "UDP")], annotations: [EpokAnnotation.rateLimitPerSource: "200/second", EpokAnnotation.allowSharedIP: "flood"])
        let loop = try h.loop()
        try h.apply(loop, [a, b, web])
        _ = try udpFlood(from: h.lab.external, to: EdgeHarness.flood4, port: 5002, packetsPerSecond: 200, seconds: 0.3)
        let admitted = try h.admitted(EdgeHarness.flood4, udp: 5002)
        func meter(_ rate: String) throws -> String {
            EdgeFirewall.Sets.meter(try AnnotationParser.rateLimit(rate, annotation: EpokAnnotation.rateLimitPerSource), .ipv4).name
        }
        func bucketOfB() throws -> Bool {
            try h.lab.host.exec(["nft", "list", "set", "inet", "epok", try meter("200/second")]).output.contains(ForwardingLab.externalClient4)
        }
        let bucketed = try bucketOfB()
        #expect(admitted > 0 && bucketed, "b's flows were counted and its source got a bucket")

        // Service a's per-source rate: 100 → 101/second.
        var changed = a
        changed.metadata.annotations?[EpokAnnotation.rateLimitPerSource] = "101/second"
        try h.apply(loop, [changed, b, web])
        #expect(try h.admitted(EdgeHarness.flood4, udp: 5002) >= admitted, "b's lb4 counter was not reset")
        #expect(try bucketOfB(), "b's per-source bucket was not reset")
        let listing = try h.lab.host.nftList("inet", "epok")
        let (new, old) = (try meter("101/second"), try meter("100/second"))
        #expect(listing.contains(new) && !listing.contains(old))
        // A drift repair reads the table back and commits the difference: the ruleset's own buckets are no drift.
        try loop.apply([], repair: true)
        #expect(try bucketOfB(), "a read-back repair leaves the per-source buckets alone")
    }

    @Test("a set that must be made anew (--no-counters) while a rule in local names it: the refusal names that rule's chain and handle, element changes go on with the skeleton in place, and the change is made once the rule is gone")
    func operatorRuleBlocksARemadeSet() throws {
        let h = try EdgeHarness()
        try h.apply(try h.loop(), [web])
        try h.lab.host.exec(["nft", "add", "rule", "inet", "epok", "local", "meta", "l4proto", ".", "th", "dport", "@services", "accept"])
        let handle = try #require(try h.lab.host.exec(["nft", "-a", "list", "chain", "inet", "epok", "local"]).output
            .split(separator: "\n").first { $0.contains("@services") }?.split(separator: " ").last.flatMap { UInt64($0) })
        let chainsBefore = try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "forward"]).output
        #expect(try h.lab.host.exec(["nft", "list", "map", "inet", "epok", "services"]).output.contains("counter"))
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.office4, port: 8443, source: ForwardingLab.externalClient4, timeout: 0.5) == .timedOut, "office is not admitted yet")

        // A restart with --no-counters: the services map loses its counters, so it must be made anew; meanwhile
        // office's LoadBalancer arrives.
        let loop = try h.loop(counters: false)
        loop.readinessGrace = 0
        try h.apply(loop, [web, office])
        let reason = try #require(loop.notReadyReason, "the blocked skeleton change is a readiness reason")
        #expect(reason.contains("set services must be made anew") && reason.contains("chain local, handle \(handle)")
            && reason.contains("nft delete rule inet epok local handle \(handle)"), "\(reason)")
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.office4, port: 8443, source: ForwardingLab.externalClient4) == .answered("n2:8443"), "office's elements went in")
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        #expect(try h.lab.host.exec(["nft", "list", "map", "inet", "epok", "services"]).output.contains("counter"), "the map stays as it was")
        #expect(try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "forward"]).output == chainsBefore, "epokd's chains stay as they were")
        #expect(try h.lab.host.exec(["nft", "-a", "list", "chain", "inet", "epok", "local"]).output.contains("handle \(handle)"))

        // The operator deletes the rule: the next commit makes the change.
        try h.lab.host.exec(["nft", "delete", "rule", "inet", "epok", "local", "handle", "\(handle)"])
        try h.apply(loop, [web, office])
        #expect(loop.notReadyReason == nil)
        #expect(!(try h.lab.host.exec(["nft", "list", "map", "inet", "epok", "services"]).output.contains("counter")), "the map was made anew")
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.office4, port: 8443, source: ForwardingLab.externalClient4) == .answered("n2:8443"))
    }

    @Test("--firewall-policy accept counts what it would drop and lets it through; no --firewall-input leaves input alone")
    func policyAccept() throws {
        let h = try EdgeHarness()
        let loop = try h.loop(policy: .accept, inputPorts: nil)
        try h.apply(loop, [web])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(1), port: 443) == .answered("n1:443"))
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.hostExternal4, port: 2222) == .answered("router:2222"))
        let kernel = try #require(try Nftables(namespacePath: h.lab.host.path).read(ForwardingRuleset.skeleton(table: "epok")))
        #expect((kernel.sets["firewall_denied"]?.counters[Element(key: [.ifname("eth0")]).identity]?.packets ?? 0) > 0)
        #expect(try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "firewall"]).output.contains("everything else is counted (policy accept)"))
    }

    @Test("a rule in chain local survives a restart and a skeleton change")
    func userChainSurvives() throws {
        let h = try EdgeHarness()
        try h.apply(try h.loop(), [web])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(2), port: 443, timeout: 0.5) == .timedOut)
        try h.lab.host.exec(["nft", "add", "rule", "inet", "epok", "local", "ip", "daddr", ForwardingLab.node4(2), "tcp", "dport", "443", "accept"])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(2), port: 443) == .answered("n2:443"))

        // A restart: a new daemon finds the table and keeps it.
        try h.apply(try h.loop(), [web])
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(2), port: 443) == .answered("n2:443"))
        // A skeleton change: a per-source rate appears (two more rules), epokd's chains and sets are made anew.
        var limited = web
        limited.metadata.annotations = [EpokAnnotation.rateLimitPerSource: "1000/second"]
        let loop = try h.loop()
        try h.apply(loop, [limited])
        #expect(try h.lab.host.exec(["nft", "list", "chain", "inet", "epok", "per_source"]).output.contains("limit rate over 1000/second"))
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(2), port: 443) == .answered("n2:443"))
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        let listing = try h.lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty)
        #expect(listing.output.contains("ip daddr 10.0.1.2 tcp dport 443 accept"))
    }

    @Test("rate limits: the delivered rate is the configured one ±20%; an unlimited Service alongside is unaffected; a polite source gets through beside a flooding one")
    func rateLimits() throws {
        let h = try EdgeHarness()
        let limitedCounter = try DatagramCounter(in: h.lab.nodes[2], port: 5001)
        let bytesCounter = try DatagramCounter(in: h.lab.nodes[2], port: 5002)
        let perSourceCounter = try DatagramCounter(in: h.lab.nodes[2], port: 5003)
        let freeCounter = try DatagramCounter(in: h.lab.nodes[1], port: 5001)
        defer { [limitedCounter, bytesCounter, perSourceCounter, freeCounter].forEach { $0.stop() } }
        let services = [
            loadBalancer("limited", ips: [EdgeHarness.flood4], ports: [(5001, "UDP")],
                         annotations: [EpokAnnotation.rateLimit: "500/second burst 10 packets", EpokAnnotation.allowSharedIP: "flood"]),
            loadBalancer("bytes", ips: [EdgeHarness.flood4], ports: [(5002, "UDP")],
                         annotations: [EpokAnnotation.bareRateLimit: "256 kbytes/second burst 16 kbytes", EpokAnnotation.allowSharedIP: "flood"]),
            loadBalancer("persource", ips: [EdgeHarness.flood4], ports: [(5003, "UDP")],
                         annotations: [EpokAnnotation.rateLimitPerSource: "400/second", EpokAnnotation.allowSharedIP: "flood"]),
            loadBalancer("free", ips: [EdgeHarness.office4], ports: [(5001, "UDP")]),
        ]
        try h.apply(try h.loop(), services)
        let ext = h.lab.external

        // A packet rate: 5,000/s offered for 2 s, 500/s (+ the burst) delivered.
        let offered = try udpFlood(from: ext, to: EdgeHarness.flood4, port: 5001, packetsPerSecond: 5000, seconds: 2)
        try h.settle([limitedCounter], EdgeHarness.flood4, udp: 5001, sources: [ForwardingLab.externalClient4])
        let packets = Double(limitedCounter.received(from: ForwardingLab.externalClient4).packets)
        let expected = 500 * offered.elapsed + 10
        #expect(offered.sent > 4 * Int(expected), "the flood offered \(offered.sent) datagrams, well over the limit")
        #expect(abs(packets - expected) <= 0.2 * expected, "delivered \(packets) datagrams in \(offered.elapsed) s, expected \(expected) ±20%")

        // A byte rate: 1,000-byte datagrams (1,028 bytes at L3) at 1,000/s offered, 256 KiB/s delivered. The
        // kernel's byte bucket starts full: one second of the rate plus the burst.
        let bytesOffered = try udpFlood(from: ext, to: EdgeHarness.flood4, port: 5002, payload: 1000, packetsPerSecond: 1000, seconds: 3)
        try h.settle([bytesCounter], EdgeHarness.flood4, udp: 5002, sources: [ForwardingLab.externalClient4])
        let delivered = Double(bytesCounter.received(from: ForwardingLab.externalClient4).packets) * 1028
        let expectedBytes = 256 * 1024 * (bytesOffered.elapsed + 1) + 16 * 1024
        #expect(abs(delivered - expectedBytes) <= 0.2 * expectedBytes, "delivered \(delivered) bytes in \(bytesOffered.elapsed) s, expected \(expectedBytes) ±20%")

        // While one source floods the limited Service, an unlimited one and a polite source are unaffected.
        let flooding = h.floodInBackground(port: 5003, packetsPerSecond: 8000, seconds: 2)
        let polite = try udpFlood(from: ext, to: EdgeHarness.flood4, port: 5003, source: ForwardingLab.otherExternalClient4, packetsPerSecond: 100, seconds: 2)
        let free = try udpFlood(from: ext, to: EdgeHarness.office4, port: 5001, source: ForwardingLab.otherExternalClient4, packetsPerSecond: 200, seconds: 1)
        let flood = try flooding()
        try h.settle([perSourceCounter], EdgeHarness.flood4, udp: 5003, sources: [ForwardingLab.externalClient4, ForwardingLab.otherExternalClient4])
        try h.settle([freeCounter], EdgeHarness.office4, udp: 5001, sources: [ForwardingLab.otherExternalClient4])
        let politeThrough = perSourceCounter.received(from: ForwardingLab.otherExternalClient4).packets
        #expect(politeThrough * 10 >= polite.sent * 9, "the polite source got \(politeThrough) of \(polite.sent) through beside the flood")
        let freeThrough = freeCounter.received(from: ForwardingLab.otherExternalClient4).packets
        #expect(freeThrough * 100 >= free.sent * 98, "the unlimited Service got \(freeThrough) of \(free.sent)")
        let flooded = Double(perSourceCounter.received(from: ForwardingLab.externalClient4).packets)
        let floodExpected = 400 * flood.elapsed + 5
        #expect(abs(flooded - floodExpected) <= 0.2 * floodExpected, "the flooding source got \(flooded) through in \(flood.elapsed) s, expected \(floodExpected) ±20%")
    }

    @Test("a per-source limit still protects a polite source when the Service has an aggregate limit too: the flooder's excess never spends the Service's bucket")
    func perSourceBeforeAggregate() throws {
        let h = try EdgeHarness()
        let counter = try DatagramCounter(in: h.lab.nodes[2], port: 5004)
        defer { counter.stop() }
        try h.apply(try h.loop(), [loadBalancer("both", ips: [EdgeHarness.flood4], ports: [(5004, "UDP")],
                                                annotations: [EpokAnnotation.rateLimit: "300/second", EpokAnnotation.rateLimitPerSource: "100/second"])])
        let flooding = h.floodInBackground(port: 5004, packetsPerSecond: 1000, seconds: 3)
        let polite = try udpFlood(from: h.lab.external, to: EdgeHarness.flood4, port: 5004, source: ForwardingLab.otherExternalClient4, packetsPerSecond: 20, seconds: 3)
        let flood = try flooding()
        try h.settle([counter], EdgeHarness.flood4, udp: 5004, sources: [ForwardingLab.externalClient4, ForwardingLab.otherExternalClient4])
        let politeThrough = counter.received(from: ForwardingLab.otherExternalClient4).packets
        #expect(politeThrough * 10 >= polite.sent * 9, "the polite source got \(politeThrough) of \(polite.sent) through beside the flood")
        let flooded = Double(counter.received(from: ForwardingLab.externalClient4).packets)
        let floodExpected = 100 * flood.elapsed + 5
        #expect(flood.sent > 5 * Int(floodExpected), "the flood offered \(flood.sent) datagrams, well over its limit")
        #expect(abs(flooded - floodExpected) <= 0.2 * floodExpected, "the flooding source got \(flooded) through in \(flood.elapsed) s, expected \(floodExpected) ±20%")
    }
}

@Suite("The LoadBalancer firewall in the daemon, watching the fake API server")
struct EdgeFirewallDaemonTests {
    @Test("LB Services from the API are admitted; a typo in one's rate limit is a Warning Event and nothing else stops; counters reach /metrics and status; an ingress IP change follows")
    func daemon() throws {
        let h = try EdgeHarness()
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        var web = loadBalancer("web", ips: [EdgeHarness.web4], ports: [(443, "TCP")], annotations: [EpokAnnotation.rateLimit: "1000/second"])
        let typo = loadBalancer("office", ips: [EdgeHarness.office4], ports: [(8443, "TCP")], annotations: [EpokAnnotation.bareRateLimit: "2 mbyte/second"])
        try api.apply(web, kind: "services")
        try api.apply(typo, kind: "services")
        let metricsPort = FakeAPIServer.freePort()
        let daemon = try DaemonProcess(lab: h.lab, api: api, extra: ["--firewall-interface", "eth0", "--firewall-input", "tcp/22",
                                                                     "--metrics-address", "127.0.0.1:\(metricsPort)"])
        defer { _ = daemon.stop(SIGKILL) }
        do {
            try waitUntil("the first commit", seconds: 30) { httpGet(port: metricsPort, path: "/readyz")?.0 == 200 }
        } catch {
            Issue.record("\(error)\n\(daemon.output)")
            return
        }
        try waitUntil("the LoadBalancer IPs admitted", seconds: 30) {
            try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443, timeout: 0.5) == .answered("n1:443")
                && (try tcpProbe(from: h.lab.external, to: EdgeHarness.office4, port: 8443, timeout: 0.5)) == .answered("n2:8443")
        }
        #expect(try tcpProbe(from: h.lab.external, to: ForwardingLab.node4(1), port: 443, timeout: 0.5) == .timedOut)
        try waitUntil("the Warning Event for the typo", seconds: 30) {
            let events = String(decoding: try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/events"), as: UTF8.self)
            return events.contains("\"reason\": \"InvalidRateLimit\"") && events.contains("unit \\\"mbyte\\\"")
        }

        try waitUntil("the admitted flows in /metrics", seconds: 20) {
            let metrics = httpGet(port: metricsPort, path: "/metrics")?.1 ?? ""
            let line = metrics.split(separator: "\n").first { $0.hasPrefix("epokd_lb_admitted_flows_total{address=\"203.0.113.10\",protocol=\"tcp\",port=\"443\"}") }
            return (line?.split(separator: " ").last.flatMap { Int($0) } ?? 0) > 0 && metrics.contains("epokd_firewall_unadmitted_packets_total{interface=\"eth0\",hook=\"forward\"}")
        }
        let status = try run([epokdBinary, "status", "--json", "--netns", h.lab.host.path]).output
        let report = try #require(try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any])
        let entries = try #require(report["loadBalancers"] as? [[String: Any]])
        let first = try #require(entries.first { $0["address"] as? String == EdgeHarness.web4 })
        #expect(first["service"] as? String == "default/web" && first["limit"] as? String == "1000/second burst 5 packets")
        #expect((first["admittedFlows"] as? Int ?? 0) > 0)
        #expect(entries.first { $0["address"] as? String == EdgeHarness.office4 }?["limit"] == nil)

        // MetalLB moves the Service to another IP: the old one closes, the new one opens, in one transaction.
        web.status?.loadBalancer?.ingress = [.init(ip: EdgeHarness.flood4)]
        try api.apply(web, kind: "services")
        try waitUntil("the new LoadBalancer IP", seconds: 30) {
            try tcpProbe(from: h.lab.external, to: EdgeHarness.flood4, port: 443, timeout: 0.5) == .answered("n3:443")
        }
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443, timeout: 0.5) == .timedOut)
    }
}

@Suite("Rate limits on host-port mappings, with real packets")
struct PortRateLimitTests {
    @Test("a Service's rate limit caps what its host port forwards (±20%), from every managed interface; another port is unaffected")
    func hostPortLimit() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
        let counters = try lab.nodes.map { try DatagramCounter(in: $0, port: 30500) }
        let freeCounters = try lab.nodes.map { try DatagramCounter(in: $0, port: 30501) }
        defer { (counters + freeCounters).forEach { $0.stop() } }
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: lab.host.path)),
                                 conntrack: nil, events: nil, options: options, logger: Logger(label: "test"))
        let limited = service("limited", annotations: [EpokAnnotation.externalPorts: "500:30500:udp", EpokAnnotation.rateLimit: "300/second burst 10 packets"],
                              nodePorts: [(30500, "UDP")])
        let free = service("free", annotations: [EpokAnnotation.externalPorts: "501:30501:udp"], nodePorts: [(30501, "UDP")])
        try loop.apply([.snapshot(ClusterSnapshot(services: [limited, free], nodes: (1...3).map { node("n\($0)", addresses: [ForwardingLab.node4($0)]) }))])

        var previous = 0
        for (client, address, source) in [(lab.external, ForwardingLab.hostExternal4, ForwardingLab.externalClient4),
                                          (lab.internal, ForwardingLab.hostInternal4, ForwardingLab.internalClient4)] {
            let offered = try udpFlood(from: client, to: address, port: 500, packetsPerSecond: 3000, seconds: 2)
            let polite = try udpFlood(from: client, to: address, port: 501, packetsPerSecond: 200, seconds: 0.5)
            // The kernel's own count of what it forwarded for the mapping is the condition to wait for.
            func delivered(_ list: [DatagramCounter]) -> Int { list.map { $0.received(from: source).packets }.reduce(0, +) }
            func forwarded(_ port: Int) throws -> Int {
                let counters = try Nftables(namespacePath: lab.host.path).counters(of: ForwardingRuleset.servicesSet, in: Table(name: "epok"))
                return Int(counters[Element(key: [.l4proto(.udp), .port(Port(port)!)]).identity]?.packets ?? 0)
            }
            // The mapping's counter counts every packet once (the first at its DNAT, the rest in `forward`).
            try waitUntil("every forwarded datagram arrives") {
                delivered(counters) + previous >= (try forwarded(500)) && delivered(freeCounters) >= polite.sent
            }
            let got = Double(delivered(counters))
            let expected = 300 * offered.elapsed + 10
            #expect(abs(got - expected) <= 0.2 * expected, "through \(address): \(got) datagrams in \(offered.elapsed) s, expected \(expected) ±20%")
            #expect(offered.sent > 3 * Int(expected))
            previous = Int(got)
        }
    }
}

@Suite("The LoadBalancer firewall from a snapshot file")
struct EdgeFirewallFileTests {
    @Test("--source with LoadBalancer Services and their status.loadBalancer.ingress: --once admits them and only them")
    func fromFile() throws {
        let h = try EdgeHarness()
        let scratch = try ScratchDirectory("lbfile")
        let file = try scratch.write("cluster.yaml", """
            apiVersion: v1
            kind: List
            items:
            - apiVersion: v1
              kind: Service
              metadata: {name: web, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z",
                         annotations: {ratelimit: "2 mbytes/second burst 512 kbytes"}}
              spec:
                type: LoadBalancer
                ports: [{port: 443, protocol: TCP, nodePort: 31443}]
              status: {loadBalancer: {ingress: [{ip: \(EdgeHarness.web4)}]}}
            - apiVersion: v1
              kind: Node
              metadata: {name: n1}
              status:
                addresses: [{type: InternalIP, address: \(ForwardingLab.node4(1))}]
                conditions: [{type: Ready, status: "True"}]
            """)
        let result = try run([epokdBinary, "--interfaces", "eth0", "--firewall-interface", "eth0", "--netns", h.lab.host.path,
                              "--once", "--metrics-address", "off", "--source", file], check: false)
        #expect(result.status == 0, "\(result.error)")
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.web4, port: 443) == .answered("n1:443"))
        #expect(try tcpProbe(from: h.lab.external, to: EdgeHarness.office4, port: 8443, timeout: 0.5) == .timedOut)
        let listing = try h.lab.host.exec(["nft", "list", "set", "inet", "epok", "lb_limits_bytes4"]).output
        #expect(listing.contains("203.0.113.10 . tcp . 443 limit rate over 2 mbytes/second burst 512 kbytes"), "\(listing)")
    }
}
