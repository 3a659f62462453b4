import Dataplane
import Logging

/// Turns cluster snapshots into committed kernel state: desired state, element diff, one transaction.
public final class Reconciler {
    /// What one reconcile did.
    public struct Report: Sendable {
        public var state: DesiredState
        public var outcome: Firewall.Outcome
    }

    public let options: ForwardingOptions
    private let firewall: Firewall
    private let conntrack: Conntrack?
    private let logger: Logger
    private var reported: Set<Problem> = []
    /// The forwarding whose stale conntrack entries have all been deleted; nil before the first commit.
    private var flushedUpTo: ForwardingState?
    /// The last committed forwarding.
    private var committed: ForwardingState?

    /// Whether stale conntrack entries are still to be deleted after a failed attempt.
    public var conntrackFlushPending: Bool { conntrack != nil && flushedUpTo != committed }

    /// `conntrack` nil leaves tracked connections alone (for plans and tests of the ruleset alone).
    public init(firewall: Firewall, conntrack: Conntrack?, options: ForwardingOptions, logger: Logger) {
        self.firewall = firewall
        self.conntrack = conntrack
        self.options = options
        self.logger = logger
    }

    /// Computes the desired state of `snapshot` and commits the difference. Problems are logged once each;
    /// a failed commit leaves the kernel as it was and is thrown for the caller to retry.
    @discardableResult
    public func reconcile(_ snapshot: ClusterSnapshot) throws(NetlinkError) -> Report {
        let state = DesiredState(snapshot: snapshot, options: options)
        let problems = Set(state.problems)
        for problem in state.problems where !reported.contains(problem) {
            logger.warning("rejected: \(problem)", metadata: ["reason": "\(problem.reason.rawValue)"])
        }
        reported = problems
        let outcome = try firewall.apply(ForwardingRuleset.elements(for: state.forwarding))
        if outcome.changed {
            let what = outcome.rebuilt ? "created table \(firewall.skeleton.table.name) with \(outcome.added) elements" : "+\(outcome.added) -\(outcome.deleted) elements"
            logger.info("applied: \(what) (\(state.ports.count) ports -> \(state.nodes.count) nodes)")
        }
        committed = state.forwarding
        flushStaleConnections(after: state.forwarding)
        return Report(state: state, outcome: outcome)
    }

    /// Retries a conntrack flush that failed, without recomputing anything else.
    public func retryConntrackFlush() {
        if let committed, conntrackFlushPending { flushStaleConnections(after: committed) }
    }

    /// Deletes the conntrack entries that the committed change made wrong. A failure is logged and
    /// retried with the next reconcile (the stale set is recomputed from the last fully flushed state).
    private func flushStaleConnections(after current: ForwardingState) {
        guard let conntrack else { return }
        guard let before = flushedUpTo else {
            flushedUpTo = current
            return
        }
        let stale = StaleFlows.between(before, current)
        do {
            let deleted = try conntrack.delete(stale)
            if deleted > 0 {
                logger.info("flushed \(deleted) stale conntrack entries (\(stale.count) changed mappings)")
            }
            flushedUpTo = current
        } catch {
            logger.warning("could not flush stale conntrack entries, will retry: \(error)")
        }
    }

    /// What reconciling `snapshot` would change in the kernel, without changing it.
    public func plan(_ snapshot: ClusterSnapshot) throws(NetlinkError) -> (state: DesiredState, diff: ElementDiff?) {
        let state = DesiredState(snapshot: snapshot, options: options)
        return (state, try firewall.plan(ForwardingRuleset.elements(for: state.forwarding)))
    }
}
