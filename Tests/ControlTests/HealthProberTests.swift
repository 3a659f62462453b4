import Control
import Dataplane
import Foundation
import NetnsLab
import Testing

@Suite("The health prober, against servers in a namespace")
struct HealthProberTests {
    /// Collects what the prober reports.
    final class Reports: @unchecked Sendable {
        private let lock = NSLock()
        private var state: [HealthView: Bool] = [:]
        func record(_ changes: [HealthView: Bool]) { lock.withLock { state.merge(changes) { $1 } } }
        subscript(view: HealthView) -> Bool? { lock.withLock { state[view] } }
    }

    @Test("TCP and HTTP checks: a closed port, a 503, a reply that is not HTTP and a silent server go down, each with its cause in words; 2xx, 3xx and a listening port stay up; a 503 turned 200 comes back")
    func checks() throws {
        let ns = try NetworkNamespace("probe")
        try ns.exec(["ip", "link", "set", "lo", "up"])
        let ok = try HTTPStatusServer(in: ns, port: 8081, status: 200)
        let moved = try HTTPStatusServer(in: ns, port: 8082, status: 302)
        let failing = try HTTPStatusServer(in: ns, port: 8083, status: 503)
        let silent = try HTTPStatusServer(in: ns, port: 8084, silent: true)
        let notHTTP = try NameServer(in: ns, name: "raw", tcpPorts: [8085], udpPorts: [])
        defer { [ok, moved, failing, silent].forEach { $0.stop() }; notHTTP.stop() }
        func view(_ port: Int, _ kind: HealthCheck.Kind) -> HealthView {
            let check = HealthCheck(kind: kind, interval: 100, timeout: 100, fall: 2, rise: 2)
            return HealthView(target: ProbeTarget(address: IPAddress("127.0.0.1")!, port: Port(port)!, check: check), fall: 2, rise: 2)
        }
        let up = [view(8081, .http(path: "/healthz")), view(8082, .http(path: "/")), view(8084, .tcp), view(8085, .tcp)]
        let downs = [view(8083, .http(path: "/healthz")), view(8084, .http(path: "/")), view(8085, .http(path: "/")), view(8099, .tcp)]
        let reports = Reports()
        let prober = HealthProber(namespacePath: ns.path) { reports.record($0) }
        defer { prober.stop() }
        prober.watch(Set(up + downs))
        try waitUntil("every failing check down") { downs.allSatisfy { reports[$0] == false } }
        // Each says why, in words.
        let causes = downs.map { prober.lastFailure(of: $0.target) }
        #expect(causes[0] == "HTTP 503" && causes[1] == "no HTTP answer within 100 ms" && causes[3] == "connection refused", "\(causes)")
        // The raw server answers a line and closes without reading the request: the kernel resets the connection,
        // and the reset may overtake the line (then nothing was read).
        #expect(causes[2] == "the answer is not HTTP" || causes[2] == "reading the answer: connection reset by peer", "\(causes)")
        try waitUntil("some probes of the others done") { prober.counts.probes >= 4 * up.count + 4 * downs.count }
        #expect(up.allSatisfy { reports[$0] == nil }, "healthy targets never went down")

        failing.status = 200
        try waitUntil("the recovered one up again") { reports[downs[0]] == true }
        // Narrowed to one target, the prober goes on probing it.
        prober.watch([up[0]])
        let before = prober.counts.probes
        try waitUntil("probing goes on for the one left") { prober.counts.probes > before + 3 }
    }

    @Test("targets that never answer in one namespace hold at most its share of the probes in flight; another namespace's check still goes down")
    func fairShare() throws {
        let ns = try NetworkNamespace("share")
        try ns.exec(["ip", "link", "set", "lo", "up"])
        // 198.18.1.0/24 answers nothing (its SYNs are dropped): every probe there waits for its timeout.
        try ns.vethPair("v0", "v1", address: "198.18.1.1/24")
        try ns.exec(["nft", "add table inet t; add chain inet t out { type filter hook output priority 0; }; add rule inet t out ip daddr 198.18.1.0/24 drop"])
        let check = HealthCheck(kind: .tcp, interval: 200, timeout: 150, fall: 2, rise: 2)
        let greedy = (1...200).map { HealthView(target: ProbeTarget(address: IPAddress("198.18.1.\($0 % 250 + 2)")!, port: Port(30000 + $0)!, check: check),
                                                fall: 2, rise: 2, namespace: "greedy") }
        let victim = HealthView(target: ProbeTarget(address: IPAddress("127.0.0.1")!, port: Port(8099)!, check: check), fall: 2, rise: 2, namespace: "victim")
        let reports = Reports()
        let prober = HealthProber(namespacePath: ns.path, maxInFlight: 64) { reports.record($0) }
        defer { prober.stop() }
        prober.watch(Set(greedy + [victim]))
        try waitUntil("the victim's closed port down") { reports[victim] == false }
        try waitUntil("greedy's probes went on") { prober.counts.failures > 200 }
        #expect(prober.peakInFlight(of: "greedy") <= 32, "greedy held \(prober.peakInFlight(of: "greedy")) of 64")
        #expect(prober.peakInFlight(of: "greedy") >= 8, "and did use its share")
    }
}
