import Dataplane
import Foundation
import Logging

/// Holds the Lease `epokd-<table>` (coordination.k8s.io/v1) while this router is the active one, so that
/// `kubectl get lease` shows which router is active and only one posts Events: the active router takes the
/// Lease when it is free or expired and renews it; a router that turns standby gives it back at once. An
/// active router that finds the Lease held, and renewed, by another is in a split brain: it says so (log,
/// `epokd_ha_split_brain`, a Warning Event on the Lease) and leaves the Lease to its holder.
public final class LeaseKeeper: @unchecked Sendable {
    public let namespace: String
    public let name: String
    /// This router's name in the Lease (`holderIdentity`).
    public let identity: String
    private let client: KubeClient
    private let role: HighAvailability
    private let events: EventRecorder?
    private let logger: Logger
    /// How long a holder that stops renewing keeps the Lease.
    public let duration: Int
    /// How often the Lease is renewed (and looked at).
    public let interval: TimeInterval
    private let condition = NSCondition()
    private var stopped = false
    private var poked = false
    private var thread: OwnThread?
    /// The other holder last reported (a split brain is said once per holder).
    private var reportedOther: String?
    private var lastError: String?
    /// `namespace/name` and this router's name, escaped for log lines and Events.
    private let shownLease: String, shownIdentity: String

    public init(client: KubeClient, namespace: String, table: String, identity: String, role: HighAvailability, events: EventRecorder?,
                logger: Logger, duration: Int = 15, interval: TimeInterval = 3) {
        self.client = client
        self.namespace = namespace
        name = "epokd-\(table)"
        self.identity = identity
        self.role = role
        self.events = events
        self.logger = logger
        self.duration = duration
        self.interval = interval
        shownLease = Escaped.text("\(namespace)/epokd-\(table)", limit: 320)
        shownIdentity = Escaped.text(identity, limit: 253)
    }

    /// The Lease as epokd reads and writes it.
    struct Lease: Codable {
        struct Metadata: Codable {
            var name: String
            var namespace: String
            var uid: String?
            var resourceVersion: String?
        }
        struct Spec: Codable {
            var holderIdentity: String?
            var leaseDurationSeconds: Int?
            var acquireTime: String?
            var renewTime: String?
            var leaseTransitions: Int?
        }
        var apiVersion = "coordination.k8s.io/v1"
        var kind = "Lease"
        var metadata: Metadata
        var spec: Spec
    }

    /// Starts looking at the Lease every `interval`, and at once after `roleChanged`.
    public func start() throws(ThreadRefused) {
        let started = try OwnThread.start("epokd-lease") { [self] in
            while true {
                step(now: Date())
                let go = condition.withLock {
                    let deadline = Date().addingTimeInterval(interval)
                    while !stopped && !poked && condition.wait(until: deadline) {}
                    poked = false
                    return !stopped
                }
                guard go else { return }
            }
        }
        condition.withLock { thread = started }
    }

    /// Looks at the Lease now (the role changed).
    public func roleChanged() {
        condition.withLock { poked = true; condition.signal() }
    }

    /// Stops; an active router gives the Lease back, so that the next one need not wait for it to expire.
    public func stop() {
        condition.withLock { stopped = true; condition.signal(); return thread }?.join()
        if let lease = try? read(), lease.spec.holderIdentity == identity { release(lease, now: Date()) }
    }

    private var path: String { "/apis/coordination.k8s.io/v1/namespaces/\(namespace)/leases" }

    /// One look: take, renew, give back, or report a split brain.
    func step(now: Date) {
        do {
            let active = role.isActive
            guard let lease = try read() else {
                guard active else {
                    role.lease(held: false, alsoActive: nil)
                    return
                }
                let made = Lease(metadata: .init(name: name, namespace: namespace),
                                 spec: .init(holderIdentity: identity, leaseDurationSeconds: duration, acquireTime: Self.stamp(now),
                                             renewTime: Self.stamp(now), leaseTransitions: 0))
                _ = try client.request("POST", path, body: try JSONEncoder().encode(made))
                took(from: nil)
                return
            }
            let holder = lease.spec.holderIdentity.flatMap { $0.isEmpty ? nil : $0 }
            if !active {
                if holder == identity { release(lease, now: now) }
                role.lease(held: false, alsoActive: nil)
                return
            }
            let renewed = lease.spec.renewTime.flatMap(Timestamp.unixTime).map(Date.init(timeIntervalSince1970:))
            let expired = renewed.map { now.timeIntervalSince($0) > Double(lease.spec.leaseDurationSeconds ?? duration) } ?? true
            if let holder, holder != identity, !expired {
                role.lease(held: false, alsoActive: holder)
                if reportedOther != holder {
                    reportedOther = holder
                    let report = "split brain: this router (\(shownIdentity)) holds its --ha-address, and so does \(Escaped.text(holder, limit: 253)), which holds Lease \(shownLease); check the VRRP link between them"
                    logger.error("\(report)")
                    events?.record(.warning, reason: "SplitBrain", message: report,
                                   about: .init(kind: "Lease", apiVersion: "coordination.k8s.io/v1", namespace: namespace, name: name, uid: lease.metadata.uid),
                                   regardless: true)
                }
                return
            }
            var next = lease
            next.spec.holderIdentity = identity
            next.spec.leaseDurationSeconds = duration
            next.spec.renewTime = Self.stamp(now)
            if holder != identity {
                next.spec.acquireTime = Self.stamp(now)
                next.spec.leaseTransitions = (lease.spec.leaseTransitions ?? 0) + 1
            }
            _ = try client.request("PUT", "\(path)/\(name)", body: try JSONEncoder().encode(next))
            if holder != identity { took(from: holder) } else { role.lease(held: true, alsoActive: nil) }
            lastError = nil
        } catch {
            // A conflict (another writer between the read and the write) is looked at again at once.
            if (error as? KubeAPIError)?.status == 409 { roleChanged() }
            let said = "Lease \(shownLease): \(error)"
            if said != lastError { logger.warning("\(said)") }
            lastError = said
        }
    }

    private func took(from holder: String?) {
        role.lease(held: true, alsoActive: nil)
        reportedOther = nil
        lastError = nil
        let from = holder.map { " (taken over from \(Escaped.text($0, limit: 253)), whose Lease expired)" } ?? ""
        logger.notice("this router (\(shownIdentity)) holds Lease \(shownLease)\(from); it posts the Events")
    }

    private func release(_ lease: Lease, now: Date) {
        var next = lease
        next.spec.holderIdentity = ""
        next.spec.leaseDurationSeconds = 1
        next.spec.renewTime = Self.stamp(now)
        do {
            _ = try client.request("PUT", "\(path)/\(name)", body: try JSONEncoder().encode(next))
            logger.notice("this router (\(shownIdentity)) gave Lease \(shownLease) back: it is standby")
        } catch {
            logger.warning("could not give Lease \(shownLease) back: \(error); it expires in \(lease.spec.leaseDurationSeconds ?? duration) s")
        }
    }

    private func read() throws(KubeAPIError) -> Lease? {
        do throws(KubeAPIError) {
            let data = try client.request("GET", "\(path)/\(name)")
            do {
                return try JSONDecoder().decode(Lease.self, from: data)
            } catch {
                throw KubeAPIError(message: "Lease \(namespace)/\(name) is not a Lease: \(error)")
            }
        } catch where error.status == 404 {
            return nil
        }
    }

    /// A `metav1.MicroTime`: RFC 3339 with microseconds, in UTC.
    static func stamp(_ date: Date) -> String { Timestamp.text(date.timeIntervalSince1970, microseconds: true) }
}
