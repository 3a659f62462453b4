import Control
import Dataplane
import FakeKube
import Foundation
import Logging
import NetnsLab
import Testing

@Suite("Watch streams that go wrong")
struct WatchRobustnessTests {
    /// Sends `bytes` on the open Service watches; `stored` keeps them in the server's history, as an event
    /// that a watch from an older resourceVersion receives again.
    func inject(_ api: FakeAPIServer, _ bytes: String, stored: Bool = false) throws {
        let file = api.directory + "/inject-\(UUID().uuidString.prefix(8))"
        try bytes.write(toFile: file, atomically: true, encoding: .utf8)
        try api.control("inject kind=services file=\(file)" + (stored ? " stored=1" : ""))
    }

    @Test("an event whose object cannot be decoded is skipped, counted and never received again; later changes arrive")
    func undecodableEvent() throws {
        let api = try FakeAPIServer()
        try api.apply(makeService("web", annotation: "22:30022"), kind: "services")
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        let wrongType = #"{"type": "MODIFIED", "object": {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "resourceVersion": "RV"}, "spec": {"ports": [{"port": 80, "nodePort": "30100"}]}}}"#
        try inject(api, wrongType + "\n", stored: true)
        try inject(api, #"{"type": "ADDED", "object": null}"# + "\n", stored: true)
        try inject(api, #"{"type": "ADDED", "object": {"kind": "Service", "spec": {}}}"# + "\n", stored: true)
        try api.apply(makeService("after", annotation: "23:30022"), kind: "services")
        try waitUntil("the change after the bad events") { running.names().contains("after") }
        #expect(running.informer.decodeErrors == 3)
        #expect(running.informer.cache.first { $0.metadata.name == "web" }?.spec.ports?.first?.nodePort == 30022, "the last valid version is kept")
        // A re-watch starts after the bad events: they are not received again.
        try api.control("drop-watches")
        try api.apply(makeService("later", annotation: "24:30022"), kind: "services")
        try waitUntil("a change after the re-watch") { running.names().contains("later") }
        #expect(running.informer.decodeErrors == 3)
    }

    @Test("a listed object that cannot be decoded is skipped, counted and reported on itself; the rest of every page arrives")
    func undecodableListedObject() throws {
        let api = try FakeAPIServer()
        // k8s-ext-connector's CRD validates no spec: the API server stores a port given as a string.
        let broken = #"{"apiVersion": "submariner.io/v1alpha1", "kind": "ExternalService", "metadata": {"name": "broken", "namespace": "team-a"}, "spec": {"targetIP": "192.0.2.1", "ports": [{"port": "80"}]}}"#
        let file = api.directory + "/broken.json"
        try broken.write(toFile: file, atomically: true, encoding: .utf8)
        try api.control("apply kind=externalservices file=\(file)")
        for i in 0..<3 {
            try api.apply(ExternalService(metadata: ObjectMeta(name: "good\(i)", namespace: "team-b"),
                                          spec: .init(targetIP: "192.0.2.2", sources: [], ports: [.init(port: 80)])), kind: "externalservices")
        }
        let recorder = EventRecorder(client: KubeClient(connection: api.tokenConnection), logger: Logger(label: "test"))
        defer { recorder.shutdown() }
        let running = RunningInformer<ExternalService>(api.tokenConnection, pageSize: 2, events: recorder)
        try waitUntil("the list without the broken object", seconds: 20) { running.informer.hasSynced }
        #expect(running.names() == ["good0", "good1", "good2"])
        #expect(running.informer.decodeErrors == 1)
        try waitUntil("the Warning Event on the broken object", seconds: 20) {
            let events = String(decoding: try KubeClient(connection: api.tokenConnection).request("GET", "/api/v1/events"), as: UTF8.self)
            return events.contains("\"reason\": \"UndecodableObject\"") && events.contains("\"name\": \"broken\"")
                && events.contains("\"kind\": \"ExternalService\"")
        }
    }

    @Test("an informer stopped between the pages of a list hands on nothing: a partial list is never taken for the whole")
    func stoppedMidList() throws {
        let api = try FakeAPIServer()
        for i in 0..<4 { try api.apply(makeService("s\(i)", annotation: "\(22 + i):30022"), kind: "services") }
        try api.control("slow-lists resource=services seconds=0.3")
        func pagesServed() throws -> Int {
            let state = try api.control("state")
            let json = try JSONSerialization.jsonObject(with: Data(state[state.firstIndex(of: "{")!...].utf8)) as? [String: Any]
            return (json?["listPagesServed"] as? [String: Int])?["services"] ?? 0
        }
        var running: RunningInformer<Service>? = RunningInformer<Service>(api.tokenConnection, pageSize: 1)
        try waitUntil("the first page served", seconds: 20) { try pagesServed() >= 1 }
        let events = running!.events
        running = nil   // stops the informer and waits for its thread, before the later pages
        #expect(events.all.isEmpty, "a stopped list delivered \(events.all.count) events")
        #expect(try pagesServed() < 4, "the list was stopped before its last page")
    }

    @Test("bytes that are not JSON events (a stray quote or brace) end that stream; the informer watches again and catches up")
    func malformedBytes() throws {
        let api = try FakeAPIServer()
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        // The fake gives injected bytes only to the watches open when they are injected, and the informer opens
        // its watch after the list: a change seen after the list proves the watch is open.
        try api.apply(makeService("watching", annotation: "21:30021"), kind: "services")
        try waitUntil("a change through the watch") { running.names().contains("watching") }
        for (i, junk) in ["\"", "}", "x"].enumerated() {
            let before = running.informer.restarts
            try inject(api, junk)
            try api.apply(makeService("s\(i)", annotation: "22:30022"), kind: "services")
            try waitUntil("the change after \(junk.debugDescription)") { running.names().contains("s\(i)") }
            #expect(running.informer.restarts > before, "\(junk.debugDescription) ended the stream")
        }
    }

    @Test("an event larger than the cap ends the stream instead of growing memory; the informer recovers")
    func oversizedEvent() throws {
        let api = try FakeAPIServer()
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try inject(api, #"{"type": "ADDED", "object": {"kind": "Service", "metadata": {"name": ""# + String(repeating: "x", count: 17 << 20))
        try api.apply(makeService("after", annotation: "22:30022"), kind: "services")
        try waitUntil("the change after the oversized event", seconds: 30) { running.names().contains("after") }
        #expect(running.informer.restarts >= 1)
    }

    @Test("watches that end at once with nothing are retried with backoff, then the informer carries on")
    func emptyWatches() throws {
        let api = try FakeAPIServer()
        let running = RunningInformer<Service>(api.tokenConnection)
        try waitUntil("the list") { running.informer.hasSynced }
        try api.control("empty-watches count=3")
        try api.control("drop-watches")
        try api.apply(makeService("after", annotation: "22:30022"), kind: "services")
        try waitUntil("the change after three empty watches", seconds: 30) { running.names().contains("after") }
        #expect(try api.control("state").contains("\"emptyWatchesServed\": 3"))
        #expect(running.informer.restarts >= 3, "each empty watch counted as a failure (\(running.informer.restarts))")
    }
}

@Suite("Splitting a watch stream")
struct JSONStreamTests {
    @Test("values split anywhere are joined; several per chunk are separated; limits and junk are errors")
    func splitter() throws {
        let text = #"{"a": "}{\"", "b": [1, {"c": 2}]} "# + "\n" + #"[{"x": "]"}]"#
        let bytes = Array(text.utf8)
        var rng = SeededGenerator()
        for _ in 0..<200 {
            var splitter = JSONStreamSplitter()
            var values: [String] = []
            var i = 0
            while i < bytes.count {
                let n = Int.random(in: 1...5, using: &rng)
                values += try splitter.feed(bytes[i..<min(bytes.count, i + n)]).map { String(decoding: $0, as: UTF8.self) }
                i += n
            }
            #expect(values == [#"{"a": "}{\"", "b": [1, {"c": 2}]}"#, #"[{"x": "]"}]"#], "\(rng)")
        }
        var small = JSONStreamSplitter(limit: 10)
        #expect(throws: JSONStreamSplitter.Malformed.self) { try small.feed(Array(#"{"a": "0123456789"#.utf8)) }
        var stray = JSONStreamSplitter()
        #expect(throws: JSONStreamSplitter.Malformed.self) { try stray.feed(Array(#"{"a": 1} } {"b": 2}"#.utf8)) }
    }
}
