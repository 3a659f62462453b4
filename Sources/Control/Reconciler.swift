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
    private let logger: Logger
    private var reported: Set<Problem> = []

    public init(firewall: Firewall, options: ForwardingOptions, logger: Logger) {
        self.firewall = firewall
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
        return Report(state: state, outcome: outcome)
    }

    /// What reconciling `snapshot` would change in the kernel, without changing it.
    public func plan(_ snapshot: ClusterSnapshot) throws(NetlinkError) -> (state: DesiredState, diff: ElementDiff?) {
        let state = DesiredState(snapshot: snapshot, options: options)
        return (state, try firewall.plan(ForwardingRuleset.elements(for: state.forwarding)))
    }
}
