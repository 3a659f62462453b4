import Control
import FakeKube
import Foundation
import Logging
import MetricsTestKit
import NetnsLab
import Testing

/// Records what an informer or cluster watch handed on, for assertions.
final class Deliveries<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [T] = []
    func append(_ item: T) { lock.withLock { items.append(item) } }
    var all: [T] { lock.withLock { items } }
}

func makeService(_ name: String, namespace: String = "default", annotation: String? = nil, nodePort: Int = 30022) -> Service {
    Service(metadata: ObjectMeta(name: name, namespace: namespace, annotations: annotation.map { [EpokAnnotation.externalPorts: $0] }),
            spec: Service.Spec(type: "NodePort", ports: [Service.Port(protocol: "TCP", port: 80, nodePort: nodePort)]))
}

func makeNode(_ name: String, address: String, ready: Bool = true) -> Node {
    Node(metadata: ObjectMeta(name: name),
         status: Node.Status(addresses: [Node.Address(type: "InternalIP", address: address)],
                             conditions: [Node.Condition(type: "Ready", status: ready ? "True" : "False")]))
}

/// Runs an informer on a thread of its own until the test ends.
final class RunningInformer<Object: KubeObject>: @unchecked Sendable {
    let informer: Informer<Object>
    let events = Deliveries<InformerEvent<Object>>()
    private let stop = StopSignal()
    private let done = DispatchGroup()

    init(_ connection: ClusterConnection, pageSize: Int = 500, events recorder: EventRecorder? = nil) {
        informer = Informer(client: KubeClient(connection: connection), logger: Logger(label: "test"), pageSize: pageSize)
        informer.events = recorder
        done.enter()
        let (informer, events, stop, done) = (informer, events, stop, done)
        Thread {
            informer.run(until: stop) { events.append($0) }
            done.leave()
        }.start()
    }

    func names() -> Set<String> { Set(informer.cache.map(\.metadata.name)) }

    /// The complete lists handed on so far.
    var lists: Int { events.all.filter { if case .listed = $0 { true } else { false } }.count }

    deinit {
        stop.stop()
        done.wait()
    }
}

@Suite("Kubernetes API client against a fake API server on loopback")
struct KubeClientTests {
    @Test("a paginated list arrives whole, as one complete list")
    func paginatedList() throws {
        let api = try FakeAPIServer()
        for i in 0..<130 { try api.apply(makeService("s\(i)"), kind: "services") }
        let running = RunningInformer<Service>(api.tokenConnection, pageSize: 50)
        try waitUntil("the list") { running.informer.hasSynced }
        #expect(running.informer.cache.count == 130)
        guard case .listed(let items)? = running.events.all.first else { Issue.record("the first delivery is not a complete list"); return }
        #expect(items.count == 130, "never a partial list")
    }

    @Test("a continue token that expired mid-list (410) restarts the list from scratch")
    func expiredContinue() throws {
        let api = try FakeAPIServer()
        for i in 0..<30 { try api.apply(makeService("s\(i)"), kind: "services") }
        try api.control("expire-continue")
        let running = RunningInformer<Service>(api.tokenConnection, pageSize: 10)
        try waitUntil("the list") { running.informer.hasSynced }
        #expect(running.informer.cache.count == 30)
        #expect(running.events.all.allSatisfy { if case .listed(let items) = $0 { items.count == 30 } else { true } })
    }

    @Test("watch events follow creates, changes and deletes, with chunk boundaries inside JSON objects")
    func watchWithSplitChunks() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("keep"), kind: "services")
        try api.apply(makeService("gone"), kind: "services")
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try api.control("split-chunks on=1")
        try api.apply(makeService("new", annotation: "22:30022"), kind: "services")
        try api.apply(makeService("keep", annotation: "80:30022"), kind: "services")
        try api.delete(kind: "services", name: "gone", namespace: "default")
        try api.control("coalesce on=1")
        try api.control("split-chunks on=0")
        for i in 0..<5 { try api.apply(makeService("burst\(i)"), kind: "services") }
        try waitUntil("the watch to catch up") { running.names() == ["keep", "new", "burst0", "burst1", "burst2", "burst3", "burst4"] }
        #expect(running.informer.cache.first { $0.metadata.name == "keep" }?.metadata.annotations?[EpokAnnotation.externalPorts] == "80:30022")
    }

    @Test("bookmarks advance the resourceVersion although none of the watched objects changed")
    func bookmarksAdvance() throws {
        let api = try FakeAPIServer()
        try api.control("bookmark-interval seconds=0.2")
        let running = RunningInformer<Node>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        let listed = Int(running.informer.currentResourceVersion ?? "") ?? 0
        for i in 0..<5 { try api.apply(makeService("s\(i)"), kind: "services") }
        try waitUntil("a bookmark past the service changes") { (Int(running.informer.currentResourceVersion ?? "") ?? 0) >= listed + 5 }
        #expect(running.events.all.count == 1, "bookmarks are not handed on as changes")
    }

    @Test("a dropped watch resumes from the last resourceVersion without listing again")
    func droppedWatchResumes() throws {
        let api = try FakeAPIServer()
        let running = RunningInformer<Node>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try api.apply(makeNode("n1", address: "10.0.1.1"), kind: "nodes")
        try waitUntil("n1") { running.names() == ["n1"] }
        try api.control("drop-watches")
        try api.apply(makeNode("n2", address: "10.0.1.2"), kind: "nodes")
        try waitUntil("n2 after the drop") { running.names() == ["n1", "n2"] }
        #expect(running.lists == 1, "the informer re-watched instead of re-listing")
    }

    /// An informer on Nodes whose watch is dropped once it has listed and the history is compacted past the
    /// version it listed: every watch from a list's version is 410 until the next write.
    func compactedUnderInformer() throws -> (FakeAPIServer, RunningInformer<Node>) {
        let api = try FakeAPIServer()
        let running = RunningInformer<Node>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try api.control("bookmark-interval seconds=100")
        try api.control("compact")
        try api.control("drop-watches")
        return (api, running)
    }

    @Test("410 Gone on a watch (a compacted resourceVersion) makes the informer list again and converge")
    func goneWatchRelists() throws {
        let (api, running) = try compactedUnderInformer()
        try api.apply(makeNode("after", address: "10.0.1.9"), kind: "nodes")
        // The relist may come before or after the new node; either way there is a second complete list.
        try waitUntil("a relist, and the new node", seconds: 30) { running.lists >= 2 && running.names() == ["after"] }
        #expect(running.names() == ["after"])
        #expect(running.informer.restarts >= 1)
    }

    @Test("a resourceVersion that expires again right after each list is listed again with backoff, not in a loop")
    func goneAgainBacksOff() throws {
        let (api, running) = try compactedUnderInformer()
        try waitUntil("two lists more", seconds: 30) { running.lists >= 3 }
        // The dropped watch waits its backoff, and each 410 after it a doubled one: when the third list is seen,
        // a fourth at most has begun. Lists in a loop would be dozens by the time the condition is polled.
        #expect(running.lists <= 4, "\(running.lists) lists")
        try api.apply(makeNode("after", address: "10.0.1.9"), kind: "nodes")
        try waitUntil("the new node, once a write moved the history on", seconds: 30) { running.names() == ["after"] }
    }

    @Test("an API server that is down at start is waited for; nothing is handed on until it answers")
    func downAtStart() throws {
        let port = FakeAPIServer.freePort()
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-late-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        try "s3cret-token".write(toFile: scratch + "/token", atomically: true, encoding: .utf8)
        var connection = ClusterConnection(server: "https://127.0.0.1:\(port)", origin: "test")
        connection.caPEM = FileManager.default.contents(atPath: TestPKI.files.ca)
        connection.tokenFile = scratch + "/token"
        let running = RunningInformer<Service>(connection)
        try waitUntil("a few failed attempts") { running.informer.restarts >= 2 }
        #expect(running.events.all.isEmpty, "no empty list was made up while the server was down")
        let api = try FakeAPIServer(port: port, directory: scratch)
        try api.apply(makeService("late"), kind: "services")
        try waitUntil("the late server's objects", seconds: 40) { running.names() == ["late"] }
    }

    @Test("401, 403 and 500 answers: clear messages; 500 is retried until it passes")
    func errorAnswers() throws {
        let api = try FakeAPIServer()
        var wrong = api.tokenConnection
        wrong.tokenFile = nil
        wrong.token = "not-the-token"
        let unauthorized = #expect(throws: KubeAPIError.self) { try KubeClient(connection: wrong).request("GET", "/api/v1/services") }
        #expect(unauthorized?.status == 401)
        #expect(unauthorized?.description.contains("401 Unauthorized from https://127.0.0.1:\(api.port): credentials rejected") == true)

        try api.control("forbid resources=nodes")
        let forbidden = #expect(throws: KubeAPIError.self) { try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/nodes") }
        #expect(forbidden?.description.contains("403: nodes is forbidden: User \"system:serviceaccount:epok:epokd\" cannot list resource \"nodes\"") == true)
        #expect(forbidden?.description.contains("deploy/rbac.yaml") == true)
        try api.control("forbid resources=")

        try api.control("fail status=500 count=3")
        try api.apply(makeService("x"), kind: "services")
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list after three 500s", seconds: 30) { running.informer.hasSynced }
        #expect(running.names() == ["x"])
    }

    @Test("TLS: an unknown CA is refused with an x509 message; a client certificate authenticates")
    func tls() throws {
        let api = try FakeAPIServer()
        var untrusted = api.tokenConnection
        untrusted.caPEM = FileManager.default.contents(atPath: TestPKI.files.otherCA)
        let error = #expect(throws: KubeAPIError.self) { try KubeClient(connection: untrusted).request("GET", "/api/v1/nodes") }
        #expect(error?.description.hasPrefix("x509: certificate signed by unknown authority") == true)
        let data = try KubeClient(connection: api.certificateConnection).request("GET", "/api/v1/nodes")
        #expect(String(decoding: data, as: UTF8.self).contains("NodeList"))
    }

    @Test("a token file rotated while watching is read again on reconnect")
    func tokenRotation() throws {
        let api = try FakeAPIServer()
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try "rotated-token".write(toFile: api.tokenFile, atomically: true, encoding: .utf8)
        try api.control("drop-watches")
        try api.apply(makeService("after-rotation"), kind: "services")
        try waitUntil("a change made after the rotation") { running.names() == ["after-rotation"] }
    }

    @Test("the cluster watch hands on nothing until both Services and Nodes are listed, then a complete snapshot")
    func clusterWatchFailsStatic() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("s1", annotation: "22:30022"), kind: "services")
        try api.apply(makeNode("n1", address: "10.0.1.1"), kind: "nodes")
        try api.control("forbid resources=nodes")
        let watch = ClusterWatch(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        let updates = Deliveries<ClusterUpdate>()
        try watch.start { updates.append($0) }
        defer { watch.shutdown() }
        try waitUntil("services listed while nodes are forbidden") { watch.services.hasSynced && watch.nodes.restarts >= 1 }
        #expect(updates.all.isEmpty, "no partial state is handed to the reconciler")
        try api.control("forbid resources=")
        try waitUntil("the first snapshot", seconds: 30) { !updates.all.isEmpty }
        guard case .snapshot(let snapshot)? = updates.all.first else { Issue.record("first update is not a snapshot"); return }
        #expect(snapshot.services.map(\.metadata.name) == ["s1"])
        #expect(snapshot.nodes.map(\.metadata.name) == ["n1"])
        try api.apply(makeNode("n1", address: "10.0.1.1", ready: false), kind: "nodes")
        try waitUntil("the node change") {
            updates.all.contains { if case .nodeChanged(let n) = $0 { !n.isReady } else { false } }
        }
    }

    @Test("the first snapshot waits for the lists under way (custom resources), not for a forbidden one (EndpointSlices), and at most firstSyncWait")
    func firstSnapshotWaitsForLists() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("s1", annotation: "22:30022"), kind: "services")
        try api.apply(makeNode("n1", address: "10.0.1.1"), kind: "nodes")
        try api.apply(ExternalService(metadata: ObjectMeta(name: "bridge", namespace: "default"),
                                      spec: .init(targetIP: "192.0.2.2", sources: [], ports: [.init(port: 80)])), kind: "externalservices")
        try api.apply(StaticEgressIP(metadata: ObjectMeta(name: "egress", namespace: "default"), spec: .init(rules: [])), kind: "staticegressips")
        try api.control("slow-lists resource=externalservices seconds=1.5")
        try api.control("slow-lists resource=staticegressips seconds=1.5")
        try api.control("forbid resources=endpointslices")
        let watch = ClusterWatch(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        watch.firstSyncWait = 60
        let updates = Deliveries<ClusterUpdate>()
        try watch.start { updates.append($0) }
        try waitUntil("the first snapshot", seconds: 30) { !updates.all.isEmpty }
        guard case .snapshot(let first)? = updates.all.first else { Issue.record("first update is not a snapshot"); return }
        #expect(first.externalServices.map(\.metadata.name) == ["bridge"] && first.staticEgressIPs.map(\.metadata.name) == ["egress"],
                "the custom resources' slow lists were waited for")
        #expect(first.endpointSlices == nil, "forbidden EndpointSlices are not waited for")
        watch.shutdown()

        // A list slower than the wait: the snapshot goes without it, and its list follows.
        try api.control("slow-lists resource=externalservices seconds=3")
        try api.control("slow-lists resource=staticegressips seconds=0")
        let impatient = ClusterWatch(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        impatient.firstSyncWait = 0.3
        let later = Deliveries<ClusterUpdate>()
        try impatient.start { later.append($0) }
        defer { impatient.shutdown() }
        try waitUntil("the ExternalServices' list after the snapshot", seconds: 30) {
            later.all.contains { if case .externalServices(.listed(let all)) = $0 { all.map(\.metadata.name) == ["bridge"] } else { false } }
        }
        guard case .snapshot(let partial)? = later.all.first else { Issue.record("first update is not a snapshot"); return }
        #expect(partial.externalServices.isEmpty && partial.staticEgressIPs.map(\.metadata.name) == ["egress"])
    }

    @Test("once the first snapshot is handed on, the Services informer keeps no copy; a relist of Nodes alone is handed on as the changes it makes, a Node gone meanwhile deleted, the Services untouched")
    func nodeRelistAfterStart() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("s1", annotation: "22:30022"), kind: "services")
        for n in 1...2 { try api.apply(makeNode("n\(n)", address: "10.0.1.\(n)"), kind: "nodes") }
        let watch = ClusterWatch(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        let updates = Deliveries<ClusterUpdate>()
        try watch.start { updates.append($0) }
        defer { watch.shutdown() }
        try waitUntil("the first snapshot") { !updates.all.isEmpty }
        guard case .snapshot(let first)? = updates.all.first else { Issue.record("first update is not a snapshot"); return }
        #expect(first.services.map(\.metadata.name) == ["s1"] && Set(first.nodes.map(\.metadata.name)) == ["n1", "n2"])
        #expect(watch.services.cache.isEmpty, "the reconcile loop holds the Services; the informer does not")
        #expect(watch.nodes.cache.count == 2)

        // While Nodes cannot be watched, n2 goes and n3 comes; the history is compacted, so Nodes are listed again.
        try api.control("forbid resources=nodes")
        try api.control("drop-watches")
        try waitUntil("the Nodes watch failing") { watch.nodes.restarts >= 1 }
        try api.delete(kind: "nodes", name: "n2")
        try api.apply(makeNode("n3", address: "10.0.1.3"), kind: "nodes")
        try api.control("compact")
        try api.control("forbid resources=")
        func changed(_ name: String) -> Bool { updates.all.contains { if case .nodeChanged(let n) = $0 { n.metadata.name == name } else { false } } }
        try waitUntil("the relisted Nodes handed on", seconds: 30) {
            changed("n3") && updates.all.contains { if case .nodeDeleted("n2") = $0 { true } else { false } }
        }
        #expect(changed("n1"), "an unchanged Node of the relist is handed on too (the relist, not a watch event)")
        for case .snapshot(let snapshot) in updates.all {
            #expect(snapshot.services.map(\.metadata.name) == ["s1"], "no snapshot lost the Services")
        }
    }

    @Test("a watch keeps up with 1,000 events per second for several seconds and ends equal to the server")
    func keepsUpWithChurn() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("hot", annotation: "22:30022"), kind: "services")
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try api.control("churn kind=services name=hot namespace=default count=4000 rate=1000")
        let final = "4000"
        try waitUntil("the last of 4,000 changes", seconds: 60) {
            running.informer.cache.first?.metadata.annotations?["epok.getbetter.ro/churn"] == final
        }
        let changes = running.events.all.filter { if case .upserted = $0 { true } else { false } }.count
        #expect(changes >= 4000, "every change was seen (\(changes))")
        #expect(running.informer.cache.count == 1, "the cache holds the object once, not its history")
    }

    @Test("events are posted once per reason and message, and at most `burst` per object")
    func eventsAreDeduplicated() throws {
        let api = try FakeAPIServer()
        let recorder = EventRecorder(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"), burst: 3)
        let s = makeService("web")
        #expect(recorder.record(.warning, reason: "InvalidAnnotation", message: "bad", service: s))
        #expect(!recorder.record(.warning, reason: "InvalidAnnotation", message: "bad", service: s), "a repeat is not posted")
        #expect(recorder.record(.warning, reason: "PortConflict", message: "taken", service: s))
        #expect(recorder.record(.normal, reason: "Mapped", message: "22/tcp", service: s))
        #expect(!recorder.record(.normal, reason: "Mapped", message: "23/tcp", service: s), "over the burst")
        #expect(recorder.flush(seconds: 20), "the worker posts what was queued")
        defer { recorder.shutdown() }
        let state = try api.control("state")
        #expect(state.contains("\"events\": 3"))
    }

    @Test("events past the queue's capacity are dropped, and counted in epokd_events_dropped_total")
    func droppedEventsCounted() throws {
        let api = try FakeAPIServer()
        let metrics = TestMetrics()
        let recorder = EventRecorder(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"), capacity: 2, metrics: metrics)
        // Stopped: nothing drains the queue, which fills with the first two.
        recorder.shutdown()
        let queued = (0..<5).map { recorder.record(.warning, reason: "InvalidAnnotation", message: "bad", service: makeService("s\($0)")) }
        #expect(queued == [true, true, false, false, false])
        #expect(recorder.dropped == 3)
        #expect(try metrics.expectCounter("epokd_events_dropped_total").totalValue == 3)
    }
}

@Suite("kubeconfig resolution")
struct KubeConfigTests {
    func write(_ text: String) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("kc-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "tok-from-file\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        try text.write(toFile: dir + "/config", atomically: true, encoding: .utf8)
        return dir
    }

    let yaml = """
    apiVersion: v1
    kind: Config
    current-context: home
    clusters:
    - name: lab
      cluster:
        server: https://10.0.0.1:6443/
        certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
    users:
    - name: epokd
      user:
        tokenFile: token
    contexts:
    - name: home
      context: {cluster: lab, user: epokd, namespace: epok}
    """

    @Test("a kubeconfig's current context, CA data and relative tokenFile are resolved")
    func resolvesCurrentContext() throws {
        let dir = try write(yaml)
        let c = try KubeConfigResolver.resolve(explicitPath: dir + "/config", environment: [:])
        #expect(c.server == "https://10.0.0.1:6443")
        #expect(c.namespace == "epok")
        #expect(String(decoding: c.caPEM ?? Data(), as: UTF8.self).hasPrefix("-----BEGIN CERTIFICATE-----"))
        #expect(c.tokenFile == dir + "/token")
    }

    @Test("order: --kubeconfig, then KUBECONFIG, then in-cluster, then ~/.kube/config")
    func resolutionOrder() throws {
        let dir = try write(yaml)
        let sa = try write("")
        try "sa-token".write(toFile: sa + "/token", atomically: true, encoding: .utf8)
        try "kube-system".write(toFile: sa + "/namespace", atomically: true, encoding: .utf8)
        let inCluster: [String: String] = ["KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "HOME": "/nonexistent"]
        let fromEnv = try KubeConfigResolver.resolve(explicitPath: nil, environment: inCluster.merging(["KUBECONFIG": "/missing:" + dir + "/config"]) { $1 },
                                                     serviceAccountDirectory: sa)
        #expect(fromEnv.server == "https://10.0.0.1:6443")
        let pod = try KubeConfigResolver.resolve(explicitPath: nil, environment: inCluster, serviceAccountDirectory: sa)
        #expect(pod.server == "https://10.96.0.1:443")
        #expect(pod.namespace == "kube-system")
        let none = #expect(throws: KubeConfigError.self) {
            try KubeConfigResolver.resolve(explicitPath: nil, environment: ["HOME": "/nonexistent"], serviceAccountDirectory: "/nonexistent")
        }
        #expect(none?.description.contains("pass --kubeconfig") == true)
    }

    @Test("insecure-skip-tls-verify is honoured with a loud warning")
    func insecureWarns() throws {
        let dir = try write(yaml.replacingOccurrences(of: "certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==", with: "insecure-skip-tls-verify: true"))
        let c = try KubeConfigResolver.load(dir + "/config")
        #expect(c.insecureSkipTLSVerify)
        #expect(c.warnings.first?.hasPrefix("INSECURE: cluster lab") == true)
    }

    @Test("an exec credential plugin is refused with a clear message")
    func execPlugin() throws {
        let dir = try write(yaml.replacingOccurrences(of: "tokenFile: token", with: "exec: {command: aws, apiVersion: client.authentication.k8s.io/v1}"))
        let error = #expect(throws: KubeConfigError.self) { try KubeConfigResolver.load(dir + "/config") }
        #expect(error?.description.contains("exec or auth-provider plugin, which epokd does not run") == true)
    }
}
