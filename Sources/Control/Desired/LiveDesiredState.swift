import Dataplane
import Dispatch
import class Foundation.ProcessInfo
import OrderedCollections

/// The desired state kept current one object at a time: each change yields the element diff it causes,
/// at a cost that follows the change, not the cluster. `DesiredState(snapshot:)` is this, fed everything at once.
public final class LiveDesiredState {
    public private(set) var options: ForwardingOptions
    /// The desired elements of every set.
    public private(set) var elements: TableElements
    /// Each Service held: one table for all a Service's data, the records side by side (see UnorderedRemoval.swift;
    /// a Dictionary's 131,072 slots for 50k Services, each a ref and a reference to a record allocated apart, took
    /// 5 MB more).
    private var held: OrderedDictionary<ServiceRef, Record> = [:]
    /// The Services whose entry has problems of its own (so that finding them does not visit every entry).
    private var troubledEntries: Set<ServiceRef> = []
    private var claims = ClaimTable<PortKey, Mapping, ClaimPrecedence>()
    private var loadBalancerClaims = ClaimTable<LoadBalancerKey, LoadBalancerEntry, ClaimPrecedence>()
    /// How many held LoadBalancer entries use each per-source rate.
    private var perSourceInUse: [RateLimit: Int] = [:]
    /// The same, by the namespace of the Services using each rate.
    private var perSourceByNamespace: [String: [RateLimit: Int]] = [:]
    private var nodes: [String: Node] = [:]
    private var eligible: [NodeAddress] = []
    /// Nodes that would be eligible but are draining: no new connections, their flows kept.
    public private(set) var draining: [NodeAddress] = []
    private var staleSinceTaken: [StaleFlows] = []
    private var setAside: [ServiceRef: String] = [:]
    /// Problems of the Nodes held (addresses that cannot be backends).
    public private(set) var nodeProblems: [Problem] = []
    /// The Services whose EndpointSlices list each pod; and the pods whose contested state (listed by slices of
    /// more than one namespace) changed since the last refresh.
    private var podRefs: [IPAddress: Set<ServiceRef>] = [:]
    private var contestedFlips: Set<IPAddress> = []
    /// The distinct HTTP health-check paths of each namespace, with how many Services check each.
    private var healthPaths: [String: [String: Int]] = [:]
    /// The host's and the Nodes' addresses, which no tenant may take.
    private var reserved = ReservedAddresses()
    /// The source addresses objects ask for (egress addresses, bridge sources), with the asker's namespace: an
    /// address belongs to the namespace of its oldest asker, and another namespace's asks for it are refused.
    private var sourceAddresses = ClaimTable<IPAddress, String, SourceClaim>()
    /// When each object began to ask for each of its source addresses, on `askClock`.
    private var sourcesAsked: [ObjectRef: [IPAddress: Int]] = [:]
    /// The namespace each source address served in the table found at start: its askers keep it across a restart.
    private var sourcesAtStart: [IPAddress: String] = [:]
    private typealias SourceClaim = FirstClaim<RequestPrecedence>
    /// The LoadBalancer IPs Services ask for, with their sharing key: an IP belongs to its first asker (the
    /// oldest Service among those that asked at once) and those with the same `allow-shared-ip` key.
    private var loadBalancerIPs = ClaimTable<IPAddress, LoadBalancerAsk, LoadBalancerIPClaim>()
    /// When each Service began to ask for each of its LoadBalancer IPs, on `askClock`.
    private var loadBalancerIPsAsked: [ServiceRef: [IPAddress: Int]] = [:]
    /// Counts the changes applied: an ask made at a later count is a later claim; a list's asks are made at one
    /// count (and ordered by age among themselves); those the table found at start holds (`holdAtStart`) at -1.
    private var askClock = 0
    /// Set while a list is applied: its asks are all made at once.
    private var clockHeld = false
    /// A new change: asks made from here on are later claims than those before.
    private func tick() { if !clockHeld { askClock += 1 } }
    /// The Service each LoadBalancer IP was admitted for in the table found at start: it keeps it across a restart.
    private var heldAtStart: [IPAddress: ServiceRef] = [:]
    private typealias LoadBalancerIPClaim = FirstClaim<ClaimPrecedence>
    private struct LoadBalancerAsk: Equatable {
        var service: ServiceRef
        var key: String?
    }
    /// Objects asking for a source address that became, or ceased to be, a LoadBalancer IP: looked at again.
    private var sourceAskersToRefresh: Set<ObjectRef> = []
    /// The EndpointSlices held by `namespace/name`, nil until they are known; and for each Service, the nodes
    /// that run a ready endpoint of it (kept current slice by slice for the Services in `grouped`, the ones that
    /// read it; computed afresh for a Service joining them).
    private var endpointSlices: [String: EndpointSlice]?
    private var slicesOf: [ServiceRef: Set<String>] = [:]
    /// Each Service's endpoint addresses, with how many of its slices list each: kept slice by slice.
    private var podCounts: [ServiceRef: [IPAddress: Int]] = [:]
    private var readyNodes: [ServiceRef: Set<String>] = [:]
    /// Services whose mappings may have a group of their own (`externalTrafficPolicy: Local`, or health
    /// checks): recomputed when the eligible nodes, their endpoints or their health change.
    private var grouped: Set<ServiceRef> = []
    /// The health views each checked Service's group depends on, with the node each one probes.
    private var views: [ServiceRef: [HealthView: String]] = [:]
    /// Counts the changes of `views`, so that the prober is told only when there is something new.
    public private(set) var healthViewsGeneration = 0
    /// The views whose target is down.
    private var down: Set<HealthView> = []
    /// Static source addresses: what each Service (by its annotations), StaticEgressIP and ExternalService asks,
    /// and who holds each pod's destinations and each bridge entrance.
    private var staticSources = StaticSources()
    private var staleEgressSinceTaken: [StaleEgress] = []
    private var staticEgressIPs: [ObjectRef: StaticEgressIP] = [:]
    private var externalServices: [ObjectRef: ExternalService] = [:]
    /// ReferenceGrants by `namespace/name`.
    private var referenceGrants: [String: ReferenceGrant] = [:]
    /// The StaticEgressIPs and ExternalServices that name each Service, and the Services each names.
    private var dependents: [ServiceRef: Set<ObjectRef>] = [:]
    private var dependencies: [ObjectRef: Set<ServiceRef>] = [:]
    private var resourcesSetAside: [ObjectRef: String] = [:]

    fileprivate typealias Age = ClaimPrecedence

    private struct Record {
        /// The Service as last seen; nil in a one-off computation, which keeps no objects.
        var service: Service?
        /// Its own ports (kept for bridges, whether or not the objects are).
        var ports: [Service.Port]
        /// What it asks for.
        var entry: Entry
    }

    private struct Entry {
        /// When the Service was created: with the ref it is held under, its age (`age(_:of:)`).
        var created: Int64
        var mappings: [Mapping]
        var loadBalancers: [LoadBalancerEntry]
        var problems: [Problem]
    }


    /// Whether element sets and diffs are kept change by change (off for a one-off `DesiredState`, which needs
    /// only the claims, and while a first snapshot is loaded, whose elements are computed once at the end).
    private var tracksElements: Bool

    /// Starts the thread that makes the next Services' own parts while a first snapshot is filed (refused, they are
    /// made in turn).
    public var threads: ThreadStarter = OwnThread.start

    public init(options: ForwardingOptions) {
        self.options = options
        tracksElements = true
        keepsObjects = true
        elements = ForwardingRuleset.elements(for: options.emptyState)
    }

    /// A state that keeps claims, nodes and problems but no elements and no objects: `DesiredState(snapshot:)`'s
    /// engine, fed once.
    init(claimsOnly options: ForwardingOptions) {
        self.options = options
        tracksElements = false
        keepsObjects = false
        elements = [:]
    }

    /// Whether the Service objects are kept (for set-aside, Events and snapshots); not by a one-off computation.
    private let keepsObjects: Bool

    /// The objects held, as a snapshot.
    public var snapshot: ClusterSnapshot {
        ClusterSnapshot(services: held.values.compactMap(\.service), nodes: Array(nodes.values), endpointSlices: endpointSlices.map { Array($0.values) },
                        staticEgressIPs: Array(staticEgressIPs.values), externalServices: Array(externalServices.values),
                        referenceGrants: Array(referenceGrants.values))
    }

    /// Who held each LoadBalancer IP and source address in the table epokd found at start (from its elements'
    /// labels), given before the first snapshot: that Service, or that namespace's askers, keep it against any
    /// other asker, as if they asked first.
    public func holdAtStart(loadBalancers: [IPAddress: ServiceRef], sources: [IPAddress: String] = [:]) {
        heldAtStart = loadBalancers
        sourcesAtStart = sources
    }

    /// Adds or replaces a Service and returns the element changes it causes.
    public func upsert(_ service: Service) -> ElementDiff {
        upsert(service, own: nil)
    }

    /// What `upsert` makes of a Service from the Service and the options alone: its rate limits and mappings,
    /// and the problems found making them, in that order.
    private struct OwnPart: Sendable {
        var limits: ServiceRateLimits
        var mappings: [Mapping]
        var problems: [Problem]

        init(_ service: Service, options: ForwardingOptions) {
            var problems: [Problem] = []
            limits = DesiredState.rateLimits(of: service, problems: &problems)
            mappings = DesiredState.mappings(of: service, options: options, limit: limits.aggregate, problems: &problems)
            self.problems = problems
        }
    }

    /// The own parts of some Services, being made on another thread.
    private final class OwnParts: @unchecked Sendable {
        private var parts: [OwnPart] = []
        private let done = DispatchSemaphore(value: 0)

        /// Without a thread for them (the process at its tasks limit), they are made here and now.
        init(_ services: ArraySlice<Service>, options: ForwardingOptions, threads: ThreadStarter) {
            do {
                _ = try threads("epokd-fold") { [self] in make(services, options: options) }
            } catch {
                make(services, options: options)
            }
        }

        private func make(_ services: ArraySlice<Service>, options: ForwardingOptions) {
            parts = services.map { OwnPart($0, options: options) }
            done.signal()
        }

        /// The parts, once made (waiting for them).
        func take() -> [OwnPart] {
            done.wait()
            return parts
        }
    }

    /// Upserts the Services of a first snapshot in order while another thread makes the own parts of the next
    /// ones (a fifth of the fold, which then only files them), a few thousand at a time; with one CPU, or a
    /// small snapshot, one by one.
    private func upsertFirst(_ services: [Service], diff: inout ElementDiff) {
        let piece = 2_048
        guard services.count > piece, ProcessInfo.processInfo.activeProcessorCount > 1 else {
            for service in services { diff.merge(upsert(service, own: nil)) }
            return
        }
        func parts(from start: Int) -> OwnParts { OwnParts(services[start..<min(start + piece, services.count)], options: options, threads: threads) }
        var next = parts(from: 0)
        for start in stride(from: 0, to: services.count, by: piece) {
            let made = next.take()
            if start + piece < services.count { next = parts(from: start + piece) }
            for (offset, part) in made.enumerated() { diff.merge(upsert(services[start + offset], own: part)) }
        }
    }

    /// `upsert(_:)`, with the Service's own part when it was made already.
    private func upsert(_ service: Service, own: OwnPart?) -> ElementDiff {
        tick()
        var diff = ElementDiff()
        let ref = service.ref
        let record = held[ref], old = record?.entry
        // A Service the kernel refused gets another chance when it changes.
        if let previous = record?.service, previous != service { setAside[ref] = nil }
        var problems: [Problem] = []
        var mappings: [Mapping] = []
        var loadBalancers: [LoadBalancerEntry] = []
        // Its LoadBalancer IPs are recorded before its entry is made (which sees who else asks); the other askers
        // whose holder changed with it are looked at again after it.
        let askers = askForLoadBalancerIPs(ref, service, setAside: setAside[ref] != nil)
        for path in service.metadata.misplacedKeys ?? [] {
            problems.append(Problem(object: "Service \(ref)", reason: .misplacedAnnotation,
                                    message: "\(path) is not read: epokd reads its keys only under metadata.annotations (an indentation slip?); the Service is handled without it",
                                    service: ref))
        }
        if let reason = setAside[ref] {
            problems.append(Problem(object: "Service \(ref)", reason: .rejectedByKernel,
                                    message: "\(reason); set aside (nothing forwarded) until the Service changes", service: ref))
            grouped.remove(ref)
            setViews(ref, nil)
        } else {
            let own = own ?? OwnPart(service, options: options)
            let limits = own.limits
            mappings = own.mappings
            problems += own.problems
            if let group = group(of: service, mappings: mappings, problems: &problems) {
                mappings = mappings.map { var m = $0; m.group = group; return m }
            }
            loadBalancers = DesiredState.loadBalancers(of: service, options: options, limits: limits, reserved: reserved,
                                                       taken: loadBalancerTaken(against: service), problems: &problems)
            // The namespace's rates without this Service's own (a Service changing its rate at the cap may).
            var ownRates = perSourceByNamespace[ref.namespace] ?? [:]
            for entry in old?.loadBalancers ?? [] {
                guard let rate = entry.perSourceLimit, let count = ownRates[rate] else { continue }
                ownRates[rate] = count > 1 ? count - 1 : nil
            }
            if let rate = limits.perSource, !loadBalancers.isEmpty, ownRates[rate] == nil, perSourceInUse[rate] == nil,
               ownRates.count >= ServiceLimits.perSourceRatesPerNamespace {
                let why = "namespace \(ref.namespace) uses \(ownRates.count) distinct per-source rates already, the most one namespace may bring in; use one of them: \(ownRates.keys.sorted().prefix(5).map(\.description).joined(separator: "; "))"
                problems.append(Problem(object: "Service \(ref)", reason: .tooManyEntries,
                                        message: "\(EpokAnnotation.rateLimitPerSource): \(why); the Service is forwarded without a per-source limit",
                                        service: ref))
                loadBalancers = loadBalancers.map { var e = $0; e.perSourceLimit = nil; return e }
            }
        }
        let entry = Entry(created: Age(service).created, mappings: mappings, loadBalancers: loadBalancers, problems: problems)
        let ports = service.spec.ports ?? []
        let portsChanged = record?.ports != ports
        held[ref] = Record(service: keepsObjects ? service : nil, ports: ports, entry: entry)
        if !problems.isEmpty { troubledEntries.insert(ref) } else if !troubledEntries.isEmpty { troubledEntries.remove(ref) }
        replaceClaims(of: ref, old: old, new: entry, diff: &diff)
        replaceLoadBalancerClaims(of: ref, old: old, new: entry, diff: &diff)
        refreshStaticSources(of: ref, service: service, setAside: setAside[ref] != nil, diff: &diff)
        if old == nil || portsChanged { refreshDependents(of: ref, diff: &diff) }
        refreshLoadBalancerAskers(askers, diff: &diff)
        return diff
    }

    /// Looks again at the Services whose LoadBalancer IP changed holder, and at the objects whose source address
    /// became, or ceased to be, a LoadBalancer IP.
    private func refreshLoadBalancerAskers(_ services: Set<ServiceRef>, diff: inout ElementDiff) {
        for other in services.sorted() { if let service = held[other]?.service { diff.merge(upsert(service)) } }
        refreshSourceAskers(diff: &diff)
    }

    /// Looks again at the objects whose source address became, or ceased to be, a LoadBalancer IP.
    private func refreshSourceAskers(diff: inout ElementDiff) {
        guard !sourceAskersToRefresh.isEmpty else { return }
        let owners = sourceAskersToRefresh
        sourceAskersToRefresh = []
        refreshAskers(owners, diff: &diff)
    }

    /// Another Service as a problem of `ref` names it: by name in the same namespace, by kind only in another.
    static func named(_ other: ServiceRef, seenFrom ref: ServiceRef) -> String {
        other.namespace == ref.namespace ? "Service \(other)" : "a Service of another namespace"
    }

    /// The LoadBalancer IPs a Service asks for (firewall or not: they are never source addresses either),
    /// but for those it may never have (the host's, a Node's), which stay the host's or the Node's.
    private func askedLoadBalancerIPs(_ service: Service) -> Set<IPAddress> {
        guard service.spec.type == "LoadBalancer" else { return [] }
        return Set((service.status?.loadBalancer?.ingress ?? []).compactMap { $0.ip.flatMap(IPAddress.init) }
            .filter { DesiredState.specialPurpose($0) == nil && reserved.why($0) == nil })
    }

    /// Records the LoadBalancer IPs `service` asks for (none when it is set aside or gone); returns the other
    /// askers of every IP whose holder changed.
    private func askForLoadBalancerIPs(_ ref: ServiceRef, _ service: Service?, setAside: Bool = false) -> Set<ServiceRef> {
        let addresses = setAside ? [] : service.map(askedLoadBalancerIPs) ?? []
        // Most Services ask for none, and asked for none before: nothing changes.
        guard !addresses.isEmpty || loadBalancerIPsAsked[ref] != nil else { return [] }
        let ask = LoadBalancerAsk(service: ref, key: service?.metadata.annotation(EpokAnnotation.allowSharedIP))
        let before = loadBalancerIPsAsked[ref] ?? [:]
        var since: [IPAddress: Int] = [:]
        for ip in addresses { since[ip] = before[ip] ?? (heldAtStart[ip] == ref ? -1 : askClock) }
        let age = service.map(ClaimPrecedence.init)
        let changes = loadBalancerIPs.replaceNamingKeys(ref, old: before.keys,
                                                        new: since.lazy.compactMap { ip, at in age.map { (ip, ask, LoadBalancerIPClaim(since: at, precedence: $0)) } })
        loadBalancerIPsAsked[ref] = since.isEmpty ? nil : since
        var affected = Set<ServiceRef>()
        for change in changes {
            affected.formUnion(loadBalancerIPs.claims(on: change.key).map(\.age.owner))
            // Became, or ceased to be, a LoadBalancer IP: whoever asks for it as a source is looked at again.
            if change.before == nil || change.after == nil {
                sourceAskersToRefresh.formUnion(sourceAddresses.claims(on: change.key).map(\.age.owner))
            }
        }
        affected.remove(ref)
        return affected
    }

    /// Who holds a LoadBalancer IP against `service` (the oldest asker, unless it is `service` or shares its
    /// key), in words: `Service ns/name`, or `a Service of another namespace`.
    private func loadBalancerTaken(against service: Service) -> (IPAddress) -> String? {
        let key = service.metadata.annotation(EpokAnnotation.allowSharedIP)
        return { ip in
            guard let holder = self.loadBalancerIPs.holder(of: ip)?.value, holder.service != service.ref,
                  holder.key == nil || holder.key != key else { return nil }
            return Self.named(holder.service, seenFrom: service.ref)
        }
    }

    /// What the static-source computations need of a Service: nil when it is not known.
    private func pods(of ref: ServiceRef) -> ServicePods? {
        guard let ports = held[ref]?.ports else { return nil }
        var result = ServicePods(ports: ports, all: podSet(ref), ready: [:])
        for key in slicesOf[ref] ?? [] {
            guard let slice = endpointSlices?[key] else { continue }
            let endpoints = slice.endpoints ?? []
            let ready = endpoints.filter(\.isReady).flatMap { $0.addresses.compactMap { IPAddress($0) } }
            for port in slice.ports ?? [] {
                guard let number = port.port.flatMap(Port.init), let proto = L4Protocol(port.protocol ?? "TCP") else { continue }
                let key = ServicePods.ReadyKey(name: port.name ?? "", proto: proto)
                var entry = result.ready[key] ?? (number, [])
                entry.addresses.formUnion(ready)
                result.ready[key] = entry
            }
        }
        return result
    }

    /// Recomputes what `service`'s annotations ask of static source addresses; nothing while it is `setAside`.
    private func refreshStaticSources(of ref: ServiceRef, service: Service, setAside: Bool, diff: inout ElementDiff) {
        guard !setAside else { return withdrawStaticSources(of: ref, diff: &diff) }
        let owner = ObjectRef(ref)
        guard service.metadata.annotation(EpokAnnotation.egressIP) != nil || staticSources.requests[owner] != nil else { return }
        let created = ClaimPrecedence(service).created
        let affected = ask(owner, created: created, for: Self.askedAddresses(of: service))
        let (templates, problems) = DesiredState.egressTemplates(of: service, reserved: reserved, taken: taken(against: owner))
        let request = StaticSourceRequest(egress: DesiredState.egressAsks(templates) { self.podSet($0) }, problems: problems)
        apply(owner, created: created, request: request, diff: &diff)
        refreshAskers(affected, diff: &diff)
    }

    /// Withdraws what a Service asked of static source addresses (it is gone, or set aside).
    private func withdrawStaticSources(of ref: ServiceRef, diff: inout ElementDiff) {
        let owner = ObjectRef(ref)
        let affected = ask(owner, created: 0, for: [])
        if staticSources.requests[owner] != nil { apply(owner, created: 0, request: nil, diff: &diff) }
        refreshAskers(affected, diff: &diff)
    }

    /// The source addresses a Service's egress annotation asks for (whether or not it gets them).
    private static func askedAddresses(of service: Service) -> Set<IPAddress> {
        Set((service.metadata.annotation(EpokAnnotation.egressIP) ?? "").split(separator: ",").compactMap { IPAddress($0) })
    }

    /// The egress addresses a StaticEgressIP asks for.
    private static func askedAddresses(of resource: StaticEgressIP) -> Set<IPAddress> {
        Set((resource.spec?.rules ?? []).compactMap { $0.egressip.flatMap(IPAddress.init) })
    }

    /// The source addresses an ExternalService asks for.
    private static func askedAddresses(of resource: ExternalService) -> Set<IPAddress> {
        Set((resource.spec?.sources ?? []).compactMap { $0.sourceIP.flatMap(IPAddress.init) })
    }

    /// The older object of another namespace that `ip` belongs to, as `owner` sees it; or, for an IP some
    /// Service has as its LoadBalancer IP (routed to the nodes, never a source or an address of this host),
    /// that Service.
    private func taken(against owner: ObjectRef) -> (IPAddress) -> String? {
        { ip in
            if self.loadBalancerIPs.holder(of: ip) != nil { return "is a LoadBalancer IP (routed to the nodes: never a source address)" }
            guard let holder = self.sourceAddresses.holder(of: ip)?.age.owner, holder.namespace != owner.namespace else { return nil }
            return "belongs to \(holder.article) of another namespace, which asked first"
        }
    }

    /// Records that `owner` (made at `created`) asks for `addresses`; returns the other askers of every address
    /// whose namespace changed with it, to be looked at again.
    private func ask(_ owner: ObjectRef, created: Int64, for addresses: Set<IPAddress>) -> Set<ObjectRef> {
        let age = RequestPrecedence(created: created, owner: owner, index: 0)
        let before = sourcesAsked[owner] ?? [:]
        var since: [IPAddress: Int] = [:]
        for ip in addresses { since[ip] = before[ip] ?? (sourcesAtStart[ip] == owner.namespace ? -1 : askClock) }
        let changes = sourceAddresses.replaceNamingKeys(owner, old: before.keys,
                                                        new: since.lazy.map { ($0.key, owner.namespace, SourceClaim(since: $0.value, precedence: age)) })
        sourcesAsked[owner] = since.isEmpty ? nil : since
        var affected = Set(changes.flatMap { sourceAddresses.claims(on: $0.key).map(\.age.owner) })
        affected.remove(owner)
        return affected
    }

    /// Looks again at what `owners` ask (an address they ask for changed namespace).
    private func refreshAskers(_ owners: Set<ObjectRef>, diff: inout ElementDiff) {
        for owner in owners.sorted() {
            if let ref = owner.service {
                if let service = held[ref]?.service { refreshStaticSources(of: ref, service: service, setAside: setAside[ref] != nil, diff: &diff) }
            } else {
                refreshResource(owner, diff: &diff)
            }
        }
    }

    /// Recomputes what a StaticEgressIP or an ExternalService asks (after it, or a Service it names, changed).
    private func refreshResource(_ owner: ObjectRef, diff: inout ElementDiff) {
        var request: StaticSourceRequest?
        var metadata: ObjectMeta?
        var named: Set<ServiceRef> = []
        // What the object asks for, recorded before its request is made (which sees who else asks).
        let asked = staticEgressIPs[owner].map(Self.askedAddresses(of:)) ?? externalServices[owner].map(Self.askedAddresses(of:)) ?? []
        let createdAt = (staticEgressIPs[owner]?.metadata ?? externalServices[owner]?.metadata)?.createdSeconds ?? .max
        let affected = ask(owner, created: createdAt, for: asked)
        defer { refreshAskers(affected, diff: &diff) }
        if let resource = staticEgressIPs[owner] {
            metadata = resource.metadata
            let (templates, problems) = DesiredState.egressTemplates(of: resource, reserved: reserved, taken: taken(against: owner)) { self.held[$0] != nil }
            request = StaticSourceRequest(egress: DesiredState.egressAsks(templates) { self.podSet($0) }, problems: problems)
            named = Set((resource.spec?.rules ?? []).compactMap { $0.serviceName.map { ServiceRef(namespace: owner.namespace, name: $0) } })
        } else if let resource = externalServices[owner] {
            metadata = resource.metadata
            request = DesiredState.bridgeRequest(of: resource, reserved: reserved, taken: taken(against: owner), pods: pods(of:)) { service in
                self.referenceGrants.values.contains { $0.lets(externalServicesOf: owner.namespace, name: service) }
            }
            named = Set((resource.spec?.sources ?? []).compactMap { s in s.service?.name.map { ServiceRef(namespace: s.service?.namespace ?? owner.namespace, name: $0) } })
        }
        if let reason = resourcesSetAside[owner], request != nil {
            request = StaticSourceRequest(problems: [Problem(object: owner.description, reason: .rejectedByKernel,
                                                             message: "\(reason); set aside (nothing applied) until it changes", owner: owner)])
        }
        for ref in dependencies[owner] ?? [] where !named.contains(ref) { dependents[ref]?.remove(owner) }
        for ref in named { dependents[ref, default: []].insert(owner) }
        dependencies[owner] = named.isEmpty ? nil : named
        let created = metadata?.createdSeconds ?? .max
        apply(owner, created: created, request: request, diff: &diff)
    }

    /// Every endpoint address of a Service, but for those EndpointSlices of another namespace list too: a pod
    /// belongs to one namespace, and whose it is cannot be told, so neither namespace's egress or bridge takes it.
    private func podSet(_ ref: ServiceRef) -> Set<IPAddress> {
        guard let pods = podCounts[ref] else { return [] }
        return Set(pods.keys.lazy.filter { !self.contested($0) })
    }

    /// Whether EndpointSlices of more than one namespace list `pod`.
    private func contested(_ pod: IPAddress) -> Bool {
        guard let refs = podRefs[pod], refs.count > 1, let first = refs.first?.namespace else { return false }
        return refs.contains { $0.namespace != first }
    }

    /// The distinct endpoint addresses of a slice, as written.
    private static func addresses(of slice: EndpointSlice?) -> Set<String> { Set((slice?.endpoints ?? []).flatMap(\.addresses)) }

    /// Counts a slice's endpoint `addresses` in (`delta` 1) or out (-1) of its Service's pods; notes in `changed`
    /// the pods that appeared (true) and went (false).
    private func countPods(_ ref: ServiceRef, _ addresses: Set<String>, _ delta: Int, into changed: inout [IPAddress: Bool]) {
        for text in addresses {
            guard let pod = IPAddress(text) else { continue }
            let before = podCounts[ref]?[pod] ?? 0
            let after = before + delta
            podCounts[ref, default: [:]][pod] = after > 0 ? after : nil
            if (before == 0) != (after == 0) {
                let wasContested = contested(pod)
                if after > 0 { podRefs[pod, default: []].insert(ref) } else { podRefs[pod]?.remove(ref) }
                if podRefs[pod]?.isEmpty == true { podRefs[pod] = nil }
                if contested(pod) != wasContested { contestedFlips.insert(pod) }
            }
            // A pod that goes and comes back in one change (its slice rewritten) has not changed.
            if before == 0 && after > 0 { changed[pod] = changed[pod] == false ? nil : true }
            if before > 0 && after == 0 { changed[pod] = changed[pod] == true ? nil : false }
        }
        if podCounts[ref]?.isEmpty == true { podCounts[ref] = nil }
    }

    /// Pods of `ref` appeared (true) or went (false): the egress asks of the Service's annotations and of the
    /// StaticEgressIPs naming it change for those pods only; ExternalServices naming it are recomputed.
    private func podsChanged(_ ref: ServiceRef, _ changed: [IPAddress: Bool], diff: inout ElementDiff) {
        var owners: [(ObjectRef, Int64, [EgressTemplate])] = []
        if let service = held[ref]?.service, setAside[ref] == nil, staticSources.requests[ObjectRef(ref)] != nil {
            owners.append((ObjectRef(ref), ClaimPrecedence(service).created,
                           DesiredState.egressTemplates(of: service, reserved: reserved, taken: taken(against: ObjectRef(ref))).templates))
        }
        for owner in dependents[ref] ?? [] {
            if let resource = staticEgressIPs[owner], resourcesSetAside[owner] == nil {
                let templates = DesiredState.egressTemplates(of: resource, reserved: reserved, taken: taken(against: owner)) { self.held[$0] != nil }
                    .templates.filter { $0.service == ref }
                owners.append((owner, resource.metadata.createdSeconds ?? .max, templates))
            } else if externalServices[owner] != nil {
                refreshResource(owner, diff: &diff)
            }
        }
        for (owner, created, templates) in owners {
            var pods: [IPAddress: [EgressAsk]] = [:]
            for (pod, present) in changed {
                let others = staticSources.requests[owner]?.egress[pod]?.filter { ask in !templates.contains { $0.index == ask.index } } ?? []
                pods[pod] = others + (present ? templates.compactMap { $0.ask(pod) } : [])
            }
            let changes = staticSources.updateEgress(owner, created: created, pods: pods, track: tracksElements)
            for (set, element) in changes.removed { change(set, element, present: false, &diff) }
            for (set, element) in changes.added { change(set, element, present: true, &diff) }
            staleEgressSinceTaken += changes.staleEgress
        }
    }

    /// Refreshes the StaticEgressIPs and ExternalServices that name `ref`.
    private func refreshDependents(of ref: ServiceRef, diff: inout ElementDiff) {
        for owner in dependents[ref] ?? [] { refreshResource(owner, diff: &diff) }
    }

    private func apply(_ owner: ObjectRef, created: Int64, request: StaticSourceRequest?, diff: inout ElementDiff) {
        let changes = staticSources.replace(owner, created: created, with: request, track: tracksElements)
        for (set, element) in changes.removed { change(set, element, present: false, &diff) }
        for (set, element) in changes.added { change(set, element, present: true, &diff) }
        staleEgressSinceTaken += changes.staleEgress
    }

    /// Adds or replaces a StaticEgressIP and returns the element changes.
    public func upsert(_ resource: StaticEgressIP) -> ElementDiff {
        refreshResource(resource.ref, changed: staticEgressIPs.updateValue(resource, forKey: resource.ref) != resource)
    }

    /// Adds or replaces an ExternalService and returns the element changes.
    public func upsert(_ resource: ExternalService) -> ElementDiff {
        refreshResource(resource.ref, changed: externalServices.updateValue(resource, forKey: resource.ref) != resource)
    }

    /// After a resource was stored: one the kernel refused gets another chance when it changed.
    private func refreshResource(_ owner: ObjectRef, changed: Bool) -> ElementDiff {
        tick()
        var diff = ElementDiff()
        if changed { resourcesSetAside[owner] = nil }
        refreshResource(owner, diff: &diff)
        return diff
    }

    /// Removes a StaticEgressIP or an ExternalService and returns the element changes.
    public func remove(_ owner: ObjectRef) -> ElementDiff {
        var diff = ElementDiff()
        resourcesSetAside[owner] = nil
        guard staticEgressIPs.removeValue(forKey: owner) != nil || externalServices.removeValue(forKey: owner) != nil else { return diff }
        refreshResource(owner, diff: &diff)
        return diff
    }

    /// Adds or replaces a ReferenceGrant; the ExternalServices of other namespaces are looked at again.
    public func upsert(_ grant: ReferenceGrant) -> ElementDiff {
        guard referenceGrants.updateValue(grant, forKey: grant.key) != grant else { return ElementDiff() }
        return refreshCrossNamespaceBridges()
    }

    /// Removes a ReferenceGrant (by `namespace/name`); what it let through is unbridged.
    public func remove(referenceGrant key: String) -> ElementDiff {
        guard referenceGrants.removeValue(forKey: key) != nil else { return ElementDiff() }
        return refreshCrossNamespaceBridges()
    }

    /// Replaces every ReferenceGrant (after they were listed).
    public func replaceReferenceGrants(_ grants: [ReferenceGrant]) -> ElementDiff {
        let incoming = Dictionary(grants.map { ($0.key, $0) }, uniquingKeysWith: { $1 })
        guard incoming != referenceGrants else { return ElementDiff() }
        referenceGrants = incoming
        return refreshCrossNamespaceBridges()
    }

    /// Refreshes the ExternalServices that name a Service of another namespace (whose grants may have changed).
    private func refreshCrossNamespaceBridges() -> ElementDiff {
        var diff = ElementDiff()
        for (owner, resource) in externalServices.sorted(by: { $0.key < $1.key })
        where (resource.spec?.sources ?? []).contains(where: { ($0.service?.namespace ?? owner.namespace) != owner.namespace }) {
            refreshResource(owner, diff: &diff)
        }
        return diff
    }

    /// Replaces every StaticEgressIP and ExternalService (after they were listed) and returns the element changes.
    public func replaceResources(staticEgressIPs egress: [StaticEgressIP]?, externalServices bridges: [ExternalService]?) -> ElementDiff {
        tick()
        let outermost = !clockHeld
        clockHeld = true
        defer { if outermost { clockHeld = false } }
        var diff = ElementDiff()
        if let egress {
            let incoming = Set(egress.map(\.ref))
            for owner in staticEgressIPs.keys where !incoming.contains(owner) { diff.merge(remove(owner)) }
            for resource in egress where staticEgressIPs[resource.ref] != resource { diff.merge(upsert(resource)) }
        }
        if let bridges {
            let incoming = Set(bridges.map(\.ref))
            for owner in externalServices.keys where !incoming.contains(owner) { diff.merge(remove(owner)) }
            for resource in bridges where externalServices[resource.ref] != resource { diff.merge(upsert(resource)) }
        }
        return diff
    }

    /// The StaticEgressIP or ExternalService held under `owner`, as an Event's object.
    public func resourceMetadata(_ owner: ObjectRef) -> ObjectMeta? {
        staticEgressIPs[owner]?.metadata ?? externalServices[owner]?.metadata
    }

    /// The problems of a StaticEgressIP or an ExternalService: its own, and its claims an older one holds.
    public func problems(of owner: ObjectRef) -> [Problem] {
        owner.service.map(problems(of:)) ?? staticSources.problems(of: owner)
    }

    /// The StaticEgressIPs and ExternalServices with a problem, in order.
    public var troubledResources: [ObjectRef] { staticSources.troubled.filter { $0.kind != .service }.sorted() }

    /// The addresses the held egress rules and bridges need on the host.
    public var neededAddresses: Set<IPAddress> { staticSources.neededAddresses }

    /// Takes a StaticEgressIP or an ExternalService out (the kernel refused one of its elements) until it changes.
    public func setAside(_ owner: ObjectRef, because reason: String) -> ElementDiff {
        if let service = owner.service { return setAside(service, because: reason) }
        var diff = ElementDiff()
        resourcesSetAside[owner] = reason
        refreshResource(owner, diff: &diff)
        return diff
    }

    /// The group of a Service with `externalTrafficPolicy: Local` (the eligible nodes that run a ready endpoint
    /// of it, while the EndpointSlices are known) or with health checks (the nodes whose checks are up); nil
    /// when it is served by the shared group of every eligible node.
    private func group(of service: Service, mappings: [Mapping], problems: inout [Problem]) -> NodeGroup? {
        let ref = service.ref
        let local = service.spec.externalTrafficPolicy == "Local" && ["NodePort", "LoadBalancer"].contains(service.spec.type ?? "")
        let checks = healthChecks(of: service, local: local, mappings: mappings, problems: &problems)
        guard !mappings.isEmpty, (local && endpointSlices != nil) || !checks.isEmpty else {
            if !grouped.isEmpty { grouped.remove(ref) }
            setViews(ref, nil)
            return nil
        }
        if !grouped.contains(ref) { readyNodes[ref] = currentReadyNodes(of: ref) }
        grouped.insert(ref)
        var nodes = eligible
        if local, endpointSlices != nil {
            let ready = readyNodes[ref] ?? []
            nodes = nodes.filter { ready.contains($0.node) }
        }
        var seen: [HealthView: String] = [:]
        var failed: [NodeAddress] = []
        for (check, port) in checks {
            nodes = nodes.filter { node in
                guard let address = node.ipv4.map(IPAddress.v4) ?? node.ipv6.map(IPAddress.v6) else { return true }
                let view = HealthView(target: ProbeTarget(address: address, port: port, check: check), fall: check.fall, rise: check.rise,
                                      namespace: ref.namespace)
                seen[view] = node.node
                if down.contains(view) { failed.append(node) }
                return !down.contains(view)
            }
        }
        setViews(ref, seen.isEmpty ? nil : seen)
        if !local || endpointSlices == nil, nodes == eligible { return nil }
        return NodeGroup(nodes: nodes, slots: slots, down: failed)
    }

    /// The Service's health checks with the node port each probes: its annotation's (an invalid one is a
    /// problem, and the Service is forwarded as without checks), and kube-proxy's `/healthz` on the
    /// `healthCheckNodePort` of a Local Service.
    private func healthChecks(of service: Service, local: Bool, mappings: [Mapping], problems: inout [Problem]) -> [(HealthCheck, Port)] {
        var result: [(HealthCheck, Port)] = []
        if let text = service.metadata.annotation(EpokAnnotation.healthCheck) {
            do {
                let check = try AnnotationParser.healthCheck(text)
                // A check probes what the Service exposes: one of its own node ports, or its healthCheckNodePort;
                // never any port of the nodes (the router would scan them for the tenant).
                let own = Set((service.spec.ports ?? []).compactMap { $0.nodePort } + [service.spec.healthCheckNodePort].compactMap { $0 })
                let paths = healthPaths[service.ref.namespace] ?? [:]
                if case .http(let path) = check.kind, paths[path] == nil, paths.count >= ServiceLimits.healthPathsPerNamespace {
                    problems.append(Problem(object: "Service \(service.ref)", reason: .tooManyEntries,
                                            message: "\(EpokAnnotation.healthCheck): namespace \(service.ref.namespace) checks \(paths.count) distinct HTTP paths already, the most one namespace may (each costs a probe per node and interval); use one of them: \(paths.keys.sorted().prefix(5).joined(separator: ", ")); the Service is forwarded without health checks",
                                            service: service.ref))
                } else if let port = check.port, !own.contains(Int(port.rawValue)) {
                    let listed = own.sorted().map(String.init).joined(separator: ", ")
                    problems.append(Problem(object: "Service \(service.ref)", reason: .invalidHealthCheck,
                                            message: "\(EpokAnnotation.healthCheck): port=\(port) is not a node port of this Service (\(listed.isEmpty ? "it has none" : "its node ports: " + listed)); the Service is forwarded without health checks",
                                            service: service.ref))
                } else if let port = check.port ?? (mappings.first { $0.proto == .tcp } ?? mappings.first)?.nodePort {
                    result.append((check, port))
                }
            } catch {
                problems.append(Problem(object: "Service \(service.ref)", reason: .invalidHealthCheck,
                                        message: "\(error); the Service is forwarded without health checks", service: service.ref))
            }
        }
        if local, let number = service.spec.healthCheckNodePort, let port = Port(number) {
            result.append((HealthCheck.kubeProxy(port: port), port))
        }
        return result
    }

    private func setViews(_ ref: ServiceRef, _ new: [HealthView: String]?) {
        guard views[ref] != new else { return }
        func paths(_ views: [HealthView: String]?) -> Set<String> {
            Set((views ?? [:]).keys.compactMap { if case .http(let path) = $0.target.kind { path } else { nil } })
        }
        let (before, after) = (paths(views[ref]), paths(new))
        for path in before.subtracting(after) {
            healthPaths[ref.namespace]?[path, default: 1] -= 1
            if healthPaths[ref.namespace]?[path] == 0 { healthPaths[ref.namespace]?[path] = nil }
            if healthPaths[ref.namespace]?.isEmpty == true { healthPaths[ref.namespace] = nil }
        }
        for path in after.subtracting(before) { healthPaths[ref.namespace, default: [:]][path, default: 0] += 1 }
        views[ref] = new
        healthViewsGeneration += 1
    }

    /// Every health view the checked Services depend on: what the prober keeps up to date.
    public var healthViews: Set<HealthView> { Set(views.values.flatMap(\.keys)) }

    /// The Services that depend on `view`, with the node it probes.
    public func services(judgedBy view: HealthView) -> [(ServiceRef, String)] {
        views.compactMap { ref, own in own[view].map { (ref, $0) } }
    }

    /// Takes the prober's news: the views that went down or up. Returns the element changes (the Services
    /// concerned get their groups anew; flows to a node that went down are flushed).
    public func health(_ changes: [HealthView: Bool]) -> ElementDiff {
        for (view, up) in changes {
            if up { down.remove(view) } else { down.insert(view) }
        }
        let concerned = views.filter { !Set($0.value.keys).isDisjoint(with: changes.keys) }.map(\.key)
        return regroup(concerned)
    }

    /// Recomputes the mappings of every Service with a group of its own (after the nodes or endpoints changed).
    private func regroup(_ refs: some Sequence<ServiceRef>) -> ElementDiff {
        var diff = ElementDiff()
        for ref in refs {
            guard let service = held[ref]?.service else { continue }
            diff.merge(upsert(service))
        }
        return diff
    }

    /// Replaces every EndpointSlice (after they were listed) and returns the element changes.
    public func replaceEndpointSlices(_ slices: [EndpointSlice]) -> ElementDiff {
        endpointSlices = Dictionary(slices.map { ($0.key, $0) }, uniquingKeysWith: { $1 })
        slicesOf = [:]
        podCounts = [:]
        podRefs = [:]
        var ignored: [IPAddress: Bool] = [:]
        for slice in endpointSlices!.values {
            guard let ref = slice.service else { continue }
            slicesOf[ref, default: []].insert(slice.key)
            countPods(ref, Self.addresses(of: slice), 1, into: &ignored)
        }
        let before = readyNodes
        readyNodes = [:]
        for slice in endpointSlices!.values { addReady(slice) }
        let changed = Set(before.keys).union(readyNodes.keys).filter { before[$0] != readyNodes[$0] }
        // Services whose policy is Local were forwarded to every node until now: all of them change.
        let local = held.compactMap { ref, record in record.service?.spec.externalTrafficPolicy == "Local" ? ref : nil }
        var diff = regroup(Set(local).union(changed.filter { grouped.contains($0) }))
        contestedFlips = []
        refreshAllStaticSources(&diff)
        return diff
    }

    /// Adds or replaces one EndpointSlice and returns the element changes.
    public func upsert(_ slice: EndpointSlice) -> ElementDiff {
        guard endpointSlices != nil else { return ElementDiff() }
        let old = endpointSlices?[slice.key]
        endpointSlices?[slice.key] = slice
        if let ref = old?.service { slicesOf[ref]?.remove(slice.key) }
        if let ref = slice.service { slicesOf[ref, default: []].insert(slice.key) }
        var changed: [ServiceRef: [IPAddress: Bool]] = [:]
        let before = Self.addresses(of: old), after = Self.addresses(of: slice)
        if let ref = old?.service {
            // Only the addresses that differ are parsed and counted: an endpoint change costs one, not the slice.
            countPods(ref, ref == slice.service ? before.subtracting(after) : before, -1, into: &changed[ref, default: [:]])
        }
        if let ref = slice.service { countPods(ref, ref == old?.service ? after.subtracting(before) : after, 1, into: &changed[ref, default: [:]]) }
        return refreshReady(for: [old?.service, slice.service], podsChanged: changed)
    }

    /// Removes one EndpointSlice (by `namespace/name`) and returns the element changes.
    public func remove(endpointSlice key: String) -> ElementDiff {
        guard let old = endpointSlices?.removeValue(forKey: key) else { return ElementDiff() }
        if let ref = old.service { slicesOf[ref]?.remove(key) }
        var changed: [ServiceRef: [IPAddress: Bool]] = [:]
        if let ref = old.service { countPods(ref, Self.addresses(of: old), -1, into: &changed[ref, default: [:]]) }
        return refreshReady(for: [old.service], podsChanged: changed)
    }

    private func addReady(_ slice: EndpointSlice) {
        guard let ref = slice.service else { return }
        readyNodes[ref, default: []].formUnion(Self.readyNodes(in: slice))
    }

    private static func readyNodes(in slice: EndpointSlice) -> [String] {
        (slice.endpoints ?? []).filter(\.isReady).compactMap(\.nodeName)
    }

    /// The nodes running a ready endpoint of `ref`, from its slices.
    private func currentReadyNodes(of ref: ServiceRef) -> Set<String>? {
        let nodes = (slicesOf[ref] ?? []).flatMap { key in endpointSlices?[key].map(Self.readyNodes(in:)) ?? [] }
        return nodes.isEmpty ? nil : Set(nodes)
    }

    /// After a slice of these Services changed: their ready nodes (for the groups of Local and checked Services)
    /// and the static sources asked for their pods (`podsChanged`: the pods that appeared or went; ExternalServices
    /// are recomputed on any change, as they follow readiness and ports too).
    private func refreshReady(for refs: [ServiceRef?], podsChanged changed: [ServiceRef: [IPAddress: Bool]]) -> ElementDiff {
        var diff = ElementDiff()
        var changed = changed
        var refs = Set(refs.compactMap { $0 })
        // A pod that another namespace's slice now lists too went for every Service that lists it (and came back
        // when that ended); a contested pod never appears.
        for pod in contestedFlips {
            for ref in podRefs[pod] ?? [] {
                changed[ref, default: [:]][pod] = !contested(pod)
                refs.insert(ref)
            }
        }
        contestedFlips = []
        for (ref, pods) in changed {
            for (pod, present) in pods where present && contested(pod) { changed[ref]![pod] = nil }
        }
        for ref in refs.sorted() {
            if grouped.contains(ref) {
                let now = currentReadyNodes(of: ref)
                if readyNodes[ref] != now {
                    readyNodes[ref] = now
                    diff.merge(regroup([ref]))
                }
            }
            podsChanged(ref, changed[ref] ?? [:], diff: &diff)
        }
        return diff
    }

    /// Recomputes every static-source request (after every EndpointSlice was replaced).
    private func refreshAllStaticSources(_ diff: inout ElementDiff) {
        for owner in staticSources.requests.keys {
            if let ref = owner.service, let service = held[ref]?.service { refreshStaticSources(of: ref, service: service, setAside: setAside[ref] != nil, diff: &diff) }
        }
        for owner in Array(staticEgressIPs.keys) + Array(externalServices.keys) { refreshResource(owner, diff: &diff) }
    }

    /// The distinct per-source rates of the LoadBalancer entries held (the skeleton has one pair of rules each).
    public var perSourceLimits: [RateLimit] { perSourceInUse.keys.sorted() }

    /// Takes a Service's mappings out (the kernel refused one of its elements) until the Service changes;
    /// returns the element changes.
    public func setAside(_ ref: ServiceRef, because reason: String) -> ElementDiff {
        guard let service = held[ref]?.service else { return ElementDiff() }
        setAside[ref] = reason
        return upsert(service)
    }

    /// The Node held under `name`.
    public func node(_ name: String) -> Node? { nodes[name] }

    /// Every Service held.
    public var serviceRefs: some Collection<ServiceRef> { held.keys }

    /// The Service held under `ref`.
    public func service(_ ref: ServiceRef) -> Service? { held[ref]?.service }

    /// The Services set aside, with the reason.
    public var servicesSetAside: [ServiceRef: String] { setAside }

    /// The Service an element belongs to, if any: by the host port its key starts with, its LB IP . protocol .
    /// port, or the pod address of an egress rule.
    public func owner(of rejected: RejectedElement) -> ObjectRef? {
        if let owner = staticSources.owner(of: rejected) { return owner }
        let key = rejected.element.key
        if key.count >= 3, let address = IPAddress(key[0]), case .l4proto(let proto) = key[1], case .port(let port) = key[2] {
            return loadBalancerClaims.holder(of: LoadBalancerKey(address: address, proto: proto, port: port)).map { ObjectRef($0.age.service) }
        }
        guard key.count >= 2, case .l4proto(let proto) = key[0], case .port(let number) = key[1] else { return nil }
        return claims.holder(of: PortKey(proto: proto, port: number)).map { ObjectRef($0.age.service) }
    }

    /// Removes a Service (deleted from the cluster) and returns the element changes it causes.
    public func remove(_ ref: ServiceRef) -> ElementDiff {
        let askers = askForLoadBalancerIPs(ref, nil)
        var diff = removeService(ref)
        refreshLoadBalancerAskers(askers, diff: &diff)
        return diff
    }

    private func removeService(_ ref: ServiceRef) -> ElementDiff {
        var diff = ElementDiff()
        setAside[ref] = nil
        grouped.remove(ref)
        setViews(ref, nil)
        guard let old = held.removeUnordered(forKey: ref)?.entry else { return diff }
        troubledEntries.remove(ref)
        replaceClaims(of: ref, old: old, new: nil, diff: &diff)
        replaceLoadBalancerClaims(of: ref, old: old, new: nil, diff: &diff)
        withdrawStaticSources(of: ref, diff: &diff)
        refreshDependents(of: ref, diff: &diff)
        return diff
    }

    /// Adds or replaces a Node and returns the element changes it causes.
    public func upsert(_ node: Node) -> ElementDiff {
        nodes[node.metadata.name] = node
        return refreshNodes()
    }

    /// Removes a Node and returns the element changes it causes.
    public func remove(node name: String) -> ElementDiff {
        guard nodes.removeValue(forKey: name) != nil else { return ElementDiff() }
        return refreshNodes()
    }

    /// Replaces every object at once (after a relist) and returns the element changes. The snapshot's Services
    /// are let go of once they are held here, before the elements are computed (given the only copy, at 50k
    /// Services that is an array of 11 MB that no longer lives through the elements and the commit).
    public func replaceAll(_ snapshot: consuming ClusterSnapshot) -> ElementDiff {
        tick()
        let outermost = !clockHeld
        clockHeld = true
        defer { if outermost { clockHeld = false } }
        if tracksElements && held.isEmpty && nodes.isEmpty {
            // The first snapshot: settle every claim, then compute the elements once (no diff built piece by piece).
            tracksElements = false
            _ = replaceAll(snapshot)
            tracksElements = true
            let before = elements
            elements = ForwardingRuleset.elements(for: state.forwarding)
            return ElementDiff(from: before, to: elements)
        }
        var diff = ElementDiff()
        held.reserveCapacity(snapshot.services.count)
        claims.reserveCapacity(snapshot.services.count)
        if !held.isEmpty {
            let incoming = Set(snapshot.services.map(\.ref))
            for ref in held.keys where !incoming.contains(ref) { diff.merge(remove(ref)) }
        }
        // Nodes and endpoints first: a Service's own group is computed from them as it is upserted.
        if let slices = snapshot.endpointSlices { diff.merge(replaceEndpointSlices(slices)) }
        nodes = Dictionary(snapshot.nodes.map { ($0.metadata.name, $0) }, uniquingKeysWith: { $1 })
        diff.merge(refreshNodes())
        // Every address asked for is recorded before any request is made, so that it goes to the namespace of its
        // oldest asker whatever the order objects are read in; askers held before that lost it are looked at again.
        var askers = Set<ObjectRef>()
        var loadBalancerAskers = Set<ServiceRef>()
        for service in snapshot.services where service.spec.type == "LoadBalancer" {
            loadBalancerAskers.formUnion(askForLoadBalancerIPs(service.ref, service, setAside: setAside[service.ref] != nil))
        }
        for service in snapshot.services where service.metadata.annotation(EpokAnnotation.egressIP) != nil && setAside[service.ref] == nil {
            askers.formUnion(ask(ObjectRef(service.ref), created: ClaimPrecedence(service).created, for: Self.askedAddresses(of: service)))
        }
        for resource in snapshot.staticEgressIPs {
            askers.formUnion(ask(resource.ref, created: resource.metadata.createdSeconds ?? .max, for: Self.askedAddresses(of: resource)))
        }
        for resource in snapshot.externalServices {
            askers.formUnion(ask(resource.ref, created: resource.metadata.createdSeconds ?? .max, for: Self.askedAddresses(of: resource)))
        }
        if held.isEmpty {
            upsertFirst(snapshot.services, diff: &diff)
        } else {
            for index in snapshot.services.indices where !keepsObjects || !isHeld(snapshot.services[index]) { diff.merge(upsert(snapshot.services[index])) }
        }
        snapshot.services = []
        if let grants = snapshot.referenceGrants { diff.merge(replaceReferenceGrants(grants)) }
        diff.merge(replaceResources(staticEgressIPs: snapshot.staticEgressIPs, externalServices: snapshot.externalServices))
        refreshAskers(askers, diff: &diff)
        refreshLoadBalancerAskers(loadBalancerAskers, diff: &diff)
        return diff
    }

    /// Whether `service` is held as it is (compared where it is held, without a copy of it).
    private func isHeld(_ service: Service) -> Bool {
        guard let place = held.index(forKey: service.ref) else { return false }
        return held.values[place].service == service
    }

    /// The SNATed conntrack entries the changes since the last call made stale; deleted after committing.
    public func takeStaleEgress() -> [StaleEgress] {
        defer { staleEgressSinceTaken = [] }
        return staleEgressSinceTaken
    }

    /// The conntrack entries the changes since the last call made stale; the caller deletes them after committing.
    /// A host port's are told every bridge entrance address (held, or of a bridge that just went), whose flows
    /// are never theirs.
    public func takeStaleFlows() -> [StaleFlows] {
        defer { staleSinceTaken = [] }
        return sparingEntrances(staleSinceTaken + staticSources.takeStaleFlows())
    }

    /// `StaleFlows.between(before, state.forwarding)`, each mapping looked up where it is claimed rather than the
    /// whole state computed and gathered into a table (at 50k mappings, 12 MB more at once).
    public func staleFlows(since before: ForwardingState) -> [StaleFlows] {
        StaleFlows.between(before, nodes: eligible, mappings: { claims.holder(of: $0)?.value })
    }

    /// `stale` with every host port's told the bridge entrance addresses (held, or of a bridge among `stale`),
    /// whose flows are never a host port's.
    public func sparingEntrances(_ stale: [StaleFlows]) -> [StaleFlows] {
        let entrances = staticSources.entranceAddresses.union(stale.compactMap(\.entrance))
        return stale.map { stale in
            var stale = stale
            if stale.entrance == nil { stale.otherEntrances = entrances }
            return stale
        }
    }

    /// The mappings a Service holds (its valid entries that no older Service claims).
    public func mappings(of ref: ServiceRef) -> [Mapping] {
        (held[ref]?.entry.mappings ?? []).filter { claims.holder(of: PortKey($0))?.age.service == ref }
    }

    /// The Service holding a host port, and its mapping there.
    public func holder(of port: PortKey) -> (service: ServiceRef, mapping: Mapping)? {
        claims.holder(of: port).map { ($0.age.service, $0.value) }
    }

    /// How many nodes receive forwarded connections.
    public var nodeCount: Int { eligible.count }

    /// The round-robin slots the eligible nodes need (see `ForwardingRuleset.slots(forNodes:)`).
    public var slots: UInt32 { ForwardingRuleset.slots(forNodes: eligible.count) }

    /// Whether `state` would list a problem, found without building it.
    public var hasProblems: Bool {
        !nodeProblems.isEmpty || claims.hasOutranked || loadBalancerClaims.hasOutranked
            || !staticSources.troubled.isEmpty || !troubledEntries.isEmpty
    }

    /// The full desired state: the ports granted (by protocol and port), the eligible nodes, and the problems
    /// (the Nodes' first, then each Service's, oldest Service first).
    public var state: DesiredState {
        let ports = claims.holdersByKey.map { ForwardedPort(service: $0.age.service, mapping: $0.value) }
        let problems = self.problems
        let loadBalancers = loadBalancerClaims.holders.map(\.value).sorted { $0.key < $1.key }
        var state = DesiredState(ports: ports, problems: problems, nodes: eligible, draining: draining, loadBalancers: loadBalancers, options: options)
        staticSources.fill(&state.forwarding)
        return state
    }

    /// Every problem of the state (the Nodes' first, then each Service's, oldest Service first, then the other
    /// resources'), as `state.problems` has them, without computing the rest of the state: only Services with a
    /// problem of their own or a lost claim are visited.
    public var problems: [Problem] {
        var troubled = troubledEntries
        troubled.formUnion(claims.outranked)
        troubled.formUnion(loadBalancerClaims.outranked)
        let sourcesTroubled = staticSources.troubled
        troubled.formUnion(sourcesTroubled.compactMap(\.service).filter { held[$0] != nil })
        var problems = nodeProblems
        for ref in troubled.sorted(by: { age(held[$0]!.entry, of: $0) < age(held[$1]!.entry, of: $1) }) { problems += self.problems(of: ref) }
        for owner in sourcesTroubled.filter({ $0.kind != .service }).sorted() { problems += staticSources.problems(of: owner) }
        return problems
    }

    /// Problems of one Service: its own annotations, and host ports an older Service holds.
    public func problems(of ref: ServiceRef) -> [Problem] {
        guard let entry = held[ref]?.entry else { return [] }
        var result = entry.problems
        for m in entry.mappings {
            guard let owner = claims.holder(of: PortKey(m)), owner.age.service != ref else { continue }
            result.append(Problem(object: "Service \(ref)", reason: .portConflict,
                                  message: "host port \(m.hostPort)/\(m.proto) is already forwarded for \(Self.named(owner.age.service, seenFrom: ref)), which is older; this entry is ignored",
                                  service: ref))
        }
        result += staticSources.problems(of: ObjectRef(ref))
        for e in entry.loadBalancers {
            guard let owner = loadBalancerClaims.holder(of: e.key), owner.age.service != ref else { continue }
            result.append(Problem(object: "Service \(ref)", reason: .portConflict,
                                  message: "LoadBalancer \(e.key) is already admitted for \(Self.named(owner.age.service, seenFrom: ref)), which is older; not admitted for this one",
                                  service: ref))
        }
        return result
    }

    /// Settles who holds each LoadBalancer IP . protocol . port the Service held or holds, and changes the
    /// elements of those whose holder (or entry) changed.
    private func replaceLoadBalancerClaims(of ref: ServiceRef, old: Entry?, new: Entry?, diff: inout ElementDiff) {
        guard old?.loadBalancers.isEmpty == false || new?.loadBalancers.isEmpty == false else { return }
        // Changes are compared even in a bulk load: the per-source rates in use are counted from them.
        let changes = loadBalancerClaims.replace(ref, old: (old?.loadBalancers ?? []).lazy.map(\.key), new: (new?.loadBalancers ?? []).lazy.map { ($0.key, $0) },
                                                 age: new.map { age($0, of: ref) })
        for (gone, now) in changes {
            if let gone {
                if let rate = gone.perSourceLimit {
                    perSourceInUse[rate, default: 0] -= 1
                    if perSourceInUse[rate] == 0 { perSourceInUse[rate] = nil }
                    let namespace = Self.namespace(of: gone)
                    perSourceByNamespace[namespace, default: [:]][rate, default: 0] -= 1
                    if perSourceByNamespace[namespace]?[rate] == 0 { perSourceByNamespace[namespace]?[rate] = nil }
                    if perSourceByNamespace[namespace]?.isEmpty == true { perSourceByNamespace[namespace] = nil }
                }
                if tracksElements { for (set, element) in ForwardingRuleset.loadBalancerElements(gone) { change(set, element, present: false, &diff) } }
            }
            if let now {
                if let rate = now.perSourceLimit {
                    perSourceInUse[rate, default: 0] += 1
                    perSourceByNamespace[Self.namespace(of: now), default: [:]][rate, default: 0] += 1
                }
                if tracksElements { for (set, element) in ForwardingRuleset.loadBalancerElements(now) { change(set, element, present: true, &diff) } }
            }
        }
    }

    /// The namespace of the Service an entry is admitted for (its label is the Service's `namespace/name`).
    private static func namespace(of entry: LoadBalancerEntry) -> String {
        String(entry.label?.split(separator: "/").first ?? "")
    }

    /// The age of the entry of the Service held under `ref`.
    private func age(_ entry: Entry, of ref: ServiceRef) -> Age { Age(created: entry.created, service: ref) }

    private func replaceClaims(of ref: ServiceRef, old: Entry?, new: Entry?, diff: inout ElementDiff) {
        // A bulk load (no elements tracked) only settles the claims: no holders to compare, no elements to change.
        let changes = claims.replace(ref, old: (old?.mappings ?? []).lazy.map(PortKey.init), new: (new?.mappings ?? []).lazy.map { (PortKey($0), $0) },
                                     age: new.map { age($0, of: ref) }, changes: tracksElements)
        for (gone, now) in changes {
            if let gone {
                for (set, element) in ForwardingRuleset.mappingElements(gone) { change(set, element, present: false, &diff) }
                staleSinceTaken += StaleFlows.between(ForwardingState(interfaces: [], nodes: eligible, mappings: [gone]),
                                                      ForwardingState(interfaces: [], nodes: eligible, mappings: now.map { [$0] } ?? []),
                                                      keeping: draining)
            }
            if let now {
                for (set, element) in ForwardingRuleset.mappingElements(now) { change(set, element, present: true, &diff) }
            }
        }
    }

    private func refreshNodes() -> ElementDiff {
        var diff = refreshEligibleNodes()
        // A Node's address is no tenant's: when the Nodes' addresses change, whatever a tenant asked of an
        // address is looked at again.
        diff.merge(refreshReserved(elsewhere: reserved.elsewhere))
        return diff
    }

    /// Takes the host's addresses anew (they are never backends, nor any tenant's). Returns the element changes.
    public func setHostAddresses(_ addresses: Set<IPAddress>) -> ElementDiff {
        guard addresses != options.hostAddresses else { return ElementDiff() }
        options.hostAddresses = addresses
        return refreshNodes()
    }

    /// Takes the addresses another host answers for (ARP probes of `--manage-addresses`): no tenant gets them,
    /// and what asked for them is looked at again. Returns the element changes.
    public func setAnsweredElsewhere(_ addresses: [IPAddress: String]) -> ElementDiff {
        refreshReserved(elsewhere: addresses)
    }

    private func refreshReserved(elsewhere: [IPAddress: String]) -> ElementDiff {
        let now = ReservedAddresses(host: options.hostAddresses, nodes: Array(nodes.values), pools: options.addressPools, elsewhere: elsewhere,
                                    gateways: options.gateways)
        guard now != reserved else { return ElementDiff() }
        reserved = now
        return refreshAddressRequests()
    }

    private func refreshEligibleNodes() -> ElementDiff {
        var diff = ElementDiff()
        var problems: [Problem] = []
        var nowDraining: [NodeAddress] = []
        let now = DesiredState.eligibleNodes(Array(nodes.values), options: options, problems: &problems, draining: &nowDraining)
        nodeProblems = problems.sorted { $0.object < $1.object }
        guard now != eligible || nowDraining != draining else { return diff }
        let before = eligible, wasDraining = draining
        eligible = now
        draining = nowDraining
        guard tracksElements else { return diff }
        if nowDraining != wasDraining {
            for (set, element) in ForwardingRuleset.drainingElements(wasDraining) { change(set, element, present: false, &diff) }
            for (set, element) in ForwardingRuleset.drainingElements(nowDraining) { change(set, element, present: true, &diff) }
        }
        if now != before {
            let slotsBefore = ForwardingRuleset.slots(forNodes: before.count)
            for (set, element) in ForwardingRuleset.slotElements(nodes: before, slots: slotsBefore) { change(set, element, present: false, &diff) }
            for (set, element) in ForwardingRuleset.slotElements(nodes: now, slots: slots) { change(set, element, present: true, &diff) }
        }
        // Flows to a draining node are not stale: it only stops receiving new ones.
        let held = claims.holders.map(\.value).filter { $0.group == nil }
        staleSinceTaken += StaleFlows.between(ForwardingState(interfaces: [], nodes: before, mappings: held),
                                              ForwardingState(interfaces: [], nodes: now, mappings: held), keeping: nowDraining)
        // Own groups follow the eligible nodes (their stale flows are found as their mappings change).
        if now != before { diff.merge(regroup(grouped)) }
        return diff
    }

    /// Recomputes every Service that asks for an address (an egress annotation, a LoadBalancer IP) and every
    /// StaticEgressIP and ExternalService, after the reserved addresses changed.
    private func refreshAddressRequests() -> ElementDiff {
        var diff = ElementDiff()
        for (_, record) in held.sorted(by: { $0.key < $1.key }) {
            guard let service = record.service,
                  service.metadata.annotation(EpokAnnotation.egressIP) != nil || service.status?.loadBalancer?.ingress?.isEmpty == false else { continue }
            diff.merge(upsert(service))
        }
        for owner in Set(staticEgressIPs.keys).union(externalServices.keys).sorted() { refreshResource(owner, diff: &diff) }
        return diff
    }

    private func change(_ set: String, _ element: Element, present: Bool, _ diff: inout ElementDiff) {
        if present {
            elements[set, default: []].insert(element)
            diff.insert(element, into: set)
        } else {
            elements[set]?.remove(element)
            diff.remove(element, from: set)
        }
    }
}

extension LiveDesiredState {
    /// Every Node with its state in words, by name.
    public var nodeViews: [LoopView.NodeView] {
        let eligible = Set(self.eligible.map(\.node)), draining = Set(self.draining.map(\.node))
        return nodes.values.sorted { $0.metadata.name < $1.metadata.name }.map { node in
            let name = node.metadata.name
            let addresses = (node.status?.addresses ?? []).filter { $0.type == "InternalIP" }.map(\.address)
            let word: String
            if !node.isReady { word = "not ready" }
            else if node.metadata.annotation(EpokAnnotation.exclude) != nil || node.metadata.labels?[EpokAnnotation.excludeLabel] != nil { word = "excluded" }
            else if draining.contains(name) { word = "draining" }
            else if eligible.contains(name) { word = "ready" }
            else { word = "no address" }
            return LoopView.NodeView(name: name, addresses: addresses, state: word)
        }
    }
}
