import Control
import Dataplane
import FakeKube
import Foundation
import Logging
import NetnsLab
import Testing

/// Sends one UDP datagram from a new socket (so a new flow, NATed anew) every `interval` until stopped.
final class NewFlows: @unchecked Sendable {
    private let lock = NSLock()
    private var stopping = false
    private var count = 0
    private let finished = DispatchSemaphore(value: 0)

    init(from namespace: NetworkNamespace, to address: String, port: UInt16) {
        Thread { [self] in
            defer { finished.signal() }
            let target = SocketAddress(address, port: port)
            while !lock.withLock({ stopping }) {
                guard let fd = try? openSocket(in: namespace, family: AF_INET, type: Int32(SOCK_DGRAM.rawValue)) else { continue }
                _ = target.withPointer { sendto(fd, "x", 1, 0, $0, $1) }
                close(fd)
                lock.withLock { count += 1 }
                usleep(500)
            }
        }.start()
    }

    /// How many were sent so far.
    var sent: Int { lock.withLock { count } }

    /// Stops sending; returns how many were sent.
    func stop() -> Int {
        lock.withLock { stopping = true }
        finished.wait()
        return lock.withLock { count }
    }
}

@Suite("StaticEgressIP and ExternalService with real packets")
struct StaticSourcesEndToEndTests {
    static let entrance = "198.51.100.9"

    @Test("an ExternalService bridges both ways: pods reach the server as the source address, the server (only it) reaches the pods through it; TCP and UDP; the address is added and removed")
    func bridge() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        h.loop.addresses = try ManagedAddresses(interface: "eth0", namespacePath: h.lab.host.path)
        // The server outside (targetIP 198.51.100.2), and the pods' servers, each saying who called.
        let server = try NameServer(in: h.lab.external, name: "server", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { server.stop() }
        let serverUDP = try DatagramCounter(in: h.lab.external, port: 7001)
        defer { serverUDP.stop() }
        let pod = try NameServer(in: h.lab.nodes[0], name: "pod", tcpPorts: [8080], udpPorts: [], reportingPeer: true)
        defer { pod.stop() }
        let podUDP = try DatagramCounter(in: h.lab.nodes[0], port: 5353)
        defer { podUDP.stop() }

        let app = webService("app", udp: true)
        let bridge = externalService("db", target: ForwardingLab.externalClient4, sources: [("app", Self.entrance)],
                                     ports: [("TCP", 7000), ("UDP", 7001)])
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [app], nodes: h.nodes, endpointSlices: [webSlice("app", ready: [ForwardingLab.node4(1)], udp: true)],
                                                    externalServices: [bridge]))])
        #expect(try h.loop.addresses!.owned() == [IPAddress(Self.entrance)!], "the source address is on eth0, marked as epokd's")

        // Out: the pod reaches the server as the bridge's address, over TCP and UDP.
        #expect("\(try tcpProbe(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 7000))" == "answered server:7000 from \(Self.entrance)")
        _ = try udpFlood(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 7001, packetsPerSecond: 200, seconds: 0.1)
        try waitUntil("the UDP datagrams at the server") { serverUDP.received(from: Self.entrance).packets > 0 }
        #expect(serverUDP.received(from: ForwardingLab.node4(1)).packets == 0)
        // In: the server reaches the pod through the address, and the pod sees the server's own address.
        #expect("\(try tcpProbe(from: h.lab.external, to: Self.entrance, port: 80, source: ForwardingLab.externalClient4))"
                == "answered pod:8080 from \(ForwardingLab.externalClient4)")
        _ = try udpFlood(from: h.lab.external, to: Self.entrance, port: 53, source: ForwardingLab.externalClient4, packetsPerSecond: 200, seconds: 0.1)
        try waitUntil("the UDP datagrams at the pod") { podUDP.received(from: ForwardingLab.externalClient4).packets > 0 }
        // A third host cannot use the entrance, nor reach the host itself on that address.
        #expect(try tcpProbe(from: h.lab.external, to: Self.entrance, port: 80, source: ForwardingLab.otherExternalClient4, timeout: 0.5) == .timedOut)
        _ = try udpFlood(from: h.lab.external, to: Self.entrance, port: 53, source: ForwardingLab.otherExternalClient4, packetsPerSecond: 200, seconds: 0.1)
        #expect(try tcpProbe(from: h.lab.external, to: Self.entrance, port: 22, source: ForwardingLab.externalClient4, timeout: 0.5) == .timedOut)
        // An unselected pod keeps its own address.
        #expect("\(try tcpProbe(from: h.lab.nodes[1], to: ForwardingLab.externalClient4, port: 7000))" == "answered server:7000 from \(ForwardingLab.node4(2))")
        #expect(podUDP.received(from: ForwardingLab.otherExternalClient4).packets == 0, "the third host's datagrams were dropped")

        let listing = try h.lab.host.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty && listing.output.contains("map @bridge_in4"), "\(listing.output)")

        // The bridge goes: the pod leaves as itself, the entrance is closed, the address is removed.
        try h.loop.apply([.externalServices(.deleted(bridge))])
        #expect("\(try tcpProbe(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 7000))" == "answered server:7000 from \(ForwardingLab.node4(1))")
        #expect(try h.loop.addresses!.owned().isEmpty)
        #expect(try !h.lab.host.exec(["ip", "-4", "addr", "show", "dev", "eth0"]).output.contains(Self.entrance))
    }

    @Test("an IPv6 bridge: the pod reaches the server as the IPv6 source address, the server reaches the pod through it, a third host does not")
    func bridgeIPv6() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        h.loop.addresses = try ManagedAddresses(interface: "eth0", namespacePath: h.lab.host.path)
        let entrance = "2001:db8:e::9"
        let server = try NameServer(in: h.lab.external, name: "server", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { server.stop() }
        let pod = try NameServer(in: h.lab.nodes[0], name: "pod", tcpPorts: [8080], udpPorts: [], reportingPeer: true)
        defer { pod.stop() }
        let bridge = externalService("db6", target: ForwardingLab.externalClient6, sources: [("app", entrance)])
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [webService("app")], nodes: h.nodes,
                                                    endpointSlices: [webSlice("app", ready: [ForwardingLab.node6(1)])], externalServices: [bridge]))])
        #expect(try h.loop.addresses!.owned() == [IPAddress(entrance)!])
        #expect("\(try tcpProbe(from: h.lab.nodes[0], to: ForwardingLab.externalClient6, port: 7000))" == "answered server:7000 from \(entrance)")
        #expect("\(try tcpProbe(from: h.lab.external, to: entrance, port: 80, source: ForwardingLab.externalClient6))"
                == "answered pod:8080 from \(ForwardingLab.externalClient6)")
        #expect(try tcpProbe(from: h.lab.external, to: entrance, port: 80, source: ForwardingLab.otherExternalClient6, timeout: 0.5) == .timedOut)
    }

    @Test("a StaticEgressIP's pods leave with its address; an address the operator put there is used and never removed")
    func egressResource() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        h.loop.addresses = try ManagedAddresses(interface: "eth0", namespacePath: h.lab.host.path)
        try h.lab.host.exec(["ip", "addr", "add", "198.51.100.20/32", "dev", "eth0"])
        let server = try NameServer(in: h.lab.external, name: "server", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { server.stop() }
        let resource = staticEgressIP("eip", rules: [("198.51.100.20", "app", "198.51.100.3/32"), (Self.entrance, "app", "198.51.100.2/32")])
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [webService("app")], nodes: h.nodes,
                                                    endpointSlices: [webSlice("app", ready: [ForwardingLab.node4(2)])], staticEgressIPs: [resource]))])
        func source(_ node: Int, _ to: String) throws -> String { "\(try tcpProbe(from: h.lab.nodes[node - 1], to: to, port: 7000))" }
        #expect(try source(2, ForwardingLab.otherExternalClient4) == "answered server:7000 from 198.51.100.20")
        #expect(try source(2, ForwardingLab.externalClient4) == "answered server:7000 from \(Self.entrance)")
        #expect(try source(1, ForwardingLab.externalClient4) == "answered server:7000 from \(ForwardingLab.node4(1))")
        #expect(try h.loop.addresses!.owned() == [IPAddress(Self.entrance)!], "only the address epokd added carries its mark")

        try h.loop.apply([.staticEgressIPs(.deleted(resource))])
        #expect(try source(2, ForwardingLab.otherExternalClient4) == "answered server:7000 from \(ForwardingLab.node4(2))")
        let addresses = try h.lab.host.exec(["ip", "-4", "addr", "show", "dev", "eth0"]).output
        #expect(addresses.contains("198.51.100.20/32") && !addresses.contains(Self.entrance), "the operator's address stays, epokd's goes")
    }

    @Test("no window: while pods come and go and rules churn, every new flow of the selected pod reaches the destination with the egress address")
    func churn() throws {
        let h = try Harness(tcpPorts: [], udpPorts: [])
        h.loop.addresses = try ManagedAddresses(interface: "eth0", namespacePath: h.lab.host.path)
        let counter = try DatagramCounter(in: h.lab.external, port: 7001)
        defer { counter.stop() }
        let resource = staticEgressIP("eip", created: "2023-01-01T00:00:00Z", rules: [(Self.entrance, "app", "198.51.100.0/24")])
        let rival = staticEgressIP("rival", rules: [("198.51.100.21", "app", "198.51.100.2/32")])
        func slice(_ extra: [Int]) -> EndpointSlice { webSlice("app", ready: ([1] + extra).map(ForwardingLab.node4)) }
        try h.loop.apply([.snapshot(ClusterSnapshot(services: [webService("app")], nodes: h.nodes, endpointSlices: [slice([])], staticEgressIPs: [resource]))])
        let flows = NewFlows(from: h.lab.nodes[0], to: ForwardingLab.externalClient4, port: 7001)
        // At least 40 rounds, and on until 300 new flows went out during the churn.
        var round = 0
        while round < 40 || (flows.sent < 300 && round < 5000) {
            defer { round += 1 }
            var updates: [ClusterUpdate] = [.endpointSliceChanged(slice(round % 3 == 0 ? [] : round % 3 == 1 ? [2] : [2, 3]))]
            updates.append(round % 2 == 0 ? .staticEgressIPs(.upserted(rival)) : .staticEgressIPs(.deleted(rival)))
            try h.loop.apply(updates)
        }
        let sent = flows.stop()
        try waitUntil("the last datagrams") { counter.received(from: Self.entrance).packets + counter.received(from: ForwardingLab.node4(1)).packets >= sent * 9 / 10 }
        #expect(counter.received(from: ForwardingLab.node4(1)).packets == 0, "no flow of the selected pod left with its own address")
        #expect(counter.received(from: "198.51.100.21").packets == 0, "the younger, overlapping rule never took the pod")
        #expect(sent >= 300 && counter.received(from: Self.entrance).packets >= sent * 9 / 10, "\(sent) flows sent during \(round) rounds")
    }
}

@Suite("StaticEgressIP and ExternalService in the daemon, applied with kubectl")
struct StaticSourcesDaemonTests {
    @Test("kubectl creates a StaticEgressIP and an ExternalService on the fake API server; the daemon follows, and a bad one gets a Warning Event")
    func kubectlDrivesTheDaemon() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
        let server = try NameServer(in: lab.external, name: "server", tcpPorts: [7000], udpPorts: [], reportingPeer: true)
        defer { server.stop() }
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        try api.apply(webService("app"), kind: "services")
        try api.apply(webSlice("app", ready: [ForwardingLab.node4(1)]), kind: "endpointslices")
        let metricsPort = FakeAPIServer.freePort()
        let daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(metricsPort)", "--manage-addresses", "eth0"])
        defer { _ = daemon.stop(SIGKILL) }
        func source() throws -> String { "\(try tcpProbe(from: lab.nodes[0], to: ForwardingLab.externalClient4, port: 7000, timeout: 0.5))" }
        try waitUntil("the daemon's first commit", seconds: 30) { try source() == "answered server:7000 from \(ForwardingLab.node4(1))" }

        let kubectl = ["kubectl", "--kubeconfig", api.kubeconfig]
        let manifest = api.directory + "/static-sources.yaml"
        try """
        apiVersion: staticegressips.nirmata.io/v1alpha1
        kind: StaticEgressIP
        metadata: {name: eip, namespace: default}
        spec:
          rules:
          - {egressip: 198.51.100.9, service-name: app, cidr: 198.51.100.2/32}
          - {egressip: 198.51.100.10, service-name: app, cidr: 10.0.0.1/8}
        ---
        apiVersion: submariner.io/v1alpha1
        kind: ExternalService
        metadata: {name: db, namespace: default}
        spec:
          targetIP: 198.51.100.3
          sources:
          - service: {namespace: default, name: app}
            sourceIP: 198.51.100.11
          ports:
          - {protocol: TCP, port: 7000, targetPort: 7000}
        """.write(toFile: manifest, atomically: true, encoding: .utf8)
        let applied = try run(kubectl + ["apply", "--validate=false", "-f", manifest])
        #expect(applied.output.contains("staticegressip.staticegressips.nirmata.io/eip created"), "\(applied.output)")
        #expect(applied.output.contains("externalservice.submariner.io/db created"), "\(applied.output)")
        try waitUntil("the egress address", seconds: 30) { try source() == "answered server:7000 from 198.51.100.9" }
        try waitUntil("the bridge's address", seconds: 30) {
            "\(try tcpProbe(from: lab.nodes[0], to: ForwardingLab.otherExternalClient4, port: 7000, timeout: 0.5))" == "answered server:7000 from 198.51.100.11"
        }
        try waitUntil("the Warning Event on the StaticEgressIP", seconds: 30) {
            let events = try run(kubectl + ["get", "events", "-n", "default", "-o", "jsonpath={range .items[*]}{.involvedObject.kind}/{.reason}/{.message};{end}"], check: false)
            return events.output.contains("StaticEgressIP/InvalidEgress/spec.rules[1]: cidr: \"10.0.0.1/8\" has host bits set")
        }
        // The metrics are rendered in the background at most every 5 s: poll until the flows show.
        try waitUntil("the SNATed flows in /metrics", seconds: 30) {
            let metrics = httpGet(port: metricsPort, path: "/metrics")?.1 ?? ""
            return metrics.contains("epokd_egress_snat_flows_total{rule=\"StaticEgressIP default/eip\",egress=\"198.51.100.9\"} ")
                && !metrics.contains("epokd_egress_snat_flows_total{rule=\"StaticEgressIP default/eip\",egress=\"198.51.100.9\"} 0\n")
                && metrics.contains("epokd_egress_snat_flows_total{rule=\"ExternalService default/db\",egress=\"198.51.100.11\"} ")
        }
        let status = try run([epokdBinary, "status", "--netns", lab.host.path]).output
        #expect(status.contains("198.51.100.9") && status.contains("StaticEgressIP default/eip") && status.contains("ExternalService default/db"), "\(status)")

        try run(kubectl + ["delete", "staticegressip", "eip"])
        try waitUntil("the pod's own address again", seconds: 30) { try source() == "answered server:7000 from \(ForwardingLab.node4(1))" }
        #expect(!daemon.output.contains("CustomResourceDefinition is not installed"), "both resources are served by the fake")
    }

    @Test("a restart while the custom resources and EndpointSlices list slowly: sampled every 100 ms, the kernel never loses an egress or bridge element and the managed addresses never go")
    func restartKeepsStaticSources() throws {
        let lab = try ForwardingLab(tcpPorts: [], udpPorts: [])
        let api = try FakeAPIServer()
        for i in 1...3 { try api.apply(makeNode("n\(i)", address: ForwardingLab.node4(i)), kind: "nodes") }
        try api.apply(webService("app"), kind: "services")
        try api.apply(webSlice("app", ready: [ForwardingLab.node4(1)]), kind: "endpointslices")
        try api.apply(StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: "default"),
                                     spec: .init(rules: [.init(egressip: "198.51.100.9", serviceName: "app", cidr: "198.51.100.2/32")])), kind: "staticegressips")
        try api.apply(ExternalService(metadata: ObjectMeta(name: "db", namespace: "default"),
                                      spec: .init(targetIP: "198.51.100.3", sources: [.init(service: .init(namespace: "default", name: "app"), sourceIP: "198.51.100.11")],
                                                  ports: [.init(port: 7000)])), kind: "externalservices")
        var daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "off", "--manage-addresses", "eth0"])
        defer { _ = daemon.stop(SIGKILL) }
        func held() throws -> String? {
            let table = try lab.host.exec(["nft", "list", "table", "inet", "epok"], check: false).output
            let addresses = try lab.host.exec(["ip", "-o", "addr", "show", "dev", "eth0"]).output
            for address in ["198.51.100.9", "198.51.100.11"] {
                guard table.contains(address) else { return "\(address) is not in the table" }
                guard addresses.contains(" \(address)/") else { return "\(address) is not on eth0" }
            }
            return nil
        }
        try waitUntil("the egress and bridge elements and addresses", seconds: 30) { try held() == nil }
        #expect(daemon.stop(SIGTERM) == 0)

        // The lists the first snapshot must wait for now take 1.5 s each.
        for resource in ["staticegressips", "externalservices", "endpointslices"] { try api.control("slow-lists resource=\(resource) seconds=1.5") }
        let metricsPort = FakeAPIServer.freePort()
        daemon = try DaemonProcess(lab: lab, api: api, extra: ["--metrics-address", "127.0.0.1:\(metricsPort)", "--manage-addresses", "eth0"])
        var samples = 0, samplesBeforeReady = 0
        var lost: [String] = []
        let deadline = Date().addingTimeInterval(30)
        // Sampled until the restarted daemon has committed its first state, and a second beyond.
        var readySince: Date?
        while Date() < deadline, readySince.map({ Date().timeIntervalSince($0) < 1 }) ?? true {
            if let problem = try held() { lost.append("sample \(samples): \(problem)") }
            samples += 1
            if readySince == nil {
                if httpGet(port: metricsPort, path: "/readyz")?.0 == 200 { readySince = Date() } else { samplesBeforeReady += 1 }
            }
            Thread.sleep(forTimeInterval: 0.1)
        }
        #expect(readySince != nil, "the restarted daemon became ready:\n\(daemon.output)")
        #expect(samplesBeforeReady > 0, "sampled while the restarted daemon waited for the lists (\(samples) samples)")
        #expect(lost.isEmpty, "lost during the restart: \(lost.prefix(5))")
        #expect(!daemon.output.contains("applied:"), "nothing changed, so the restart committed nothing:\n\(daemon.output)")
    }
}

@Suite("StaticEgressIP and ExternalService: hostile resources into the kernel")
struct StaticSourcesKernelFuzzTests {
    @Test("kernel fuzz: overlapping, nested, duplicate and malformed rules and bridges over shared pods; the kernel holds the desired state after every step")
    func kernelFuzz() throws {
        let ns = try NetworkNamespace("srcfuzz")
        let nft = try Nftables(namespacePath: ns.path)
        let skeleton = ForwardingRuleset.skeleton()
        let loop = ReconcileLoop(firewall: Firewall(skeleton: skeleton, nftables: nft), conntrack: nil, events: nil,
                                 options: options, logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
        var rng = SeededGenerator()
        let pods = ["10.244.0.1", "10.244.0.2", "10.244.0.3", "fd00:244::1", "fd00:244::2", "10.244.0.1 "]
        let addresses = ["198.51.100.9", "198.51.100.9", "198.51.100.10", "198.51.100.10", "2001:db8::9", "2001:db8::9", "0.0.0.0",
                         "198.51.100.9/32", "", "::ffff:1.2.3.4", "224.0.0.1"]
        let cidrs = ["0.0.0.0/0", "192.0.2.0/24", "192.0.2.128/25", "192.0.2.7/32", "::/0", "2001:db8:9::/48", "10.0.0.1/8", "x", "192.0.2.0/24,198.18.0.0/15", ""]
        let names = ["s0", "s1", "s2", "s0", "s1", "ghost", ""]
        func pick<T>(_ items: [T]) -> T { items[Int.random(in: 0..<items.count, using: &rng)] }
        func slice(_ name: String) -> EndpointSlice {
            let all = (0..<Int.random(in: 0...4, using: &rng)).map { _ in pick(pods) }
            return webSlice(name, ready: all.filter { _ in Bool.random(using: &rng) }, notReady: all, udp: Bool.random(using: &rng))
        }
        func egress(_ i: Int) -> StaticEgressIP {
            staticEgressIP("e\(i)", created: "2024-01-0\(Int.random(in: 1...3, using: &rng))T00:00:00Z",
                           rules: (0..<Int.random(in: 0...4, using: &rng)).map { _ in (pick(addresses), pick(names), pick(cidrs)) })
        }
        func bridge(_ i: Int) -> ExternalService {
            externalService("b\(i)", created: "2024-01-0\(Int.random(in: 1...3, using: &rng))T00:00:00Z", target: pick(addresses),
                            sources: (0..<Int.random(in: 0...3, using: &rng)).map { _ in (pick(names), pick(addresses)) },
                            ports: (0..<Int.random(in: 0...3, using: &rng)).map { _ in (pick(["TCP", "TCP", "UDP", "SCTP", "tcp"]), pick([7000, 7000, 7000, 53, 0, 70000])) })
        }
        var services: [String: Service] = [:], slices: [String: EndpointSlice] = [:]
        var egresses: [Int: StaticEgressIP] = [:], bridges: [Int: ExternalService] = [:]
        var reached = (egress: 0, exits: 0, entrances: 0)
        for step in 0..<120 {
            var updates: [ClusterUpdate] = []
            if step == 0 {
                // A valid start, so that the maps hold something for the random steps to disturb.
                services["s0"] = webService("s0")
                slices["default/s0-x"] = webSlice("s0", ready: ["10.244.0.1", "fd00:244::1"])
                egresses[0] = staticEgressIP("e0", rules: [("198.51.100.9", "s0", "0.0.0.0/0")])
                bridges[0] = externalService("b0", target: "198.51.100.2", sources: [("s0", "198.51.100.10")])
                updates = [.snapshot(ClusterSnapshot(services: [services["s0"]!], endpointSlices: [slices["default/s0-x"]!],
                                                     staticEgressIPs: [egresses[0]!], externalServices: [bridges[0]!]))]
            }
            for _ in 0..<(step == 0 ? 0 : Int.random(in: 1...5, using: &rng)) {
                switch Int.random(in: 0..<10, using: &rng) {
                case 0 where services.count < 3 || Bool.random(using: &rng):
                    let name = pick(["s0", "s1", "s2"])
                    services[name] = webService(name, udp: Bool.random(using: &rng))
                    updates.append(.serviceChanged(services[name]!))
                case 1:
                    let name = pick(["s0", "s1", "s2"])
                    services[name] = nil
                    updates.append(.serviceDeleted(ServiceRef(namespace: "default", name: name)))
                case 2, 3:
                    let s = slice(pick(["s0", "s1", "s2"]))
                    slices[s.key] = s
                    updates.append(.endpointSliceChanged(s))
                case 4, 5:
                    let i = Int.random(in: 0..<4, using: &rng)
                    egresses[i] = egress(i)
                    updates.append(.staticEgressIPs(.upserted(egresses[i]!)))
                case 6, 7:
                    let i = Int.random(in: 0..<4, using: &rng)
                    bridges[i] = bridge(i)
                    updates.append(.externalServices(.upserted(bridges[i]!)))
                case 8:
                    guard let i = egresses.keys.randomElement(using: &rng) else { continue }
                    updates.append(.staticEgressIPs(.deleted(egresses.removeValue(forKey: i)!)))
                default:
                    guard let i = bridges.keys.randomElement(using: &rng) else { continue }
                    updates.append(.externalServices(.deleted(bridges.removeValue(forKey: i)!)))
                }
            }
            do {
                try loop.apply(updates)
            } catch {
                Issue.record("\(rng) step \(step): the commit failed: \(error)")
                return
            }
            let snapshot = ClusterSnapshot(services: Array(services.values), endpointSlices: Array(slices.values),
                                           staticEgressIPs: Array(egresses.values), externalServices: Array(bridges.values))
            let expected = ForwardingRuleset.elements(for: DesiredState(snapshot: snapshot, options: options).forwarding)
            let held = try #require(try nft.read(skeleton)).elements
            guard held == expected else {
                let diff = ElementDiff(from: held, to: expected)
                Issue.record("\(rng) step \(step): the kernel differs from the desired state (something was refused or set aside): missing \(diff.added), extra \(diff.deleted)")
                return
            }
            // Every egress map (a rule to everywhere is in egress_all4/6, one to ranges in egress4/6): which ones a
            // seed reaches is its own, and a seed that drew no range rule once failed here while every step agreed.
            reached.egress = max(reached.egress, EgressSNAT.Sets.all.map { held[$0.name]?.count ?? 0 }.reduce(0, +))
            reached.exits = max(reached.exits, (held["bridge_out4"]?.count ?? 0) + (held["bridge_out6"]?.count ?? 0))
            reached.entrances = max(reached.entrances, (held["bridge_in4"]?.count ?? 0) + (held["bridge_in6"]?.count ?? 0))
        }
        #expect(reached.egress > 0 && reached.exits > 0 && reached.entrances > 0, "the fuzz reached the kernel's egress and bridge maps: \(reached)")
    }
}
