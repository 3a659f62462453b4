import Dataplane
import Foundation
import Logging
import Metrics

/// The daemon's reconcile loop. Cluster updates from the watch are queued and coalesced: each batch
/// becomes one element diff and one transaction. A failed transaction leaves the kernel as it was and
/// is retried with backoff (by a full read-back and repair); a periodic read-back repairs drift.
public final class ReconcileLoop: @unchecked Sendable {
    private let firewall: Firewall
    private let conntrack: Conntrack?
    private let events: EventRecorder?
    private let logger: Logger
    private let live: LiveDesiredState
    private let condition = NSCondition()
    private var queue: [ClusterUpdate] = []
    private var ready = false
    private var pendingStale: [StaleFlows] = []
    private var haveSnapshot = false
    private var synchronizedOnce = false
    private let committed = Counter(label: "epokd_transactions_total")
    private let failed = Counter(label: "epokd_transaction_failures_total")
    private let duration = Metrics.Timer(label: "epokd_transaction_duration_seconds")

    /// How long to wait for more updates after the first of a burst.
    public var coalescing: TimeInterval = 0.05
    /// How often the kernel is read back and repaired.
    public var driftInterval: TimeInterval = 60

    public init(firewall: Firewall, conntrack: Conntrack?, events: EventRecorder?, options: ForwardingOptions, logger: Logger) {
        self.firewall = firewall
        self.conntrack = conntrack
        self.events = events
        self.logger = logger
        live = LiveDesiredState(options: options)
    }

    /// Whether the first complete cluster state has been committed.
    public var isReady: Bool { condition.withLock { ready } }

    /// Queues an update (from any thread).
    public func submit(_ update: ClusterUpdate) {
        condition.withLock {
            queue.append(update)
            condition.signal()
        }
    }

    /// Runs until `stop`, on the calling thread. Nothing is committed before the first snapshot arrives.
    public func run(until stop: StopSignal) {
        var backoff = Backoff()
        var retryAt: Date?
        var lastRepair = Date()
        while !stop.isStopped {
            condition.withLock {
                let wakeAt = retryAt ?? lastRepair.addingTimeInterval(driftInterval)
                while queue.isEmpty && !stop.isStopped && Date() < wakeAt {
                    _ = condition.wait(until: min(wakeAt, Date().addingTimeInterval(0.2)))
                }
            }
            if stop.isStopped { return }
            // Let a burst arrive, then take all of it.
            if coalescing > 0 { _ = stop.wait(seconds: coalescing) }
            let updates: [ClusterUpdate] = condition.withLock {
                defer { queue.removeAll() }
                return queue
            }
            let repair = retryAt.map { Date() >= $0 } ?? false || Date().timeIntervalSince(lastRepair) >= driftInterval
            do {
                try apply(updates, repair: repair)
                if repair { lastRepair = Date() }
                retryAt = nil
                backoff.reset()
            } catch {
                let delay = backoff.next()
                retryAt = Date().addingTimeInterval(delay)
                logger.error("\(error); the kernel keeps its previous state; retrying in \(String(format: "%.1f", delay)) s")
            }
        }
    }

    /// Applies a batch of updates as one transaction, then deletes the conntrack entries it made stale.
    /// With `repair` (or when the kernel's state is unknown) the table is read back and repaired first.
    /// Does nothing before the first snapshot. On failure the kernel keeps its previous state.
    @discardableResult
    public func apply(_ updates: [ClusterUpdate], repair: Bool = false) throws(NetlinkError) -> Firewall.Outcome {
        var diff = ElementDiff()
        var touched: [Service] = []
        for update in updates {
            let change: ElementDiff
            switch update {
            case .snapshot(let snapshot):
                haveSnapshot = true
                change = live.replaceAll(snapshot)
                touched += snapshot.services
            case .serviceChanged(let s):
                change = live.upsert(s)
                touched.append(s)
            case .serviceDeleted(let ref): change = live.remove(ref)
            case .nodeChanged(let n): change = live.upsert(n)
            case .nodeDeleted(let name): change = live.remove(node: name)
            }
            diff.merge(change)
        }
        pendingStale += live.takeStaleFlows()
        guard haveSnapshot else { return Firewall.Outcome(rebuilt: false, added: 0, deleted: 0) }
        let outcome: Firewall.Outcome
        let started = DispatchTime.now()
        do {
            outcome = repair || firewall.applied == nil ? try firewall.synchronize(live.elements) : try firewall.apply(diff: diff)
        } catch {
            failed.increment()
            throw error
        }
        if !synchronizedOnce {
            // Whatever changed while epokd was not running (a node that left, a port that moved) left stale
            // flows too: the table epokd found says what the kernel forwarded before.
            synchronizedOnce = true
            if let before = firewall.foundInKernel {
                pendingStale += StaleFlows.between(ForwardingRuleset.forwarding(from: before), live.state.forwarding)
            }
        }
        if outcome.changed {
            committed.increment()
            duration.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds))
            for (set, elements) in live.elements { Gauge(label: "epokd_elements", dimensions: [("set", set)]).record(elements.count) }
            let what = outcome.rebuilt ? "created table \(firewall.skeleton.table.name) with \(outcome.added) elements"
                : "+\(outcome.added) -\(outcome.deleted) elements"
            let names = Array(Set(touched.map(\.ref.description))).sorted()
            let who = names.isEmpty ? "" : ": " + names.prefix(3).joined(separator: ", ") + (names.count > 3 ? " and \(names.count - 3) more" : "")
            logger.info("applied: \(what) (\(updates.count) updates\(who); \(live.nodeCount) nodes\(repair ? "; read back from the kernel" : ""))")
        }
        condition.withLock { ready = true }
        report(touched)
        flushStale()
        return outcome
    }

    private func report(_ services: [Service]) {
        for service in services {
            let held = live.mappings(of: service.ref)
            if !held.isEmpty {
                let ports = held.map { "\($0.hostPort)/\($0.proto) -> node port \($0.nodePort)" }.joined(separator: ", ")
                events?.record(.normal, reason: "Mapped", message: "epokd forwards \(ports) to \(live.nodeCount) nodes", service: service)
            }
            for problem in live.problems(of: service.ref) {
                Counter(label: "epokd_rejected_total", dimensions: [("reason", problem.reason.rawValue)]).increment()
                logger.warning("rejected: \(problem)", metadata: ["reason": "\(problem.reason.rawValue)"])
                events?.record(.warning, reason: problem.reason.rawValue, message: problem.message, service: service)
            }
        }
    }

    private func flushStale() {
        guard let conntrack, !pendingStale.isEmpty else { return }
        do {
            let deleted = try conntrack.delete(pendingStale)
            if deleted > 0 { logger.info("flushed \(deleted) stale conntrack entries") }
            pendingStale = []
        } catch {
            logger.warning("could not flush stale conntrack entries, will retry: \(error)")
        }
    }
}
