import Control
import Dataplane
import FakeKube
import Foundation
import NetnsLab
import Testing

/// dnsmasq from Debian in a test namespace, reading the hosts files of `directory` (`hostsdir=`, inotify) and
/// answering on 127.0.0.1:5353; names under `k8s.test` are its own (unknown ones get NXDOMAIN).
private final class Dnsmasq {
    let namespace: NetworkNamespace
    /// dnsmasq's pid, read from its pid file once it answers (the file goes with the test's scratch directory).
    private var pid: Int32?

    /// dnsmasq daemonizes (it closes every descriptor it inherited, so it cannot be a Foundation `Process`, which
    /// would take that for its exit); it is stopped by its pid.
    init(in namespace: NetworkNamespace, hostsDirectory directory: String, log: String) throws {
        self.namespace = namespace
        let pidFile = log + ".pid"
        try namespace.exec(["dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--hostsdir=\(directory)", "--local=/k8s.test/",
                            "--port=5353", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--pid-file=\(pidFile)",
                            "--log-queries", "--log-facility=\(log)"])
        // The daemon writes its pid file as it starts, before it answers.
        try waitUntil("dnsmasq's pid file", seconds: 20) {
            pid = (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            return pid != nil
        }
        try waitUntil("dnsmasq answering", seconds: 20) { try status(of: "absent.k8s.test") == "NXDOMAIN" }
    }

    /// Stops dnsmasq (the test calls it: a daemon outlives its namespace).
    func stop() {
        // SIGKILL: it inherits the test process's blocked signals, so SIGTERM would wait forever.
        if let pid { kill(pid, SIGKILL) }
        pid = nil
    }

    /// The addresses dnsmasq answers for `name` (A and AAAA), sorted.
    func addresses(of name: String) throws -> [String] {
        try ["A", "AAAA"].flatMap { type in
            try namespace.exec(["dig", "+short", "+time=1", "+tries=1", "-p", "5353", "@127.0.0.1", name, type]).output
                .split(separator: "\n").map(String.init)
        }.sorted()
    }

    /// The answer's status (`NOERROR`, `NXDOMAIN`...).
    func status(of name: String) throws -> String? {
        let answer = try namespace.exec(["dig", "+time=1", "+tries=1", "-p", "5353", "@127.0.0.1", name, "A"], check: false).output
        return answer.split(separator: "\n").first { $0.contains("status: ") }?
            .split(separator: ",").first { $0.contains("status: ") }?.split(separator: " ").last.map(String.init)
    }
}

/// epokd in a test namespace, with the arguments every test here gives it.
private func epokd(_ arguments: [String], log: String) throws -> DaemonProcess {
    try DaemonProcess(arguments: arguments + ["--metrics-address", "off", "--log-level", "debug"], log: log)
}

private func hostname(_ names: String) -> StringMap { [ExternalDNS.hostnameAnnotation: names] }

private func ingress(_ name: String, hosts: [String], ips: [String], created: String = "2024-01-01T00:00:00Z") -> Ingress {
    Ingress(metadata: ObjectMeta(name: name, namespace: "default", creationTimestamp: created), spec: .init(rules: hosts.map { .init(host: $0) }),
            status: .init(loadBalancer: .init(ingress: ips.map { .init(ip: $0) })))
}

/// A `kubectl get -o json`-style List of `objects`.
private func list(_ objects: [any Encodable]) throws -> String {
    let items = try objects.map { object -> String in
        var json = String(decoding: try JSONEncoder().encode(object), as: UTF8.self)
        let kind = object is Ingress ? "Ingress" : object is Node ? "Node" : "Service"
        json.insert(contentsOf: "\"kind\":\"\(kind)\",", at: json.index(after: json.startIndex))
        return json
    }
    return "{\"kind\":\"List\",\"items\":[\(items.joined(separator: ","))]}"
}

@Suite("The router's DNS: dnsmasq answers epokd's names")
struct DNSEndToEndTests {
    @Test("from a snapshot file: LoadBalancer and Ingress names resolve, follow a change of address, go away with their Service; an invalid name is refused alone")
    func fromFile() throws {
        let ns = try NetworkNamespace("dns")
        let scratch = try ScratchDirectory("dns")
        let hosts = scratch.path + "/hosts.d"
        try FileManager.default.createDirectory(atPath: hosts, withIntermediateDirectories: true)
        let dnsmasq = try Dnsmasq(in: ns, hostsDirectory: hosts, log: scratch.path + "/dnsmasq.log")
        defer { dnsmasq.stop() }
        let nodes: [any Encodable] = [node("n1", addresses: ["10.0.1.1"])]
        let web = loadBalancer("web", ips: ["192.0.2.10", "2001:db8::10"], ports: [(443, "TCP")], annotations: hostname("web.k8s.test, WWW.k8s.test"))
        let game = service("game", annotations: [EpokAnnotation.externalPorts: "25565:30565", ExternalDNS.hostnameAnnotation: "game.k8s.test"],
                           nodePorts: [(30565, "TCP")])
        let bad = loadBalancer("bad", ips: ["192.0.2.40"], ports: [(80, "TCP")], annotations: hostname("*.k8s.test,fine.k8s.test"))
        let shop = ingress("shop", hosts: ["shop.k8s.test"], ips: ["192.0.2.20"])
        let source = try scratch.write("cluster.json", try list(nodes + [web, game, bad, shop]))
        let daemon = try epokd(["--interfaces", "eth0", "--netns", ns.path, "--source", source, "--dns-hosts", hosts + "/epokd.hosts",
                                "--dns-address", "192.168.1.1"], log: scratch.path + "/epokd.log")
        defer { _ = daemon.stop(SIGKILL) }

        try waitUntil("web.k8s.test in dnsmasq", seconds: 30) { try dnsmasq.addresses(of: "web.k8s.test") == ["192.0.2.10", "2001:db8::10"] }
        #expect(try dnsmasq.addresses(of: "www.k8s.test") == ["192.0.2.10", "2001:db8::10"])
        #expect(try dnsmasq.addresses(of: "shop.k8s.test") == ["192.0.2.20"], "an Ingress host")
        #expect(try dnsmasq.addresses(of: "game.k8s.test") == ["192.168.1.1"], "a host-port Service: the router's address")
        #expect(try dnsmasq.addresses(of: "fine.k8s.test") == ["192.0.2.40"], "the valid name beside an invalid one")
        #expect(daemon.output.contains("rejected: Service default/bad: external-dns.alpha.kubernetes.io/hostname: \"*.k8s.test\" is a wildcard"),
                "\(daemon.output)")
        let written = try String(contentsOfFile: hosts + "/epokd.hosts", encoding: .utf8)
        #expect(written.hasPrefix("# Written by epokd") && !written.contains("*"))
        let status = try run([epokdBinary, "status", "--netns", ns.path, "--dns-hosts", hosts + "/epokd.hosts"]).output
        #expect(status.split(separator: "\n").contains { $0.hasPrefix("web.k8s.test") && $0.contains("192.0.2.10,2001:db8::10") }, "\(status)")
        // The table was programmed as always: the host port is forwarded.
        #expect(try ns.nftList("inet", "epok").contains("tcp . 25565"))

        // The LoadBalancer's address moves: the answer follows.
        let moved = loadBalancer("web", ips: ["192.0.2.11"], ports: [(443, "TCP")], annotations: hostname("web.k8s.test, WWW.k8s.test"))
        try scratch.write("cluster.json", try list(nodes + [moved, game, bad, shop]))
        try waitUntil("the new address", seconds: 30) { try dnsmasq.addresses(of: "web.k8s.test") == ["192.0.2.11"] }
        #expect(try dnsmasq.addresses(of: "shop.k8s.test") == ["192.0.2.20"])

        // The Service and the Ingress removed: their names are gone (NXDOMAIN); the others stay.
        try scratch.write("cluster.json", try list(nodes + [game, bad]))
        try waitUntil("the names removed", seconds: 30) { try dnsmasq.status(of: "web.k8s.test") == "NXDOMAIN" }
        #expect(try dnsmasq.status(of: "www.k8s.test") == "NXDOMAIN")
        #expect(try dnsmasq.status(of: "shop.k8s.test") == "NXDOMAIN")
        #expect(try dnsmasq.addresses(of: "game.k8s.test") == ["192.168.1.1"])
        #expect(daemon.stop() == 0)
        #expect(FileManager.default.fileExists(atPath: hosts + "/epokd.hosts"), "the names stay in place across a restart")
        #expect(try FileManager.default.contentsOfDirectory(atPath: hosts) == ["epokd.hosts"], "no temporary file left")
    }

    @Test("from the API: an Ingress watched, a Warning Event for an invalid name and for a name held by an older Service; forbidden Ingresses stop nothing")
    func fromAPI() throws {
        let ns = try NetworkNamespace("dnsapi")
        let scratch = try ScratchDirectory("dnsapi")
        let api = try FakeAPIServer()
        try api.apply(makeNode("n1", address: "10.0.1.1", ready: true), kind: "nodes")
        try api.apply(loadBalancer("web", ips: ["192.0.2.10"], ports: [(443, "TCP")], annotations: hostname("web.k8s.test"),
                                   created: "2024-01-01T00:00:00Z"), kind: "services")
        let path = scratch.path + "/epokd.hosts"
        let daemon = try epokd(["--interfaces", "eth0", "--netns", ns.path, "--kubeconfig", api.kubeconfig, "--dns-hosts", path],
                               log: scratch.path + "/epokd.log")
        defer { _ = daemon.stop(SIGKILL) }
        func names() -> [String: [String]] {
            Dictionary((HostsFile.read(path) ?? []).map { ($0.name, $0.addresses) }, uniquingKeysWith: { a, _ in a })
        }
        try waitUntil("the Service's name", seconds: 30) { names() == ["web.k8s.test": ["192.0.2.10"]] }

        // An Ingress appears; a younger Service asks for the same name with another address, and one asks for an invalid name.
        try api.apply(ingress("shop", hosts: ["shop.k8s.test"], ips: ["192.0.2.20"]), kind: "ingresses")
        try api.apply(loadBalancer("copy", ips: ["192.0.2.99"], ports: [(443, "TCP")], annotations: hostname("web.k8s.test"),
                                   created: "2025-01-01T00:00:00Z"), kind: "services")
        try api.apply(loadBalancer("bad", ips: ["192.0.2.40"], ports: [(443, "TCP")], annotations: hostname("bad_name.k8s.test")), kind: "services")
        try waitUntil("the Ingress's name", seconds: 30) { names()["shop.k8s.test"] == ["192.0.2.20"] }
        try waitUntil("the Warning Events", seconds: 30) {
            let events = String(decoding: try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/events"), as: UTF8.self)
            return events.contains("\"reason\": \"HostnameConflict\"") && events.contains("\"reason\": \"InvalidHostname\"")
        }
        #expect(names() == ["web.k8s.test": ["192.0.2.10"], "shop.k8s.test": ["192.0.2.20"]], "the older Service keeps its name")

        // The Ingress deleted: its name goes.
        try api.delete(kind: "ingresses", name: "shop", namespace: "default")
        try waitUntil("the Ingress's name removed", seconds: 30) { names()["shop.k8s.test"] == nil }
        #expect(daemon.stop() == 0)

        // Without the right to list Ingresses: said once, and the Services' names are still kept.
        _ = try api.control("forbid resources=ingresses")
        try FileManager.default.removeItem(atPath: path)
        let forbidden = try epokd(["--interfaces", "eth0", "--netns", ns.path, "--kubeconfig", api.kubeconfig, "--dns-hosts", path],
                                  log: scratch.path + "/forbidden.log")
        defer { _ = forbidden.stop(SIGKILL) }
        try waitUntil("the Service's name without Ingresses", seconds: 30) { names()["web.k8s.test"] == ["192.0.2.10"] }
        try waitUntil("the 403 said", seconds: 30) { forbidden.output.contains("ingresses: 403 Forbidden") }
        #expect(forbidden.output.components(separatedBy: "ingresses: 403 Forbidden").count == 2, "said once:\n\(forbidden.output)")
        #expect(forbidden.stop() == 0)
    }
}
