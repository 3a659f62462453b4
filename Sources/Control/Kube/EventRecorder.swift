import Dataplane
import Foundation
import Logging
import Metrics

/// Posts `core/v1` Events about Services (rejected annotations, port conflicts, mappings) and Nodes (drain)
/// from a worker of its own, so that the reconcile loop never waits on the API server for them.
///
/// `record` only queues: the same reason and message for the same object are queued once per `quietPeriod`,
/// no object gets more than `burst` events per `quietPeriod`, the queue holds at most `capacity` events (more
/// are dropped and counted), and the worker posts at most `perSecond` events a second.
public final class EventRecorder: @unchecked Sendable {
    public enum Kind: String, Sendable { case normal = "Normal", warning = "Warning" }

    /// The object an Event is about.
    public struct InvolvedObject: Hashable, Sendable {
        public var kind: String
        public var apiVersion = "v1"
        /// nil for cluster-scoped objects (their Events go to namespace `default`, as kubectl looks for them).
        public var namespace: String?
        public var name: String
        public var uid: String?
        public var resourceVersion: String?

        public init(_ service: Service) {
            kind = "Service"
            namespace = service.ref.namespace
            name = service.ref.name
            uid = service.metadata.uid
            resourceVersion = service.metadata.resourceVersion
        }

        public init(_ node: Node) {
            kind = "Node"
            name = node.metadata.name
            uid = node.metadata.uid
            resourceVersion = node.metadata.resourceVersion
        }

        /// A StaticEgressIP or an ExternalService (or a Service known only by reference).
        public init(_ ref: ObjectRef, _ metadata: ObjectMeta?) {
            kind = ref.kind.rawValue
            apiVersion = ref.kind.apiVersion
            namespace = ref.namespace
            name = ref.name
            uid = metadata?.uid
            resourceVersion = metadata?.resourceVersion
        }

        /// Any object, by its kind, apiVersion and metadata.
        public init(kind: String, apiVersion: String, namespace: String?, name: String, uid: String?) {
            self.kind = kind
            self.apiVersion = apiVersion
            self.namespace = namespace
            self.name = name
            self.uid = uid
        }

        var eventNamespace: String { namespace ?? "default" }
        var description: String { "\(kind) " + (namespace.map { "\($0)/" } ?? "") + name }
    }

    private struct Pending {
        var kind: Kind
        var reason: String
        var message: String
        var object: InvolvedObject
        var time: Date
    }

    private let client: KubeClient
    private let logger: Logger
    private let quietPeriod: TimeInterval
    private let burst: Int
    private let capacity: Int
    private let perSecond: Double
    private let now: () -> Date
    private let condition = NSCondition()
    /// When each (object, reason, message), by hash, was last queued.
    private var lastQueued: [Int: Date] = [:]
    /// When each object (by kind, namespace and name) was last given an event.
    private var recent: [String: [Date]] = [:]
    private var queue: [Pending] = []
    private var stopped = false
    /// Whether the thread that posts the queue runs; whether it was refused (said once until it starts).
    private var working = false
    private var refused = false
    /// Events dropped because the queue was full (and `epokd_events_dropped_total`).
    public private(set) var dropped = 0
    private let droppedMetric: Counter
    /// Events posted so far.
    public private(set) var posted = 0

    /// Whether this instance posts Events now (a standby router does not); set before the first `record`.
    /// Nil: it always does.
    public var gate: (@Sendable () -> Bool)?

    /// `metrics`: where `epokd_events_dropped_total` is counted (the process's metrics system).
    public init(client: KubeClient, logger: Logger, quietPeriod: TimeInterval = 600, burst: Int = 5,
                capacity: Int = 1000, perSecond: Double = 10, now: @escaping () -> Date = Date.init, metrics: MetricsFactory = MetricsSystem.factory) {
        droppedMetric = Counter(label: "epokd_events_dropped_total", factory: metrics)
        self.client = client
        self.logger = logger
        self.quietPeriod = quietPeriod
        self.burst = burst
        self.capacity = capacity
        self.perSecond = perSecond
        self.now = now
    }

    /// Queues an event about `service` unless an identical one was queued recently, the object is over its
    /// budget or the queue is full. Returns whether it was queued; never blocks on the API server.
    @discardableResult
    public func record(_ kind: Kind, reason: String, message: String, service: Service) -> Bool {
        record(kind, reason: reason, message: message, about: InvolvedObject(service))
    }

    /// Queues an event about `object`, as `record(_:reason:message:service:)` does; `regardless` of the gate
    /// (for what only this instance can see, such as a split brain seen by the router that is not the Lease's holder).
    @discardableResult
    public func record(_ kind: Kind, reason: String, message: String, about object: InvolvedObject, regardless: Bool = false) -> Bool {
        if !regardless, let gate, !gate() { return false }
        let ref = object.description
        var hasher = Hasher()
        hasher.combine(ref)
        hasher.combine(reason)
        hasher.combine(message)
        let key = hasher.finalize()
        let time = now()
        return condition.withLock {
            if let last = lastQueued[key], time.timeIntervalSince(last) < quietPeriod { return false }
            let window = (recent[ref] ?? []).filter { time.timeIntervalSince($0) < quietPeriod }
            guard window.count < burst else {
                recent[ref] = window
                return false
            }
            guard queue.count < capacity else {
                dropped += 1
                droppedMetric.increment()
                return false
            }
            recent[ref] = window + [time]
            lastQueued[key] = time
            if lastQueued.count > 4 * capacity { prune(at: time) }
            queue.append(Pending(kind: kind, reason: reason, message: message, object: object, time: time))
            if !working && !stopped {
                do {
                    try OwnThread.start("epokd-events") { [self] in drain() }
                    working = true
                    refused = false
                } catch {
                    // The queue waits for the next event's try (it is bounded: past `capacity`, events are dropped).
                    if !refused { logger.error("Kubernetes Events wait: \(error)") }
                    refused = true
                }
            }
            condition.signal()
            return true
        }
    }

    /// Waits until every queued event has been posted (or given up on), at most `seconds`; returns whether the
    /// queue is empty.
    @discardableResult
    public func flush(seconds: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        return condition.withLock {
            while !queue.isEmpty || inFlight, Date() < deadline { _ = condition.wait(until: min(deadline, Date().addingTimeInterval(0.05))) }
            return queue.isEmpty && !inFlight
        }
    }

    /// Stops the worker (it holds the recorder until then); events still queued are dropped.
    public func shutdown() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    private var inFlight = false

    /// Forgets dedupe entries older than the quiet period, so the table stays bounded.
    private func prune(at time: Date) {
        lastQueued = lastQueued.filter { time.timeIntervalSince($0.value) < quietPeriod }
        recent = recent.filter { $0.value.contains { time.timeIntervalSince($0) < quietPeriod } }
    }

    private func drain() {
        var nextPost = Date.distantPast
        while true {
            let item: Pending? = condition.withLock {
                while queue.isEmpty && !stopped { condition.wait() }
                if stopped { return nil }
                inFlight = true
                return queue.removeFirst()
            }
            guard let item else { return }
            let wait = nextPost.timeIntervalSinceNow
            if wait > 0 { Thread.sleep(forTimeInterval: wait) }
            nextPost = Date().addingTimeInterval(1 / perSecond)
            post(item)
            condition.withLock {
                inFlight = false
                condition.broadcast()
            }
        }
    }

    private func post(_ item: Pending) {
        let ref = item.object
        let stamp = Timestamp.text(item.time.timeIntervalSince1970)
        var involved: [String: Any] = ["apiVersion": ref.apiVersion, "kind": ref.kind, "name": ref.name,
                                       "uid": ref.uid ?? "", "resourceVersion": ref.resourceVersion ?? ""]
        if let namespace = ref.namespace { involved["namespace"] = namespace }
        let event: [String: Any] = [
            "apiVersion": "v1", "kind": "Event",
            "metadata": ["generateName": "\(ref.name).", "namespace": ref.eventNamespace],
            "involvedObject": involved,
            "reason": item.reason, "message": Escaped.text(item.message, limit: 1000), "type": item.kind.rawValue,
            "source": ["component": "epokd", "host": ProcessInfo.processInfo.hostName],
            "reportingComponent": "epokd", "reportingInstance": ProcessInfo.processInfo.hostName,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        ]
        do {
            let body = try JSONSerialization.data(withJSONObject: event)
            _ = try client.request("POST", "/api/v1/namespaces/\(ref.eventNamespace)/events", body: body)
            condition.withLock { posted += 1 }
        } catch {
            logger.warning("could not post event \(Escaped.text(item.reason, limit: 100)) for \(Escaped.text(ref.description, limit: 300)): \(error)")
        }
    }
}
