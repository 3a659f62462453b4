@testable import Control
import Dataplane
import Foundation
import Logging
import Synchronization
import NetnsLab
import Testing

/// The kernel, whose compared reads (the drift check's) wait, while `holding`, until the test lets them go.
final class HeldReadKernel: NftablesKernel, @unchecked Sendable {
    let kernel: Nftables
    private let lock = NSLock()
    private var holding = true
    private(set) var comparedReads = 0
    /// Signalled when a compared read starts waiting.
    let waiting = DispatchSemaphore(value: 0)
    private let released = DispatchSemaphore(value: 0)

    init(_ kernel: Nftables) { self.kernel = kernel }

    var isHolding: Bool { lock.withLock { holding } }
    var reads: Int { lock.withLock { comparedReads } }

    /// Lets the waiting read go, and every later one.
    func release() {
        lock.withLock { holding = false }
        released.signal()
    }

    func commit(_ transaction: Transaction) throws(NetlinkError) { try kernel.commit(transaction) }
    func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError) { try kernel.commit(transaction, atGeneration: generation) }
    func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError] { try kernel.check(transaction) }
    func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable? { try kernel.read(skeleton) }
    func generation() throws(NetlinkError) -> UInt32 { try kernel.generation() }

    func read(_ skeleton: Skeleton, comparedWith expected: TableElements, attempts: Int) throws(NetlinkError) -> KernelTable? {
        if isHolding {
            waiting.signal()
            released.wait()
        }
        defer { lock.withLock { comparedReads += 1 } }
        return try kernel.read(skeleton, comparedWith: expected, attempts: attempts)
    }
}

@Suite("The drift check beside the loop: it never holds up a change, and drift it finds is repaired")
struct DriftCheckTests {
    let quiet = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    let nodes = [node("n1", addresses: ["10.0.1.1"]), node("n2", addresses: ["10.0.1.2"])]

    /// The checker's read of `firewall`'s table compared with `applied`, waited for.
    func read(_ checker: DriftChecker, _ firewall: Firewall, applied: TableElements) throws -> DriftChecker.Finding {
        let done = DispatchSemaphore(value: 0)
        let result = Mutex<DriftChecker.Finding?>(nil)
        try checker.check(firewall.skeleton, applied: applied) { found in
            result.withLock { $0 = found }
            done.signal()
        }
        done.wait()
        return try #require(result.withLock { $0 })
    }

    @Test("judged with the loop's own commits since it asked: clean; another program's commit makes it stale; a change by hand is drift")
    func verdicts() throws {
        let ns = try NetworkNamespace("drift")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: ns.path))
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options, logger: quiet)
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        try loop.apply([.snapshot(ClusterSnapshot(services: [web], nodes: nodes))])
        let checker = DriftChecker(kernel: try Nftables(namespacePath: ns.path))
        defer { checker.stop() }
        var asked = ReconcileLoop.PendingCheck(generation: try firewall.generation(), applied: try #require(firewall.applied))
        func verdict(_ check: ReconcileLoop.PendingCheck? = nil) throws -> ReconcileLoop.Verdict {
            ReconcileLoop.judge(try read(checker, firewall, applied: asked.applied), check ?? asked, skeleton: firewall.skeleton)
        }
        #expect(try verdict() == .clean)

        // The loop's own commit after it asked: allowed for, with its diff.
        let before = try #require(firewall.applied)
        var moved = web
        moved.metadata.annotations?[EpokAnnotation.externalPorts] = "81:30022"
        try loop.apply([.serviceChanged(moved)])
        let made = ElementDiff(from: before, to: try #require(firewall.applied))
        #expect(!made.isEmpty)
        asked.commits.append((try firewall.generation(), made))
        #expect(try verdict() == .clean)
        // Without its diff, or without the commit, the read cannot be judged: stale.
        var unknown = asked
        unknown.commits[0].diff = nil
        #expect(try verdict(unknown) == .stale)
        var missing = asked
        missing.commits = []
        #expect(try verdict(missing) == .stale)
        // With a diff that is not what was committed: drift.
        var wrong = asked
        wrong.commits[0].diff = ElementDiff()
        wrong.commits[0].diff?.added = made.deleted
        #expect(try verdict(wrong) == .drifted)

        // Another program's commit (another table): stale.
        var other = Transaction()
        other.append(.addTable(Table(name: "elsewhere"), comment: "someone else"))
        try nft.commit(other)
        #expect(try verdict() == .stale)

        // Asked afresh; then an element of the table deleted by hand: drift.
        asked = ReconcileLoop.PendingCheck(generation: try firewall.generation(), applied: try #require(firewall.applied))
        #expect(try verdict() == .clean)
        let element = try #require(try nft.elements(of: ForwardingRuleset.servicesSet, in: firewall.skeleton.table).first)
        var byHand = Transaction()
        byHand.append(.deleteElements(firewall.skeleton.table, ForwardingRuleset.servicesSet, [element]))
        try nft.commit(byHand)
        asked.generation = try firewall.generation()
        #expect(try verdict() == .drifted)
    }

    @Test("a change is committed while the drift check's read is still going, and allowed for when the read comes back; drift is repaired")
    func changeDuringCheck() throws {
        let ns = try NetworkNamespace("drift")
        // The loop's socket is the loop's: the test reads and writes the kernel on a socket of its own.
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: ns.path))
        let loop = ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options, logger: quiet)
        loop.driftInterval = 0.01
        let held = HeldReadKernel(try Nftables(namespacePath: ns.path))
        loop.checkDrift(with: held)
        let stop = StopSignal()
        let finished = DispatchSemaphore(value: 0)
        Thread {
            loop.run(until: stop)
            finished.signal()
        }.start()
        defer {
            held.release()
            stop.stop()
            loop.wake()
            finished.wait()
        }
        let web = service("web", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        loop.submit(.snapshot(ClusterSnapshot(services: [web], nodes: nodes)))
        #expect(held.waiting.wait(timeout: .now() + 30) == .success, "no drift check started")
        #expect(loop.isReady)

        func ports() throws -> Set<Dataplane.Port> {
            Set(try nft.elements(of: ForwardingRuleset.servicesSet, in: firewall.skeleton.table).compactMap {
                if case .port(let p)? = $0.key.last { p } else { nil }
            })
        }
        var moved = web
        moved.metadata.annotations?[EpokAnnotation.externalPorts] = "81:30022"
        loop.submit(.serviceChanged(moved))
        let deadline = Date().addingTimeInterval(30)
        while try ports() != [Dataplane.Port(81)!] && Date() < deadline { usleep(1_000) }
        #expect(try ports() == [Dataplane.Port(81)!], "the change waited for the drift check")
        #expect(held.isHolding && held.reads == 0, "the drift check's read was let go before the change was in")

        // Let the check go: the change came before its read and is allowed for; the checks go on.
        held.release()
        while held.reads < 2 && Date() < deadline { usleep(1_000) }
        #expect(held.reads >= 2)
        // An element deleted by hand: the next check finds it, the loop puts it back.
        let element = try #require(try nft.elements(of: ForwardingRuleset.servicesSet, in: firewall.skeleton.table).first)
        var byHand = Transaction()
        byHand.append(.deleteElements(firewall.skeleton.table, ForwardingRuleset.servicesSet, [element]))
        try nft.commit(byHand)
        #expect(try ports().isEmpty)
        while try ports() != [Dataplane.Port(81)!] && Date() < deadline { usleep(1_000) }
        #expect(try ports() == [Dataplane.Port(81)!], "the drift was not repaired")
    }
}
