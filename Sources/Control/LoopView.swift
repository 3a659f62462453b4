import Dataplane
import Foundation

/// What the daemon knows beyond the kernel's table, as its status page shows it: every Node with its state in
/// words, the problems of the desired state, the last warnings, and when the table was last committed.
public struct LoopView: Sendable, Encodable {
    /// A Node as the page shows it.
    public struct NodeView: Sendable, Encodable, Equatable {
        public var name: String
        public var addresses: [String]
        /// `ready`, `not ready`, `excluded`, `draining` or `no address`.
        public var state: String
    }

    /// A problem of the desired state, or a warning as it was logged.
    public struct Warning: Sendable, Encodable, Equatable {
        /// When it was logged (nil for a problem that stands).
        public var time: Date?
        public var object: String
        public var reason: String
        public var message: String
    }

    public var nodes: [NodeView] = []
    /// The problems that stand now (the first `LoopView.shownProblems`), and how many there are in all.
    public var problems: [Warning] = []
    public var problemCount = 0
    /// The last `LoopView.keptWarnings` warnings logged (and posted as Events, with an API server), newest last.
    public var warnings: [Warning] = []
    /// When the kernel last acknowledged a commit (or a batch that changed nothing).
    public var lastCommit: Date?
    /// This router's role among several (`--ha-address`), nil when it is the only one.
    public var role: HighAvailability.View?

    public static let shownProblems = 200
    public static let keptWarnings = 20

    public init() {}
}
