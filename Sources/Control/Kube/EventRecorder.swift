import Foundation
import Logging

/// Posts `core/v1` Events about Services (rejected annotations, port conflicts, mappings), de-duplicated and
/// rate-limited: the same reason and message for the same object are posted once per `quietPeriod`, and no
/// object gets more than `burst` events per `quietPeriod`, so a flapping object cannot flood the API.
public final class EventRecorder: @unchecked Sendable {
    public enum Kind: String, Sendable { case normal = "Normal", warning = "Warning" }

    private let client: KubeClient
    private let logger: Logger
    private let quietPeriod: TimeInterval
    private let burst: Int
    private let now: () -> Date
    private let lock = NSLock()
    private var lastPosted: [String: Date] = [:]
    private var recent: [String: [Date]] = [:]

    public init(client: KubeClient, logger: Logger, quietPeriod: TimeInterval = 600, burst: Int = 5, now: @escaping () -> Date = Date.init) {
        self.client = client
        self.logger = logger
        self.quietPeriod = quietPeriod
        self.burst = burst
        self.now = now
    }

    /// Posts an event about `service` unless an identical one was posted recently or the object is over its budget.
    /// Returns whether it was posted. Failures are logged, never thrown: events are advisory.
    @discardableResult
    public func record(_ kind: Kind, reason: String, message: String, service: Service) -> Bool {
        let ref = service.ref
        let key = "\(ref)|\(reason)|\(message)"
        let time = now()
        let allowed: Bool = lock.withLock {
            if let last = lastPosted[key], time.timeIntervalSince(last) < quietPeriod { return false }
            let window = (recent[ref.description] ?? []).filter { time.timeIntervalSince($0) < quietPeriod }
            guard window.count < burst else {
                recent[ref.description] = window
                return false
            }
            recent[ref.description] = window + [time]
            lastPosted[key] = time
            return true
        }
        guard allowed else { return false }
        let stamp = ISO8601DateFormatter().string(from: time)
        let event: [String: Any] = [
            "apiVersion": "v1", "kind": "Event",
            "metadata": ["generateName": "\(ref.name).", "namespace": ref.namespace],
            "involvedObject": ["apiVersion": "v1", "kind": "Service", "namespace": ref.namespace, "name": ref.name,
                               "uid": service.metadata.uid ?? "", "resourceVersion": service.metadata.resourceVersion ?? ""],
            "reason": reason, "message": String(message.prefix(1024)), "type": kind.rawValue,
            "source": ["component": "epokd", "host": ProcessInfo.processInfo.hostName],
            "reportingComponent": "epokd", "reportingInstance": ProcessInfo.processInfo.hostName,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        ]
        do {
            let body = try JSONSerialization.data(withJSONObject: event)
            _ = try client.request("POST", "/api/v1/namespaces/\(ref.namespace)/events", body: body)
            return true
        } catch {
            logger.warning("could not post event \(reason) for Service \(ref): \(error)")
            return false
        }
    }
}
