import Control
import Foundation
import NetnsLab
import Testing

/// What Foundation's decoder makes of the same bytes, reduced to what epokd keeps (its annotations and labels).
private func foundation<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) throws -> T { try JSONDecoder().decode(type, from: Data(bytes)) }

extension Service { var projected: Service { var s = self; s.metadata = s.metadata.projected; return s } }
extension Node { var projected: Node { var n = self; n.metadata = n.metadata.projected; return n } }
extension EndpointSlice { var projected: EndpointSlice { var e = self; e.metadata = e.metadata.projected; return e } }

/// Random objects as the API server would send them, with fields epokd does not read mixed in.
struct ObjectGenerator {
    var rng: SeededGenerator

    mutating func pick<T>(_ items: [T]) -> T { items[Int.random(in: 0..<items.count, using: &rng)] }
    mutating func maybe<T>(_ value: @autoclosure () -> T) -> T? { Bool.random(using: &rng) ? value() : nil }
    mutating func text() -> String {
        pick(["web", "a\"b", "tab\there", "é€😀", "\\back\\slash", "line\nbreak", "\u{1}", "", "x/y", "ünïcode"])
    }

    mutating func metadata(_ name: String) -> [String: Any] {
        var meta: [String: Any] = ["name": name, "namespace": pick(["default", "kube-system", "team-a1"]), "uid": "uid-\(name)-\(Int.random(in: 0...999, using: &rng))",
                                   "resourceVersion": String(Int.random(in: 1...99999, using: &rng)),
                                   "creationTimestamp": "2024-0\(Int.random(in: 1...9, using: &rng))-01T00:00:00Z",
                                   "managedFields": [["manager": "kubectl", "fieldsV1": ["f:spec": ["f:ports": [:]]]]]]
        var annotations: [String: String] = ["kubectl.kubernetes.io/last-applied-configuration": "{\"big\": \"\(String(repeating: "x", count: 200))\"}"]
        if Bool.random(using: &rng) { annotations["epok.getbetter.ro/externalports"] = "80:30080,53:30053:udp" }
        if Bool.random(using: &rng) { annotations["epok.getbetter.ro/allow-range"] = text() }
        if Bool.random(using: &rng) { annotations["ratelimit"] = "200/second" }
        if Bool.random(using: &rng) { meta["annotations"] = annotations }
        if Bool.random(using: &rng) {
            meta["labels"] = ["app": "web", "epok_exclude": "yes", "kubernetes.io/service-name": text()].filter { _ in Bool.random(using: &rng) }
        }
        return meta
    }

    mutating func service(_ i: Int) -> [String: Any] {
        var spec: [String: Any] = ["clusterIP": "10.96.0.\(i % 250)", "sessionAffinity": "None",
                                   "ports": (0..<Int.random(in: 0...3, using: &rng)).map { p -> [String: Any] in
                                       var port: [String: Any] = ["port": 80 + p, "targetPort": pick([8080, "http"] as [Any])]
                                       if Bool.random(using: &rng) { port["name"] = text() }
                                       if Bool.random(using: &rng) { port["protocol"] = pick(["TCP", "UDP", "SCTP"]) }
                                       if Bool.random(using: &rng) { port["nodePort"] = 30000 + p }
                                       return port
                                   }]
        if Bool.random(using: &rng) { spec["type"] = pick(["NodePort", "LoadBalancer", "ClusterIP"]) }
        if Bool.random(using: &rng) { spec["loadBalancerSourceRanges"] = ["10.0.0.0/8", text()] }
        if Bool.random(using: &rng) { spec["externalTrafficPolicy"] = pick(["Local", "Cluster"]) }
        if Bool.random(using: &rng) { spec["healthCheckNodePort"] = 32000 + i % 700 }
        var object: [String: Any] = ["apiVersion": "v1", "kind": "Service", "metadata": metadata("svc-\(i)"), "spec": spec]
        if Bool.random(using: &rng) {
            object["status"] = ["loadBalancer": Bool.random(using: &rng) ? [:] as [String: Any]
                                : ["ingress": [["ip": "203.0.113.\(i % 250)", "ipMode": "VIP"], ["hostname": "lb.example"]]]]
        }
        return object
    }

    mutating func node(_ i: Int) -> [String: Any] {
        var object: [String: Any] = ["apiVersion": "v1", "kind": "Node", "metadata": metadata("n\(i)")]
        if Bool.random(using: &rng) { object["spec"] = ["podCIDR": "10.244.\(i % 250).0/24", "unschedulable": Bool.random(using: &rng)] }
        if Bool.random(using: &rng) {
            object["status"] = ["addresses": [["type": "InternalIP", "address": "10.0.1.\(i % 250)"], ["type": "Hostname", "address": "n\(i)"]],
                                "conditions": [["type": "Ready", "status": pick(["True", "False", "Unknown"]), "reason": "KubeletReady"]],
                                "nodeInfo": ["kernelVersion": "6.1", "images": [[:]]]]
        }
        return object
    }

    mutating func slice(_ i: Int) -> [String: Any] {
        var object: [String: Any] = ["apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata("s\(i)"),
                                     "addressType": "IPv4"]
        if Bool.random(using: &rng) {
            object["endpoints"] = (0..<Int.random(in: 0...3, using: &rng)).map { e -> [String: Any] in
                var endpoint: [String: Any] = ["addresses": ["10.244.\(i % 250).\(e)"], "targetRef": ["kind": "Pod", "name": "p"]]
                if Bool.random(using: &rng) { endpoint["conditions"] = ["ready": Bool.random(using: &rng), "terminating": false] }
                if Bool.random(using: &rng) { endpoint["nodeName"] = "n\(e)" }
                return endpoint
            }
        }
        if Bool.random(using: &rng) { object["ports"] = [["name": "web", "port": 8080, "protocol": "TCP"]] }
        return object
    }
}

@Suite("The JSON reader: Kubernetes objects from bytes, checked against Foundation's decoder")
struct JSONReaderTests {
    @Test("property: generated Services, Nodes and EndpointSlices read as Foundation decodes them, reduced to what epokd keeps")
    func roundTrip() throws {
        var generator = ObjectGenerator(rng: SeededGenerator())
        for i in 0..<300 {
            for object in [generator.service(i), generator.node(i), generator.slice(i)] {
                let bytes = [UInt8](try JSONSerialization.data(withJSONObject: object))
                var reader = JSONReader(bytes)
                switch object["kind"] as? String {
                case "Service": #expect(try Service(json: &reader) == foundation(Service.self, bytes).projected, "\(generator.rng) \(String(decoding: bytes, as: UTF8.self))")
                case "Node": #expect(try Node(json: &reader) == foundation(Node.self, bytes).projected, "\(generator.rng)")
                default: #expect(try EndpointSlice(json: &reader) == foundation(EndpointSlice.self, bytes).projected, "\(generator.rng)")
                }
                try reader.readEnd()
            }
        }
    }

    /// Keys sorted (as kubectl writes them: each item's kind comes right after its apiVersion, and is read in the
    /// one pass) and in hash order (from the first item whose kind comes later, items are read after the pass).
    @Test("when an object last changed: the latest managedFields time (a null or malformed one is passed over, and what follows it is read), an EndpointSlice's trigger time with its fraction")
    func changedAt() throws {
        let service = """
        {"kind": "Service", "metadata": {"name": "web", "namespace": "default",
          "managedFields": [{"manager": "a", "time": null, "fieldsV1": {"f:spec": {}}}, {"manager": "b", "time": "yesterday"},
                            {"manager": "c", "operation": "Update", "time": "2024-05-01T10:00:05Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}},
                            {"time": "2024-05-01T10:00:00Z", "manager": "d"}],
          "annotations": {"epok.getbetter.ro/externalports": "22:30022"}},
         "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}}
        """
        var reader = JSONReader(Array(service.utf8))
        let read = try Service(json: &reader)
        #expect(read.metadata.changedAt == Double(try #require(Timestamp.seconds("2024-05-01T10:00:05Z"))))
        #expect(read.metadata.annotations?[EpokAnnotation.externalPorts] == "22:30022", "what follows managedFields is read")
        let slice = """
        {"kind": "EndpointSlice", "addressType": "IPv4", "metadata": {"name": "web-x", "namespace": "default",
          "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00.250000000Z"}}, "endpoints": []}
        """
        var sliceReader = JSONReader(Array(slice.utf8))
        #expect(try EndpointSlice(json: &sliceReader).metadata.changedAt == Double(try #require(Timestamp.seconds("2024-05-01T10:00:00Z"))) + 0.25)
    }

    @Test("a kubectl get -o json List reads as Foundation decodes it, and the file path gives the same snapshot",
          arguments: [JSONSerialization.WritingOptions.sortedKeys, []])
    func kubectlList(order: JSONSerialization.WritingOptions) throws {
        var generator = ObjectGenerator(rng: SeededGenerator())
        let items = (0..<50).flatMap { [generator.service($0), generator.node($0), generator.slice($0)] }
            + [["apiVersion": "v1", "kind": "Pod", "metadata": ["name": "skipped"], "spec": ["containers": [[:]]]] as [String: Any]]
        let list: [String: Any] = ["apiVersion": "v1", "kind": "List", "items": items, "metadata": ["resourceVersion": ""]]
        let bytes = [UInt8](try JSONSerialization.data(withJSONObject: list, options: [.prettyPrinted, order]))
        let fast = try SnapshotFile.decode(String(decoding: bytes, as: UTF8.self))
        #expect(fast.services.count == 50 && fast.nodes.count == 50 && fast.endpointSlices?.count == 50)
        struct Document: Decodable { var items: [Item] }
        enum Item: Decodable {
            case service(Service), node(Node), slice(EndpointSlice), other
            init(from decoder: Decoder) throws {
                struct Kind: Decodable { var kind: String }
                switch try Kind(from: decoder).kind {
                case "Service": self = .service(try Service(from: decoder))
                case "Node": self = .node(try Node(from: decoder))
                case "EndpointSlice": self = .slice(try EndpointSlice(from: decoder))
                default: self = .other
                }
            }
        }
        let slow = try foundation(Document.self, bytes).items
        #expect(fast.services == slow.compactMap { if case .service(let s) = $0 { s.projected } else { nil } })
        #expect(fast.nodes == slow.compactMap { if case .node(let n) = $0 { n.projected } else { nil } })
        #expect(fast.endpointSlices == slow.compactMap { if case .slice(let e) = $0 { e.projected } else { nil } })
    }

    @Test("items whose kind comes first and later are read in document order; a bad item is reported after the document")
    func itemOrderAndErrors() throws {
        func service(_ name: String, kindFirst: Bool) -> String {
            let body = "\"metadata\": {\"name\": \"\(name)\"}, \"spec\": {\"ports\": [{\"port\": 80, \"nodePort\": 30080}]}"
            return kindFirst ? "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \(body)}" : "{\(body), \"kind\": \"Service\"}"
        }
        let node = "{\"kind\": \"Node\", \"metadata\": {\"name\": \"n1\"}}"
        let items = [service("a", kindFirst: true), node, service("b", kindFirst: false), service("c", kindFirst: true)]
        let read = try SnapshotFile.decode("{\"items\": [\(items.joined(separator: ", "))], \"kind\": \"List\"}")
        #expect(read.services.map(\.metadata.name) == ["a", "b", "c"])
        #expect(read.nodes.map(\.metadata.name) == ["n1"])

        let nameless = "{\"kind\": \"Service\", \"metadata\": {}, \"spec\": {}}"
        let late = "{\"metadata\": {}, \"kind\": \"Service\"}"
        func error(_ document: String) -> String {
            do {
                _ = try SnapshotFile.decode(document)
                return "read"
            } catch {
                return "\(error)"
            }
        }
        // The first bad item is named, whether its kind came first or later.
        #expect(error("{\"kind\": \"List\", \"items\": [\(node), \(nameless), \(late)]}").contains("cannot be read at items[1] (a Service): metadata has no name"))
        #expect(error("{\"kind\": \"List\", \"items\": [\(node), \(late), \(nameless)]}").contains("cannot be read at items[1] (a Service)"))
        // A document that is not a List, or not JSON, is reported as such before any of its items.
        #expect(error("{\"items\": [\(nameless)]}").contains("has no kind"))
        #expect(error("{\"kind\": \"Pod\", \"items\": [\(nameless)]}").contains("is a Pod, not a List"))
        #expect(error("{\"kind\": \"List\", \"items\": [\(nameless), {]}").contains("is malformed"))
        // Within an item, the grammar is checked as the item is read: the item and the byte are named.
        #expect(error("{\"kind\": \"List\", \"items\": [{\"kind\": \"Service\", \"metadata\": {\"name\": }}]}")
            .contains("cannot be read at items[0] (a Service): expected a string at byte 68"))
    }

    @Test("annotation names kept are one String for every object that has them; past the intern limit, still the right names")
    func internedNames() throws {
        // Names past the limit, then names repeated: every one reads back right.
        let names = (0..<(JSONReader.internLimit + 4)).map { "epok.getbetter.ro/annotation-number-\($0)" }
        let objects = (names + names).enumerated().map { index, name in
            "{\"kind\": \"Service\", \"metadata\": {\"name\": \"s\(index)\", \"annotations\": {\"\(name)\": \"v\", \"other\": \"x\"}}, \"spec\": {}}"
        }
        let read = try SnapshotFile.decode("{\"kind\": \"List\", \"items\": [\(objects.joined(separator: ", "))]}")
        #expect(read.services.map { $0.metadata.annotations?.keys ?? [] } == (names + names).map { [$0] })
        func storage(_ service: Service) -> UnsafePointer<UInt8>? {
            service.metadata.annotations?.keys.first?.utf8.withContiguousStorageIfAvailable { $0.baseAddress } ?? nil
        }
        let count = names.count
        // The first `internLimit` names: the second object with a name shares the first one's String.
        for i in 0..<JSONReader.internLimit { #expect(storage(read.services[i]) == storage(read.services[count + i]), "name \(i)") }
        for i in JSONReader.internLimit..<count { #expect(storage(read.services[i]) != storage(read.services[count + i]), "name \(i)") }
    }

    @Test("malformed JSON is an error at its byte offset", arguments: [
        ("{\"a\": tru}", 6), ("{\"a\" 1}", 5), ("[1, 2,]", 6), ("{\"a\": \"x", 6), ("{\"a\": 01}", 7), ("{\"a\": -}", 6),
        ("{\"a\": \"\\q\"}", 7), ("{\"a\": \"\\ud800\"}", 13), ("{\"a\": 1} x", 9), ("{\"a\": \"\u{1}\"}", 7), ("", 0), ("{\"a\": 1.}", 8),
    ])
    func malformed(text: String, offset: Int) {
        var reader = JSONReader(Array(text.utf8))
        do {
            try reader.skipValue()
            try reader.readEnd()
            Issue.record("\(text.debugDescription) was read")
        } catch {
            #expect(error.offset == offset, "\(text.debugDescription): \(error)")
        }
    }

    @Test("a string skipped unbuilt is checked as one read: invalid UTF-8 after an escape, bad escapes, a lone surrogate")
    func skippedStringsAreChecked() {
        let cases: [[UInt8]] = [
            Array(#"{"a": "\n"#.utf8) + [0xff] + Array(#""}"#.utf8),
            Array(#"{"a": "x\"y"#.utf8) + [0xc0, 0xaf] + Array(#""}"#.utf8),
            Array(#"{"a": "\"\x"}"#.utf8),
            Array(#"{"a": "\"\udc00"}"#.utf8),
        ]
        for bytes in cases {
            var skipping = JSONReader(bytes)
            #expect(throws: JSONReadError.self, "\(bytes)") { try skipping.skipValue() }
            var reading = JSONReader(bytes)
            #expect(throws: JSONReadError.self, "\(bytes)") { try reading.readObject { (r: inout JSONReader, _: JSONKey) throws(JSONReadError) in _ = try r.readString() } }
        }
    }

    @Test("wrong types and missing fields are errors, as Foundation's decoder has them")
    func wrongTypes() {
        for (text, reason) in [("{\"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [{\"port\": 80, \"nodePort\": \"30100\"}]}}", "expected an integer"),
                               ("{\"metadata\": {}, \"spec\": {}}", "metadata has no name"), ("{\"metadata\": {\"name\": \"a\"}}", "spec is missing"),
                               ("{\"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [{\"port\": 80.5}]}}", "expected an integer"),
                               ("{\"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [{\"port\": 99999999999999999999}]}}", "integer out of range"),
                               // An annotation epokd does not keep is skipped unbuilt, but still has to be a string.
                               ("{\"metadata\": {\"name\": \"a\", \"annotations\": {\"other\": 5}}, \"spec\": {}}", "expected a string"),
                               ("{\"metadata\": {\"name\": \"a\", \"annotations\": {\"other\": {\"x\": \"y\"}}}, \"spec\": {}}", "expected a string")] {
            var reader = JSONReader(Array(text.utf8))
            #expect(throws: JSONReadError.self, "\(text)") { _ = try Service(json: &reader) }
            var again = JSONReader(Array(text.utf8))
            do { _ = try Service(json: &again) } catch { #expect(error.reason.contains(reason), "\(text): \(error)") }
            #expect((try? JSONDecoder().decode(Service.self, from: Data(text.utf8))) == nil, "Foundation refuses \(text) too")
        }
    }

    @Test("fuzz: mutated documents are read or refused exactly as JSONSerialization accepts or refuses them; nothing crashes; hostile nesting is refused")
    func fuzz() throws {
        var generator = ObjectGenerator(rng: SeededGenerator())
        let alphabet = Array("{}[]\",:\\0123456789-+.eEtrufalsn \n\u{1}x".utf8)
        for i in 0..<600 {
            var bytes = [UInt8](try JSONSerialization.data(withJSONObject: generator.service(i)))
            for _ in 0..<Int.random(in: 1...4, using: &generator.rng) {
                let at = Int.random(in: 0..<bytes.count, using: &generator.rng)
                switch Int.random(in: 0..<3, using: &generator.rng) {
                case 0: bytes[at] = generator.pick(alphabet)
                case 1: bytes.insert(generator.pick(alphabet), at: at)
                default: bytes.removeSubrange(at..<min(bytes.count, at + Int.random(in: 1...8, using: &generator.rng)))
                }
            }
            var reader = JSONReader(bytes)
            let ours = Result<Void, JSONReadError>(catching: { () throws(JSONReadError) in
                try reader.skipValue()
                try reader.readEnd()
            })
            // Where JSONSerialization departs from RFC 8259 the documents are not compared: it reads a trailing comma
            // (`{"a": 1,}`, which the reader refuses) and refuses numbers beyond a Double (`3E339`, which the grammar
            // allows; the reader skips them, and refuses them where it reads an integer).
            let text = String(decoding: bytes, as: UTF8.self)
            let comparable = text.range(of: #",\s*[}\]]"#, options: .regularExpression) == nil
                && text.range(of: #"[0-9][eE][+-]?[0-9]{3,}"#, options: .regularExpression) == nil
            let theirs = (try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed])) != nil
            switch ours {
            case _ where !comparable: break
            case .success: #expect(theirs, "\(generator.rng) we read what JSONSerialization refuses: \(String(decoding: bytes, as: UTF8.self).debugDescription)")
            case .failure(let error):
                #expect(!theirs, "\(generator.rng) we refuse what JSONSerialization reads (\(error)): \(String(decoding: bytes, as: UTF8.self).debugDescription)")
                #expect((0...bytes.count).contains(error.offset))
            }
            // The typed readers never crash on the same bytes.
            var typed = JSONReader(bytes)
            _ = try? Service(json: &typed)
            _ = try? SnapshotFile.decode(String(decoding: bytes, as: UTF8.self))
        }
        var deep = JSONReader(Array(repeating: UInt8(ascii: "["), count: 100_000))
        #expect(throws: JSONReadError.self) { try deep.skipValue() }
    }
}
