import Control
import Dataplane
import FakeKube
import Foundation
import Logging
import NetnsLab
import Testing

/// The kernel, except that it refuses (with EEXIST, naming the element, as the kernel does) every element
/// `refuse` picks: a way to prove the safety net for refusals that epokd's own validation cannot produce.
final class RefusingKernel: NftablesKernel {
    let kernel: Nftables
    let refuse: @Sendable (String, Element) -> Bool
    /// Transactions the kernel was asked to commit and refused, described by their operations.
    private(set) var refusedCommits: [String] = []
    /// Whether `refuse` applies (off: the plain kernel).
    var active = true

    init(_ kernel: Nftables, refuse: @escaping @Sendable (String, Element) -> Bool) {
        self.kernel = kernel
        self.refuse = refuse
    }

    private func refusal(_ operation: Transaction.Operation) -> NetlinkError? {
        guard active, case .addElements(_, let set, let elements) = operation, let bad = elements.first(where: { refuse(set.name, $0) }) else { return nil }
        var error = NetlinkError(code: EEXIST, operation: "commit transaction", subject: "set \(set.name): add element \(bad) rejected")
        error.rejected = [RejectedElement(set: set.name, element: bad)]
        return error
    }

    func commit(_ transaction: Transaction) throws(NetlinkError) {
        if let error = transaction.operations.lazy.compactMap(refusal).first {
            refusedCommits.append(transaction.operations.map { "\($0)" }.joined(separator: "; "))
            throw error
        }
        try kernel.commit(transaction)
    }

    func generation() throws(NetlinkError) -> UInt32 { try kernel.generation() }

    func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError) {
        guard try kernel.generation() == generation else { throw NetlinkError(code: ERESTART, operation: "commit transaction") }
        try commit(transaction)
    }

    func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError] {
        var passed = Transaction()
        var refused: [NetlinkError] = []
        for operation in transaction.operations {
            if let error = refusal(operation) { refused.append(error) } else { passed.append(operation) }
        }
        return refused + (try kernel.check(passed))
    }

    func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable? { try kernel.read(skeleton) }
}

private func services(_ kernel: KernelTable?) -> Set<String> {
    Set((kernel?.elements["services"] ?? []).compactMap(\.comment))
}

@Suite("One Service never stops the others")
struct IsolationTests {
    @Test("a Service whose element the kernel refuses is set aside; the rest commits in the same cycle and follows node changes")
    func setAside() throws {
        let ns = try NetworkNamespace("aside")
        let nft = try Nftables(namespacePath: ns.path)
        let kernel = RefusingKernel(nft) { set, element in set == "services" && element.key.last == .port(Port(23)!) }
        let skeleton = ForwardingRuleset.skeleton()
        let loop = ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: kernel), conntrack: nil, events: nil,
                                 options: options, logger: Logger(label: "test"))
        let good = service("good", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let bad = service("bad", annotations: [EpokAnnotation.externalPorts: "23:30022"])
        let nodes = (1...2).map { node("n\($0)", addresses: ["10.0.1.\($0)"]) }

        try loop.apply([.snapshot(ClusterSnapshot(services: [good, bad], nodes: nodes))])
        #expect(kernel.refusedCommits.count == 1, "the refused batch is not sent again unchanged: \(kernel.refusedCommits)")
        #expect(Array(loop.servicesSetAside.keys) == [bad.ref])
        #expect(loop.servicesSetAside[bad.ref]?.contains("EEXIST") == true)
        let held = services(try nft.read(skeleton))
        #expect(held == ["default/good"])
        #expect(loop.notReadyReason == nil, "the kernel holds everything that can be held")

        // The others keep following the cluster: a node goes NotReady.
        try loop.apply([.nodeChanged(node("n2", ready: false, addresses: ["10.0.1.2"]))])
        let backends = Set(try #require(try nft.read(skeleton)).elements["backends4"]!.compactMap { $0.value?.first?.description })
        #expect(backends == ["10.0.1.1"])
        #expect(kernel.refusedCommits.count == 1, "a set-aside Service is not retried until it changes")

        // The Service changes: it gets another chance, and this time the kernel takes it.
        var fixed = bad
        fixed.metadata.annotations?[EpokAnnotation.externalPorts] = "24:30022"
        try loop.apply([.serviceChanged(fixed)])
        #expect(loop.servicesSetAside.isEmpty)
        let after = services(try nft.read(skeleton))
        #expect(after == ["default/good", "default/bad"])
    }

    @Test("500 nodes all receive traffic: the slots grow with the node count (the table rebuilt once), and shrink back")
    func manyNodes() throws {
        let ns = try NetworkNamespace("slots")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: nft)
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options, logger: Logger(label: "test"))
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let many = (1...500).map { node(String(format: "n%03d", $0), addresses: ["10.1.\($0 / 250).\($0 % 250 + 1)"]) }
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: many))])
        let slots = ForwardingRuleset.slots(forNodes: 500)
        #expect(slots == 1020)
        let backends = try #require(try nft.read(firewall.skeleton)).elements["backends4"]!
        #expect(backends.count == Int(slots))
        let share = Dictionary(grouping: backends, by: { $0.value! }).mapValues(\.count)
        #expect(share.count == 500, "every node has a slot")
        #expect(share.values.max()! * 2 <= share.values.min()! * 3, "no node gets more than 1.5 times another's share")
        #expect(try ns.nftList("inet", "epok").contains("dnat ip to numgen inc mod 1020 map @backends4"), "the rule's modulus follows")
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: Array(many.prefix(3))))])
        #expect(try #require(try nft.read(firewall.skeleton)).elements["backends4"]!.count == 60)
        #expect(try ns.nftList("inet", "epok").contains("dnat ip to numgen inc mod 60 map @backends4"))
    }

    @Test("/readyz says why while the kernel refuses what no Service explains")
    func notReadyWhileDiverged() throws {
        let ns = try NetworkNamespace("diverge")
        let nft = try Nftables(namespacePath: ns.path)
        let kernel = RefusingKernel(nft) { set, _ in set == "backends4" }
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: kernel), conntrack: nil, events: nil,
                                 options: options, logger: Logger(label: "test"))
        loop.readinessGrace = 0
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        kernel.active = false
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: [node("n1", addresses: ["10.0.1.1"])]))])
        #expect(loop.notReadyReason == nil)
        kernel.active = true
        #expect(throws: NetlinkError.self) { try loop.apply([.nodeChanged(node("n2", addresses: ["10.0.1.2"]))]) }
        #expect(loop.servicesSetAside.isEmpty, "a node's element is no Service's fault")
        #expect(loop.failure?.code == EEXIST)
        let reason = try #require(loop.notReadyReason)
        #expect(reason.contains("the kernel has differed from the desired state") && reason.contains("EEXIST"), "\(reason)")
        kernel.active = false
        try loop.apply([], repair: true)
        #expect(loop.notReadyReason == nil && loop.failure == nil, "ready again once the kernel took it")
    }

    @Test("a node going NotReady is committed while the events endpoint takes 30 s to answer")
    func eventsOffTheHotPath() throws {
        let ns = try NetworkNamespace("events")
        let api = try FakeAPIServer()
        try api.control("slow-writes resource=events seconds=30")
        let recorder = EventRecorder(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        defer { recorder.shutdown() }
        let nft = try Nftables(namespacePath: ns.path)
        let skeleton = ForwardingRuleset.skeleton()
        let loop = ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: nft), conntrack: nil, events: recorder,
                                 options: options, logger: Logger(label: "test"))
        let typo = service("typo", annotations: [EpokAnnotation.externalPorts: "22:"])
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        try loop.apply([.snapshot(ClusterSnapshot(services: [typo, web], nodes: [node("n1", addresses: ["10.0.1.1"]), node("n2", addresses: ["10.0.1.2"])]))])
        try loop.apply([.nodeChanged(node("n2", ready: false, addresses: ["10.0.1.2"]))])
        let backends = Set(try #require(try nft.read(skeleton)).elements["backends4"]!.compactMap { $0.value?.first?.description })
        #expect(backends == ["10.0.1.1"], "the node change is in the kernel")
        #expect(recorder.posted == 0, "while the first Event is still being posted: the loop did not wait for it")
    }

    @Test("kernel fuzz: hostile Services and Nodes, as snapshots and events; every valid Service's elements are in the kernel after every step")
    func kernelFuzz() throws {
        let ns = try NetworkNamespace("fuzz")
        let nft = try Nftables(namespacePath: ns.path)
        let skeleton = ForwardingRuleset.skeleton()
        let loop = ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: nft), conntrack: nil, events: nil,
                                 options: options, logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
        var rng = SeededGenerator()
        var grammar = HostileGrammar()
        var services: [ServiceRef: Service] = [:]
        var nodes: [String: Node] = [:]
        for step in 0..<120 {
            var updates: [ClusterUpdate] = []
            if step == 0 || Int.random(in: 0..<10, using: &rng) == 0 {
                services = Dictionary((0..<Int.random(in: 0...25, using: &rng)).map { _ in grammar.service(&rng) }.map { ($0.ref, $0) }, uniquingKeysWith: { $1 })
                nodes = Dictionary((1...Int.random(in: 1...5, using: &rng)).map { grammar.hostileNode($0, &rng) }.map { ($0.metadata.name, $0) }, uniquingKeysWith: { $1 })
                updates.append(.snapshot(ClusterSnapshot(services: Array(services.values), nodes: Array(nodes.values))))
            } else {
                for _ in 0..<Int.random(in: 1...6, using: &rng) {
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0..<6:
                        let s = grammar.service(&rng)
                        services[s.ref] = s
                        updates.append(.serviceChanged(s))
                    case 6..<8:
                        guard let ref = services.keys.randomElement(using: &rng) else { continue }
                        services[ref] = nil
                        updates.append(.serviceDeleted(ref))
                    default:
                        let n = grammar.hostileNode(Int.random(in: 1...5, using: &rng), &rng)
                        nodes[n.metadata.name] = n
                        updates.append(.nodeChanged(n))
                    }
                }
            }
            do {
                try loop.apply(updates)
            } catch {
                Issue.record("\(rng) step \(step): the commit failed: \(error)")
                return
            }
            let expected = ForwardingRuleset.elements(for: DesiredState(snapshot: ClusterSnapshot(services: Array(services.values), nodes: Array(nodes.values)),
                                                                        options: options).forwarding)
            let held = try #require(try nft.read(skeleton)).elements
            #expect(loop.servicesSetAside.isEmpty, "\(rng) step \(step): the kernel refused \(loop.servicesSetAside)")
            guard held == expected else {
                let diff = ElementDiff(from: held, to: expected)
                Issue.record("\(rng) step \(step): the kernel differs from the desired state: missing \(diff.added), extra \(diff.deleted)")
                return
            }
        }
    }

    @Test("one Service with nested allow-ranges beside another: the other's traffic flows and follows a node going NotReady")
    func nestedRangesBesideAnother() throws {
        let h = try Harness()
        let guarded = service("guarded", annotations: [EpokAnnotation.externalPorts: "80:30080",
                                                       EpokAnnotation.allowRange: "198.51.100.0/24,198.51.100.0/25,198.51.100.2/32,10.0.0.0/8,10.1.0.0/16"],
                              nodePorts: [(30080, "TCP")], sourceRanges: ["198.51.100.0/26"])
        try h.apply([sshAndDNS, guarded])
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22)) == ["n1:30022", "n2:30022", "n3:30022"])
        #expect(try h.tcpAnswers(1, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 80).first?.hasSuffix(":30080") == true)
        h.nodes[1] = node("n2", ready: false, addresses: [ForwardingLab.node4(2), ForwardingLab.node6(2)])
        try h.apply([sshAndDNS, guarded])
        #expect(Set(try h.tcpAnswers(6, from: h.lab.external, to: ForwardingLab.hostExternal4, port: 22)) == ["n1:30022", "n3:30022"])
    }
}

/// Random Services and Nodes, hostile where epokd must cope: overlapping and nested ranges in both families,
/// host bits, huge and duplicate port lists, conflicting claims, long names, odd bytes, odd timestamps and addresses.
struct HostileGrammar {
    mutating func service(_ rng: inout SeededGenerator) -> Service {
        let names = ["web", "dns", String(repeating: "é", count: 70), "ns\nforged log line", "a\u{0}b", String(repeating: "x", count: 300), "🙂"]
        let name = names.randomElement(using: &rng)! + "\(Int.random(in: 0..<6, using: &rng))"
        let ports = (0..<Int.random(in: 1...4, using: &rng)).map { _ in (Int.random(in: 30000...30010, using: &rng), Bool.random(using: &rng) ? "TCP" : "UDP") }
        var entries: [String] = []
        switch Int.random(in: 0..<12, using: &rng) {
        case 0: entries = (1...1001).map { "\($0):30000" }                                  // over the per-Service limit
        case 1: entries = ["22:30000", "22:30000"]                                          // duplicate
        case 2: entries = ["x:y", "70000:30000", ""]                                        // malformed
        default:
            for (nodePort, proto) in ports.prefix(Int.random(in: 1...ports.count, using: &rng)) {
                entries.append("\(Int.random(in: 20...40, using: &rng)):\(Bool.random(using: &rng) ? nodePort : 31999):\(proto.lowercased())")
            }
        }
        var annotations: StringMap = [EpokAnnotation.externalPorts: entries.joined(separator: ",")]
        let ranges = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/8", "0.0.0.0/0", "192.168.0.0/25", "192.168.0.128/25",
                      "2001:db8::/32", "2001:db8:1::/48", "::/0", "fd00::1/64", "10.0.0.0/33", "junk"]
        if Bool.random(using: &rng) {
            annotations[EpokAnnotation.allowRange] = (0..<Int.random(in: 1...6, using: &rng)).map { _ in ranges.randomElement(using: &rng)! }.joined(separator: ",")
        }
        if Int.random(in: 0..<4, using: &rng) == 0 { annotations[EpokAnnotation.internal] = "" }
        let created = ["2024-01-01T00:00:00Z", "2023-06-01T12:00:00+02:00", "0", "", "garbage", "2024-01-01T00:00:00.123456Z"].randomElement(using: &rng)!
        var s = Control.Service(metadata: ObjectMeta(name: name, namespace: ["default", "prod"].randomElement(using: &rng)!, uid: name,
                                                     creationTimestamp: created, annotations: annotations),
                                spec: Control.Service.Spec(type: "NodePort", ports: ports.enumerated().map {
                                    Control.Service.Port(protocol: $0.element.1, port: 1000 + $0.offset, nodePort: $0.element.0)
                                }))
        if Int.random(in: 0..<5, using: &rng) == 0 {
            s.spec.loadBalancerSourceRanges = (0..<Int.random(in: 1...3, using: &rng)).map { _ in ranges.randomElement(using: &rng)! }
        }
        return s
    }

    mutating func hostileNode(_ index: Int, _ rng: inout SeededGenerator) -> Node {
        let addresses = ["10.0.1.\(index)", "fd00::\(index)", "127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.1", "fe80::1", "::1", "not-an-ip"]
        return node("n\(index)", ready: Int.random(in: 0..<4, using: &rng) != 0,
                            addresses: (0..<Int.random(in: 0...3, using: &rng)).map { _ in addresses.randomElement(using: &rng)! })
    }
}

/// Keeps every log message, for tests that check what an operator is told.
final class CapturedLogs: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    var all: [String] { lock.withLock { lines } }
    func append(_ line: String) { lock.withLock { lines.append(line) } }

    var logger: Logger {
        Logger(label: "captured") { _ in Handler(sink: self) }
    }

    struct Handler: LogHandler {
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            sink.append("\(event.level) \(event.message)")
        }
    }
}

@Suite("Host ports that hide the host's own sockets")
struct ShadowedListenerTests {
    @Test("a Service claiming a port the host listens on (TCP and UDP) is warned about once, naming the process")
    func warnsOnce() throws {
        let ns = try NetworkNamespace("shadow")
        let tcp = try openSocket(in: ns, family: AF_INET, type: Int32(SOCK_STREAM.rawValue))
        let udp = try openSocket(in: ns, family: AF_INET6, type: Int32(SOCK_DGRAM.rawValue))
        let local = try openSocket(in: ns, family: AF_INET, type: Int32(SOCK_STREAM.rawValue))
        defer { [tcp, udp, local].forEach { close($0) } }
        #expect(SocketAddress("0.0.0.0", port: 2222).withPointer { bind(tcp, $0, $1) } == 0 && listen(tcp, 4) == 0)
        #expect(SocketAddress("::", port: 5353).withPointer { bind(udp, $0, $1) } == 0)
        #expect(SocketAddress("127.0.0.1", port: 8080).withPointer { bind(local, $0, $1) } == 0 && listen(local, 4) == 0)

        let found = try ListeningSockets.read(namespacePath: ns.path)
        #expect(found.contains { $0.proto == .tcp && $0.port == Port(2222)! && $0.isReachable })
        #expect(found.contains { $0.proto == .udp && $0.port == Port(5353)! })
        #expect(found.contains { $0.port == Port(8080)! && !$0.isReachable }, "bound to loopback: not reachable from outside")
        let owner = try #require(found.first { $0.port == Port(2222)! }.flatMap { ListeningSockets.owner(ofInode: $0.inode) })
        #expect(!owner.isEmpty)

        let logs = CapturedLogs()
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: ns.path)),
                                 conntrack: nil, events: nil, options: options, logger: logs.logger)
        loop.listeners = { () throws(NetlinkError) in try ListeningSockets.read(namespacePath: ns.path) }
        let git = service("gitea", namespace: "git", annotations: [EpokAnnotation.externalPorts: "2222:30022,53:30053:udp,5353:30053:udp,8080:30022"],
                          nodePorts: [(30022, "TCP"), (30053, "UDP")])
        let snapshot = ClusterSnapshot(services: [git], nodes: [node("n1", addresses: ["10.0.1.1"])])
        try loop.apply([.snapshot(snapshot)])
        try loop.apply([.snapshot(snapshot)])
        let warnings = logs.all.filter { $0.contains("listens there") }
        #expect(warnings.count == 2, "\(warnings)")
        #expect(warnings.contains { $0.contains("Service git/gitea claims 2222/tcp on eth0,wg0; \(owner) on this host listens there") })
        #expect(warnings.contains { $0.contains("5353/udp") })
    }
}
