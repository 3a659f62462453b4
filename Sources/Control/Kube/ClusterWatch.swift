import Dataplane
import Foundation
import Logging

/// What the cluster watch hands to the reconciler: a complete picture first, then changes.
public enum ClusterUpdate: Sendable {
    /// Every Service and Node: after the first complete lists, and again after any relist.
    case snapshot(ClusterSnapshot)
    case serviceChanged(Service)
    case serviceDeleted(ServiceRef)
    case nodeChanged(Node)
    case nodeDeleted(String)
    /// Every EndpointSlice, after they were listed (again).
    case endpointSlices([EndpointSlice])
    case endpointSliceChanged(EndpointSlice)
    /// The slice's `namespace/name`.
    case endpointSliceDeleted(String)
    /// StaticEgressIPs and ExternalServices: listed (all of them), changed or deleted.
    case staticEgressIPs(InformerEvent<StaticEgressIP>)
    case externalServices(InformerEvent<ExternalService>)
    /// Ingresses (watched for `--dns-hosts` only): listed, changed or deleted.
    case ingresses(InformerEvent<Ingress>)
    /// ReferenceGrants: listed, changed or deleted.
    case referenceGrants(InformerEvent<ReferenceGrant>)
    /// Health views that went down (false) or up (true), from the `HealthProber`.
    case backendHealth([HealthView: Bool])
    /// The host's own addresses changed (rtnetlink said so): the ones epokd added are not among them.
    case hostAddresses(Set<IPAddress>)

    /// When the change an update carries happened in the cluster, where the object says (see `ObjectMeta.changedAt`).
    public var changedAt: Double? {
        switch self {
        case .serviceChanged(let service): service.metadata.changedAt
        case .endpointSliceChanged(let slice): slice.metadata.changedAt
        default: nil
        }
    }
}

/// Informers for Services and Nodes, joined: nothing is handed on until both have listed completely
/// (fail static: while the API is unreachable the kernel keeps what it has), then every change in order.
/// The first snapshot also waits for the other resources whose lists are under way (EndpointSlices,
/// StaticEgressIPs, ExternalServices), so that a restart commits the same state the
/// kernel holds, not one without egress rules and bridges: at most `firstSyncWait` seconds, and not for a
/// resource the API server does not serve or lets epokd read (404, 403). What is listed later follows the
/// snapshot.
public final class ClusterWatch: @unchecked Sendable {
    public let services: Informer<Service>
    public let nodes: Informer<Node>
    public let endpointSlices: Informer<EndpointSlice>
    public let staticEgressIPs: Informer<StaticEgressIP>
    public let externalServices: Informer<ExternalService>
    public let referenceGrants: Informer<ReferenceGrant>
    /// Ingresses, for the router's DNS names; nil when they are not watched.
    public let ingresses: Informer<Ingress>?
    private let lock = NSLock()
    private var handOver: ((ClusterUpdate) -> Void)?
    private var started = false
    /// The Nodes handed over, by name: a relist of Nodes alone is handed over as the changes it makes.
    private var nodeNames = Set<String>()
    private let stop = StopSignal()
    /// How long the first snapshot waits for the lists of EndpointSlices and the custom resources after Services
    /// and Nodes are listed (set before `start`).
    public var firstSyncWait: TimeInterval = 15
    private let logger: Logger
    /// When Services and Nodes had both listed, before the first snapshot.
    private var coreSyncedAt: Date?
    private let finished = DispatchGroup()

    /// With `ingresses`, Ingresses are watched too (for `--dns-hosts`).
    public init(client: KubeClient, logger: Logger, ingresses watchIngresses: Bool = false) {
        self.logger = logger
        services = Informer(client: client, logger: logger)
        nodes = Informer(client: client, logger: logger)
        endpointSlices = Informer(client: client, logger: logger)
        staticEgressIPs = Informer(client: client, logger: logger, optional: true)
        externalServices = Informer(client: client, logger: logger, optional: true)
        referenceGrants = Informer(client: client, logger: logger, optional: true)
        ingresses = watchIngresses ? Informer(client: client, logger: logger, optional: true) : nil
    }

    /// Posts Warning Events on the objects an informer cannot decode (call before `start`).
    public func report(to events: EventRecorder) {
        services.events = events
        nodes.events = events
        endpointSlices.events = events
        staticEgressIPs.events = events
        externalServices.events = events
        referenceGrants.events = events
        ingresses?.events = events
    }

    /// Whether both resources have been listed completely.
    public var hasSynced: Bool { services.hasSynced && nodes.hasSynced }

    /// Starts both informers; `deliver` is called on their threads, one update at a time. Refused a thread, it
    /// stops those it started.
    public func start(_ deliver: @escaping (ClusterUpdate) -> Void) throws(ThreadRefused) {
        lock.withLock { handOver = deliver }
        for informer in awaited { informer.onUnavailable = { [weak self] in self?.startIfComplete() } }
        // Once the deadline passes, the first snapshot goes with what is listed by then.
        try spawn { [self] in
            while !stop.isStopped {
                let wait = lock.withLock { started ? nil : coreSyncedAt.map { firstSyncWait - Date().timeIntervalSince($0) } ?? 0.2 }
                guard let wait else { return }
                if wait <= 0 {
                    startIfComplete(deadlinePassed: true)
                    return
                }
                if stop.wait(seconds: min(wait, 0.2)) { return }
            }
        }
        try spawn { [self] in services.run(until: stop) { self.received(.services($0)) } }
        try spawn { [self] in nodes.run(until: stop) { self.received(.nodes($0)) } }
        try spawn { [self] in endpointSlices.run(until: stop) { self.received(.endpointSlices($0)) } }
        try spawn { [self] in staticEgressIPs.run(until: stop) { self.received(.staticEgressIPs($0)) } }
        try spawn { [self] in externalServices.run(until: stop) { self.received(.externalServices($0)) } }
        try spawn { [self] in referenceGrants.run(until: stop) { self.received(.referenceGrants($0)) } }
        if let ingresses { try spawn { [self] in ingresses.run(until: stop) { self.received(.ingresses($0)) } } }
    }

    /// Stops the informers and waits for their threads (closing the watches).
    public func shutdown() {
        stop.stop()
        finished.wait()
    }

    private func spawn(_ body: @escaping @Sendable () -> Void) throws(ThreadRefused) {
        finished.enter()
        do {
            try OwnThread.start("epokd-watch") { [finished] in
                body()
                finished.leave()
            }
        } catch {
            finished.leave()
            shutdown()
            throw error
        }
    }

    /// The informers the first snapshot waits for, besides Services and Nodes (not Ingresses: they name DNS
    /// records, nothing in the kernel, and their list is handed on when it arrives).
    private var awaited: [any AwaitedList] { [endpointSlices, staticEgressIPs, externalServices, referenceGrants] }

    /// Hands over the first snapshot if it is due (see `firstSnapshotIfDue`).
    private func startIfComplete(deadlinePassed: Bool = false) {
        lock.withLock { firstSnapshotIfDue(listedServices: nil, deadlinePassed: deadlinePassed) }
    }

    /// With the lock held: hands over the first snapshot if Services and Nodes are listed and every other list has
    /// arrived or will not (or once `firstSyncWait` has passed since Services and Nodes were listed).
    private func firstSnapshotIfDue(listedServices: [Service]?, deadlinePassed: Bool = false) {
        guard !started, handOver != nil, services.hasSynced, nodes.hasSynced else { return }
        if coreSyncedAt == nil { coreSyncedAt = Date() }
        let pending = awaited.filter { !$0.hasSynced && !$0.isUnavailable }
        if !pending.isEmpty {
            guard deadlinePassed || Date().timeIntervalSince(coreSyncedAt!) >= firstSyncWait else { return }
            logger.warning("first sync: \(pending.map(\.path).joined(separator: ", ")) not listed within \(String(format: "%g", firstSyncWait)) s; committing what is known, the rest follows when it is listed")
        }
        handSnapshot(listedServices: listedServices ?? services.cache)
    }

    /// With the lock held: hands over every Service (`listedServices`) and the other resources' caches as a snapshot.
    private func handSnapshot(listedServices: [Service]) {
        started = true
        let listedNodes = nodes.cache
        nodeNames = Set(listedNodes.map(\.metadata.name))
        handOver?(.snapshot(ClusterSnapshot(services: listedServices, nodes: listedNodes,
                                            endpointSlices: endpointSlices.hasSynced ? endpointSlices.cache : nil,
                                            staticEgressIPs: staticEgressIPs.cache, externalServices: externalServices.cache,
                                            ingresses: ingresses?.cache ?? [],
                                            referenceGrants: referenceGrants.hasSynced ? referenceGrants.cache : nil)))
        // From here on the reconcile loop holds every Service: the informer need not hold them too.
        services.stopCaching()
    }

    private enum Source {
        case services(InformerEvent<Service>)
        case nodes(InformerEvent<Node>)
        case endpointSlices(InformerEvent<EndpointSlice>)
        case staticEgressIPs(InformerEvent<StaticEgressIP>)
        case externalServices(InformerEvent<ExternalService>)
        case ingresses(InformerEvent<Ingress>)
        case referenceGrants(InformerEvent<ReferenceGrant>)
    }

    private func received(_ source: Source) {
        lock.withLock {
            guard let handOver, services.hasSynced, nodes.hasSynced else { return }
            guard started else {
                // Everything waits in its informer's cache for the first snapshot.
                if case .services(.listed(let all)) = source { firstSnapshotIfDue(listedServices: all) } else { firstSnapshotIfDue(listedServices: nil) }
                return
            }
            switch source {
            case .endpointSlices(.listed): handOver(.endpointSlices(endpointSlices.cache))
            case .endpointSlices(.upserted(let slice)): handOver(.endpointSliceChanged(slice))
            case .endpointSlices(.deleted(let slice)): handOver(.endpointSliceDeleted(slice.key))
            case .staticEgressIPs(let event): handOver(.staticEgressIPs(event))
            case .externalServices(let event): handOver(.externalServices(event))
            case .ingresses(let event): handOver(.ingresses(event))
            case .referenceGrants(let event): handOver(.referenceGrants(event))
            case .nodes(.listed(let all)):
                // The Services are the reconcile loop's to keep (the informer keeps none once started): a relist
                // of Nodes alone is what it adds, changes and removes.
                for node in all { handOver(.nodeChanged(node)) }
                let listedNames = Set(all.map(\.metadata.name))
                for name in nodeNames.subtracting(listedNames).sorted() { handOver(.nodeDeleted(name)) }
                nodeNames = listedNames
            case .services(.listed(let all)): handSnapshot(listedServices: all)
            case .services(.upserted(let s)): handOver(.serviceChanged(s))
            case .services(.deleted(let s)): handOver(.serviceDeleted(s.ref))
            case .nodes(.upserted(let n)):
                nodeNames.insert(n.metadata.name)
                handOver(.nodeChanged(n))
            case .nodes(.deleted(let n)):
                nodeNames.remove(n.metadata.name)
                handOver(.nodeDeleted(n.metadata.name))
            }
        }
    }
}

/// What the first snapshot asks of an informer it waits for.
protocol AwaitedList: AnyObject {
    var hasSynced: Bool { get }
    var isUnavailable: Bool { get }
    var onUnavailable: (@Sendable () -> Void)? { get set }
    /// The collection path, for the log.
    var path: String { get }
}

extension Informer: AwaitedList {
    var path: String { Object.collectionPath }
}
