import FakeKube
import Foundation
import NetnsLab

// The daemon's memory holding N Services, from each source (a snapshot file, the API server) and from each start
// (an empty namespace; a table a `--once` from the same objects left): the peak (VmHWM) once it has committed and
// made two drift checks (`--drift-interval 1`; each reads the whole table back), and what stays resident then (VmRSS).
// Then once more from a file, which is replaced by one with a Service changed (as a ConfigMap update does), written
// on one line: the peak through its reading and commit, and what stays resident after.
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
    let (peak, resident) = try daemonMemory(epokd: epokd, arguments: [], existingFrom: snapshotFile, n: n, changing: snapshotFile)
    rows.append(Row(name: "peak RSS of the daemon, file source, the file replaced (one line, a Service changed)", n: n, epokd: Measured([peak]), unit: "MiB"))
    rows.append(Row(name: "resident after, file source, the file replaced", n: n, epokd: Measured([resident]), unit: "MiB"))
    return rows
}

/// One daemon's peak and resident memory (MiB) after its first commit and two drift checks that found it clean;
/// with `changing`, a copy of that snapshot file is its source, replaced then by one with a Service changed, and
/// the figures are taken once that change is committed.
private func daemonMemory(epokd: String, arguments: [String], existingFrom file: String?, n: Int, changing original: String? = nil) throws -> (Double, Double) {
    let ns = try NetworkNamespace("memory")
    try ns.exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    if let file {
        _ = try ns.exec([epokd, "--interfaces", "eth0", "--source", file, "--once", "--log-level", "error", "--metrics-address", "off"])
    }
    let port = 21_000 + Int(getpid() % 10_000)
    let live = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-memory-\(getpid())-\(n).json").path
    defer { try? FileManager.default.removeItem(atPath: live) }
    if let original {
        try? FileManager.default.removeItem(atPath: live)
        try FileManager.default.copyItem(atPath: original, toPath: live)
    }
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: epokd)
    daemon.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--log-level", "error", "--drift-interval", "1",
                        "--metrics-address", "127.0.0.1:\(port)"] + arguments + (original == nil ? [] : ["--source", live])
    try daemon.run()
    defer {
        kill(daemon.processIdentifier, SIGKILL)
        daemon.waitUntilExit()
    }
    /// The value of the metric whose line starts with `name` and a space, polled every 50 ms until `done` says so.
    func waitFor(_ name: String, _ what: String, until done: (Double) -> Bool) throws -> Double {
        let deadline = Date().addingTimeInterval(300)
        while true {
            let metrics = httpGet(port: port, path: "/metrics")?.1 ?? ""
            let line = metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }
            if let value = line.flatMap({ Double($0.split(separator: " ").last ?? "") }), done(value) { return value }
            guard Date() < deadline, daemon.isRunning else { throw LabError.timeout("\(what) (N=\(n))") }
            usleep(50_000)
        }
    }
    // The first commit and two drift checks, counted by the daemon itself.
    _ = try waitFor("epokd_drift_checks_total{result=\"clean\"}", "the daemon's second clean drift check") { $0 >= 2 }
    if let original {
        // The file replaced in one rename, with one Service given a second mapping, and on one line (as a tool
        // that writes compact JSON leaves it): the reader cannot split such a List, and digests what it skips.
        let committed = try waitFor("epokd_transactions_total", "the daemon's commits") { _ in true }
        let text = try String(contentsOfFile: original, encoding: .utf8)
        let before = #""epok.getbetter.ro/externalports": "1:30000""#
        guard let first = text.range(of: before) else { throw LabError.commandFailed("change \(original)", 0, "no \(before) in it") }
        var line: [UInt8] = [], indenting = false
        line.reserveCapacity(text.utf8.count)
        for byte in text.replacingCharacters(in: first, with: #""epok.getbetter.ro/externalports": "1:30000,60001:30000""#).utf8 {
            if byte == UInt8(ascii: "\n") { indenting = true; continue }
            if indenting && byte == UInt8(ascii: " ") { continue }
            indenting = false
            line.append(byte)
        }
        try Data(line).write(to: URL(fileURLWithPath: live + ".new"))
        guard rename(live + ".new", live) == 0 else { throw LabError.commandFailed("rename \(live).new", errno, String(cString: strerror(errno))) }
        _ = try waitFor("epokd_transactions_total", "the commit of the changed file") { $0 > committed }
    }
    let status = (try? String(contentsOfFile: "/proc/\(daemon.processIdentifier)/status", encoding: .utf8)) ?? ""
    func kilobytes(_ field: String) -> Double {
        status.split(separator: "\n").first { $0.hasPrefix(field) }.flatMap { Double($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    }
    return (kilobytes("VmHWM:") / 1024, kilobytes("VmRSS:") / 1024)
}
