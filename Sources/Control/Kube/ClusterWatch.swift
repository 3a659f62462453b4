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
    /// Health views that went down (false) or up (true), from the `HealthProber`.
    case backendHealth([HealthView: Bool])
}

/// Informers for Services and Nodes, joined: nothing is handed on until both have listed completely
/// (fail static: while the API is unreachable the kernel keeps what it has), then every change in order.
/// EndpointSlices are watched beside them but never waited for (without the right to list them, epokd
/// forwards as before, to every eligible node): they join the snapshot, or follow it, once listed. So do
/// StaticEgressIPs and ExternalServices, whose CRDs may not be installed, and Ingresses when they are watched.
public final class ClusterWatch: @unchecked Sendable {
    public let services: Informer<Service>
    public let nodes: Informer<Node>
    public let endpointSlices: Informer<EndpointSlice>
    public let staticEgressIPs: Informer<StaticEgressIP>
    public let externalServices: Informer<ExternalService>
    /// Ingresses, for the router's DNS names; nil when they are not watched.
    public let ingresses: Informer<Ingress>?
    private let lock = NSLock()
    private var handOver: ((ClusterUpdate) -> Void)?
    private var started = false
    /// The Nodes handed over, by name: a relist of Nodes alone is handed over as the changes it makes.
    private var nodeNames = Set<String>()
    private let stop = StopSignal()
    private var threads: [Thread] = []
    private let finished = DispatchGroup()

    /// With `ingresses`, Ingresses are watched too (for `--dns-hosts`).
    public init(client: KubeClient, logger: Logger, ingresses watchIngresses: Bool = false) {
        services = Informer(client: client, logger: logger)
        nodes = Informer(client: client, logger: logger)
        endpointSlices = Informer(client: client, logger: logger)
        staticEgressIPs = Informer(client: client, logger: logger, optional: true)
        externalServices = Informer(client: client, logger: logger, optional: true)
        ingresses = watchIngresses ? Informer(client: client, logger: logger, optional: true) : nil
    }

    /// Posts Warning Events on the objects an informer cannot decode (call before `start`).
    public func report(to events: EventRecorder) {
        services.events = events
        nodes.events = events
        endpointSlices.events = events
        staticEgressIPs.events = events
        externalServices.events = events
        ingresses?.events = events
    }

    /// Whether both resources have been listed completely.
    public var hasSynced: Bool { services.hasSynced && nodes.hasSynced }

    /// Starts both informers; `deliver` is called on their threads, one update at a time.
    public func start(_ deliver: @escaping (ClusterUpdate) -> Void) {
        lock.withLock { handOver = deliver }
        spawn { [self] in services.run(until: stop) { self.received(.services($0)) } }
        spawn { [self] in nodes.run(until: stop) { self.received(.nodes($0)) } }
        spawn { [self] in endpointSlices.run(until: stop) { self.received(.endpointSlices($0)) } }
        spawn { [self] in staticEgressIPs.run(until: stop) { self.received(.staticEgressIPs($0)) } }
        spawn { [self] in externalServices.run(until: stop) { self.received(.externalServices($0)) } }
        if let ingresses { spawn { [self] in ingresses.run(until: stop) { self.received(.ingresses($0)) } } }
    }

    /// Stops the informers and waits for their threads (closing the watches).
    public func shutdown() {
        stop.stop()
        finished.wait()
    }

    private func spawn(_ body: @escaping @Sendable () -> Void) {
        finished.enter()
        let thread = Thread { [finished] in
            body()
            finished.leave()
        }
        threads.append(thread)
        thread.start()
    }

    private enum Source {
        case services(InformerEvent<Service>)
        case nodes(InformerEvent<Node>)
        case endpointSlices(InformerEvent<EndpointSlice>)
        case staticEgressIPs(InformerEvent<StaticEgressIP>)
        case externalServices(InformerEvent<ExternalService>)
        case ingresses(InformerEvent<Ingress>)
    }

    private func received(_ source: Source) {
        lock.withLock {
            guard let handOver, services.hasSynced, nodes.hasSynced else { return }
            let listed: Bool
            switch source {
            case .services(.listed), .nodes(.listed): listed = true
            default: listed = false
            }
            if case .endpointSlices(let event) = source {
                // Before the first snapshot, slices wait in their cache; it joins the snapshot.
                guard started else { return }
                switch event {
                case .listed: handOver(.endpointSlices(endpointSlices.cache))
                case .upserted(let slice): handOver(.endpointSliceChanged(slice))
                case .deleted(let slice): handOver(.endpointSliceDeleted(slice.key))
                }
                return
            }
            // Before the first snapshot, custom resources wait in their caches too.
            if case .staticEgressIPs(let event) = source {
                if started { handOver(.staticEgressIPs(event)) }
                return
            }
            if case .externalServices(let event) = source {
                if started { handOver(.externalServices(event)) }
                return
            }
            if case .ingresses(let event) = source {
                if started { handOver(.ingresses(event)) }
                return
            }
            if started, case .nodes(.listed(let all)) = source {
                // The Services are the reconcile loop's to keep (the informer keeps none once started): a relist
                // of Nodes alone is what it adds, changes and removes.
                for node in all { handOver(.nodeChanged(node)) }
                let listedNames = Set(all.map(\.metadata.name))
                for name in nodeNames.subtracting(listedNames).sorted() { handOver(.nodeDeleted(name)) }
                nodeNames = listedNames
                return
            }
            if !started || listed {
                started = true
                let listedServices: [Service]
                if case .services(.listed(let all)) = source { listedServices = all } else { listedServices = services.cache }
                let listedNodes = nodes.cache
                nodeNames = Set(listedNodes.map(\.metadata.name))
                handOver(.snapshot(ClusterSnapshot(services: listedServices, nodes: listedNodes,
                                                   endpointSlices: endpointSlices.hasSynced ? endpointSlices.cache : nil,
                                                   staticEgressIPs: staticEgressIPs.cache, externalServices: externalServices.cache,
                                                   ingresses: ingresses?.cache ?? [])))
                // From here on the reconcile loop holds every Service: the informer need not hold them too.
                services.stopCaching()
                return
            }
            switch source {
            case .services(.upserted(let s)): handOver(.serviceChanged(s))
            case .services(.deleted(let s)): handOver(.serviceDeleted(s.ref))
            case .nodes(.upserted(let n)):
                nodeNames.insert(n.metadata.name)
                handOver(.nodeChanged(n))
            case .nodes(.deleted(let n)):
                nodeNames.remove(n.metadata.name)
                handOver(.nodeDeleted(n.metadata.name))
            case .services(.listed), .nodes(.listed), .endpointSlices, .staticEgressIPs, .externalServices, .ingresses: break
            }
        }
    }
}
