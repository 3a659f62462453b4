import Control
import Dataplane
import Foundation
import NetnsLab
#if canImport(Glibc)
import Glibc
#endif

// The health prober's cost: 1k checked Services × 3 nodes at the default interval (2 s), TCP checks of
// listening ports in a namespace (a small Python process accepts and closes them), measured over a window:
// probes completed per second, and the CPU the bench process (the prober's thread; nothing else runs) used.

/// Accepts and closes connections on `ports` of every address in `ns`, in a process of its own.
private func listenerFarm(in ns: NetworkNamespace, ports: ClosedRange<Int>) throws -> Process {
    let script = """
        import selectors, socket, sys
        sel = selectors.DefaultSelector()
        for port in range(\(ports.lowerBound), \(ports.upperBound + 1)):
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port)); s.listen(128); s.setblocking(False); sel.register(s, selectors.EVENT_READ)
        print("ready", flush=True)
        while True:
            for key, _ in sel.select():
                try:
                    c, _ = key.fileobj.accept(); c.close()
                except OSError:
                    pass
        """
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
    process.arguments = ["netns", "exec", ns.name, "python3", "-c", script]
    let out = Pipe()
    process.standardOutput = out
    try process.run()
    _ = out.fileHandleForReading.availableData   // "ready"
    return process
}

private func cpuSeconds() -> Double {
    var usage = rusage()
    getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

func healthRows(seconds: Double) throws -> [Row] {
    let ns = try NetworkNamespace("health")
    try ns.exec(["ip", "link", "set", "lo", "up"])
    let farm = try listenerFarm(in: ns, ports: 30000...30999)
    defer { farm.terminate(); farm.waitUntilExit() }
    let check = HealthCheck(kind: .tcp)
    let views = Set((0..<1000).flatMap { service in
        (1...3).map { node in
            HealthView(target: ProbeTarget(address: IPAddress("127.0.0.\(node)")!, port: Port(30000 + service)!, check: check), fall: check.fall, rise: check.rise)
        }
    })
    let prober = HealthProber(namespacePath: ns.path) { _ in }
    defer { prober.stop() }
    prober.watch(views)
    // The first round is spread over one interval; measure after it.
    Thread.sleep(forTimeInterval: Double(check.interval) / 1000 + 0.5)
    let (probes, cpu, start) = (prober.counts.probes, cpuSeconds(), Date())
    Thread.sleep(forTimeInterval: seconds)
    let elapsed = Date().timeIntervalSince(start)
    let rate = Double(prober.counts.probes - probes) / elapsed
    let usage = (cpuSeconds() - cpu) / elapsed * 100
    let expected = Double(views.count) / (Double(check.interval) / 1000)
    return [
        Row(name: "health probes/s, 1k checked Services × 3 nodes, TCP every 2 s (higher is better)", n: views.count, epokd: rate,
            baselineName: "the rate asked for (targets / interval)", baseline: expected, unit: "/s"),
        Row(name: "CPU of the health prober, 1k checked Services × 3 nodes", n: views.count, epokd: usage, unit: "% of a CPU"),
        Row(name: "failed health probes (all targets listen)", n: views.count, epokd: Double(prober.counts.failures), unit: "probes"),
    ]
}
