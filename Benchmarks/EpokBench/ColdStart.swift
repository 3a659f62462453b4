import Dataplane
import FakeKube
import Foundation
import NetnsLab

/// The daemon's cold start from the API server: process start to its first commit, listing `n` Services (pages of
/// 500) from the fake API server seeded with `snapshotFile`, and its peak memory then (three starts); beside it,
/// kubectl listing the same objects from the same server (once: it takes 5-8 times as long).
func coldStartRows(epokd: String, snapshotFile: String, n: Int) throws -> [Row] {
    let api = try FakeAPIServer(seed: snapshotFile)
    defer { api.stop() }
    var starts: [Double] = [], peaks: [Double] = []
    for _ in 0..<3 {
        let (start, peak) = try coldStart(epokd: epokd, api: api, n: n)
        starts.append(start)
        peaks.append(peak)
    }
    let listStart = DispatchTime.now().uptimeNanoseconds
    _ = try run(["kubectl", "--kubeconfig", api.kubeconfig, "get", "services,nodes", "-A", "-o", "json"])
    let kubectl = Double(DispatchTime.now().uptimeNanoseconds - listStart) / 1e6
    return [
        Row(name: "cold start from the API server: process start to first commit (daemon)", n: n, epokd: Measured(starts),
            baselineName: "kubectl get services,nodes -A -o json (process)", baseline: Measured([kubectl])),
        Row(name: "peak RSS of the daemon after listing N Services from the API server", n: n, epokd: Measured(peaks), unit: "MiB"),
    ]
}

/// One cold start into a new namespace: milliseconds to the first commit, and the peak RSS then (MiB).
private func coldStart(epokd: String, api: FakeAPIServer, n: Int) throws -> (Double, Double) {
    let ns = try NetworkNamespace("cold")
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-cold-\(getpid())-\(n).log").path
    _ = FileManager.default.createFile(atPath: log, contents: nil)
    defer { try? FileManager.default.removeItem(atPath: log) }
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: epokd)
    daemon.arguments = ["--interfaces", "eth0", "--kubeconfig", api.kubeconfig, "--netns", ns.path, "--log-level", "info",
                        "--metrics-address", "off"]
    let handle = FileHandle(forWritingAtPath: log)!
    defer { try? handle.close() }
    daemon.standardOutput = handle
    daemon.standardError = handle
    let start = DispatchTime.now().uptimeNanoseconds
    try daemon.run()
    defer {
        kill(daemon.processIdentifier, SIGKILL)
        daemon.waitUntilExit()
    }
    // The first commit is logged as the table's creation; the log is read, the kernel is not polled.
    let deadline = Date().addingTimeInterval(180)
    while !((try? String(contentsOfFile: log, encoding: .utf8))?.contains("applied: created table") ?? false) {
        guard Date() < deadline, daemon.isRunning else { throw LabError.timeout("epokd's first commit from the API server (N=\(n))") }
        usleep(2_000)
    }
    let coldStart = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
    let status = (try? String(contentsOfFile: "/proc/\(daemon.processIdentifier)/status", encoding: .utf8)) ?? ""
    let peak = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }.flatMap { Double($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    return (coldStart, peak / 1024)
}
