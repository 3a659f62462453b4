import Control
import Dataplane
import NetnsLab
import Testing

private let firewallOptions = ForwardingOptions(interfaces: ["eth0"], externalInterface: "eth0", firewallInterfaces: ["eth0"])
private let nodes = [node("a", addresses: ["10.0.1.1"])]

@Suite("Rate limits and the LoadBalancer firewall's desired state")
struct LoadBalancerStateTests {
    @Test("rate limits parse in arbf-nft-operator's and nft's syntax", arguments: [
        ("2 mbytes/second burst 512 kbytes", RateLimit(rate: 2 << 20, unit: .bytes, per: .second, burst: 512 << 10)),
        ("200/second burst 20 packets", RateLimit(rate: 200, unit: .packets, per: .second, burst: 20)),
        ("200/second burst 20", RateLimit(rate: 200, unit: .packets, per: .second, burst: 20)),
        ("100/minute", RateLimit(rate: 100, unit: .packets, per: .minute)),
        ("  7 packets/hour  ", RateLimit(rate: 7, unit: .packets, per: .hour)),
        ("1000 bytes/day", RateLimit(rate: 1000, unit: .bytes, per: .day)),
        ("64 kbytes/second", RateLimit(rate: 64 << 10, unit: .bytes, per: .second, burst: 0)),
    ])
    func parses(text: String, expected: RateLimit) throws {
        #expect(try AnnotationParser.rateLimit(text, annotation: EpokAnnotation.rateLimit) == expected)
    }

    @Test("malformed rate limits name the offending token", arguments: [
        ("2 mbyte/second", "unit \"mbyte\""),
        ("2 mbytes/sec", "period \"sec\""),
        ("2 mbytes", "no \"/\""),
        ("2/second/minute", "more than one"),
        ("/second", "no value"),
        ("0/second", "\"0\" is not a whole number"),
        ("-5/second", "\"-5\""),
        ("1.5/second", "\"1.5\""),
        ("2 mbytes/second burst 512", "the burst is in packets but the rate in bytes"),
        ("200/second burst 20 kbytes", "the burst is in bytes but the rate in packets"),
        ("200/second bust 20", "\"bust\" after the period"),
        ("200/second burst", "no value after \"burst\""),
        ("200/second burst 20 packets now", "\"now\" after the burst"),
        ("2 mbytes extra/second", "\"extra\" after the unit"),
        ("99999999999999999999/second", "is not a whole number"),
        ("1 mbytes/day", "more than the kernel's bucket holds"),
        ("1/day burst 4000000000 packets", "more than the kernel's bucket holds"),
        ("10/second burst 0 packets", "\"0\" is not a whole number"),
        ("", "no \"/\""),
    ])
    func rejects(text: String, mention: String) {
        let error = #expect(throws: AnnotationError.self) { try AnnotationParser.rateLimit(text, annotation: EpokAnnotation.rateLimit) }
        #expect(error?.message.contains(mention) == true, "\(error?.message ?? "-")")
    }

    @Test("property: any rate limit printed in nft's spelling parses back to itself; junk never crashes the parser")
    func roundTripAndJunk() throws {
        var random = SeededGenerator()
        for _ in 0..<500 {
            let unit: RateLimit.Unit = Bool.random(using: &random) ? .packets : .bytes
            let scale: UInt64 = unit == .packets ? 1 : [1, 1024, 1 << 20].randomElement(using: &random)!
            let limit = RateLimit(rate: UInt64.random(in: 1...100_000, using: &random) * scale, unit: unit,
                                  per: RateLimit.Period.allCases.randomElement(using: &random)!,
                                  burst: UInt32.random(in: unit == .packets ? 1...1000 : 0...1000, using: &random) * UInt32(scale))
            guard limit.kernelProblem == nil else {
                #expect(throws: AnnotationError.self) { try AnnotationParser.rateLimit(limit.description, annotation: "x") }
                continue
            }
            #expect(try AnnotationParser.rateLimit(limit.description, annotation: "x") == limit, "\(limit) with seed \(random)")
        }
        let alphabet = Array("0123456789 /burstpacketskmbytesecondminutehourday-.\t")
        for _ in 0..<2000 {
            let text = String((0..<Int.random(in: 0...30, using: &random)).map { _ in alphabet.randomElement(using: &random)! })
            _ = try? AnnotationParser.rateLimit(text, annotation: "x")
        }
    }

    @Test("a LoadBalancer's ingress IPs by each port become entries with its ranges and limits; only with the firewall on")
    func entries() {
        let web = loadBalancer("web", ips: ["203.0.113.10", "2001:db8:5::10", "not-an-ip"], ports: [(443, "TCP"), (443, "UDP")],
                               annotations: [EpokAnnotation.bareRateLimit: "2 mbytes/second burst 512 kbytes",
                                             EpokAnnotation.rateLimitPerSource: "100/second"],
                               sourceRanges: ["192.0.2.0/24"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [web], nodes: nodes), options: firewallOptions)
        #expect(state.loadBalancers.count == 4)
        #expect(state.loadBalancers.allSatisfy {
            $0.allowedSources == [try! CIDR(parsing: "192.0.2.0/24")] && $0.limit?.unit == .bytes && $0.perSourceLimit?.rate == 100 && $0.label == "default/web"
        })
        #expect(state.problems.map(\.reason) == [.invalidLoadBalancerIP])
        #expect(state.problems.first?.message.contains("\"not-an-ip\"") == true)
        #expect(DesiredState(snapshot: ClusterSnapshot(services: [web], nodes: nodes), options: options).loadBalancers.isEmpty)
    }

    @Test("an invalid rate limit is a Warning naming the token; the Service stays forwarded and admitted without it")
    func invalidLimit() {
        var web = loadBalancer("web", ips: ["203.0.113.10"], ports: [(443, "TCP")], annotations: [
            EpokAnnotation.rateLimit: "2 mbyte/second", EpokAnnotation.externalPorts: "443:31000",
        ])
        web.spec.ports?[0].nodePort = 31000
        let state = DesiredState(snapshot: ClusterSnapshot(services: [web], nodes: nodes), options: firewallOptions)
        #expect(state.ports.count == 1 && state.ports[0].mapping.limit == nil)
        #expect(state.loadBalancers.count == 1 && state.loadBalancers[0].limit == nil)
        #expect(state.problems.map(\.reason) == [.invalidRateLimit])
        #expect(state.problems[0].message.contains("unit \"mbyte\""))
    }

    @Test("two Services sharing one LB IP (MetalLB's allow-shared-ip key): on one port the older holds it, the other is told; an invalid range admits nobody")
    func conflictsAndRanges() {
        let shared: StringMap = [EpokAnnotation.allowSharedIP: "web"]
        let old = loadBalancer("old", ips: ["203.0.113.10"], ports: [(443, "TCP")], annotations: shared, created: "2023-01-01T00:00:00Z")
        let new = loadBalancer("new", ips: ["203.0.113.10"], ports: [(443, "TCP"), (80, "TCP")], annotations: shared)
        let broken = loadBalancer("broken", ips: ["203.0.113.11"], ports: [(443, "TCP")], sourceRanges: ["10.0.0.1/8"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [new, broken, old], nodes: nodes), options: firewallOptions)
        #expect(state.loadBalancers.map { "\($0.key) \($0.label!)" } == ["203.0.113.10:80/tcp default/new", "203.0.113.10:443/tcp default/old"])
        #expect(Set(state.problems.map(\.reason)) == [.portConflict, .invalidAllowRange])
    }

    @Test("an LB IP belongs to its oldest Service: another without the same allow-shared-ip key gets none of it, on any port, whatever the order; another namespace's holder is named by kind only")
    func addressHeld() {
        let old = loadBalancer("old", ips: ["203.0.113.10"], ports: [(443, "TCP")], created: "2023-01-01T00:00:00Z")
        var other = loadBalancer("other", ips: ["203.0.113.10", "203.0.113.12"], ports: [(80, "TCP")])
        other.metadata.namespace = "team-b"
        let keyed = loadBalancer("keyed", ips: ["203.0.113.10"], ports: [(8080, "TCP")], annotations: [EpokAnnotation.allowSharedIP: "x"])
        for services in [[old, other, keyed], [keyed, other, old]] {
            let state = DesiredState(snapshot: ClusterSnapshot(services: services, nodes: nodes), options: firewallOptions)
            #expect(state.loadBalancers.map { "\($0.key) \($0.label!)" } == ["203.0.113.10:443/tcp default/old", "203.0.113.12:80/tcp team-b/other"])
            let messages = state.problems.filter { $0.reason == .addressTaken }.map(\.message)
            #expect(messages.count == 2 && messages.contains { $0.contains("203.0.113.10 belongs to a Service of another namespace") }
                    && messages.contains { $0.contains("203.0.113.10 belongs to Service default/old") }, "\(messages)")
        }
        // Live: the holder goes, the next oldest takes the IP in the same diff.
        let live = LiveDesiredState(options: firewallOptions)
        _ = live.replaceAll(ClusterSnapshot(services: [old, other], nodes: nodes))
        let diff = live.remove(old.ref)
        #expect(live.state.loadBalancers.map(\.key.description).sorted() == ["203.0.113.10:80/tcp", "203.0.113.12:80/tcp"] && diff.addedCount > 0)
    }

    @Test("an LB IP stays with the Service that held it first: an older Service whose status later names it gets nothing, also after a restart that finds the table")
    func firstClaimHolds() {
        let victim = loadBalancer("victim", ips: ["203.0.113.10"], ports: [(443, "TCP")], sourceRanges: ["198.51.100.0/24"])
        var older = loadBalancer("older", ips: ["203.0.113.20"], ports: [(443, "TCP")], created: "2020-01-01T00:00:00Z")
        older.metadata.namespace = "team-b"
        let live = LiveDesiredState(options: firewallOptions)
        _ = live.replaceAll(ClusterSnapshot(services: [victim, older], nodes: nodes))
        // team-b writes its Service's status to name the victim's IP and port.
        older.status = Service.Status(loadBalancer: .init(ingress: [.init(ip: "203.0.113.10", hostname: nil)]))
        let diff = live.upsert(older)
        let held = live.state.loadBalancers
        #expect(held.map { "\($0.key) \($0.label!)" } == ["203.0.113.10:443/tcp default/victim"], "\(held)")
        #expect(held.first?.allowedSources != nil, "the victim's allow-range still applies")
        #expect(live.problems(of: older.ref).contains { $0.reason == .addressTaken && $0.message.contains("belongs to a Service of another namespace, which held it first") })
        #expect(!diff.added.keys.contains(EdgeFirewall.Sets.admitted4.name), "\(diff)")
        // A restart: the table found at start says who held the IP, whatever the Services' ages.
        let restarted = LiveDesiredState(options: firewallOptions)
        restarted.holdAtStart(loadBalancers: [IPAddress("203.0.113.10")!: victim.ref])
        _ = restarted.replaceAll(ClusterSnapshot(services: [older, victim], nodes: nodes))
        #expect(restarted.state.loadBalancers.map(\.label) == ["default/victim"])
        // Without a table, the Services that ask at once are ordered by age: the older holds.
        let fresh = LiveDesiredState(options: firewallOptions)
        _ = fresh.replaceAll(ClusterSnapshot(services: [older, victim], nodes: nodes))
        #expect(fresh.state.loadBalancers.map(\.label) == ["team-b/older"])
        // The victim goes: the waiting asker takes the IP in the same diff.
        let handover = live.remove(victim.ref)
        #expect(live.state.loadBalancers.map(\.label) == ["team-b/older"] && handover.addedCount > 0)
    }

    @Test("per-source rates have no cluster-wide cap: 40 namespaces with a rate each all get it; a Service moving between rates in use is an element diff")
    func perSourceNoClusterCap() {
        let services = (1...40).map { i in
            var service = loadBalancer("s\(i)", ips: ["203.0.113.\(i)"], ports: [(443, "TCP")], annotations: [EpokAnnotation.rateLimitPerSource: "\(i)/second"],
                                       created: "2024-01-01T00:00:\(String(format: "%02d", i))Z")
            service.metadata.namespace = "ns\(i)"
            return service
        }
        let live = LiveDesiredState(options: firewallOptions)
        _ = live.replaceAll(ClusterSnapshot(services: services, nodes: nodes))
        #expect(live.perSourceLimits.count == 40)
        #expect(live.state.problems.isEmpty, "\(live.state.problems)")
        // s1 takes s2's rate: its element moves between two rates' sets, and no rate comes or goes but its own.
        var moved = services[0]
        moved.metadata.annotations?[EpokAnnotation.rateLimitPerSource] = "2/second"
        let diff = live.upsert(moved)
        #expect(live.perSourceLimits.count == 39)
        #expect(diff.added.keys.sorted() == ["per_source4_2pps5"] && diff.deleted.keys.sorted() == ["per_source4_1pps5"], "\(diff)")
    }

    @Test("a Service at its namespace's cap may change its own rate")
    func perSourceChangeAtTheCap() {
        let share = ServiceLimits.perSourceRatesPerNamespace
        let services = (1...share).map { i in
            var service = loadBalancer("s\(i)", ips: ["203.0.113.\(i)"], ports: [(443, "TCP")], annotations: [EpokAnnotation.rateLimitPerSource: "\(i)/second"],
                                       created: "2024-01-01T00:00:\(String(format: "%02d", i))Z")
            service.metadata.namespace = "full"
            return service
        }
        let live = LiveDesiredState(options: firewallOptions)
        _ = live.replaceAll(ClusterSnapshot(services: services, nodes: nodes))
        var changed = services[0]
        changed.metadata.annotations?[EpokAnnotation.rateLimitPerSource] = "1000/second"
        _ = live.upsert(changed)
        #expect(live.state.problems.isEmpty, "\(live.state.problems)")
        #expect(live.state.loadBalancers.first { $0.label == changed.ref.description }?.perSourceLimit?.rate == 1000)
    }

    @Test("one namespace brings in at most its share of distinct per-source rates; a rate another namespace uses costs nothing; another namespace still can")
    func perSourcePerNamespace() {
        let share = ServiceLimits.perSourceRatesPerNamespace
        func lb(_ i: Int, _ namespace: String, rate: Int) -> Service {
            var service = loadBalancer("s\(i)", ips: ["203.0.113.\(i)"], ports: [(443, "TCP")], annotations: [EpokAnnotation.rateLimitPerSource: "\(rate)/second"],
                                       created: "2024-01-01T00:00:\(String(format: "%02d", i))Z")
            service.metadata.namespace = namespace
            return service
        }
        let greedy = (1...share + 1).map { lb($0, "greedy", rate: $0) }
        let shared = lb(20, "greedy", rate: 500)
        let other = [lb(21, "other", rate: 500), lb(22, "other", rate: 999)]
        let state = DesiredState(snapshot: ClusterSnapshot(services: other + greedy + [shared], nodes: nodes), options: firewallOptions)
        let refused = state.problems.filter { $0.reason == .tooManyEntries }
        #expect(refused.map(\.service) == [greedy.last!.ref], "only greedy's rate beyond its share: \(refused)")
        #expect(refused.first?.message.contains("namespace greedy uses \(share) distinct per-source rates already") == true)
        #expect(state.loadBalancers.first { $0.label == shared.ref.description }?.perSourceLimit != nil, "a rate in use elsewhere costs nothing")
        #expect(state.loadBalancers.first { $0.label == "other/s22" }?.perSourceLimit != nil)
    }

    @Test("an LB change is an element diff, and the elements add up to the full computation")
    func incremental() {
        let live = LiveDesiredState(options: firewallOptions)
        var web = loadBalancer("web", ips: ["203.0.113.10"], ports: [(443, "TCP")])
        _ = live.replaceAll(ClusterSnapshot(services: [web], nodes: nodes))
        web.status?.loadBalancer?.ingress = [.init(ip: "203.0.113.20")]
        web.metadata.annotations = [EpokAnnotation.rateLimit: "10/second"]
        let diff = live.upsert(web)
        #expect(diff.addedCount == 2 && diff.deletedCount == 1, "lb4 element moved, one limit element added")
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: firewallOptions).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty })
    }
}

@Suite("externalTrafficPolicy: Local")
struct LocalPolicyTests {
    static let three = (1...3).map { node("n\($0)", addresses: ["10.0.1.\($0)"]) }

    static func slice(_ service: String, _ endpoints: [(node: String, ready: Bool)], name: String? = nil) -> EndpointSlice {
        EndpointSlice(metadata: ObjectMeta(name: name ?? "\(service)-abc", namespace: "default", labels: [EndpointSlice.serviceNameLabel: service]),
                      endpoints: endpoints.enumerated().map { EndpointSlice.Endpoint(addresses: ["10.244.\($0.offset).5"], conditions: .init(ready: $0.element.ready),
                                                                                   nodeName: $0.element.node) })
    }

    static func local(_ name: String, port: Int = 22, nodePort: Int = 30022) -> Service {
        var s = service(name, annotations: [EpokAnnotation.externalPorts: "\(port):\(nodePort)"], nodePorts: [(nodePort, "TCP")])
        s.spec.externalTrafficPolicy = "Local"
        return s
    }

    @Test("a Local Service's mappings go only to eligible nodes with a ready endpoint; none: its own empty group; a Cluster Service shares")
    func groups() {
        let web = Self.local("web"), db = Self.local("db", port: 5432, nodePort: 30432)
        let shared = service("plain", annotations: [EpokAnnotation.externalPorts: "80:30080"], nodePorts: [(30080, "TCP")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [web, db, shared], nodes: Self.three, endpointSlices: [
            Self.slice("web", [("n2", true), ("n3", false)]), Self.slice("db", [("n9", true)]),
        ]), options: options)
        let byPort = Dictionary(uniqueKeysWithValues: state.ports.map { ($0.mapping.hostPort.rawValue, $0.mapping.group) })
        #expect(byPort[22]??.nodes.map(\.node) == ["n2"])
        #expect(byPort[5432]??.nodes == [], "an endpoint on a node that is not eligible does not count")
        #expect(byPort[80]! == nil)
        // Unknown endpoints (no right to list them): forwarded as before, to every node.
        #expect(DesiredState(snapshot: ClusterSnapshot(services: [web], nodes: Self.three), options: options).ports[0].mapping.group == nil)
    }

    @Test("endpoints moving, nodes changing and slices arriving late change only the Local Service's elements, and flush its flows to the node it left")
    func incremental() {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [Self.local("web")], nodes: Self.three))
        #expect(live.mappings(of: ServiceRef(namespace: "default", name: "web"))[0].group == nil)
        _ = live.replaceEndpointSlices([Self.slice("web", [("n1", true)])])
        #expect(live.mappings(of: ServiceRef(namespace: "default", name: "web"))[0].group?.nodes.map(\.node) == ["n1"])
        _ = live.takeStaleFlows()
        let moved = live.upsert(Self.slice("web", [("n3", true)]))
        #expect(moved.addedCount == 60 && moved.deletedCount == 60, "60 slots now point at n3")
        let stale = live.takeStaleFlows()
        #expect(stale.count == 1 && stale[0].reasons == [.backendsRemoved([.v4(IPv4Address(10, 0, 1, 1))])])
        // n3 goes NotReady: the group is empty, the port refused.
        var down = Self.three
        down[2].status?.conditions = [Node.Condition(type: "Ready", status: "False")]
        _ = live.upsert(down[2])
        #expect(live.mappings(of: ServiceRef(namespace: "default", name: "web"))[0].group?.nodes == [])
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: options).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty }, "the increments add up to the full computation")
    }

    @Test("a Service that turns Local after its endpoints moved goes to where they are now")
    func turnsLocal() {
        let live = LiveDesiredState(options: options)
        var web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022"], nodePorts: [(30022, "TCP")])
        _ = live.replaceAll(ClusterSnapshot(services: [web], nodes: Self.three, endpointSlices: [Self.slice("web", [("n1", true)])]))
        _ = live.upsert(Self.slice("web", [("n3", true)]))
        web.spec.externalTrafficPolicy = "Local"
        _ = live.upsert(web)
        #expect(live.mappings(of: web.ref)[0].group?.nodes.map(\.node) == ["n3"])
    }
}

@Suite("Health checks in the desired state")
struct HealthStateTests {
    static let three = (1...3).map { node("n\($0)", addresses: ["10.0.1.\($0)"]) }

    @Test("health-check annotations parse with HAProxy's defaults; malformed ones name the token", arguments: [
        ("tcp", HealthCheck(kind: .tcp)),
        ("http:/healthz", HealthCheck(kind: .http(path: "/healthz"))),
        ("tcp interval=1s timeout=500ms fall=2 rise=2", HealthCheck(kind: .tcp, interval: 1000, timeout: 500, fall: 2, rise: 2)),
        ("http:/ready?x=1 interval=1m port=8080", HealthCheck(kind: .http(path: "/ready?x=1"), interval: 60_000, timeout: 2000, port: Port(8080)!)),
    ])
    func parses(text: String, expected: HealthCheck) throws {
        #expect(try AnnotationParser.healthCheck(text) == expected)
    }

    @Test("malformed health checks are refused with the reason", arguments: [
        ("", "is empty"), ("udp", "\"udp\" is not tcp or http:/path"), ("http:healthz", "must start with /"),
        ("tcp interval=2", "\"2\" is not a duration"), ("tcp interval=50ms", "not from 100ms"), ("tcp fall=0", "fall \"0\""),
        ("tcp rise=x", "rise \"x\""), ("tcp timeout=3s", "longer than the interval"), ("tcp speed=1", "\"speed\" is not"),
        ("tcp fall=2 fall=3", "\"fall\" is given twice"), ("tcp port=70000", "port \"70000\""), ("tcp fall", "\"fall\" is not name=value"),
    ])
    func rejects(text: String, mention: String) {
        let error = #expect(throws: AnnotationError.self) { try AnnotationParser.healthCheck(text) }
        #expect(error?.message.contains(mention) == true, "\(error?.message ?? "-")")
    }

    @Test("one namespace checks at most 4 distinct HTTP paths: a 5th is refused (the Service forwarded without checks), a path in use costs nothing, another namespace still can, and a path freed is free again")
    func pathsPerNamespace() {
        func checked(_ i: Int, _ namespace: String, path: String) -> Service {
            var s = service("s\(i)", namespace: namespace, annotations: [EpokAnnotation.externalPorts: "\(1000 + i):\(30000 + i)", EpokAnnotation.healthCheck: "http:\(path)"],
                            nodePorts: [(30000 + i, "TCP")])
            s.metadata.uid = "uid-\(namespace)-\(i)"
            return s
        }
        let live = LiveDesiredState(options: options)
        let greedy = (1...5).map { checked($0, "greedy", path: "/p\($0)") }
        _ = live.replaceAll(ClusterSnapshot(services: greedy + [checked(6, "greedy", path: "/p1"), checked(7, "other", path: "/p5")], nodes: Self.three))
        let refused = live.state.problems.filter { $0.reason == .tooManyEntries }
        #expect(refused.map(\.service) == [greedy[4].ref] && refused[0].message.contains("namespace greedy checks 4 distinct HTTP paths already"), "\(refused)")
        #expect(Set(live.healthViews.map { "\($0.namespace) \($0.target.kind)" }) == ["greedy http:/p1", "greedy http:/p2", "greedy http:/p3", "greedy http:/p4", "other http:/p5"])
        _ = live.remove(greedy[3].ref)
        _ = live.upsert(greedy[4])
        #expect(live.problems(of: greedy[4].ref).isEmpty, "a path freed makes room")
    }

    @Test("a node whose check goes down leaves only that Service's group, with its flows flushed; back up, the shared group again")
    func downAndUp() throws {
        let live = LiveDesiredState(options: options)
        var web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022,53:30053:udp", EpokAnnotation.healthCheck: "tcp fall=1 rise=1"],
                          nodePorts: [(30022, "TCP"), (30053, "UDP")])
        let other = service("other", annotations: [EpokAnnotation.externalPorts: "80:30080"], nodePorts: [(30080, "TCP")])
        _ = live.replaceAll(ClusterSnapshot(services: [web, other], nodes: Self.three))
        _ = live.takeStaleFlows()
        let views = live.healthViews
        #expect(views.count == 3 && views.allSatisfy { $0.target.port == Port(30022)! && $0.fall == 1 })
        let n2 = try #require(views.first { $0.target.address == IPAddress("10.0.1.2") })
        _ = live.health([n2: false])
        let ref = web.ref
        #expect(live.mappings(of: ref).allSatisfy { $0.group?.nodes.map(\.node) == ["n1", "n3"] })
        #expect(live.mappings(of: other.ref).allSatisfy { $0.group == nil })
        let stale = live.takeStaleFlows()
        #expect(Set(stale.map(\.hostPort)) == [Port(22)!, Port(53)!] && stale.allSatisfy { $0.reasons == [.backendsRemoved([IPAddress("10.0.1.2")!])] })
        _ = live.health([n2: true])
        #expect(live.mappings(of: ref).allSatisfy { $0.group == nil })
        // An invalid annotation: forwarded as without checks, with a Warning.
        web.metadata.annotations?[EpokAnnotation.healthCheck] = "tcp fall=zero"
        _ = live.upsert(web)
        #expect(live.problems(of: ref).map(\.reason) == [.invalidHealthCheck])
        #expect(live.healthViews.isEmpty && live.mappings(of: ref).count == 2)
    }

    @Test("port= probes only what the Service exposes: its own node ports or healthCheckNodePort, never another port of the nodes (SSH, the API server, the kubelet)")
    func portLimitedToTheService() throws {
        let live = LiveDesiredState(options: options)
        var web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.healthCheck: "tcp port=30053"],
                          nodePorts: [(30022, "TCP"), (30053, "UDP")])
        _ = live.replaceAll(ClusterSnapshot(services: [web], nodes: Self.three))
        #expect(live.problems(of: web.ref).isEmpty && live.healthViews.allSatisfy { $0.target.port == Port(30053)! } && live.healthViews.count == 3,
                "its own node port")
        for port in [22, 6443, 10250, 30080] {
            web.metadata.annotations?[EpokAnnotation.healthCheck] = "tcp port=\(port)"
            _ = live.upsert(web)
            #expect(live.healthViews.isEmpty, "port=\(port) is probed nowhere")
            #expect(live.problems(of: web.ref).map(\.reason) == [.invalidHealthCheck])
            #expect(live.problems(of: web.ref).first?.message.contains("port=\(port) is not a node port of this Service (its node ports: 30022, 30053)") == true)
            #expect(live.mappings(of: web.ref).count == 1, "forwarded as without checks")
        }
        web.spec.healthCheckNodePort = 32000
        web.metadata.annotations?[EpokAnnotation.healthCheck] = "http:/healthz port=32000"
        _ = live.upsert(web)
        #expect(live.problems(of: web.ref).isEmpty && !live.healthViews.isEmpty, "its healthCheckNodePort")
    }
}

@Suite("kube-proxy's health check for Local Services")
struct KubeProxyHealthTests {
    @Test("a Local Service with healthCheckNodePort is checked with GET /healthz there on every node with an endpoint; a failing node leaves its group")
    func healthCheckNodePort() throws {
        let live = LiveDesiredState(options: options)
        var web = LocalPolicyTests.local("web")
        web.spec.healthCheckNodePort = 32000
        _ = live.replaceAll(ClusterSnapshot(services: [web], nodes: LocalPolicyTests.three,
                                            endpointSlices: [LocalPolicyTests.slice("web", [("n1", true), ("n2", true)])]))
        let views = live.healthViews
        #expect(views.count == 2 && views.allSatisfy { $0.target.port == Port(32000)! && $0.target.kind == .http(path: "/healthz") })
        let n1 = try #require(views.first { $0.target.address == IPAddress("10.0.1.1") })
        _ = live.health([n1: false])
        #expect(live.mappings(of: web.ref)[0].group?.nodes.map(\.node) == ["n2"])
        #expect(live.mappings(of: web.ref)[0].group?.down.map(\.node) == ["n1"])
    }
}

@Suite("Health views follow the Services")
struct HealthViewLifecycleTests {
    @Test("a deleted or set-aside checked Service is no longer probed")
    func views() {
        let live = LiveDesiredState(options: options)
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.healthCheck: "tcp"], nodePorts: [(30022, "TCP")])
        _ = live.replaceAll(ClusterSnapshot(services: [web], nodes: HealthStateTests.three))
        #expect(live.healthViews.count == 3)
        _ = live.setAside(web.ref, because: "refused")
        #expect(live.healthViews.isEmpty)
        _ = live.upsert(service("web", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.healthCheck: "tcp fall=2"], nodePorts: [(30022, "TCP")]))
        #expect(live.healthViews.count == 3)
        _ = live.remove(web.ref)
        #expect(live.healthViews.isEmpty)
    }
}

@Suite("Static egress addresses in the desired state")
struct EgressStateTests {
    static func slice(_ service: String, _ pods: [String]) -> EndpointSlice {
        EndpointSlice(metadata: ObjectMeta(name: "\(service)-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: service]),
                      endpoints: pods.map { EndpointSlice.Endpoint(addresses: [$0]) })
    }

    @Test("each pod of an annotated Service gets a rule per family; a pod two Services select goes to the older; a missing or bad value is a problem")
    func rules() {
        let old = service("old", created: "2023-01-01T00:00:00Z", annotations: [EpokAnnotation.egressIP: "198.51.100.10,2001:db8::10",
                                                                                 EpokAnnotation.egressDestinations: "0.0.0.0/0,2001:db8:9::/48"])
        let new = service("new", annotations: [EpokAnnotation.egressIP: "198.51.100.11", EpokAnnotation.egressDestinations: "192.0.2.0/24"])
        let incomplete = service("incomplete", annotations: [EpokAnnotation.egressIP: "198.51.100.12"])
        let bad = service("bad", annotations: [EpokAnnotation.egressIP: "nope", EpokAnnotation.egressDestinations: "192.0.2.0/24"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [new, old, incomplete, bad], nodes: [], endpointSlices: [
            Self.slice("old", ["10.244.1.5", "fd00:244::5"]), Self.slice("new", ["10.244.1.5", "10.244.2.7"]), Self.slice("incomplete", ["10.244.3.1"]),
        ]), options: options)
        let rules = state.forwarding.egress.map { "\($0.source) \($0.egress) \($0.label!)" }
        #expect(rules == ["10.244.1.5 198.51.100.10 default/old", "10.244.2.7 198.51.100.11 default/new", "fd00:244::5 2001:db8::10 default/old"])
        #expect(Set(state.problems.map(\.reason)) == [.portConflict, .invalidEgress])
        #expect(state.problems.filter { $0.reason == .invalidEgress }.count == 2)
    }

    @Test("a pod moving and a rule changing are element diffs that add up to the full computation")
    func incremental() {
        let live = LiveDesiredState(options: options)
        var app = service("app", annotations: [EpokAnnotation.egressIP: "198.51.100.10", EpokAnnotation.egressDestinations: "192.0.2.0/24,203.0.113.0/24"])
        _ = live.replaceAll(ClusterSnapshot(services: [app], nodes: [], endpointSlices: [Self.slice("app", ["10.244.1.5"])]))
        #expect(live.elements["egress4"]?.count == 2)
        _ = live.takeStaleEgress()
        let moved = live.upsert(Self.slice("app", ["10.244.1.6"]))
        #expect(moved.addedCount == 2 && moved.deletedCount == 2)
        #expect(live.takeStaleEgress() == [StaleEgress(source: IPAddress("10.244.1.5")!, egress: IPAddress("198.51.100.10")!, stillCovered: [])])
        app.metadata.annotations?[EpokAnnotation.egressDestinations] = "192.0.2.0/24"
        _ = live.upsert(app)
        #expect(live.takeStaleEgress() == [StaleEgress(source: IPAddress("10.244.1.6")!, egress: IPAddress("198.51.100.10")!,
                                                       stillCovered: [try! CIDR(parsing: "192.0.2.0/24")])],
                "flows to the destination no longer covered go; those to the one still covered stay")
        let full = ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: options).forwarding)
        #expect(live.elements.filter { !$0.value.isEmpty } == full.filter { !$0.value.isEmpty })
        #expect(live.elements["egress4"]?.count == 1)
    }
}
