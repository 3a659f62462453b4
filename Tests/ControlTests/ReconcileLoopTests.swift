import Control
import Dataplane
import Foundation
import Logging
import NetnsLab
import Testing

/// The reconcile loop against nftables and conntrack in memory: no root, no namespace, milliseconds.
@Suite("Unprivileged: the reconcile loop against an in-memory kernel")
struct ReconcileLoopTests {
    let kernel = ModelKernel()
    let flows = RecordingFlowRemover()
    let skeleton = ForwardingRuleset.skeleton()
    let web = service("web", annotations: [EpokAnnotation.externalPorts: "80:30022"])
    let nodes = [node("n1", addresses: ["10.0.1.1"]), node("n2", addresses: ["10.0.1.2"])]

    func loop() -> ReconcileLoop {
        ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: kernel), conntrack: flows, events: nil, options: options,
                      logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
    }

    func held(_ set: String) throws -> Set<Element> { try #require(try kernel.read(skeleton)).elements[set] ?? [] }

    @Test("nothing is committed before the first snapshot; then the table is created whole, in one transaction")
    func firstSnapshot() throws {
        let loop = loop()
        try loop.apply([.serviceChanged(web)])
        #expect(kernel.commits == 0 && !loop.isReady)
        let outcome = try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        #expect(outcome.rebuilt && kernel.commits == 1 && loop.isReady)
        #expect(try held("services").map(\.comment) == ["default/web"])
        #expect(try held("backends4").count == 60)
    }

    @Test("one Service change is one small transaction; a node leaving rewrites the slots and asks for its flows to be flushed")
    func incremental() throws {
        let loop = loop()
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        var moved = web
        moved.metadata.annotations?[EpokAnnotation.externalPorts] = "81:30022"
        let change = try loop.apply([.serviceChanged(moved)])
        #expect(change == Firewall.Outcome(rebuilt: false, added: 1, deleted: 1) && kernel.commits == 2)
        let leave = try loop.apply([.nodeChanged(node("n2", ready: false, addresses: ["10.0.1.2"]))])
        #expect(leave == Firewall.Outcome(rebuilt: false, added: 30, deleted: 30))
        #expect(Set(try held("backends4").compactMap { $0.value?.first?.description }) == ["10.0.1.1"])
        #expect(flows.deletions.last?.first?.reasons == [.backendsRemoved([IPAddress("10.0.1.2")!])])
    }

    @Test("a Service that needs an idle chain brings it in with its elements, in one transaction that reads nothing back, and takes it away again when it no longer does")
    func idleChainsFollowTheState() throws {
        let firewall = Firewall(skeleton: skeleton, nftables: kernel)
        let loop = ReconcileLoop(firewall: firewall, conntrack: flows, events: nil, options: options,
                                 logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        func chains() -> Set<String> { Set(firewall.skeleton.chains.map(\.name)) }
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        #expect(!chains().contains("guard") && !chains().contains("egress") && chains().contains("nat_prerouting"))
        var restricted = web
        restricted.metadata.annotations?[EpokAnnotation.allowRange] = "192.168.0.0/16"
        let commits = kernel.commits, reads = kernel.reads
        let outcome = try loop.apply([.serviceChanged(restricted)])
        #expect(outcome.chainsReplaced && !outcome.rebuilt && kernel.commits == commits + 1, "\(outcome)")
        #expect(kernel.reads == reads, "the state is known: the table is not read back for a change of chains")
        #expect(try kernel.read(firewall.skeleton)?.matches(firewall.skeleton) == true, "the kernel holds the new chains")
        #expect(chains().contains("guard"))
        #expect(try held("restricted").count == 1 && held("services").map(\.comment) == ["default/web"])
        let back = try loop.apply([.serviceChanged(web)])
        #expect(back.chainsReplaced && !chains().contains("guard") && kernel.commits == commits + 2, "\(back)")
        #expect(try kernel.read(firewall.skeleton)?.matches(firewall.skeleton) == true)
        #expect(try held("restricted").isEmpty)
    }

    @Test("a failed commit leaves the kernel as it was, is reported, and the next attempt reads back and repairs")
    func failureAndRetry() throws {
        let loop = loop()
        loop.readinessGrace = 0
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        let before = try held("services")
        kernel.failNextCommit = NetlinkError(code: ENOMEM, operation: "commit transaction")
        var moved = web
        moved.metadata.annotations?[EpokAnnotation.externalPorts] = "81:30022"
        #expect(throws: NetlinkError.self) { try loop.apply([.serviceChanged(moved)]) }
        #expect(try held("services") == before, "all or nothing")
        #expect(loop.failure?.code == ENOMEM && loop.notReadyReason?.contains("ENOMEM") == true)
        try loop.apply([], repair: true)
        #expect(try held("services").map(\.key) == [[.l4proto(.tcp), .port(Port(81)!)]])
        #expect(loop.failure == nil && loop.notReadyReason == nil)
    }

    @Test("an element deleted by hand is put back by the read-back, and only it")
    func driftRepair() throws {
        let loop = loop()
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        let slot = try #require(try held("backends4").first)
        kernel.removeByHand(slot, from: "backends4")
        let outcome = try loop.apply([], repair: true)
        #expect(outcome == Firewall.Outcome(rebuilt: false, added: 1, deleted: 0))
        #expect(try held("backends4").contains(slot))
    }

    @Test("a Service the kernel refuses is set aside and the others commit in the same cycle; it is retried when it changes")
    func setAside() throws {
        let loop = loop()
        kernel.refuse = { set, element in set == "services" && element.comment == "default/bad" }
        let bad = service("bad", annotations: [EpokAnnotation.externalPorts: "23:30022"])
        try loop.apply([.snapshot(ClusterSnapshot(services: [web, bad], nodes: nodes))])
        #expect(Array(loop.servicesSetAside.keys) == [bad.ref])
        #expect(try held("services").map(\.comment) == ["default/web"])
        #expect(kernel.refusals == 1, "the refused batch was not sent again unchanged")
        kernel.refuse = { _, _ in false }
        var fixed = bad
        fixed.metadata.annotations?["note"] = "fixed"
        try loop.apply([.serviceChanged(fixed)])
        #expect(loop.servicesSetAside.isEmpty)
        #expect(Set(try held("services").compactMap(\.comment)) == ["default/web", "default/bad"])
    }

    @Test("a table of that name that is not epokd's is an error, and never touched")
    func foreignTable() throws {
        var foreign = Transaction()
        foreign.append(.addTable(Table(name: "epok"), comment: "made by hand"))
        try kernel.commit(foreign)
        let loop = loop()
        let error = #expect(throws: NetlinkError.self) { try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))]) }
        #expect(error?.description.contains("exists and is not epokd's") == true)
        #expect(try kernel.read(skeleton)?.owner == "made by hand")
    }
}

@Suite("Unprivileged: when the reconcile loop takes a batch")
struct CoalescingTests {
    @Test("an idle loop commits a change at once; within the interval after a commit, the rest of the interval is waited, never more")
    func coalescingWait() {
        let now = Date(timeIntervalSince1970: 1_000)
        func wait(_ sinceCommit: TimeInterval?, _ interval: TimeInterval = 0.05) -> TimeInterval {
            ReconcileLoop.coalescingWait(lastCommit: sinceCommit.map { now.addingTimeInterval(-$0) }, now: now, interval: interval)
        }
        #expect(wait(nil) == 0, "the first change after a start")
        #expect(wait(1) == 0 && wait(0.05) == 0, "idle: at once")
        // (Dates are seconds in a Double: equal to a microsecond.)
        #expect(abs(wait(0.01) - 0.04) < 1e-6, "a change 10 ms after a commit waits the 40 ms left")
        #expect(abs(wait(0) - 0.05) < 1e-6)
        #expect(abs(wait(-10) - 0.05) < 1e-6, "a clock set back waits one interval, not ten seconds")
        #expect(wait(0.01, 0) == 0, "no interval (a file source): never")
    }
}

@Suite("Unprivileged: what the reconcile loop tells an operator")
struct ReconcileReportTests {
    let logs = CapturedLogs()
    /// A loop without Events, logging to `logs`, on a model kernel (each test has its own).
    let loop: ReconcileLoop

    init() {
        loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: ModelKernel()), conntrack: nil,
                             events: nil, options: options, logger: logs.logger)
    }

    @Test("a problem is logged once per change, not again on every relist")
    func problemsOncePerChange() throws {
        var typo = service("typo", annotations: [EpokAnnotation.externalPorts: "22:30022:tpc"])
        let snapshot = { ClusterSnapshot(services: [typo], nodes: [node("n1", addresses: ["10.0.1.1"]), node("lo", addresses: ["127.0.0.1"])]) }
        for _ in 0..<3 { try loop.apply([.snapshot(snapshot())]) }
        func rejected() -> [String] { logs.all.filter { $0.contains("rejected:") } }
        #expect(rejected().filter { $0.contains("Service default/typo") }.count == 1, "\(rejected())")
        #expect(rejected().filter { $0.contains("Node lo") }.count == 2, "its two problems, once each: \(rejected())")
        typo.metadata.annotations?[EpokAnnotation.externalPorts] = "22:30022:tcpp"
        try loop.apply([.serviceChanged(typo)])
        #expect(rejected().filter { $0.contains("Service default/typo") }.count == 2, "a new problem is told")
    }

    @Test("a problem mended and made again is told again, also while nothing else has one (no Service is visited then)")
    func mendedAndMadeAgain() throws {
        let broken = service("typo", annotations: [EpokAnnotation.externalPorts: "22:30022:tpc"])
        var mended = broken
        mended.metadata.annotations?[EpokAnnotation.externalPorts] = "22:30022:tcp"
        let nodes = [node("n1", addresses: ["10.0.1.1"])]
        func told() -> Int { logs.all.filter { $0.contains("rejected:") && $0.contains("Service default/typo") }.count }
        try loop.apply([.snapshot(ClusterSnapshot(services: [broken], nodes: nodes))])
        #expect(told() == 1)
        try loop.apply([.serviceChanged(mended)])
        try loop.apply([.snapshot(ClusterSnapshot(services: [mended], nodes: nodes))])
        #expect(told() == 1)
        try loop.apply([.serviceChanged(broken)])
        #expect(told() == 2, "the same problem, back: \(logs.all)")
    }
}

@Suite("Unprivileged: kernel refusals of the newer features' elements")
struct NewerRefusalTests {
    let kernel = ModelKernel()

    @Test("an egress or LoadBalancer element the kernel refuses sets its Service aside; every other Service commits in the same cycle")
    func refusedElementsHaveOwners() throws {
        let firewallOptions = ForwardingOptions(interfaces: ["eth0"], firewallInterfaces: ["eth0"])
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: kernel), conntrack: RecordingFlowRemover(),
                                 events: nil, options: firewallOptions, logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        let app = service("app", annotations: [EpokAnnotation.egressIP: "198.51.100.10", EpokAnnotation.egressDestinations: "192.0.2.0/24"])
        let lb = loadBalancer("lb", ips: ["203.0.113.10"], ports: [(443, "TCP")])
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        let slice = EndpointSlice(metadata: ObjectMeta(name: "app-x", namespace: "default", labels: [EndpointSlice.serviceNameLabel: "app"]),
                                  endpoints: [EndpointSlice.Endpoint(addresses: ["10.244.1.5"])])
        kernel.refuse = { set, element in set == "egress4" || (set == "lb4" && element.comment == "default/lb") }
        try loop.apply([.snapshot(ClusterSnapshot(services: [app, lb, web], nodes: [node("n1", addresses: ["10.0.1.1"])], endpointSlices: [slice]))])
        #expect(Set(loop.servicesSetAside.keys) == [app.ref, lb.ref])
        let held = try #require(try kernel.read(ForwardingRuleset.skeleton())).elements
        #expect(held["services"]?.map(\.comment) == ["default/web"])
        #expect(held["egress4"]?.isEmpty == true && held["lb4"]?.isEmpty == true)
    }

    @Test("a bridge or StaticEgressIP element the kernel refuses sets that resource aside, named in the log; the others commit; a change retries it")
    func refusedResourceElements() throws {
        let loop = ReconcileLoop(firewall: Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: kernel), conntrack: RecordingFlowRemover(),
                                 events: nil, options: options, logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        var bridge = externalService("db", target: "198.51.100.2", sources: [("app", "198.51.100.9")])
        let eip = staticEgressIP("eip", rules: [("198.51.100.10", "app", "192.0.2.0/24")])
        kernel.refuse = { set, _ in set == "bridge_out4" }
        try loop.apply([.snapshot(ClusterSnapshot(services: [webService("app")], endpointSlices: [webSlice("app", ready: ["10.244.1.5"])],
                                                  staticEgressIPs: [eip], externalServices: [bridge]))])
        var held = try #require(try kernel.read(ForwardingRuleset.skeleton())).elements
        #expect(held["bridge_out4"]?.isEmpty == true && held["bridge_in4"]?.isEmpty == true, "the whole bridge is set aside, not half of it")
        #expect(held["egress4"]?.count == 1, "the StaticEgressIP commits in the same cycle")
        #expect(loop.servicesSetAside.isEmpty)
        kernel.refuse = { _, _ in false }
        bridge.spec?.ports = [.init(protocol: "TCP", port: 7001, targetPort: 7001)]
        try loop.apply([.externalServices(.upserted(bridge))])
        held = try #require(try kernel.read(ForwardingRuleset.skeleton())).elements
        #expect(held["bridge_out4"]?.count == 1 && held["bridge_in4"]?.count == Int(Bridge.slots), "changed, it is tried again")
    }
}
