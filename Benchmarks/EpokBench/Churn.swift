import Dataplane
import FakeKube
import Foundation
import NetnsLab

// Network programming latency under churn: the fake API server holds N Services; epokd watches it and programs a
// namespace. Each change remaps one Service to a new host port; its latency runs from the moment the server sent
// its watch event (wrote it to the watch's socket) to the moment the kernel announced the new element (read
// in-process from the nftables notification group, as `nft monitor` would print it), and again from the moment the
// server stored the change (so that the fake's own delay in sending, Python serializing objects, shows). First
// isolated changes (one at a time, 100 ms apart: 200, so that the p99 is not the largest of them), then `rate`
// changes a second for `seconds`; epokd's CPU share over that time from /proc.
func churnRows(epokd: String, n: Int, isolated: Int = 200, rate: Int = 1000, seconds: Int = 15) throws -> [Row] {
    let scratch = try ScratchDirectory("churn")
    let seed = URL(fileURLWithPath: scratch.path + "/seed.json")
    try writeSnapshot(n, to: seed)
    let api = try FakeAPIServer(seed: seed.path)
    defer { api.stop() }
    // A real API server sends a bookmark about once a minute; the fake's default (every second, on every watch)
    // would measure Python's scheduling more than epokd.
    try api.control("bookmark-interval seconds=60")
    let ns = try NetworkNamespace("churn")
    try ns.exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    let monitor = try ElementMonitor(namespacePath: ns.path)
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: epokd)
    // A drift check every 5 s (not 60): some fall among the isolated changes, which must not wait for them.
    daemon.arguments = ["--interfaces", "eth0", "--kubeconfig", api.kubeconfig, "--netns", ns.path, "--metrics-address", "off", "--log-level", "error",
                        "--drift-interval", "5"]
    try daemon.run()
    defer { daemon.terminate(); daemon.waitUntilExit() }
    let nftables = try Nftables(namespacePath: ns.path)
    let deadline = Date().addingTimeInterval(120)
    while (try? nftables.elements(of: ForwardingRuleset.servicesSet, in: Table(name: "epok")).count) ?? 0 < n {
        guard Date() < deadline, daemon.isRunning else { throw LabError.timeout("epokd's first commit of \(n) Services") }
        Thread.sleep(forTimeInterval: 0.2)
    }
    var lost = false
    while !(try monitor.next(timeout: 0.2, lost: &lost)).isEmpty {}

    /// The host port of an element of the services map (`meta l4proto . th dport`), when it is added.
    func addedPorts(_ notices: [ElementNotice]) -> [(Int, Double)] {
        notices.filter { $0.added && $0.set == ForwardingRuleset.servicesSet.name && $0.key.count >= 6 }
            .map { (Int($0.key[4]) << 8 | Int($0.key[5]), $0.time) }
    }
    /// "PORT STORED SENT" lines the fake wrote when its changes were made: when each was stored, and sent.
    func sent(_ path: String, expecting count: Int, within seconds: Double) throws -> [Int: (stored: Double, sent: Double)] {
        let until = Date().addingTimeInterval(seconds)
        while !FileManager.default.fileExists(atPath: path) {
            guard Date() < until else { throw LabError.timeout("the fake's record of its changes") }
            Thread.sleep(forTimeInterval: 0.01)
        }
        var result: [Int: (stored: Double, sent: Double)] = [:]
        for line in try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 3, let port = Int(parts[0]), let stored = Double(parts[1]), let sent = Double(parts[2]) {
                result[port] = (stored, sent)
            }
        }
        guard result.count == count else { throw LabError.commandFailed("the fake made \(result.count) of \(count) changes", 1, "") }
        return result
    }

    // Isolated changes.
    let firstPort = n + 1
    var isolatedLatencies: [Double] = [], isolatedSinceStored: [Double] = []
    for k in 0..<isolated {
        let log = scratch.path + "/isolated-\(k)"
        try api.control("remap first=\(k) count=1 port=\(firstPort + k) log=\(log)")
        var seen: Double?
        let until = Date().addingTimeInterval(10)
        while seen == nil && Date() < until {
            seen = addedPorts(try monitor.next(timeout: 0.5, lost: &lost)).first { $0.0 == firstPort + k }?.1
        }
        guard let seen, let made = try sent(log, expecting: 1, within: 5)[firstPort + k] else { throw LabError.timeout("isolated change \(k) in the kernel") }
        isolatedLatencies.append((seen - made.sent) * 1000)
        isolatedSinceStored.append((seen - made.stored) * 1000)
        Thread.sleep(forTimeInterval: 0.1)
    }

    // Sustained churn.
    let total = rate * seconds, sustainedPort = firstPort + isolated
    let log = scratch.path + "/sustained"
    let cpuBefore = cpuSeconds(daemon.processIdentifier), wallBefore = Date()
    try api.control("remap first=\(isolated) count=\(total) port=\(sustainedPort) rate=\(rate) log=\(log)")
    var arrivals: [Int: Double] = [:]
    let until = Date().addingTimeInterval(Double(seconds) + 20)
    while arrivals.count < total && Date() < until {
        for (port, time) in addedPorts(try monitor.next(timeout: 0.5, lost: &lost)) where port >= sustainedPort && arrivals[port] == nil {
            arrivals[port] = time
        }
    }
    let cpu = (cpuSeconds(daemon.processIdentifier) - cpuBefore) / Date().timeIntervalSince(wallBefore)
    let made = try sent(log, expecting: total, within: 30)
    let latencies = made.compactMap { port, time in arrivals[port].map { ($0 - time.sent) * 1000 } }
    let sinceStored = made.compactMap { port, time in arrivals[port].map { ($0 - time.stored) * 1000 } }
    func percentile(_ values: [Double], _ q: Double) -> Double {
        let sorted = values.sorted()
        return sorted.isEmpty ? .infinity : sorted[min(sorted.count - 1, Int((Double(sorted.count) * q).rounded(.up)) - 1)]
    }
    let label = "API change to kernel"
    if lost { print("churn at N=\(n): the kernel dropped nftables notifications (the socket's buffer was full); landed counts only those read") }
    return [
        Row(name: "\(label), isolated changes, p50", n: n, epokd: percentile(isolatedLatencies, 0.5)),
        Row(name: "\(label), isolated changes, p99", n: n, epokd: percentile(isolatedLatencies, 0.99)),
        Row(name: "\(label), \(rate) changes/s for \(seconds) s, p50", n: n, epokd: percentile(latencies, 0.5)),
        Row(name: "\(label), \(rate) changes/s for \(seconds) s, p99", n: n, epokd: percentile(latencies, 0.99)),
        Row(name: "\(label) from the fake's store, isolated changes, p99", n: n, epokd: percentile(isolatedSinceStored, 0.99)),
        Row(name: "\(label) from the fake's store, \(rate) changes/s, p50", n: n, epokd: percentile(sinceStored, 0.5)),
        Row(name: "\(label) from the fake's store, \(rate) changes/s, p99", n: n, epokd: percentile(sinceStored, 0.99)),
        Row(name: "changes landed at \(rate) changes/s (higher is better)", n: n,
            epokd: Double(latencies.count) * 100 / Double(total), unit: "%"),
        Row(name: "epokd CPU at \(rate) changes/s, share of one core", n: n, epokd: cpu * 100, unit: "%"),
    ]
}

/// User and system CPU seconds of process `pid` so far, from /proc.
private func cpuSeconds(_ pid: Int32) -> Double {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = stat.lastIndex(of: ")") else { return 0 }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    // After the command: state is field 3, utime 14 and stime 15 (so 11 and 12 here, from 0).
    guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}
