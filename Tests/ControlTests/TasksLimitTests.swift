import Foundation
import NetnsLab
import Testing

/// A cgroup of the pids controller, made for one test and removed with it: what runs in it has at most `max`
/// tasks (processes and threads) at once, as under systemd's `TasksMax` or a pod's pids limit.
final class PidsCgroup {
    let directory: String

    init(max: Int) throws {
        let base: String
        if FileManager.default.fileExists(atPath: "/sys/fs/cgroup/pids/cgroup.procs") {
            base = "/sys/fs/cgroup/pids"
        } else if let controllers = try? String(contentsOfFile: "/sys/fs/cgroup/cgroup.controllers", encoding: .utf8),
                  controllers.split(whereSeparator: \.isWhitespace).contains("pids") {
            base = "/sys/fs/cgroup"
            try "+pids".write(toFile: base + "/cgroup.subtree_control", atomically: false, encoding: .utf8)
        } else {
            throw LabError.commandFailed("find the pids cgroup controller", 1, "neither /sys/fs/cgroup/pids (v1) nor a cgroup2 root with pids")
        }
        directory = base + "/epk-tasks-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        try "\(max)".write(toFile: directory + "/pids.max", atomically: false, encoding: .utf8)
    }

    /// `arguments` as a command that moves itself into the cgroup before it runs, so that every thread it starts counts.
    func command(_ arguments: [String]) -> [String] {
        ["sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", directory] + arguments
    }

    deinit {
        // A task that has just ended may still be counted for a moment.
        for _ in 0..<500 where rmdir(directory) != 0 && errno == EBUSY { usleep(10_000) }
    }
}

/// epokd under a tasks limit: it never waits forever for a thread the system refuses. What it can do without
/// (the second reading thread, the fold's helper, the drift checker, the status history, the metrics server) it
/// does without; without a thread for its feed or its loop it says so and stops; and it stops when told to.
@Suite("epokd at its tasks limit")
struct TasksLimitTests {
    /// A List of `count` Services, each mapped by its annotation to node port 30000, and a ready Node: about 1.4 kB a
    /// Service, so that 3,500 of them are read in two parts and folded with a helper when threads can be had.
    static func list(services count: Int) -> String {
        let applied = String(repeating: "{\\\"kind\\\":\\\"Service\\\",\\\"spec\\\":{\\\"type\\\":\\\"NodePort\\\"}}", count: 24)
        let services = (0..<count).map { i in
            """
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc-\(i)", "namespace": "limits", "creationTimestamp": "2024-01-01T00:00:00Z",
             "annotations": {"epok.getbetter.ro/externalports": "\(1000 + i):30000", "kubectl.kubernetes.io/last-applied-configuration": "\(applied)"}},
             "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30000, "targetPort": 8080}]}}
            """
        }
        let node = """
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}],
             "conditions": [{"type": "Ready", "status": "True"}]}}
            """
        return "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n" + (services + [node]).joined(separator: ",\n") + "\n]}\n"
    }

    /// A namespace with the interface epokd is given, and a List of 3,500 Services in a file.
    struct Setting {
        let host: NetworkNamespace
        let scratch: ScratchDirectory
        let source: String

        init() throws {
            host = try NetworkNamespace("tasks")
            try host.vethPair("eth0", "eth1", address: "192.0.2.1/24")
            scratch = try ScratchDirectory("tasks")
            source = scratch.path + "/cluster.json"
            let text = TasksLimitTests.list(services: 3_500)
            #expect(text.utf8.count > 4 << 20, "large enough to be read in two parts")
            try text.write(toFile: source, atomically: true, encoding: .utf8)
        }

        /// epokd in the namespace, in `cgroup`, its output in a file.
        func start(_ cgroup: PidsCgroup, _ options: [String]) throws -> (Process, log: String) {
            let log = scratch.path + "/epokd-\(UInt32.random(in: 0...UInt32.max)).log"
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = cgroup.command(["ip", "netns", "exec", host.name, epokdBinary, "--interfaces", "eth0", "--source", source] + options)
            let handle = FileHandle(forWritingAtPath: log)!
            process.standardOutput = handle
            process.standardError = handle
            try process.run()
            return (process, log)
        }

        /// The Services' mappings (to node port 30000) in the kernel's table; 0 without one.
        func mappings() throws -> Int {
            let listing = try host.exec(["nft", "list", "map", "inet", "epok", "services"], check: false).output
            return listing.components(separatedBy: " : 30000").count - 1
        }
    }

    /// Waits for `process` to exit (at most `seconds`, then it is killed and the wait is an error).
    static func exitStatus(_ process: Process, seconds: Double = 120) throws -> Int32 {
        do {
            try waitUntil("epokd to exit", seconds: seconds) { !process.isRunning }
        } catch {
            kill(process.processIdentifier, SIGKILL)
            throw error
        }
        return process.terminationStatus
    }

    @Test("refused its first thread, it says which and why, and stops: --once and the daemon alike; nothing is committed")
    func refusedAtOnce() throws {
        let setting = try Setting()
        for options in [["--once"], ["--metrics-address", "127.0.0.1:0"]] {
            let cgroup = try PidsCgroup(max: 1)
            let (process, log) = try setting.start(cgroup, options)
            let status = try Self.exitStatus(process)
            let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(status == 1, "\(options): \(output)")
            #expect(output.contains("could not start thread epokd-file: Resource temporarily unavailable (the process is at its tasks limit"), "\(options): \(output)")
            #expect(try setting.mappings() == 0)
        }
    }

    @Test("with threads for its feed and its loop only, --once commits every Service, and the daemon runs and stops when told to")
    func tightLimit() throws {
        let setting = try Setting()
        let once = try PidsCgroup(max: 3)
        let (first, firstLog) = try setting.start(once, ["--once"])
        let status = try Self.exitStatus(first)
        #expect(status == 0, "\((try? String(contentsOfFile: firstLog, encoding: .utf8)) ?? "")")
        #expect(try setting.mappings() == 3_500)

        try setting.host.exec(["nft", "delete", "table", "inet", "epok"])
        let daemon = try PidsCgroup(max: 3)
        let (process, log) = try setting.start(daemon, ["--drift-interval", "1", "--metrics-address", "127.0.0.1:0"])
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        try waitUntil("the daemon's commit", seconds: 120) { try setting.mappings() == 3_500 }
        // A drift check without a thread of its own: the loop reads the table back itself.
        try waitUntil("a drift check", seconds: 60) {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("the drift check reads the table on the reconcile loop: could not start thread epokd-drift")
        }
        kill(process.processIdentifier, SIGTERM)
        let stopped = try Self.exitStatus(process, seconds: 60)
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(stopped == 0, "\(output)")
        #expect(output.contains("signal 15: stopping; the table stays in place"), "\(output)")
        #expect(try setting.mappings() == 3_500, "the table stays")
    }
}
