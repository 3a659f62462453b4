import Dataplane
import Foundation
import Metrics
import Synchronization

/// This router's role among routers that share a front door (`--ha-address`): it is *active* while one of
/// the followed addresses (those keepalived, or any other mover, manages) is on one of its interfaces, and
/// *standby* otherwise. The active router holds and announces the managed addresses and posts Events; a
/// standby router programs the same table (hot standby) and runs the same health checks, nothing more.
public final class HighAvailability: Sendable {
    /// What the role is, for `/status.json` and the page.
    public struct View: Sendable, Encodable, Equatable {
        public var active: Bool
        public var follows: [String]
        /// When the role last changed (or the daemon started).
        public var since: Date
        /// Whether this router holds the Lease (nil without an API server).
        public var leaseHeld: Bool?
        /// The other router that holds the Lease while this one is active too (split brain), when there is one.
        public var alsoActive: String?
    }

    /// The addresses whose presence on this host makes it the active router.
    public let followed: Set<IPAddress>
    private let state: Mutex<View>
    private let activeGauge: Gauge
    private let changedGauge = Gauge(label: "epokd_ha_role_changed_timestamp_seconds")
    private let splitGauge = Gauge(label: "epokd_ha_split_brain")

    /// Follows `followed`, starting from the host's addresses as they are.
    public init(followed: Set<IPAddress>, hostAddresses: Set<IPAddress>) {
        self.followed = followed
        let follows = followed.sorted().map(\.description)
        activeGauge = Gauge(label: "epokd_ha_active", dimensions: [("follows", follows.joined(separator: ","))])
        let active = !followed.isDisjoint(with: hostAddresses)
        state = Mutex(View(active: active, follows: follows, since: Date()))
        activeGauge.record(active ? 1 : 0)
        changedGauge.record(Date().timeIntervalSince1970)
        splitGauge.record(0)
    }

    public var isActive: Bool { state.withLock { $0.active } }

    public var view: View { state.withLock { $0 } }

    /// Events are posted by the active router, and with a Lease only by its holder.
    public var postsEvents: Bool { state.withLock { $0.active && $0.leaseHeld != false } }

    /// Takes the role the host's addresses give; returns whether it changed.
    public func follow(hostAddresses: Set<IPAddress>) -> Bool {
        let active = !followed.isDisjoint(with: hostAddresses)
        let changed = state.withLock { view in
            guard view.active != active else { return false }
            view.active = active
            view.since = Date()
            if !active { view.alsoActive = nil }
            return true
        }
        if changed {
            activeGauge.record(active ? 1 : 0)
            changedGauge.record(Date().timeIntervalSince1970)
            if !active { splitGauge.record(0) }
        }
        return changed
    }

    /// Records what the Lease says: whether this router holds it, and which other router holds it while this
    /// one is active too.
    public func lease(held: Bool, alsoActive: String?) {
        state.withLock { view in
            view.leaseHeld = held
            view.alsoActive = alsoActive
        }
        splitGauge.record(alsoActive == nil ? 0 : 1)
    }

    /// How the role reads in a log line: `active (holds 192.0.2.1)` or `standby (192.0.2.1 is elsewhere)`.
    public func describe(hostAddresses: Set<IPAddress>) -> String {
        let held = followed.intersection(hostAddresses).sorted().map(\.description)
        return held.isEmpty ? "standby (\(followed.sorted().map(\.description).joined(separator: ", ")) not on this host)"
            : "active (holds \(held.joined(separator: ", ")))"
    }
}
