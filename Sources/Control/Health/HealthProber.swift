import Dataplane
import Foundation
import HeapModule
import Logging
import Metrics
#if canImport(Glibc)
import Glibc
#endif

/// One probe that runs every `interval`: a TCP connect, or an HTTP GET, to a node's port.
public struct ProbeTarget: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var port: Dataplane.Port
    public var kind: HealthCheck.Kind
    /// Milliseconds.
    public var interval: Int
    public var timeout: Int

    public init(address: IPAddress, port: Dataplane.Port, check: HealthCheck) {
        self.address = address
        self.port = port
        kind = check.kind
        interval = check.interval
        timeout = check.timeout
    }

    public var description: String { "\(kind) \(address.isV4 ? address.description : "[\(address)]"):\(port)" }
}

/// A target as one check judges it: down after `fall` consecutive failures, up again after `rise` successes;
/// `namespace` is whose check it is (the prober shares its probes fairly between namespaces).
public struct HealthView: Hashable, Sendable {
    public var target: ProbeTarget
    public var fall: Int
    public var rise: Int
    public var namespace: String

    public init(target: ProbeTarget, fall: Int, rise: Int, namespace: String = "") {
        self.target = target
        self.fall = fall
        self.rise = rise
        self.namespace = namespace
    }
}

/// Probes targets from one thread of its own (inside `--netns` when given), with non-blocking sockets and at
/// most `maxInFlight` probes at once, of which one namespace's checks hold at most an equal share (`maxInFlight`
/// over the namespaces with checks, at least 8; targets that never answer hold a probe until its timeout: one
/// namespace's cannot take every slot and delay another's); each distinct target is probed once per interval, however many checks judge it. Every
/// view starts up; `report` is called (on the prober's thread) with the views that changed.
public final class HealthProber: @unchecked Sendable {
    private let namespacePath: String?
    private let maxInFlight: Int
    /// The most probes each namespace had in flight at once.
    private var peakInFlight: [String: Int] = [:]
    private let report: @Sendable ([HealthView: Bool]) -> Void
    private let logger: Logger?
    private let lock = NSLock()
    private var wanted: Set<HealthView> = []
    private var wantedChanged = false
    private var stopped = false
    /// The probing thread; whether it was refused (said once).
    private var thread: OwnThread?
    private var refused = false
    private var completed = 0
    private var failed = 0
    private var causes: [ProbeTarget: String] = [:]
    private let succeededMetric = Counter(label: "epokd_health_probes_total", dimensions: [("result", "success")])
    private let failedMetric = Counter(label: "epokd_health_probes_total", dimensions: [("result", "failure")])

    public init(namespacePath: String?, maxInFlight: Int = 256, logger: Logger? = nil,
                report: @escaping @Sendable ([HealthView: Bool]) -> Void) {
        self.namespacePath = namespacePath
        self.maxInFlight = maxInFlight
        self.logger = logger
        self.report = report
    }

    /// Probes completed so far, and how many of them failed.
    public var counts: (probes: Int, failures: Int) { lock.withLock { (completed, failed) } }

    /// The most probes of `namespace`'s checks in flight at once, so far.
    public func peakInFlight(of namespace: String) -> Int { lock.withLock { peakInFlight[namespace] ?? 0 } }

    /// Why the last failed probe of `target` failed, in words (`connection refused`, `HTTP 404`, `no answer
    /// within 2000 ms`); nil when none failed since it was last watched.
    public func lastFailure(of target: ProbeTarget) -> String? { lock.withLock { causes[target] } }

    /// Replaces the views to keep up to date (a target no view needs any more is no longer probed).
    public func watch(_ views: Set<HealthView>) {
        lock.withLock {
            guard views != wanted else { return }
            wanted = views
            wantedChanged = true
        }
        startIfNeeded()
    }

    public func stop() {
        lock.withLock { stopped = true; return thread }?.join()
    }

    private func startIfNeeded() {
        lock.withLock {
            guard thread == nil, !stopped else { return }
            do {
                thread = try OwnThread.start("epokd-health") { [self] in run() }
                refused = false
            } catch {
                // Tried again at the next change of what to probe.
                if !refused { logger?.error("health checks wait: \(error)") }
                refused = true
            }
        }
    }

    private struct State {
        var due: UInt64
        /// Whose checks judge the target (the namespace of the first view; targets are a Service's own ports).
        var namespace = ""
        var successes = 0
        var failures = 0
        var views: [HealthView: Bool] = [:]
        var probing = false
    }

    /// When a target is due; an entry whose target was rescheduled or dropped since is skipped.
    private struct Due: Comparable {
        var time: UInt64
        var target: ProbeTarget
        static func < (a: Due, b: Due) -> Bool { a.time < b.time }
        static func == (a: Due, b: Due) -> Bool { a.time == b.time && a.target == b.target }
    }

    private struct Probe {
        var target: ProbeTarget
        /// Whose share it counts against.
        var namespace = ""
        var fd: Int32
        var deadline: UInt64
        var connected = false
        var response: [UInt8] = []
    }

    /// A probe's result: up, or down with the cause in words.
    private enum Verdict {
        case up
        case down(String)
    }

    private static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds / 1_000_000 }

    private func run() {
        if let namespacePath {
            do {
                try NamespaceThread.enter(namespacePath)
            } catch {
                // Without the namespace every probe would go to the wrong place: none runs, no node goes down.
                logger?.error("health checks are off: \(error)")
                return
            }
        }
        var states: [ProbeTarget: State] = [:]
        var inFlight: [String: Int] = [:]
        var share = maxInFlight
        var schedule = Heap<Due>()
        var probes: [Probe] = []
        var random = SystemRandomNumberGenerator()
        while true {
            let (views, changed, stop) = lock.withLock { () -> (Set<HealthView>, Bool, Bool) in
                defer { wantedChanged = false }
                return (wanted, wantedChanged, stopped)
            }
            if stop {
                probes.forEach { close($0.fd) }
                return
            }
            let now = Self.now()
            if changed {
                var next: [ProbeTarget: State] = [:]
                for view in views {
                    var state = next[view.target] ?? states[view.target] ?? {
                        // A new target's first probe is spread over its interval, so that many do not start at once.
                        let first = State(due: now + UInt64.random(in: 0...UInt64(view.target.interval), using: &random))
                        schedule.insert(Due(time: first.due, target: view.target))
                        return first
                    }()
                    state.views[view] = state.views[view] ?? states[view.target]?.views[view] ?? true
                    state.namespace = state.views.keys.map(\.namespace).min() ?? ""
                    next[view.target] = state
                }
                for (target, state) in next { next[target]!.views = state.views.filter { views.contains($0.key) } }
                states = next
                share = max(8, maxInFlight / max(1, Set(views.map(\.namespace)).count))
                lock.withLock { causes = causes.filter { next[$0.key] != nil } }
            }
            var postponed: [Due] = []
            var soonestEnd: [String: UInt64] = [:]
            while probes.count < maxInFlight, let first = schedule.min, first.time <= now {
                schedule.removeMin()
                guard let state = states[first.target], !state.probing, state.due == first.time else { continue }
                // A namespace at its share waits for one of its own probes to end (the soonest deadline).
                if inFlight[state.namespace, default: 0] >= share {
                    if soonestEnd[state.namespace] == nil {
                        soonestEnd[state.namespace] = probes.lazy.filter { $0.namespace == state.namespace }.map(\.deadline).min() ?? now + 10
                    }
                    states[first.target]!.due = max(soonestEnd[state.namespace]!, now + 1)
                    postponed.append(Due(time: states[first.target]!.due, target: first.target))
                    continue
                }
                switch start(first.target, now: now) {
                case .success(var probe):
                    probe.namespace = state.namespace
                    probes.append(probe)
                    states[first.target]!.probing = true
                    inFlight[state.namespace, default: 0] += 1
                    let count = inFlight[state.namespace]!
                    lock.withLock { if count > peakInFlight[state.namespace] ?? 0 { peakInFlight[state.namespace] = count } }
                case .failure(let cause):
                    finish(first.target, .down(cause.text), states: &states, schedule: &schedule, now: now)
                }
            }
            for due in postponed { schedule.insert(due) }
            var wait = 100
            if let soonest = (probes.map(\.deadline) + (probes.count < maxInFlight ? [schedule.min?.time].compactMap { $0 } : [])).min() {
                wait = max(0, min(wait, Int(soonest) - Int(now)))
            }
            var polled = probes.map { pollfd(fd: $0.fd, events: Int16($0.connected ? POLLIN : POLLOUT), revents: 0) }
            _ = poll(&polled, nfds_t(polled.count), Int32(wait))
            let after = Self.now()
            var remaining: [Probe] = []
            for (index, var probe) in probes.enumerated() {
                let events = Int32(polled[index].revents)
                var result: Verdict?
                if events != 0 { result = advance(&probe, events: events) }
                if result == nil && after >= probe.deadline {
                    result = .down(probe.connected ? "no HTTP answer within \(probe.target.timeout) ms" : "no answer within \(probe.target.timeout) ms")
                }
                if let result {
                    close(probe.fd)
                    inFlight[probe.namespace, default: 1] -= 1
                    finish(probe.target, result, states: &states, schedule: &schedule, now: after)
                } else {
                    remaining.append(probe)
                }
            }
            probes = remaining
        }
    }

    /// A failure in words, from an errno.
    private struct Cause: Error {
        var text: String
        init(_ code: Int32, _ what: String = "") {
            let words = code == ECONNREFUSED ? "connection refused" : code == EHOSTUNREACH ? "no route to host"
                : code == ENETUNREACH ? "network unreachable" : code == ETIMEDOUT ? "connection timed out" : String(cString: strerror(code)).lowercased()
            text = what.isEmpty ? words : "\(what): \(words)"
        }
    }

    /// Opens a non-blocking socket and starts connecting; the cause when even that fails.
    private func start(_ target: ProbeTarget, now: UInt64) -> Result<Probe, Cause> {
        let family = target.address.isV4 ? AF_INET : AF_INET6
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(Cause(errno, "socket")) }
        // Closed with a reset: thousands of probes a second leave no TIME_WAIT behind.
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        let rc: Int32
        switch target.address {
        case .v4(let a):
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = target.port.rawValue.bigEndian
            sa.sin_addr.s_addr = a.value.bigEndian
            rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        case .v6(let a):
            var sa = sockaddr_in6()
            sa.sin6_family = sa_family_t(AF_INET6)
            sa.sin6_port = target.port.rawValue.bigEndian
            withUnsafeMutableBytes(of: &sa.sin6_addr) { raw in
                raw.storeBytes(of: a.high.bigEndian, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: a.low.bigEndian, toByteOffset: 8, as: UInt64.self)
            }
            rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        }
        guard rc == 0 || errno == EINPROGRESS else {
            let cause = Cause(errno)
            close(fd)
            return .failure(cause)
        }
        return .success(Probe(target: target, fd: fd, deadline: now + UInt64(target.timeout)))
    }

    /// Moves a probe on after `events`; returns its result once known.
    private func advance(_ probe: inout Probe, events: Int32) -> Verdict? {
        if !probe.connected {
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(probe.fd, SOL_SOCKET, SO_ERROR, &error, &length)
            guard error == 0 else { return .down(Cause(error).text) }
            guard events & Int32(POLLOUT) != 0 else { return .down("connection closed") }
            guard case .http(let path) = probe.target.kind else { return .up }
            probe.connected = true
            let request = "GET \(path) HTTP/1.0\r\nHost: \(probe.target.address):\(probe.target.port)\r\nUser-Agent: epokd-health\r\nConnection: close\r\n\r\n"
            let sent = request.withCString { send(probe.fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
            return sent == request.utf8.count ? nil : .down(sent < 0 ? Cause(errno, "sending the request").text : "the request was cut short")
        }
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = recv(probe.fd, &buffer, buffer.count, 0)
        if n > 0 { probe.response += buffer[0..<n] }
        // "HTTP/1.x NNN": 2xx and 3xx are healthy, as HAProxy takes them.
        if probe.response.count >= 12 || n <= 0 {
            guard probe.response.count >= 12 else {
                // Bytes that are no status line, then a reset (a server that does not read the request): not HTTP.
                return .down(!probe.response.isEmpty ? "the answer is not HTTP"
                             : n < 0 ? Cause(errno, "reading the answer").text : "connection closed without an HTTP answer")
            }
            guard probe.response.starts(with: Array("HTTP/1.".utf8)) else { return .down("the answer is not HTTP") }
            let code = probe.response[9..<12]
            guard code.allSatisfy({ (0x30...0x39).contains($0) }) else { return .down("the answer is not HTTP") }
            return code.first == UInt8(ascii: "2") || code.first == UInt8(ascii: "3") ? .up : .down("HTTP \(String(decoding: code, as: UTF8.self))")
        }
        return nil
    }

    private func finish(_ target: ProbeTarget, _ verdict: Verdict, states: inout [ProbeTarget: State], schedule: inout Heap<Due>, now: UInt64) {
        let success: Bool
        switch verdict {
        case .up: success = true
        case .down: success = false
        }
        lock.withLock {
            completed += 1
            if case .down(let cause) = verdict {
                failed += 1
                causes[target] = cause
            }
        }
        (success ? succeededMetric : failedMetric).increment()
        guard var state = states[target] else { return }
        state.probing = false
        state.due = now + UInt64(target.interval)
        schedule.insert(Due(time: state.due, target: target))
        if success {
            state.successes += 1
            state.failures = 0
        } else {
            state.failures += 1
            state.successes = 0
        }
        var changes: [HealthView: Bool] = [:]
        for (view, up) in state.views {
            if up && state.failures >= view.fall {
                state.views[view] = false
                changes[view] = false
            } else if !up && state.successes >= view.rise {
                state.views[view] = true
                changes[view] = true
            }
        }
        states[target] = state
        if !changes.isEmpty { report(changes) }
    }
}
