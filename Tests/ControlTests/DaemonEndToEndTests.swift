import Control
import Dataplane
import FakeKube
import Foundation
import NetnsLab
import Testing

/// The epokd executable, built next to the test bundle.
let epokdBinary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("epokd").path

/// epokd as a process, watching the fake API server and programming the lab's host namespace.
final class DaemonProcess {
    let process = Process()
    let log: String

    convenience init(lab: ForwardingLab, api: FakeAPIServer, extra: [String] = []) throws {
        try self.init(arguments: ["--interfaces", "eth0,wg0", "--external-interface", "eth0", "--kubeconfig", api.kubeconfig,
                                  "--netns", lab.host.path, "--log-level", "debug"] + (extra.isEmpty ? ["--metrics-address", "off"] : extra),
                      log: api.directory + "/epokd-\(UUID().uuidString.prefix(6)).log")
    }

    /// epokd with `arguments`, its output in `log`.
    init(arguments: [String], log: String) throws {
        self.log = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = URL(fileURLWithPath: epokdBinary)
        process.arguments = arguments
        let handle = FileHandle(forWritingAtPath: log)!
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
    }

    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    /// Sends `signal` and waits for the exit status.
    func stop(_ signal: Int32 = SIGTERM) -> Int32 {
        kill(process.processIdentifier, signal)
        var status: Int32 = 0
        for _ in 0..<1000 where waitpid(process.processIdentifier, &status, WNOHANG) == 0 { usleep(10_000) }
        return status
    }
}

@Suite("The daemon as a process, driven by the fake API server")
struct DaemonEndToEndTests {
    func nodes(_ api: FakeAPIServer, ready: [Bool]) throws {
        for (i, up) in ready.enumerated() {
            var n = makeNode("n\(i + 1)", address: ForwardingLab.node4(i + 1), ready: up)
            n.status?.addresses?.append(Node.Address(type: "InternalIP", address: ForwardingLab.node6(i + 1)))
            try api.apply(n, kind: "nodes")
        }
    }

    func answer(_ probe: Probe) -> String? {
        if case .answered(let who) = probe { return who }
        return nil
    }

    @Test("annotate a Service: traffic flows; nodes change: traffic follows; SIGTERM and restart drop no connection; kill -9 converges")
    func daemonLifecycle() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [30053], echoPorts: [30500])
        let api = try FakeAPIServer()
        try nodes(api, ready: [true, true, true])
        var web = makeService("web", nodePort: 30022)
        web.spec.ports = [Service.Port(protocol: "TCP", port: 22, nodePort: 30022), Service.Port(protocol: "UDP", port: 53, nodePort: 30053),
                          Service.Port(protocol: "TCP", port: 500, nodePort: 30500)]
        try api.apply(web, kind: "services")
        let metricsPort = FakeAPIServer.freePort()
        var daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(metricsPort)", "--drift-interval", "1"])
        defer { _ = daemon.stop(SIGKILL) }
        try waitUntil("the metrics endpoint") { httpGet(port: metricsPort, path: "/healthz")?.0 == 200 }

        // Annotate: traffic flows.
        web.metadata.annotations = [EpokAnnotation.externalPorts: "22:30022, 53:30053:udp, 500:30500"]
        try api.apply(web, kind: "services")
        try waitUntil("forwarding of 22/tcp", seconds: 30) {
            answer(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 0.5))?.hasSuffix(":30022") == true
        }

        // Events on the Services: a Normal one for the mapping, a Warning for a malformed annotation.
        try api.apply(makeService("typo", annotation: "22:30022:tpc"), kind: "services")
        try waitUntil("the events", seconds: 30) {
            let events = String(decoding: try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/events"), as: UTF8.self)
            return events.contains("\"reason\": \"Mapped\"") && events.contains("\"reason\": \"InvalidAnnotation\"")
                && events.contains("protocol \\\"tpc\\\" is not tcp or udp")
        }

        // Ready, metrics with per-mapping counters, and status read from the kernel.
        #expect(httpGet(port: metricsPort, path: "/readyz")?.0 == 200)
        let metrics = try #require(httpGet(port: metricsPort, path: "/metrics")?.1)
        #expect(metrics.contains("epokd_transactions_total"))
        #expect(metrics.contains("epokd_network_programming_duration_seconds_count"), "each change's programming time is measured")
        let version = try run([epokdBinary, "--version"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        let commit = try #require(version.firstMatch(of: /^epokd (\d+\.\d+\.\d+) \(commit ([0-9a-f]{12}(-dirty)?)\)$/), "\(version)")
        #expect(metrics.contains("epokd_build_info{version=\"\(commit.1)\",commit=\"\(commit.2)\"} 1")
                || metrics.contains("epokd_build_info{commit=\"\(commit.2)\",version=\"\(commit.1)\"} 1"), "\(metrics.split(separator: "\n").filter { $0.contains("build_info") })")
        let packets = metrics.split(separator: "\n").first { $0.hasPrefix("epokd_mapping_packets_total{protocol=\"tcp\",port=\"22\"}") }
        #expect((packets?.split(separator: " ").last.flatMap { Int($0) } ?? 0) > 0, "forwarded packets are counted:\n\(metrics)")
        let status = try run([epokdBinary, "status", "--netns", lab.host.path, "--metrics-address", "127.0.0.1:\(metricsPort)"]).output
        #expect(status.contains("HOST PORT") && status.split(separator: "\n").contains { $0.hasPrefix("22 ") && $0.contains("default/web") && $0.contains("30022") && $0.contains(ForwardingLab.node4(3)) })
        // The daemon's programming latency, from its histogram.
        let latency = try #require(status.split(separator: "\n").first { $0.hasPrefix("programming latency") }, "\(status)")
        #expect(latency.contains("p50 ≤ ") && latency.contains("p99 ≤ ") && !latency.contains("over 0 changes"), "\(latency)")
        let json = try run([epokdBinary, "status", "--json", "--netns", lab.host.path, "--metrics-address", "127.0.0.1:\(metricsPort)"]).output
        let programming = try #require((try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["programming"] as? [String: Any])
        #expect((programming["changes"] as? Int ?? 0) > 0 && (programming["p99Seconds"] as? Double ?? 0) >= (programming["p50Seconds"] as? Double ?? 1))

        // Drift: an element deleted by hand comes back with the next read-back, and only it.
        try lab.host.exec(["nft", "delete", "element", "inet", "epok", "services", "{ tcp . 22 }"])
        try waitUntil("the repair, adding back exactly the missing element", seconds: 30) {
            daemon.output.contains("applied: +1 -0 elements")
        }
        #expect(answer(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22))?.hasSuffix(":30022") == true)

        // Nodes change: new connections follow.
        try nodes(api, ready: [true, false, false])
        try waitUntil("only n1 receives", seconds: 30) {
            try (0..<4).allSatisfy { _ in answer(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22))?.hasPrefix("n1:") == true }
        }

        // Restart while a TCP connection and a UDP stream exchange messages without pause: not one goes unanswered.
        let stream = try FlowClient.tcp(from: lab.external, to: ForwardingLab.hostExternal4, port: 500)
        let datagrams = try FlowClient.udp(from: lab.internal, to: ForwardingLab.hostInternal4, port: 53)
        let tcpNode = try #require(answer(stream.exchange("0"))?.split(separator: ":").first)
        let udpBefore = try #require(answer(datagrams.exchange("0")))
        let traffic = Deliveries<String>()
        let trafficStop = StopSignal()
        let trafficDone = DispatchSemaphore(value: 0)
        Thread {
            var i = 0
            repeat {
                i += 1
                let t = answer(stream.exchange("\(i)", timeout: 1))
                traffic.append(t == "\(tcpNode):30500:\(i)" ? "ok" : "tcp \(i): \(t ?? "no answer")")
                let u = answer(datagrams.exchange("\(i)", timeout: 1))
                traffic.append(u == udpBefore ? "ok" : "udp \(i): \(u ?? "no answer")")
            } while !trafficStop.wait(seconds: 0.005)
            trafficDone.signal()
        }.start()
        #expect(daemon.stop(SIGTERM) == 0, "SIGTERM exits 0:\n\(daemon.output)")
        #expect(try Nftables(namespacePath: lab.host.path).read(ForwardingRuleset.skeleton()) != nil, "the table stays in place")
        let restartedMetrics = FakeAPIServer.freePort()
        daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(restartedMetrics)"])
        try waitUntil("the restarted daemon's first sync", seconds: 30) { httpGet(port: restartedMetrics, path: "/readyz")?.0 == 200 }
        #expect(!daemon.output.contains("applied:"), "nothing changed, so the restart committed nothing:\n\(daemon.output)")
        let countAtRestart = traffic.all.count
        try waitUntil("more exchanges after the restart") { traffic.all.count >= countAtRestart + 20 }
        trafficStop.stop()
        trafficDone.wait()
        let failures = traffic.all.filter { $0 != "ok" }
        #expect(failures.isEmpty, "lost during the restart: \(failures.prefix(5))")
        #expect(traffic.all.count >= 40)

        // kill -9 right after a change: the kernel holds the old or new state, and the next start converges.
        try nodes(api, ready: [true, true, true])
        _ = daemon.stop(SIGKILL)
        daemon = try DaemonProcess(lab: lab, api: api)
        try waitUntil("all three nodes again", seconds: 30) {
            Set(try (0..<6).compactMap { _ in answer(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22)) }) ==
                ["n1:30022", "n2:30022", "n3:30022"]
        }
        #expect(daemon.stop(SIGTERM) == 0)
        #expect(daemon.output.contains("applied: +80 -80 elements"), "the restart applied only the difference it read back:\n\(daemon.output)")
    }
}

@Suite("The metrics endpoint under abuse")
struct MetricsAbuseTests {
    @Test("huge request lines are refused, idle and surplus connections are closed, scrapes never block /healthz")
    func limits() throws {
        let ns = try NetworkNamespace("metrics")
        let scratch = try ScratchDirectory("metrics")
        let dir = scratch.path
        try scratch.write("empty.json", ScratchDirectory.emptyList)
        let port = FakeAPIServer.freePort()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: epokdBinary)
        process.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--source", dir + "/empty.json", "--metrics-address", "127.0.0.1:\(port)",
                             "--metrics-idle-timeout", "1", "--metrics-max-connections", "80"]
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        defer {
            kill(process.processIdentifier, SIGKILL)
            var status: Int32 = 0
            waitpid(process.processIdentifier, &status, 0)
        }
        try waitUntil("the metrics endpoint", seconds: 20) { httpGet(port: port, path: "/readyz")?.0 == 200 }

        // A 400 KB request line: refused (NIO caps the head at 80 KiB), and the server carries on.
        let huge = try #require(LoopbackConnection(port: port))
        huge.send("GET /" + String(repeating: "a", count: 400_000) + " HTTP/1.1\r\nHost: x\r\n\r\n")
        let answer = huge.readAll()
        #expect(answer.hasPrefix("HTTP/1.1 400"), "\(answer.prefix(200))")
        #expect(httpGet(port: port, path: "/healthz")?.0 == 200)

        // Idle connections are closed by the server.
        let idle = try #require(LoopbackConnection(port: port))
        #expect(idle.closedByServer(within: 10), "an idle connection is closed after the idle timeout")

        // More connections than the limit: the surplus is closed at once; the listener survives.
        let many = (0..<100).compactMap { _ in LoopbackConnection(port: port) }
        let refused = many.filter { $0.closedByServer(within: 0.5) }.count
        #expect(refused >= 15, "\(refused) of 100 connections closed beyond the limit of 80")
        _ = many
        try waitUntil("the idle connections to be closed", seconds: 10) { httpGet(port: port, path: "/healthz")?.0 == 200 }

        // 64 scrapes in flight at once, and /healthz still answers.
        let scrapers = (0..<64).compactMap { _ in LoopbackConnection(port: port) }
        scrapers.forEach { $0.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") }
        #expect(scrapers.count == 64)
        #expect(httpGet(port: port, path: "/healthz")?.0 == 200, "answered while 64 scrapes are in flight")
        let bodies = scrapers.map { $0.readAll() }
        #expect(bodies.allSatisfy { $0.hasPrefix("HTTP/1.1 200") && $0.contains("epokd_source_errors") }, "every scrape was answered")
        #expect(httpGet(port: port, path: "/healthz")?.0 == 200)
    }
}

@Suite("The daemon as a process, driven by a snapshot file")
struct DaemonSourceFileTests {
    @Test("--source --once applies a kubectl List and exits 0; a malformed file exits 1 and leaves the kernel alone")
    func sourceOnce() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [])
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-src-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var ssh = makeService("ssh", annotation: "22:30022")
        ssh.metadata.creationTimestamp = "2024-01-01T00:00:00Z"
        struct List: Encodable {
            var apiVersion = "v1", kind = "List"
            var items: [Item]
            enum Item: Encodable {
                case service(Service), node(Node)
                enum K: String, CodingKey { case kind }
                func encode(to encoder: Encoder) throws {
                    var c = encoder.container(keyedBy: K.self)
                    switch self {
                    case .service(let s): try s.encode(to: encoder); try c.encode("Service", forKey: .kind)
                    case .node(let n): try n.encode(to: encoder); try c.encode("Node", forKey: .kind)
                    }
                }
            }
        }
        let list = List(items: [.service(ssh)] + (1...3).map { .node(makeNode("n\($0)", address: ForwardingLab.node4($0))) })
        try JSONEncoder().encode(list).write(to: URL(fileURLWithPath: dir + "/cluster.json"))
        let base = [epokdBinary, "--interfaces", "eth0", "--netns", lab.host.path, "--once"]
        // Epok's command line (executor argument, --batch-* options) starts unchanged.
        let applied = try run(base + ["local", "--batch-commands", "true", "--batch-size", "1677722", "--source", dir + "/cluster.json"], check: false)
        #expect(applied.status == 0, "\(applied.error)")
        #expect(applied.error.contains("the 'local' executor no longer applies"))
        #expect(try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22).description.hasSuffix(":30022"))
        let listing = try lab.host.nftList("inet", "epok")

        try "items: [".write(toFile: dir + "/broken.yaml", atomically: true, encoding: .utf8)
        let broken = try run(base + ["--source", dir + "/broken.yaml"], check: false)
        #expect(broken.status == 1)
        #expect(broken.error.contains("broken.yaml: is malformed"), "\(broken.error)")
        #expect(try lab.host.nftList("inet", "epok") == listing, "the kernel keeps its previous state")
    }
}

@Suite("The daemon follows a snapshot file as people deploy it")
struct DaemonFileFollowTests {
    func list(_ port: Int) -> String {
        """
        {"kind": "List", "apiVersion": "v1", "items": [
          {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "\(port):30022"}},
           "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30022, "protocol": "TCP"}]}},
          {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}],
           "conditions": [{"type": "Ready", "status": "True"}]}}]}
        """
    }

    @Test("a ConfigMap-style mount (..data swapped) and a rewrite with the same size and mtime are both followed")
    func configMapAndSameMtime() throws {
        let ns = try NetworkNamespace("follow")
        let scratch = try ScratchDirectory("follow")
        let dir = scratch.path
        // What the kubelet makes of a ConfigMap: cluster.json -> ..data/cluster.json, ..data -> ..v1.
        try FileManager.default.createDirectory(atPath: dir + "/..v1", withIntermediateDirectories: true)
        try scratch.write("..v1/cluster.json", list(1001))
        try FileManager.default.createSymbolicLink(atPath: dir + "/..data", withDestinationPath: "..v1")
        try FileManager.default.createSymbolicLink(atPath: dir + "/cluster.json", withDestinationPath: "..data/cluster.json")
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: epokdBinary)
        daemon.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--source", dir + "/cluster.json", "--metrics-address", "off"]
        daemon.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try daemon.run()
        defer {
            kill(daemon.processIdentifier, SIGKILL)
            var status: Int32 = 0
            waitpid(daemon.processIdentifier, &status, 0)
        }
        func holds(_ port: Int) throws -> Bool { try ns.exec(["nft", "list", "table", "inet", "epok"], check: false).output.contains("tcp . \(port) ") }
        try waitUntil("the first version", seconds: 20) { try holds(1001) }

        // The kubelet's update: a new directory, then ..data swapped to it in one rename.
        try FileManager.default.createDirectory(atPath: dir + "/..v2", withIntermediateDirectories: true)
        try scratch.write("..v2/cluster.json", list(1002))
        try FileManager.default.createSymbolicLink(atPath: dir + "/..data_tmp", withDestinationPath: "..v2")
        #expect(rename(dir + "/..data_tmp", dir + "/..data") == 0)
        try waitUntil("the swapped version", seconds: 20) { try holds(1002) && !(try holds(1001)) }

        // Rewritten in place with the same size, its mtime set back: seen by content.
        let path = dir + "/..v2/cluster.json"
        let before = try FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as! Date
        try list(1003).write(toFile: path, atomically: false, encoding: .utf8)
        try FileManager.default.setAttributes([.modificationDate: before], ofItemAtPath: path)
        try waitUntil("the rewrite with the same mtime", seconds: 30) { try holds(1003) }
    }

    @Test("SIGTERM keeps the table by default; with --cleanup-on-exit it removes epokd's table only, and a foreign table of another name stays")
    func cleanupOnExit() throws {
        let ns = try NetworkNamespace("cleanup")
        let scratch = try ScratchDirectory("cleanup")
        try scratch.write("cluster.json", list(1001))
        try ns.exec(["nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; add rule inet filter input tcp dport 22 accept"])
        let foreign = try ns.nftList("inet", "filter")
        func run(_ extra: [String]) throws -> Int32 {
            let daemon = Process()
            daemon.executableURL = URL(fileURLWithPath: epokdBinary)
            daemon.arguments = ["--interfaces", "eth0", "--netns", ns.path, "--source", scratch.path + "/cluster.json", "--metrics-address", "off"] + extra
            daemon.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try daemon.run()
            defer { if daemon.isRunning { kill(daemon.processIdentifier, SIGKILL) } }
            try waitUntil("the table", seconds: 20) { try ns.exec(["nft", "list", "table", "inet", "epok"], check: false).output.contains("tcp . 1001 ") }
            kill(daemon.processIdentifier, SIGTERM)
            daemon.waitUntilExit()
            return daemon.terminationStatus
        }
        #expect(try run([]) == 0)
        #expect(try ns.exec(["nft", "list", "table", "inet", "epok"], check: false).output.contains("tcp . 1001 "), "without --cleanup-on-exit the table stays")
        // Deleted, so that the next run's table shows that daemon has started (its signal handlers come first).
        try ns.exec(["nft", "delete", "table", "inet", "epok"])
        #expect(try run(["--cleanup-on-exit"]) == 0)
        #expect(try ns.exec(["nft", "list", "table", "inet", "epok"], check: false).status != 0, "the table is gone")
        #expect(try ns.nftList("inet", "filter") == foreign)
    }
}

@Suite("--once against hostile files and missing privileges")
struct DaemonOnceFailureTests {
    @Test("a file that is not a complete snapshot, a directory, a FIFO or a missing path: exit 1 with the reason, kernel unchanged")
    func hostileFiles() throws {
        let ns = try NetworkNamespace("once")
        let scratch = try ScratchDirectory("once")
        let dir = scratch.path
        let good = """
        {"kind": "List", "apiVersion": "v1", "items": [
          {"kind": "Service", "metadata": {"name": "ssh", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "22:30022"}},
           "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}},
          {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}],
           "conditions": [{"type": "Ready", "status": "True"}]}}]}
        """
        try good.write(toFile: dir + "/good.json", atomically: true, encoding: .utf8)
        let base = [epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--once", "--source"]
        // The dynamic loader names every library the process loads, at start or later: libcurl is not one of
        // them when no API server is asked (the daemon's tests with the fake API server load and use it).
        let applied = try run(["LD_DEBUG=files"] + base + [dir + "/good.json"], check: false)
        #expect(applied.status == 0, "\(applied.error)")
        let curl = applied.error.split(separator: "\n").filter { $0.contains("libcurl") }
        #expect(applied.error.contains("file=libnftnl.so") && curl.isEmpty, "the loader says: \(curl.prefix(3))")
        let listing = try ns.nftList("inet", "epok")
        #expect(listing.contains("default/ssh"))

        mkfifo(dir + "/fifo", 0o600)
        let cases: [(String, String?, String)] = [
            ("hello.yaml", "hello: world", "has no kind"),
            ("empty-object.json", "{}", "has no kind"),
            ("cut.yaml", "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n", "has no kind"),
            ("empty.yaml", "", "is empty"),
            ("configmap.yaml", "kind: ConfigMap\nmetadata: {name: x}\n", "is a ConfigMap, not a List"),
            ("missing.yaml", nil, "does not exist"),
            ("fifo", nil, "is a FIFO"),
            (".", nil, "is a directory"),
        ]
        for (name, content, reason) in cases {
            if let content { try content.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8) }
            let result = try run(base + [dir + "/" + name], check: false)
            #expect(result.status == 1, "\(name): \(result.error)")
            #expect(result.error.contains(reason), "\(name): \(result.error)")
            #expect(!result.error.contains("NSCocoaErrorDomain"), "\(name): \(result.error)")
        }
        #expect(try ns.nftList("inet", "epok") == listing, "no hostile file changed the kernel")
    }

    @Test("--once without CAP_NET_ADMIN exits 1 with the reason instead of retrying forever")
    func unprivileged() throws {
        let ns = try NetworkNamespace("eperm")
        let scratch = try ScratchDirectory("eperm")
        let dir = scratch.path
        try scratch.write("empty.json", ScratchDirectory.emptyList)
        chmod(dir, 0o755)
        chmod(dir + "/empty.json", 0o644)
        let result = try ns.exec(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                                  epokdBinary, "--interfaces", "eth0", "--once", "--metrics-address", "off", "--source", dir + "/empty.json"], check: false)
        #expect(result.status == 1, "\(result.error)")
        #expect(result.error.contains("EPERM") && result.error.contains("CAP_NET_ADMIN"), "\(result.error)")
    }

    @Test("--netns without CAP_SYS_ADMIN says what setns needs; in a systemd unit (INVOCATION_ID) it names RestrictNamespaces too")
    func netnsWithoutSysAdmin() throws {
        let ns = try NetworkNamespace("setns")
        let scratch = try ScratchDirectory("setns")
        try scratch.write("empty.json", ScratchDirectory.emptyList)
        let epokd = [epokdBinary, "--interfaces", "eth0", "--once", "--metrics-address", "off", "--netns", ns.path, "--source", scratch.path + "/empty.json"]
        // Root with every capability but CAP_SYS_ADMIN, as a unit that grants CAP_NET_ADMIN alone.
        let dropped = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
        let plain = try run(dropped + epokd, check: false)
        #expect(plain.status == 1 && plain.error.contains("--netns needs CAP_SYS_ADMIN (setns)"), "\(plain.error)")
        #expect(!plain.error.contains("RestrictNamespaces"))
        let unit = try run(["env", "INVOCATION_ID=0123456789abcdef"] + dropped + epokd, check: false)
        #expect(unit.status == 1 && unit.error.contains("RestrictNamespaces=net"), "\(unit.error)")
    }
}

@Suite("--once again with nothing to change")
struct DaemonOnceStampTests {
    static func snapshot(port: Int, annotation: String? = nil) -> String {
        """
        {"kind": "List", "apiVersion": "v1", "items": [
          {"kind": "Service", "metadata": {"name": "ssh", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "\(port):30022"}},
           "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}},
          {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "\(annotation ?? "80:30080")"}},
           "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}},
          {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}],
           "conditions": [{"type": "Ready", "status": "True"}]}}]}
        """
    }

    @Test("a re-run with the same file and options does nothing while nobody commits; drift, another writer, a new file or new options make it work")
    func skipsOnlyWhatIsVouchedFor() throws {
        let ns = try NetworkNamespace("stampd")
        let scratch = try ScratchDirectory("stampd")
        let file = scratch.path + "/cluster.json"
        try Self.snapshot(port: 22).write(toFile: file, atomically: true, encoding: .utf8)
        let base = [epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--once", "--metrics-address", "off", "--source", file]
        let skipped = "nothing to do"

        let first = try run(base, check: false)
        #expect(first.status == 0, "\(first.error)")
        #expect(!first.error.contains(skipped))
        let listing = try ns.nftList("inet", "epok")
        #expect(listing.contains("default/ssh") && listing.contains("generation"), "\(listing)")

        let again = try run(base, check: false)
        #expect(again.status == 0 && again.error.contains(skipped), "\(again.error)")
        #expect(try ns.nftList("inet", "epok") == listing)
        let plan = try run([epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--dry-run", "--source", file])
        #expect(plan.output.contains("kernel: +0 -0 elements"), "the stamp is bookkeeping, not a change: \(plan.output)")

        // Drift: an element removed by hand. The generation moved, so the run reads the kernel and repairs it.
        _ = try ns.exec(["nft", "flush", "set", "inet", "epok", "interfaces"])
        let repaired = try run(base, check: false)
        #expect(repaired.status == 0 && !repaired.error.contains(skipped), "\(repaired.error)")
        #expect(try ns.exec(["nft", "list", "set", "inet", "epok", "interfaces"]).output.contains("\"eth0\""))
        #expect(try run(base, check: false).error.contains(skipped))

        // Another writer's table: nothing of epokd's changed, but nothing vouches for it any more.
        _ = try ns.exec(["nft", "add", "table", "inet", "operator"])
        #expect(!(try run(base, check: false).error.contains(skipped)))
        #expect(try run(base, check: false).error.contains(skipped))

        // Other options, then another file: both applied.
        let wider = try run(base.map { $0 == "eth0" ? "eth0,wg0" : $0 }, check: false)
        #expect(wider.status == 0 && !wider.error.contains(skipped), "\(wider.error)")
        #expect(try ns.exec(["nft", "list", "set", "inet", "epok", "interfaces"]).output.contains("\"wg0\""))
        try Self.snapshot(port: 2222).write(toFile: file, atomically: true, encoding: .utf8)
        let moved = try run(base, check: false)
        #expect(moved.status == 0 && !moved.error.contains(skipped), "\(moved.error)")
        let after = try ns.nftList("inet", "epok")
        #expect(after.contains("2222") && !after.contains("wg0"), "\(after)")
    }

    @Test("a run with a problem to report is never skipped: the warning (and exit status 2) comes every time")
    func problemsAreRepeated() throws {
        let ns = try NetworkNamespace("stampw")
        let scratch = try ScratchDirectory("stampw")
        let file = scratch.path + "/cluster.json"
        try Self.snapshot(port: 22, annotation: "eighty:30080").write(toFile: file, atomically: true, encoding: .utf8)
        let base = [epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--once", "--metrics-address", "off", "--source", file]
        for attempt in 1...2 {
            let result = try run(base, check: false)
            #expect(result.status == 2, "the rest is committed, web's annotation refused: \(result.error)")
            #expect(result.error.contains("default/web") && !result.error.contains("nothing to do"), "run \(attempt): \(result.error)")
        }
        #expect(try ns.nftList("inet", "epok").contains("default/ssh"), "the rest is forwarded")
    }
}

@Suite("Stale flows across a restart")
struct DaemonRestartConntrackTests {
    @Test("a node that leaves while epokd is stopped: on start, its UDP flows are flushed and follow the new mapping")
    func nodeLeftWhileStopped() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [30053])
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        var dns = makeService("dns", annotation: "53:30053:udp")
        dns.spec.ports = [Service.Port(protocol: "UDP", port: 53, nodePort: 30053)]
        try api.apply(dns, kind: "services")
        var daemon = try DaemonProcess(lab: lab, api: api)
        defer { _ = daemon.stop(SIGKILL) }
        let stream = try FlowClient.udp(from: lab.external, to: ForwardingLab.hostExternal4, port: 53)
        var first: String?
        try waitUntil("forwarding of 53/udp", seconds: 30) {
            if case .answered(let who) = stream.exchange("q", timeout: 0.5) { first = who }
            return first != nil
        }
        let pinned = String(first!.prefix(2))
        #expect(daemon.stop(SIGTERM) == 0)

        let index = Int(pinned.dropFirst())!
        try api.apply(makeNode(pinned, address: ForwardingLab.node4(index), ready: false), kind: "nodes")
        let whileStopped = stream.exchange("while stopped")
        guard case .answered(let who) = whileStopped else {
            Issue.record("the stream got no answer while epokd was stopped: \(whileStopped)")
            return
        }
        #expect(who.hasPrefix(pinned), "conntrack still pins the stream")

        daemon = try DaemonProcess(lab: lab, api: api)
        try waitUntil("the stream to leave the node that left", seconds: 30) {
            if case .answered(let who) = stream.exchange("after", timeout: 0.5) { return !who.hasPrefix(pinned) }
            return false
        }
    }
}

@Suite("The host's addresses, followed as they change")
struct HostAddressFollowTests {
    @Test("a node address that becomes the host's own stops being a backend at once (rtnetlink, no restart), and comes back when it is the host's no more")
    func followed() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [])
        let scratch = try ScratchDirectory("follow")
        let nodes = (1...3).map { """
            {"kind": "Node", "metadata": {"name": "n\($0)"}, "status": {"addresses": [{"type": "InternalIP", "address": "\(ForwardingLab.node4($0))"}],
             "conditions": [{"type": "Ready", "status": "True"}]}}
            """ }.joined(separator: ", ")
        let file = try scratch.write("cluster.json", """
            {"kind": "List", "items": [{"kind": "Service", "metadata": {"name": "ssh", "namespace": "default",
              "annotations": {"epok.getbetter.ro/externalports": "22:30022"}},
              "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}}, \(nodes)]}
            """)
        let daemon = try DaemonProcess(arguments: ["--interfaces", "eth0", "--netns", lab.host.path, "--source", file, "--metrics-address", "off"],
                                       log: scratch.path + "/epokd.log")
        defer { _ = daemon.stop(SIGKILL) }
        func backends() throws -> Set<String> {
            let status = try run([epokdBinary, "status", "--json", "--netns", lab.host.path], check: false).output
            guard let report = try? JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any],
                  let ssh = (report["mappings"] as? [[String: Any]])?.first else { return [] }
            return Set(ssh["nodes"] as? [String] ?? [])
        }
        let all = Set((1...3).map { ForwardingLab.node4($0) })
        try waitUntil("the table made", seconds: 30) { try backends() == all }
        try lab.host.exec(["ip", "addr", "add", "\(ForwardingLab.node4(2))/32", "dev", "lo"])
        try waitUntil("n2's address, now the host's own, out", seconds: 10) { try backends() == all.subtracting([ForwardingLab.node4(2)]) }
        #expect(daemon.output.contains("the host's addresses changed: + \(ForwardingLab.node4(2))"), "\(daemon.output)")
        try lab.host.exec(["ip", "addr", "del", "\(ForwardingLab.node4(2))/32", "dev", "lo"])
        try waitUntil("n2 back", seconds: 10) { try backends() == all }
    }
}

@Suite("Network programming latency from the change in the cluster, as kube-proxy measures it")
struct ProgrammingSinceChangeTests {
    /// RFC 3339 in UTC, `seconds` ago, with `digits` of fraction.
    static func stamp(_ secondsAgo: Double, digits: Int) -> String {
        let time = Date().addingTimeInterval(-secondsAgo)
        let whole = ISO8601DateFormatter().string(from: time).dropLast()
        let fraction = time.timeIntervalSince1970.truncatingRemainder(dividingBy: 1)
        return whole + (digits > 0 ? String(String(format: "%.9f", fraction).dropFirst().prefix(digits + 1)) : "") + "Z"
    }

    @Test("a Service's latest managedFields time and an EndpointSlice's last-change-trigger-time start epokd_network_programming_since_change_seconds")
    func sinceChange() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
        let api = try FakeAPIServer()
        try api.apply(makeNode("n1", address: ForwardingLab.node4(1)), kind: "nodes")
        let metricsPort = FakeAPIServer.freePort()
        let daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(metricsPort)"])
        defer { _ = daemon.stop(SIGKILL) }
        try waitUntil("the first commit", seconds: 30) { httpGet(port: metricsPort, path: "/readyz")?.0 == 200 }

        // Changes (watch events) made 30 s and 20.5 s before they arrive; the older managedFields entry is not the latest.
        let service = """
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default",
          "annotations": {"epok.getbetter.ro/externalports": "22:30022"},
          "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1", "time": "\(Self.stamp(3600, digits: 0))", "fieldsType": "FieldsV1", "fieldsV1": {}},
                            {"manager": "kubectl", "operation": "Update", "apiVersion": "v1", "time": "\(Self.stamp(30, digits: 0))", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]},
         "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}}
        """
        let slice = """
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "web-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"},
          "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "\(Self.stamp(20.5, digits: 9))"}},
         "endpoints": [{"addresses": ["10.0.1.1"], "conditions": {"ready": true}}], "ports": [{"port": 22, "protocol": "TCP"}]}
        """
        for (kind, text) in [("services", service), ("endpointslices", slice)] {
            let file = api.directory + "/\(kind).json"
            try text.write(toFile: file, atomically: true, encoding: .utf8)
            try api.control("apply kind=\(kind) file=\(file)")
        }
        var sum = 0.0
        try waitUntil("both changes counted", seconds: 30) {
            let metrics = httpGet(port: metricsPort, path: "/metrics")?.1 ?? ""
            func value(_ name: String) -> Double? {
                metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { $0.split(separator: " ").last.flatMap { Double($0) } }
            }
            sum = value("epokd_network_programming_since_change_seconds_sum") ?? 0
            return value("epokd_network_programming_since_change_seconds_count") == 2
        }
        // 30 s and 20.5 s ago (the first to the second), plus the time to the kernel; the hour-old entry did not count.
        #expect(sum >= 49.5 && sum < 600, "the two changes' programming times add up to \(sum) s")
    }
}

@Suite("The metrics endpoint's body")
struct MetricsBodyTests {
    @Test("/metrics of 3,000 mappings is sent in pieces: its Content-Length is exact (a request behind it on the same connection is answered after it), each mapping once a family, in order; HEAD sends no body")
    func streamedBody() throws {
        let ns = try NetworkNamespace("metrics-body")
        let scratch = try ScratchDirectory("metrics-body")
        // 1,500 TCP and 1,500 UDP mappings: about 340 KB of text, several pieces.
        let ports = Array(1001...2500)
        let services = ports.flatMap { port in
            [#"{"kind": "Service", "metadata": {"name": "t\#(port)", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "\#(port):30022"}}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30022, "protocol": "TCP"}]}}"#,
             #"{"kind": "Service", "metadata": {"name": "u\#(port)", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "\#(port):30053:udp"}}, "spec": {"type": "NodePort", "ports": [{"port": 53, "nodePort": 30053, "protocol": "UDP"}]}}"#]
        }
        let node = #"{"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}], "conditions": [{"type": "Ready", "status": "True"}]}}"#
        let file = try scratch.write("cluster.json", #"{"kind": "List", "apiVersion": "v1", "items": ["# + (services + [node]).joined(separator: ",\n") + "]}")
        let port = FakeAPIServer.freePort()
        let daemon = try DaemonProcess(arguments: ["--interfaces", "eth0", "--netns", ns.path, "--source", file, "--metrics-address", "127.0.0.1:\(port)"],
                                       log: scratch.path + "/epokd.log")
        defer { _ = daemon.stop(SIGKILL) }
        func mappingLines(_ text: Substring) -> Int { text.split(separator: "\n").count { $0.hasPrefix("epokd_mapping_") } }
        try waitUntil("every mapping's counters", seconds: 60) { mappingLines(Substring(httpGet(port: port, path: "/metrics")?.1 ?? "")) == 6_000 }

        // A GET and, behind it on the same connection, a /healthz: the body ends exactly where its length says.
        let connection = try #require(LoopbackConnection(port: port))
        connection.send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        let answer = connection.readAll()
        let headEnd = try #require(answer.range(of: "\r\n\r\n"))
        let head = answer[..<headEnd.lowerBound]
        #expect(head.hasPrefix("HTTP/1.1 200 OK"), "\(head)")
        let length = try #require(head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length: ") }.flatMap { Int($0.dropFirst(16)) }, "\(head)")
        let rest = answer.utf8[headEnd.upperBound...]
        #expect(rest.count > length, "the body and the answer behind it")
        let body = Substring(rest.prefix(length))
        let after = Substring(rest.dropFirst(length))
        #expect(after.hasPrefix("HTTP/1.1 200 OK") && after.hasSuffix("\r\n\r\nok\n"), "the next answer starts right after the body: \(after.prefix(200))")

        // Each family: its header, then every mapping once, TCP before UDP, by port.
        let expected = ports.map { "tcp/\($0)" } + ports.map { "udp/\($0)" }
        for family in ["packets", "bytes"] {
            let name = "epokd_mapping_\(family)_total"
            #expect(body.contains("# TYPE \(name) counter\n"))
            let seen = body.split(separator: "\n").filter { $0.hasPrefix(name + "{") }.map { line -> String in
                let labels = line.firstMatch(of: /\{protocol="(\w+)",port="(\d+)"\} (\d+)$/)
                return labels.map { "\($0.1)/\($0.2)" } ?? "unparsed: \(line)"
            }
            #expect(seen.elementsEqual(expected), "\(family): \(seen.count) lines, first differing \(zip(seen, expected).first { $0 != $1 }.map { "\($0)" } ?? "-")")
        }
        #expect(mappingLines(body) == 6_000)
        #expect(body.hasSuffix("\n"))

        // HEAD: the same headers, no body.
        let headOnly = try #require(LoopbackConnection(port: port))
        headOnly.send("HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        let headAnswer = headOnly.readAll()
        #expect(headAnswer.hasPrefix("HTTP/1.1 200 OK") && headAnswer.lowercased().contains("content-length: ") && headAnswer.hasSuffix("\r\n\r\n"), "\(headAnswer)")

        // Scrapes one after another, and three on one connection, each read a little at a time: every one whole.
        for _ in 0..<10 { #expect(mappingLines(Substring(httpGet(port: port, path: "/metrics")?.1 ?? "")) == 6_000) }
        let kept = try #require(LoopbackConnection(port: port))
        kept.send(String(repeating: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", count: 2) + "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        let three = kept.readAll(piece: 1_000)
        #expect(three.components(separatedBy: "HTTP/1.1 200 OK").count == 4 && mappingLines(Substring(three)) == 18_000)
        #expect(daemon.process.isRunning, "\(daemon.output)")

        // The status page's history keeps the first 2,000 mappings by protocol and port, and counts the others.
        var history: [String: Any] = [:]
        try waitUntil("a sample of the table as committed", seconds: 30) {
            let json = httpGet(port: port, path: "/status.json")?.1 ?? ""
            history = ((try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any])?["history"] as? [String: Any] ?? [:]
            return (history["mappings"] as? [String: Any])?.count == 2_000
        }
        let sampled = Set((history["mappings"] as? [String: Any] ?? [:]).keys)
        #expect(sampled == Set(expected.prefix(2_000)) && history["omitted"] as? Int == 1_000, "\(sampled.count) kept, \(String(describing: history["omitted"])) omitted")
    }
}
