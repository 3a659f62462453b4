import Dataplane
import Foundation
import Logging
import Metrics
import OrderedCollections
import Synchronization

/// The daemon's reconcile loop. Cluster updates from the watch are queued and coalesced: each batch
/// becomes one element diff and one transaction. A failed transaction leaves the kernel as it was and
/// is retried with backoff (by a full read-back and repair); a periodic read-back repairs drift.
public final class ReconcileLoop: @unchecked Sendable {
    private let firewall: Firewall
    /// Flushes stale flows beside the loop while `run` runs (and on the caller's thread for `apply`).
    private let flusher: StaleFlusher?
    /// Whether `run` is running (the loop's thread only).
    private var running = false
    private let events: EventRecorder?
    private let logger: Logger
    private let live: LiveDesiredState
    private let condition = NSCondition()
    private var queue: [ClusterUpdate] = []
    /// When each queued update arrived (uptime nanoseconds), in queue order.
    private var arrivals: [UInt64] = []
    /// The status page asked for a fresh view (guarded by `condition`).
    private var viewWanted = false
    private var ready = false
    private var pendingStale: [StaleFlows] = []
    private var pendingStaleEgress: [StaleEgress] = []
    private var haveSnapshot = false
    private var synchronizedOnce = false
    /// Since when the kernel has differed from the desired state (a commit failed and no later one succeeded).
    private var divergedSince: Date?
    private var lastFailure: NetlinkError?
    /// The problems last reported per Service and for the Nodes, so that a relist does not report them again.
    private var reported: OrderedDictionary<ServiceRef, Int> = [:]
    /// What was reported of a Service, kept as its hash (a value per Service would double the memory held).
    private struct Reported: Hashable {
        var problems: [Problem]
        var mappings: [Mapping]
    }
    private var reportedNodeProblems: [Problem] = []
    private var reportedResources: [ObjectRef: [Problem]] = [:]

    /// Adds the egress and bridge addresses the held rules need to an interface, and removes them when no
    /// longer needed (`--manage-addresses`); without it, an address the host would not receive replies for is
    /// warned about.
    public var addresses: ManagedAddresses?
    /// This router's role among several (`--ha-address`): a standby router holds none of the managed
    /// addresses. Nil: this router is the only one.
    public var highAvailability: HighAvailability?
    /// Called on the loop's thread when this router's role changed.
    public var onRoleChange: (@Sendable () -> Void)?
    /// Whether the host receives packets for an address (see `ManagedAddresses.isLocal`).
    public var isLocal: ((IPAddress) throws(NetlinkError) -> Bool)?
    /// The addresses last made (nil before the first commit, so that addresses left by an earlier run are
    /// removed once even when nothing is needed).
    private var addressesHeld: Set<IPAddress>?
    private var addressesWarned: Set<IPAddress> = []
    /// Addresses another host on the `--manage-addresses` interface answers for, with that interface.
    private var answeredElsewhere: [IPAddress: String] = [:]
    private var reportedDraining: Set<String> = []
    private let committed = Counter(label: "epokd_transactions_total")
    private let failed = Counter(label: "epokd_transaction_failures_total")
    private let duration = Metrics.Timer(label: "epokd_transaction_duration_seconds")
    /// From a watch event's (or a file change's) arrival to the kernel's acknowledgement of its commit.
    private let programming = Metrics.Timer(label: "epokd_network_programming_duration_seconds")
    /// From the change in the cluster (a Service's latest managedFields time, an EndpointSlice's
    /// last-change-trigger-time) to the kernel's acknowledgement, as kube-proxy measures it.
    private let programmingSinceChange = Metrics.Timer(label: "epokd_network_programming_since_change_seconds")
    private let skeletonBlocked = Gauge(label: "epokd_skeleton_blocked")
    /// Commits made against a read-back of the table (the first, and every drift repair).
    private let readBacks = Counter(label: "epokd_read_backs_total")
    /// The skeleton change last refused while the elements went in (logged once until it changes).
    private var reportedBlock: NetlinkError?

    /// The router's DNS names (`--dns-hosts`): written after every batch that changes them; nil without it.
    public var dnsHosts: HostsFile?
    private let dns = DNSNames()
    private var reportedDNS: [ObjectRef: [Problem]] = [:]

    /// Keeps the health views of checked Services up to date; given the views after a batch that changed them.
    public var prober: HealthProber?
    private var proberGeneration = -1

    /// Reads the host's listening sockets (see `ListeningSockets`), to warn when a Service's host port hides one.
    public var listeners: (() throws(NetlinkError) -> [Listener])?
    /// Host ports where the host listens, with the Service holding each that was warned about.
    private var shadowChecked: [PortKey: ServiceRef] = [:]

    /// What the desired state is made from (see `SnapshotFile.stamp`): recorded with the first full sync if it has
    /// no problem at all, so that a later `--once` with the same stamp finds nothing to do while nobody commits.
    public var stamp: String?

    /// The shortest time between two commits while changes keep coming (a change that finds the loop idle is
    /// committed at once; see `coalescingWait`).
    public var coalescing: TimeInterval = 0.02
    /// Called on the loop's thread after each batch of updates is applied or fails (for a caller waiting for a commit).
    public var onApplied: (@Sendable () -> Void)?
    /// Called on the loop's thread after a commit made against a read-back (the first, a repair) or of a whole
    /// snapshot (a relist, a changed file): the moment the largest transient allocations (a snapshot, a
    /// read-back, a whole-table transaction) have just been freed.
    public var onBulkCommit: (@Sendable () -> Void)?
    /// How often the kernel is read back and repaired.
    public var driftInterval: TimeInterval = 60
    /// Reads the kernel back beside the loop for the periodic drift check (see `checkDrift(with:)`).
    private var driftChecker: DriftChecker?
    /// What the drift checker last found, until the loop takes it (guarded by `condition`).
    private var driftFinding: DriftChecker.Finding?
    /// How long no commit must have been made for a drift check to start (a table changing under a read cannot be
    /// read whole). A check that such a commit, or another program's, made stale is made again at the next such
    /// moment a second later at the earliest (or as long as it took, if longer). A check not done `checkPatience`
    /// past its time is done by the loop itself, on its own thread (a change then waits for that read).
    static let quietBeforeCheck: TimeInterval = 0.1
    static let checkPatience: TimeInterval = 60
    /// The element diff the last commit made, when it was one (not a read-back, nor a change of chains).
    private var committedDiff: ElementDiff?

    /// A drift check asked for: what the loop had committed then, and its own commits since, each with the
    /// generation read right after it (its own commits are allowed for when the check's read comes back).
    struct PendingCheck {
        var generation: UInt32
        var applied: TableElements
        var asked = Date()
        var commits: [(generation: UInt32?, diff: ElementDiff?)] = []
    }

    /// What a drift check's read says, once the loop's own commits before it are allowed for.
    enum Verdict: Equatable {
        case clean, stale, drifted, failed
    }

    /// Judges a drift check's read: the generations between the one the check was asked at and the read's must all
    /// be the loop's own commits, each a plain element diff (else the read is stale); the kernel must then hold
    /// what the loop had committed with those diffs applied (else it drifted).
    static func judge(_ finding: DriftChecker.Finding, _ asked: PendingCheck, skeleton: Skeleton) -> Verdict {
        switch finding {
        case .failed: return .failed
        case .unsettled: return .stale
        case .read(let table, let generation):
            let span = Int(generation &- asked.generation)
            let before = asked.commits.filter { commit in commit.generation.map { Int($0 &- asked.generation) <= span } ?? true }
            guard before.count == span, before.allSatisfy({ $0.generation != nil && $0.diff != nil }) else { return .stale }
            var made = ElementDiff()
            for commit in before { made.merge(commit.diff!) }
            return Firewall.holds(table, asked.applied, after: made, skeleton: skeleton) ? .clean : .drifted
        }
    }

    /// Makes the periodic drift check on a thread of its own, with `kernel` (a socket of its own to the same
    /// namespace), so that it never holds up a change: only drift it finds is repaired on the loop's thread.
    /// Without it, every check is a read-back on the loop's thread.
    public func checkDrift(with kernel: any NftablesKernel) {
        driftChecker = DriftChecker(kernel: kernel)
    }

    public init(firewall: Firewall, conntrack: (any StaleFlowRemover)?, events: EventRecorder?, options: ForwardingOptions, logger: Logger) {
        self.firewall = firewall
        flusher = conntrack.map { StaleFlusher(remover: $0, interval: 0.25, logger: logger) }
        self.events = events
        self.logger = logger
        live = LiveDesiredState(options: options)
        hostAddresses = options.hostAddresses
    }

    /// How long the kernel may differ from the desired state before `/readyz` says so.
    public var readinessGrace: TimeInterval = 5

    /// Whether the first complete cluster state has been committed.
    public var isReady: Bool { condition.withLock { ready } }

    /// Why epokd is not ready (nothing committed yet, or the kernel has differed from the desired state for
    /// longer than `readinessGrace`), or nil when it is.
    public var notReadyReason: String? {
        condition.withLock {
            guard ready else { return "waiting for the first complete sync" }
            if let since = divergedSince, Date().timeIntervalSince(since) >= readinessGrace, let lastFailure {
                return "the kernel has differed from the desired state for \(Int(Date().timeIntervalSince(since))) s: \(lastFailure)"
            }
            return nil
        }
    }

    /// Everything refused, set aside or left out for an error in the desired state, advisories aside (the
    /// Nodes' first, then the Services', the other resources' and the DNS names'). Read it while `run` is not
    /// running (after it returned, or from the thread that calls `apply`).
    public var problems: [Problem] {
        guard live.hasProblems || !reportedDNS.isEmpty else { return [] }
        return (live.problems + reportedDNS.keys.sorted().flatMap { reportedDNS[$0]! }).filter { !$0.isAdvisory }
    }

    /// The host's addresses the desired state was computed with (read when the loop was made).
    public let hostAddresses: Set<IPAddress>

    /// The last commit failure that isolation could not resolve, while the kernel differs from the desired state.
    public var failure: NetlinkError? { condition.withLock { divergedSince == nil ? nil : lastFailure } }

    /// Services whose elements the kernel refused, set aside until they change, with the reason (as of the last
    /// batch: the state itself belongs to the loop's thread).
    public var servicesSetAside: [ServiceRef: String] { setAsideShown.withLock { $0 } }
    private let setAsideShown = Mutex<[ServiceRef: String]>([:])

    /// What the status page shows beyond the table, as of its last refresh: while someone asks for it, the loop
    /// refreshes it after every batch (its cost is the Nodes and the troubled objects, never the whole state), and
    /// when it is a second old, at once.
    /// A view a second old or more is refreshed first: this waits up to `patience` for the loop to do it (it may be
    /// in a commit), and returns the last view otherwise.
    public func currentView(patience: TimeInterval = 0.25) -> LoopView {
        let asked = Date()
        let stale = viewShown.withLock { shown in
            shown.asked = asked
            return shown.refreshed.map { asked.timeIntervalSince($0) >= 1 } ?? true
        }
        if stale {
            condition.withLock { viewWanted = true; condition.broadcast() }
            viewRefreshed.withLock {
                let deadline = asked.addingTimeInterval(patience)
                while viewShown.withLock({ $0.refreshed.map { $0 < asked } ?? true }) && viewRefreshed.wait(until: deadline) {}
            }
        }
        return viewShown.withLock { $0.view }
    }
    /// Signalled when the view was refreshed.
    private let viewRefreshed = NSCondition()
    private let viewShown = Mutex<(view: LoopView, refreshed: Date?, asked: Date?)>((LoopView(), nil, nil))
    /// The last warnings logged, newest last (the loop's thread only).
    private var recentWarnings: [LoopView.Warning] = []
    private var lastCommitted: Date?

    private func refreshView() {
        var view = LoopView()
        view.nodes = live.nodeViews
        let all = problems
        view.problemCount = all.count
        view.problems = all.prefix(LoopView.shownProblems).map { LoopView.Warning(time: nil, object: $0.object, reason: $0.reason.rawValue, message: $0.message) }
        view.warnings = recentWarnings
        view.lastCommit = lastCommitted
        view.role = highAvailability?.view
        viewShown.withLock { $0.view = view; $0.refreshed = Date() }
        viewRefreshed.withLock { viewRefreshed.broadcast() }
    }

    /// Whether the view was asked for in the last 30 s.
    private var viewWatched: Bool {
        viewShown.withLock { shown in shown.asked.map { Date().timeIntervalSince($0) < 30 } ?? false }
    }

    private func noteWarning(_ problem: Problem) {
        recentWarnings.append(LoopView.Warning(time: Date(), object: problem.object, reason: problem.reason.rawValue, message: problem.message))
        if recentWarnings.count > LoopView.keptWarnings { recentWarnings.removeFirst(recentWarnings.count - LoopView.keptWarnings) }
    }

    /// Queues an update (from any thread).
    public func submit(_ update: ClusterUpdate) {
        let now = DispatchTime.now().uptimeNanoseconds
        condition.withLock {
            queue.append(update)
            arrivals.append(now)
            condition.signal()
        }
    }

    /// Wakes `run` at once (after `stop` was signalled, so that it returns without waiting out its poll).
    public func wake() {
        condition.withLock { condition.broadcast() }
    }

    /// How long a batch waits before it is taken: nothing when the last commit ended `interval` ago or more (an
    /// idle loop commits a change at once), otherwise the rest of that interval, so that changes coming faster
    /// than that are taken together (at most one commit per interval under load).
    public static func coalescingWait(lastCommit: Date?, now: Date, interval: TimeInterval) -> TimeInterval {
        guard let lastCommit, interval > 0 else { return 0 }
        return max(0, min(interval, lastCommit.addingTimeInterval(interval).timeIntervalSince(now)))
    }

    /// Runs until `stop`, on the calling thread. Nothing is committed before the first snapshot arrives.
    public func run(until stop: StopSignal) {
        running = true
        defer {
            running = false
            flusher?.stop()
            driftChecker?.stop()
        }
        var lastCommit: Date?
        var waiting: [UInt64] = []
        var changes: [Double] = []
        var backoff = Backoff()
        var retryAt: Date?
        var lastRepair = Date()
        var pending: PendingCheck?
        var checkerRefused = false
        // When a check made stale may be made again.
        var checkAgainAt = Date.distantPast
        while !stop.isStopped {
            let viewOnly: Bool = condition.withLock {
                let due = lastRepair.addingTimeInterval(driftInterval)
                let quiet = max(due, checkAgainAt, (lastCommit ?? .distantPast).addingTimeInterval(Self.quietBeforeCheck))
                let wakeAt = retryAt ?? (pending != nil ? .distantFuture : min(quiet, due.addingTimeInterval(Self.checkPatience)))
                while queue.isEmpty && !viewWanted && driftFinding == nil && !stop.isStopped && Date() < wakeAt {
                    _ = condition.wait(until: min(wakeAt, Date().addingTimeInterval(0.2)))
                }
                defer { viewWanted = false }
                return queue.isEmpty && viewWanted && driftFinding == nil && Date() < wakeAt
            }
            if stop.isStopped { return }
            if viewOnly {
                if haveSnapshot { refreshView() }
                continue
            }
            // The drift check: made beside the loop when it can be; only drift found is repaired here.
            var repair = retryAt.map { Date() >= $0 } ?? false
            if let finding = condition.withLock({ () -> DriftChecker.Finding? in defer { driftFinding = nil }; return driftFinding }),
               let asked = pending {
                pending = nil
                let verdict = Self.judge(finding, asked, skeleton: firewall.skeleton)
                Counter(label: "epokd_drift_checks_total", dimensions: [("result", "\(verdict)")]).increment()
                switch verdict {
                case .clean: lastRepair = Date()
                case .stale: checkAgainAt = Date().addingTimeInterval(max(1, Date().timeIntervalSince(asked.asked)))
                case .drifted, .failed: repair = true
                }
            }
            let overdue = Date().timeIntervalSince(lastRepair) - driftInterval
            if !repair, pending == nil, overdue >= 0 {
                let quiet = Date() >= checkAgainAt && lastCommit.map { Date().timeIntervalSince($0) >= Self.quietBeforeCheck } ?? true
                if !quiet && overdue < Self.checkPatience && driftChecker != nil {
                    // Changes are coming (or a check was just made stale): the check waits for a moment without them.
                } else if let checker = driftChecker, overdue < Self.checkPatience, haveSnapshot, retryAt == nil,
                          let applied = firewall.applied, let generation = try? firewall.generation() {
                    do {
                        try checker.check(firewall.skeleton, applied: applied) { [weak self] finding in
                            guard let self else { return }
                            condition.withLock {
                                driftFinding = finding
                                condition.signal()
                            }
                        }
                        pending = PendingCheck(generation: generation, applied: applied)
                        checkerRefused = false
                    } catch {
                        // No thread for the check: the loop reads the table back itself, as without a checker (said
                        // once, until a check has its thread again).
                        if !checkerRefused { logger.warning("the drift check reads the table on the reconcile loop: \(error)") }
                        checkerRefused = true
                        repair = true
                    }
                } else {
                    repair = true
                }
            }
            if !repair && condition.withLock({ queue.isEmpty }) { continue }
            let wait = Self.coalescingWait(lastCommit: lastCommit, now: Date(), interval: coalescing)
            if wait > 0 { _ = stop.wait(seconds: wait) }
            var (updates, arrived): ([ClusterUpdate], [UInt64]) = condition.withLock {
                defer {
                    queue.removeAll()
                    arrivals.removeAll()
                }
                return (queue, arrivals)
            }
            // From each update's arrival to the kernel's acknowledgement of the commit that holds it (an update
            // that changed nothing too: it was programmed as soon as that). Before the first snapshot, and after a
            // failed commit, the updates count until the next commit that succeeds.
            waiting += arrived
            changes += updates.compactMap(\.changedAt)
            do {
                committedDiff = nil
                let outcome = try apply(taking: &updates, repair: repair)
                // A commit while a drift check is out: its generation and diff, for the check to allow for.
                if pending != nil, outcome.changed {
                    pending?.commits.append((try? firewall.generation(), repair ? nil : committedDiff))
                }
                lastCommit = Date()
                lastCommitted = lastCommit
                if haveSnapshot {
                    let acknowledged = DispatchTime.now().uptimeNanoseconds
                    for time in waiting { programming.recordNanoseconds(Int64(acknowledged &- time)) }
                    waiting.removeAll()
                    // A clock behind the API server's would make a change seem to come from the future: not counted.
                    let now = Date().timeIntervalSince1970
                    for time in changes where time <= now { programmingSinceChange.recordNanoseconds(Int64((now - time) * 1e9)) }
                    changes.removeAll()
                }
                if repair { lastRepair = Date() }
                retryAt = nil
                backoff.reset()
            } catch {
                lastCommit = Date()
                let delay = backoff.next()
                retryAt = Date().addingTimeInterval(delay)
                logger.error("\(error); the kernel keeps its previous state; retrying in \(String(format: "%.1f", delay)) s")
            }
            if viewWatched { refreshView() }
            onApplied?()
        }
    }

    /// Who held what in the table epokd finds, given to the state before its first snapshot so that a restart keeps
    /// each LoadBalancer IP with its Service (its `lb4`/`lb6` element's label) and each source address with its
    /// namespace (the labels of the egress and bridge-exit elements that SNAT to it). Nothing without a table.
    private func heldAtStart() {
        let lb = [EdgeFirewall.Sets.admitted4.name, EdgeFirewall.Sets.admitted6.name]
        let sources = EgressSNAT.Sets.all.map(\.name) + [Bridge.Sets.exits4.name, Bridge.Sets.exits6.name]
        guard let found = try? firewall.held(Set(lb + sources)) else { return }
        func address(_ field: Field?) -> IPAddress? {
            switch field {
            case .ipv4(let a)?: .v4(a)
            case .ipv6(let a)?: .v6(a)
            default: nil
            }
        }
        /// The Service a label names (`namespace/name`, after the kind if there is one).
        func service(_ label: String?) -> ServiceRef? {
            guard let ref = label?.split(separator: " ").last, let slash = ref.firstIndex(of: "/") else { return nil }
            return ServiceRef(namespace: String(ref[..<slash]), name: String(ref[ref.index(after: slash)...]))
        }
        var loadBalancers: [IPAddress: ServiceRef] = [:], namespaces: [IPAddress: String] = [:]
        for element in lb.flatMap({ found[$0] ?? [] }) {
            if let ip = address(element.key.first), let ref = service(element.comment) { loadBalancers[ip] = ref }
        }
        for element in sources.flatMap({ found[$0] ?? [] }) {
            if let ip = address(element.value?.first), let ref = service(element.comment) { namespaces[ip] = ref.namespace }
        }
        live.holdAtStart(loadBalancers: loadBalancers, sources: namespaces)
    }

    /// Applies a batch of updates as one transaction, then deletes the conntrack entries it made stale.
    /// With `repair` (or when the kernel's state is unknown) the table is read back and repaired first.
    /// Does nothing before the first snapshot. On failure the kernel keeps its previous state.
    @discardableResult
    public func apply(_ updates: [ClusterUpdate], repair: Bool = false) throws(NetlinkError) -> Firewall.Outcome {
        var batch = updates
        return try apply(taking: &batch, repair: repair)
    }

    /// `apply(_:repair:)`, emptying `updates` once they are folded into the state: a snapshot's objects are not
    /// held through the commit (at 50k Services, its array alone is 10 MB).
    private func apply(taking updates: inout [ClusterUpdate], repair: Bool) throws(NetlinkError) -> Firewall.Outcome {
        defer { setAsideShown.withLock { $0 = live.servicesSetAside } }
        var diff = ElementDiff()
        var touched = Touched()
        let updateCount = updates.count
        // Each update is taken out of the batch as it is applied, so that a snapshot's only copy is the one given
        // to the state, which lets go of its Services early.
        updates.reverse()
        while let update = updates.popLast() {
            let change: ElementDiff
            switch consume update {
            case .snapshot(let snapshot):
                if dnsHosts != nil { dns.replaceAll(services: snapshot.services, ingresses: snapshot.ingresses) }
                if !haveSnapshot { heldAtStart() }
                haveSnapshot = true
                touched = Touched(everyService: true)
                change = live.replaceAll(snapshot)
                reported = reported.filter { live.service($0.key) != nil }
            case .serviceChanged(let s):
                if dnsHosts != nil { dns.upsert(s) }
                change = live.upsert(s)
                touched.append(s.ref)
            case .serviceDeleted(let ref):
                dns.remove(ref)
                change = live.remove(ref)
                reported.removeUnordered(forKey: ref)
            case .nodeChanged(let n): change = live.upsert(n)
            case .nodeDeleted(let name): change = live.remove(node: name)
            case .endpointSlices(let slices): change = live.replaceEndpointSlices(slices)
            case .endpointSliceChanged(let slice): change = live.upsert(slice)
            case .endpointSliceDeleted(let key): change = live.remove(endpointSlice: key)
            case .staticEgressIPs(.listed(let all)): change = live.replaceResources(staticEgressIPs: all, externalServices: nil)
            case .staticEgressIPs(.upserted(let resource)): change = live.upsert(resource)
            case .staticEgressIPs(.deleted(let resource)): change = live.remove(resource.ref)
            case .externalServices(.listed(let all)): change = live.replaceResources(staticEgressIPs: nil, externalServices: all)
            case .externalServices(.upserted(let resource)): change = live.upsert(resource)
            case .externalServices(.deleted(let resource)): change = live.remove(resource.ref)
            case .referenceGrants(.listed(let all)): change = live.replaceReferenceGrants(all)
            case .referenceGrants(.upserted(let grant)): change = live.upsert(grant)
            case .referenceGrants(.deleted(let grant)): change = live.remove(referenceGrant: grant.key)
            case .ingresses(let event):
                switch event {
                case .listed(let all): dns.replaceAll(ingresses: all)
                case .upserted(let ingress): dns.upsert(ingress)
                case .deleted(let ingress): dns.remove(ingress.ref)
                }
                change = ElementDiff()
            case .hostAddresses(let addresses):
                let before = live.options.hostAddresses
                change = live.setHostAddresses(addresses)
                if addresses != before {
                    let gained = addresses.subtracting(before).map(\.description).sorted(), lost = before.subtracting(addresses).map(\.description).sorted()
                    logger.notice("the host's addresses changed\(gained.isEmpty ? "" : ": + " + gained.joined(separator: ", "))\(lost.isEmpty ? "" : "; - " + lost.joined(separator: ", ")); they are never backends nor a tenant's")
                }
                if let ha = highAvailability, ha.follow(hostAddresses: addresses) {
                    logger.notice("this router is now \(ha.describe(hostAddresses: addresses)): \(Self.duties(active: ha.isActive))")
                    onRoleChange?()
                }
            case .backendHealth(let changes):
                change = live.health(changes)
                reportHealth(changes)
            }
            diff.merge(change)
        }
        if let prober, live.healthViewsGeneration != proberGeneration {
            proberGeneration = live.healthViewsGeneration
            prober.watch(live.healthViews)
        }
        guard haveSnapshot else {
            pendingStale += live.takeStaleFlows()
            pendingStaleEgress += live.takeStaleEgress()
            return Firewall.Outcome(rebuilt: false, added: 0, deleted: 0)
        }
        let started = DispatchTime.now()
        let current = ForwardingRuleset.parameters(of: firewall.skeleton)
        var wanted = current
        wanted.slots = live.slots
        wanted.perSourceLimits = live.perSourceLimits
        wanted.idleChains = ForwardingRuleset.idleChains(in: live.elements)
        if wanted != current {
            // More (or fewer) nodes than the slots serve well, or a per-source rate appeared or went: a rule
            // changes, so epokd's chains and sets are rebuilt in one transaction (the operator's chain stays).
            // A feature's chain that comes or goes replaces only epokd's chains, in the transaction of the diff.
            firewall.use(ForwardingRuleset.skeleton(table: firewall.skeleton.table.name, wanted))
            let why: String? = wanted.slots != current.slots ? "\(live.nodeCount) nodes: \(live.slots) slots per backend group; the table's skeleton is rebuilt"
                : wanted.perSourceLimits != current.perSourceLimits ? "\(wanted.perSourceLimits.count) distinct per-source rates; the table's skeleton is rebuilt"
                : synchronizedOnce ? Self.describe(idle: wanted.idleChains, was: current.idleChains) : nil
            if let why { logger.notice("\(why) in one transaction") }
        }
        if repair, !answeredElsewhere.isEmpty {
            // Asked again: the other host may have gone.
            answeredElsewhere = [:]
            diff.merge(live.setAnsweredElsewhere([:]))
        }
        var needed = neededAddresses
        // New addresses before the commit (the first SNATed packet's reply finds its address), old ones after. One
        // that another host answers for is not taken: the rules that need it are withheld in this same commit.
        if needed != addressesHeld {
            let taken = manageAddresses(needed.union(addressesHeld ?? []))
            if !taken.isEmpty, let interface = addresses?.interface {
                for address in taken { answeredElsewhere[address] = interface }
                diff.merge(live.setAnsweredElsewhere(answeredElsewhere))
                needed = neededAddresses
            }
        }
        let outcome: Firewall.Outcome
        let fullSync = repair || firewall.applied == nil, wholeSnapshot = touched.everyService
        do {
            outcome = try commit(diff, fullSync: fullSync, touched: &touched)
            if fullSync { readBacks.increment() }
            if fullSync || wholeSnapshot { onBulkCommit?() }
        } catch {
            refreshNames()
            // A set that must be made anew while an operator's rule names it: the error names the rule.
            if error.undeletableSet != nil { skeletonBlocked.record(1) }
            pendingStale += live.takeStaleFlows()
            pendingStaleEgress += live.takeStaleEgress()
            condition.withLock {
                if divergedSince == nil { divergedSince = Date() }
                lastFailure = error
            }
            throw error
        }
        pendingStale += live.takeStaleFlows()
        pendingStaleEgress += live.takeStaleEgress()
        if let refusal = outcome.skeletonBlocked {
            // The elements are in; the skeleton change waits for the operator's rule (named in the message).
            skeletonBlocked.record(1)
            if refusal != reportedBlock { logger.error("\(refusal)") }
            condition.withLock {
                if divergedSince == nil { divergedSince = Date() }
                lastFailure = refusal
            }
        } else {
            if reportedBlock != nil { logger.notice("the skeleton change is in: the table's rules and sets are epokd's current ones") }
            condition.withLock { divergedSince = nil }
            skeletonBlocked.record(0)
        }
        reportedBlock = outcome.skeletonBlocked
        if needed != addressesHeld { manageAddresses(needed) }
        if !synchronizedOnce {
            // Whatever changed while epokd was not running (a node that left, a port that moved) left stale
            // flows too: the table epokd found says what the kernel forwarded before.
            synchronizedOnce = true
            if let before = firewall.foundInKernel {
                pendingStale += live.sparingEntrances(live.staleFlows(since: ForwardingRuleset.forwarding(from: before)))
            }
        }
        if outcome.changed {
            committed.increment()
            duration.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds))
            for (set, elements) in live.elements { Gauge(label: "epokd_elements", dimensions: [("set", set)]).record(elements.count) }
            let table = firewall.skeleton.table.name
            let what = outcome.rebuilt && outcome.keptSets > 0
                ? "reshaped table \(table) (\(outcome.keptSets) sets kept with their elements and counters): +\(outcome.added) -\(outcome.deleted) elements"
                : outcome.rebuilt ? "created table \(table) with \(outcome.added) elements"
                : "\(outcome.chainsReplaced ? "chains replaced, " : "")+\(outcome.added) -\(outcome.deleted) elements"
            logger.info("applied: \(what) (\(updateCount) updates\(touched.everyService ? Self.names(live.serviceRefs) : Self.names(Set(touched.listed))); \(live.nodeCount) nodes\(repair ? "; read back from the kernel" : ""))")
        }
        condition.withLock { ready = true }
        if repair { shadowChecked = [:] }
        // A host port changes holder only with a new element in `services`: otherwise the listeners need no new look.
        let checkListeners = repair || diff.added[ForwardingRuleset.servicesSet.name] != nil
        if touched.everyService { report(live.serviceRefs, checkListeners: checkListeners) } else { report(touched.listed, checkListeners: checkListeners) }
        reportResources()
        refreshNames()
        flushStale()
        return outcome
    }

    /// Writes the router's DNS names if they changed, and reports the objects whose names were left out.
    private func refreshNames() {
        guard let dnsHosts else { return }
        let records = dns.records(hasHostPorts: { !live.mappings(of: $0).isEmpty }, address: dnsHosts.address)
        do {
            if try dnsHosts.update(records.names) {
                logger.info("wrote \(records.names.count) names to \(dnsHosts.path)")
            }
            Gauge(label: "epokd_dns_names").record(records.names.count)
        } catch {
            logger.error("\(error); the router's DNS keeps the previous names; will retry with the next change")
        }
        reportNew(records.problems, since: reportedDNS, metadata: dns.metadata(of:))
        reportedDNS = records.problems
    }

    /// Commits `diff` (or, with `fullSync`, the whole desired state against a read-back). When the kernel refuses
    /// elements, the Services they belong to are set aside and everything else is committed in the same cycle:
    /// the same refused batch is never sent again unchanged. Errors that no Service explains are thrown.
    private func commit(_ diff: ElementDiff, fullSync: Bool, touched: inout Touched) throws(NetlinkError) -> Firewall.Outcome {
        var fullSync = fullSync
        var round = 0
        while true {
            do {
                let outcome = fullSync ? try firewall.synchronize(live.elements, stamp: round == 0 ? cleanStamp() : nil) : try firewall.apply(diff: diff, leadingTo: { [live] in live.elements })
                committedDiff = fullSync || outcome.rebuilt || outcome.chainsReplaced ? nil : diff
                return outcome
            } catch {
                failed.increment()
                round += 1
                guard round <= 3, Self.mayBeAboutAnElement(error.code) else { throw error }
                // Every refused element, found by letting the kernel validate the state one element per message.
                let refusals = (try? firewall.rejectedElements(live.elements)) ?? []
                var offenders: [ObjectRef: NetlinkError] = [:]
                for refusal in refusals {
                    for rejected in refusal.rejected {
                        if let ref = live.owner(of: rejected), offenders[ref] == nil { offenders[ref] = refusal }
                    }
                }
                guard !offenders.isEmpty else { throw error }
                for (ref, refusal) in offenders.sorted(by: { $0.key < $1.key }) {
                    let what = refusal.rejected.first.map { "the kernel refused element \($0.element) of \($0.set)" } ?? "the kernel refused an element"
                    let reason = "\(what): \(refusal.errnoDescription)" + (refusal.kernelMessage.map { ": \($0)" } ?? "")
                    _ = live.setAside(ref, because: reason)
                    logger.error("set aside: \(ref): \(Escaped.text(reason, limit: 1000)); everything else is committed")
                    if let service = ref.service { touched.append(service) }
                }
                Gauge(label: "epokd_services_set_aside").record(live.servicesSetAside.count)
                fullSync = true
            }
        }
    }

    /// Which of epokd's optional chains a change of skeleton puts in and leaves out, for the log.
    private static func describe(idle: Set<String>, was: Set<String>) -> String {
        let added = was.subtracting(idle).sorted(), removed = idle.subtracting(was).sorted()
        let parts = (added.isEmpty ? [] : ["chain \(added.joined(separator: ", ")) now in use"])
            + (removed.isEmpty ? [] : ["chain \(removed.joined(separator: ", ")) idle, left out"])
        return parts.joined(separator: "; ") + "; epokd's chains are replaced, elements kept,"
    }

    /// The Services an apply may have changed: every one held (after a snapshot: no list of 50k names is made),
    /// or those listed.
    private struct Touched {
        var everyService = false
        var listed: [ServiceRef] = []

        mutating func append(_ ref: ServiceRef) {
            if !everyService { listed.append(ref) }
        }
    }

    /// `: a, b, c and N more` of distinct `names`, for the log line of a commit (only built when it is logged).
    private static func names(_ names: some Collection<ServiceRef>) -> String {
        guard !names.isEmpty else { return "" }
        // The three first in order, without sorting them all.
        var first: [ServiceRef] = []
        for name in names where first.count < 3 || name < first[2] {
            first.insert(name, at: first.firstIndex { name < $0 } ?? first.count)
            if first.count > 3 { first.removeLast() }
        }
        return ": " + first.map(\.description).joined(separator: ", ") + (names.count > 3 ? " and \(names.count - 3) more" : "")
    }

    /// The stamp, when the state it stands for has no problem to report (a run that warns is never skipped).
    private func cleanStamp() -> String? {
        guard let stamp, !live.hasProblems else { return nil }
        self.stamp = nil
        return stamp
    }

    /// Whether a refused transaction may be the fault of one element (and so of one Service).
    private static func mayBeAboutAnElement(_ code: Int32) -> Bool {
        [EEXIST, EINVAL, ERANGE, EOVERFLOW, EMSGSIZE, E2BIG, ENOENT, EOPNOTSUPP].contains(code)
    }

    /// Logs, counts and posts Events for backends that went down or came back.
    private func reportHealth(_ changes: [HealthView: Bool]) {
        for (view, up) in changes.sorted(by: { "\($0.key.target)" < "\($1.key.target)" }) {
            for (ref, node) in live.services(judgedBy: view) {
                Gauge(label: "epokd_backend_up", dimensions: [("service", ref.description), ("port", "\(view.target.port)"), ("node", node)])
                    .record(up ? 1 : 0)
                let cause = up ? nil : prober?.lastFailure(of: view.target)
                let message = up
                    ? "node \(node) passed \(view.rise) \(view.target.kind) checks of \(view.target): it gets new connections again"
                    : "node \(node) failed \(view.fall) \(view.target.kind) checks of \(view.target)\(cause.map { " (last: \($0))" } ?? ""): no new connections go there; its flows for this Service are flushed"
                let logged = Escaped.text(message, limit: 1000)
                if up { logger.notice("Service \(ref): \(logged)") } else { logger.warning("Service \(ref): \(logged)") }
                if let service = live.service(ref) {
                    events?.record(up ? .normal : .warning, reason: up ? "BackendUp" : "BackendDown", message: message, service: service)
                }
            }
        }
    }

    /// Logs and posts (as Events) the problems of `services` that changed since they were last reported, the
    /// nodes that started or stopped draining, and (with `checkListeners`) host ports that hide a host's listener.
    private func report(_ services: some Sequence<ServiceRef>, checkListeners: Bool) {
        // Without Events, only a problem is reported: while no Service has one, none is visited (a first sync of
        // 10k Services spent 6% of its instructions finding that out one Service at a time).
        let quiet = events == nil && !live.hasProblems
        if quiet {
            reported.removeAll()
        } else {
            for ref in services {
                let problems = live.problems(of: ref)
                // Without Events, a Service with no problem has nothing to report, now or when it changes.
                if events == nil && problems.isEmpty {
                    reported.removeUnordered(forKey: ref)
                    continue
                }
                let held = live.mappings(of: ref)
                let now = Reported(problems: problems, mappings: held).hashValue
                guard reported[ref] != now else { continue }
                reported[ref] = now
                let service = events == nil ? nil : live.service(ref)
                if let service, !held.isEmpty {
                    let ports = held.prefix(20).map { "\($0.hostPort)/\($0.proto) -> node port \($0.nodePort)" }.joined(separator: ", ")
                        + (held.count > 20 ? " and \(held.count - 20) more" : "")
                    events?.record(.normal, reason: "Mapped", message: "epokd forwards \(ports) to \(live.nodeCount) nodes", service: service)
                }
                for problem in problems {
                    Counter(label: "epokd_rejected_total", dimensions: [("reason", problem.reason.rawValue)]).increment()
                    logger.warning("rejected: \(problem)", metadata: ["reason": "\(problem.reason.rawValue)"])
                    noteWarning(problem)
                    if let service { events?.record(.warning, reason: problem.reason.rawValue, message: problem.message, service: service) }
                }
            }
        }
        if checkListeners { warnAboutShadowedListeners() }
        let draining = Set(live.draining.map(\.node))
        if draining != reportedDraining {
            for name in draining.subtracting(reportedDraining).sorted() {
                logger.notice("node \(Escaped.text(name, limit: 300)) is draining: it gets no new connections; its open flows are left alone")
                if let node = live.node(name) {
                    events?.record(.normal, reason: "Draining", message: "epokd sends no new connections to this node (\(EpokAnnotation.drain)); open flows are left alone", about: .init(node))
                }
            }
            for name in reportedDraining.subtracting(draining).sorted() {
                logger.notice("node \(Escaped.text(name, limit: 300)) is no longer draining")
                if let node = live.node(name) {
                    events?.record(.normal, reason: "DrainEnded", message: "epokd sends new connections to this node again", about: .init(node))
                }
            }
            reportedDraining = draining
        }
        if live.nodeProblems != reportedNodeProblems {
            reportedNodeProblems = live.nodeProblems
            for problem in reportedNodeProblems {
                Counter(label: "epokd_rejected_total", dimensions: [("reason", problem.reason.rawValue)]).increment()
                logger.warning("rejected: \(problem)", metadata: ["reason": "\(problem.reason.rawValue)"])
            }
        }
    }

    /// Warns (log and Event), once per port and holder, about each host port held by a Service where the host itself listens: the
    /// work follows the host's listeners, not the number of mappings.
    private func warnAboutShadowedListeners() {
        guard let listeners else { return }
        let open: [PortKey: Listener]
        do {
            open = Dictionary(try listeners().filter(\.isReachable).map { (PortKey(proto: $0.proto, port: $0.port), $0) }, uniquingKeysWith: { a, _ in a })
        } catch {
            logger.debug("could not read the host's listening sockets: \(error)")
            return
        }
        for (port, listener) in open.sorted(by: { $0.key < $1.key }) {
            guard let (ref, mapping) = live.holder(of: port), shadowChecked[port] != ref else { continue }
            shadowChecked[port] = ref
            let who = ListeningSockets.owner(ofInode: listener.inode) ?? "a process"
            let message = "Service \(ref) claims \(mapping.hostPort)/\(mapping.proto) on \(live.options.interfaces.joined(separator: ",")); \(who) on this host listens there (\(listener.address)) and is no longer reachable through those interfaces"
            logger.warning("\(Escaped.text(message, limit: 1000))")
            if let service = live.service(ref) { events?.record(.warning, reason: "HostPortShadowed", message: message, service: service) }
        }
    }

    /// The managed addresses the rules need, or none on a standby router.
    private var neededAddresses: Set<IPAddress> { highAvailability?.isActive == false ? [] : live.neededAddresses }

    /// What a router does in its role, for the log.
    public static func duties(active: Bool) -> String {
        active ? "it takes and announces the egress and bridge addresses (--manage-addresses) and posts Events"
            : "it gives up the egress and bridge addresses and posts no Events; its table stays programmed and its health checks run (hot standby)"
    }

    /// Makes the managed addresses `needed` (or, unmanaged, warns once about each needed one the host does
    /// not receive packets for). Failures are logged: the ruleset is committed regardless.
    /// Returns the addresses another host on the interface answers for (not added).
    @discardableResult
    private func manageAddresses(_ needed: Set<IPAddress>) -> [IPAddress] {
        if let addresses {
            do {
                let done = try addresses.reconcile(needed: needed)
                if !done.added.isEmpty { logger.notice("added \(done.added.map(\.description).joined(separator: ", ")) to \(addresses.interface) (egress and bridge addresses)") }
                if !done.removed.isEmpty {
                    let why = highAvailability?.isActive == false ? "this router is standby" : "no rule needs them"
                    logger.notice("removed \(done.removed.map(\.description).joined(separator: ", ")) from \(addresses.interface): \(why)")
                }
                if let refused = done.announceRefused {
                    logger.warning("could not announce \(done.added.map(\.description).joined(separator: ", ")) on \(addresses.interface): \(refused); neighbours learn the new holder when their cache expires (give epokd CAP_NET_RAW)")
                }
                if let refused = done.probeRefused {
                    logger.warning("\(refused); addresses are added to \(addresses.interface) without asking first whether another host answers for them (give epokd CAP_NET_RAW)")
                }
                for address in done.answeredElsewhere {
                    logger.error("another host on \(addresses.interface) answers for \(address) (ARP): it is not added, and the rules that need it are withheld; asked again at the next read-back")
                }
                addressesHeld = needed.subtracting(done.answeredElsewhere)
                return done.answeredElsewhere
            } catch {
                logger.error("could not manage the addresses on \(addresses.interface): \(error); will retry")
            }
            return []
        }
        addressesHeld = needed
        guard let isLocal else { return [] }
        for address in needed.subtracting(addressesWarned).sorted() {
            guard (try? isLocal(address)) == false else { continue }
            addressesWarned.insert(address)
            logger.warning("\(address) is an egress or bridge address, but this host neither has it nor a local route to it: replies to flows SNATed to it will not come back here; add it (--manage-addresses IFACE) or route it to this host")
        }
        addressesWarned.formIntersection(needed)
        return []
    }

    /// Logs and posts (as Events on them) the problems of StaticEgressIPs and ExternalServices that changed.
    private func reportResources() {
        var now: [ObjectRef: [Problem]] = [:]
        for owner in live.troubledResources { now[owner] = live.problems(of: owner) }
        reportNew(now, since: reportedResources, metadata: live.resourceMetadata)
        reportedResources = now
    }

    /// Logs, counts and posts (as Warning Events on their objects) the problems in `problems` not already in
    /// `reported`.
    private func reportNew(_ problems: [ObjectRef: [Problem]], since reported: [ObjectRef: [Problem]], metadata: (ObjectRef) -> ObjectMeta?) {
        for (owner, list) in problems.sorted(by: { $0.key < $1.key }) where reported[owner] != list {
            for problem in list where !(reported[owner] ?? []).contains(problem) {
                Counter(label: "epokd_rejected_total", dimensions: [("reason", problem.reason.rawValue)]).increment()
                logger.warning("rejected: \(problem)", metadata: ["reason": "\(problem.reason.rawValue)"])
                noteWarning(problem)
                events?.record(.warning, reason: problem.reason.rawValue, message: problem.message, about: .init(owner, metadata(owner)))
            }
        }
    }

    private func flushStale() {
        guard let flusher, !pendingStale.isEmpty || !pendingStaleEgress.isEmpty else { return }
        // Outside `run` (a caller's `apply`), on the caller's thread: no worker shares the remover with the caller.
        if running { flusher.add(pendingStale, pendingStaleEgress) } else { flusher.flushNow(pendingStale, pendingStaleEgress) }
        pendingStale = []
        pendingStaleEgress = []
    }
}
