import FakeKube
import Foundation
import NetnsLab

// The daemon's memory holding N Services, from each source (a snapshot file, the API server) and from each start
// (an empty namespace; a table a `--once` from the same objects left): the peak (VmHWM) once it has committed and
// made two drift checks (`--drift-interval 1`; each reads the whole table back), and what stays resident then (VmRSS).
func daemonMemoryRows(epokd: String, snapshotFile: String, n: Int) throws -> [Row] {
    let api = try FakeAPIServer(seed: snapshotFile)
    defer { api.stop() }
    var rows: [Row] = []
    for (source, arguments) in [("file", ["--source", snapshotFile]), ("API", ["--kubeconfig", api.kubeconfig])] {
        for existing in [false, true] {
            let (peak, resident) = try daemonMemory(epokd: epokd, arguments: arguments, existingFrom: existing ? snapshotFile : nil, n: n)
            let start = existing ? "existing table" : "empty namespace"
            rows.append(Row(name: "peak RSS of the daemon, \(source) source, \(start), 2 drift checks", n: n, epokd: Measured([peak]), unit: "MiB"))
            rows.append(Row(name: "resident after, \(source) source, \(start)", n: n, epokd: Measured([resident]), unit: "MiB"))
        }
    }
    return rows
}

/// One daemon's peak and resident memory (MiB) after its first commit and two drift checks that found it clean.
private func daemonMemory(epokd: String, arguments: [String], existingFrom file: String?, n: Int) throws -> (Double, Double) {
    let ns = try NetworkNamespace("memory")
    try ns.exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    if let file {
        _ = try ns.exec([epokd, "--interfaces", "eth0", "--source", file, "--once", "--log-level", "error", "--metrics-address", "off"])
    }
    let port = 21_000 + Int(getpid() % 10_000)
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: epokd)
    daemon.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--log-level", "error", "--drift-interval", "1",
                        "--metrics-address", "127.0.0.1:\(port)"] + arguments
    try daemon.run()
    defer {
        kill(daemon.processIdentifier, SIGKILL)
        daemon.waitUntilExit()
    }
    // The first commit and two drift checks, counted by the daemon itself.
    let deadline = Date().addingTimeInterval(300)
    while true {
        let metrics = httpGet(port: port, path: "/metrics")?.1 ?? ""
        let line = metrics.split(separator: "\n").first { $0.hasPrefix("epokd_drift_checks_total{result=\"clean\"} ") }
        if let count = line.flatMap({ Double($0.split(separator: " ").last ?? "") }), count >= 2 { break }
        guard Date() < deadline, daemon.isRunning else { throw LabError.timeout("the daemon's second clean drift check (N=\(n))") }
        usleep(50_000)
    }
    let status = (try? String(contentsOfFile: "/proc/\(daemon.processIdentifier)/status", encoding: .utf8)) ?? ""
    func kilobytes(_ field: String) -> Double {
        status.split(separator: "\n").first { $0.hasPrefix(field) }.flatMap { Double($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    }
    return (kilobytes("VmHWM:") / 1024, kilobytes("VmRSS:") / 1024)
}
