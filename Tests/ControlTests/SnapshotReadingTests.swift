import Control
import Foundation
import NetnsLab
import Testing
import Yams

@Suite("YAML snapshots: hostile nesting and aliases are refused before parsing; mutated files never crash")
struct YAMLSnapshotTests {
    /// A snapshot's error text, or nil when it was read.
    func refusal(_ text: String) -> String? {
        do {
            _ = try SnapshotFile.decode(text)
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test("nesting thousands deep (flow, block, compact sequences, a JSON array) is refused with the limit named; 100 levels are read")
    func deepNesting() throws {
        let deep = [
            String(repeating: "[", count: 5_000),
            "items: " + String(repeating: "[", count: 5_000) + String(repeating: "]", count: 5_000) + "\nkind: List\n",
            "kind: List\nitems:\n" + String(repeating: "- ", count: 5_000) + "x\n",
            "kind: List\nitems:\n" + (0..<400).map { String(repeating: " ", count: $0) + "k\($0):\n" }.joined() + String(repeating: " ", count: 400) + "v: 1\n",
        ]
        for text in deep {
            let error = try #require(refusal(text), "\(text.prefix(40))")
            #expect(error.contains("nests deeper than 100 levels"), "\(error)")
        }
        // JSON (an object first) goes to the JSON reader, which bounds its own depth.
        #expect(refusal("{\"kind\": \"List\", \"items\": [" + String(repeating: "{\"a\": ", count: 5_000)) != nil)
        // 99 levels below the List's items are read as far as nesting goes (the items are not Services, so skipped).
        let fine = "kind: List\nitems:\n- kind: Thing\n  spec: " + String(repeating: "[", count: 95) + String(repeating: "]", count: 95) + "\n"
        #expect(refusal(fine) == nil)
    }

    @Test("aliases expanding a small document far beyond its size are refused; a few aliases are read")
    func aliases() throws {
        var bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        for i in 1...9 { bomb += "a\(i): &a\(i) [" + [String](repeating: "*a\(i - 1)", count: 10).joined(separator: ", ") + "]\n" }
        bomb += "kind: List\nitems: []\n"
        let error = try #require(refusal(bomb))
        #expect(error.contains("aliases expand it"), "\(error)")
        let few = """
            kind: List
            items:
            - kind: Service
              metadata: {name: a, namespace: default, annotations: &ports {epok.getbetter.ro/externalports: "80:30080"}}
              spec: {ports: [{port: 80, nodePort: 30080}]}
            - kind: Service
              metadata: {name: b, namespace: default, annotations: *ports}
              spec: {ports: [{port: 80, nodePort: 30080}]}
            """
        #expect(try SnapshotFile.decode(few).services.map { $0.metadata.annotations?[EpokAnnotation.externalPorts] } == ["80:30080", "80:30080"])
    }

    @Test("fuzz: mutated YAML snapshots are read or refused, never crash; their nesting is checked first")
    func fuzz() throws {
        var generator = ObjectGenerator(rng: SeededGenerator())
        let alphabet = Array("[]{}-:?&*!|>'\"#,\n \t0123456789abcx".utf8)
        var read = 0, refused = 0
        for i in 0..<400 {
            let list: [String: Any] = ["apiVersion": "v1", "kind": "List", "items": [generator.service(i), generator.service(i + 1000)]]
            var bytes = Array(try Yams.dump(object: list).utf8)
            for _ in 0..<Int.random(in: 1...6, using: &generator.rng) {
                let at = Int.random(in: 0..<bytes.count, using: &generator.rng)
                switch Int.random(in: 0..<4, using: &generator.rng) {
                case 0: bytes[at] = generator.pick(alphabet)
                case 1: bytes.insert(generator.pick(alphabet), at: at)
                case 2: bytes.insert(contentsOf: [UInt8](repeating: generator.pick(Array("[{- ".utf8)), count: Int.random(in: 100...3_000, using: &generator.rng)), at: at)
                default: bytes.removeSubrange(at..<min(bytes.count, at + Int.random(in: 1...8, using: &generator.rng)))
                }
            }
            if refusal(String(decoding: bytes, as: UTF8.self)) == nil { read += 1 } else { refused += 1 }
        }
        #expect(read > 0 && refused > 0, "read \(read), refused \(refused)")
    }
}

@Suite("Multi-document YAML snapshots (---), as kubectl, Helm and people write them")
struct MultiDocumentTests {
    @Test("the project's own example reads: one object per document, joined")
    func example() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/static-sources.yaml").path
        let snapshot = try SnapshotFile.load(path)
        #expect(snapshot.staticEgressIPs.map(\.metadata.name) == ["eip"])
        #expect(snapshot.externalServices.map(\.metadata.name) == ["my-externalservice"])
        #expect(!snapshot.services.isEmpty)
    }

    @Test("Lists and single objects mix; empty documents and a trailing --- are nothing; a half-written or unknown document is an error naming it")
    func strictness() throws {
        let service = "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {ports: [{port: 80, nodePort: 30080}]}\n"
        let node = "kind: Node\nmetadata: {name: n1}\n"
        let list = "apiVersion: v1\nkind: List\nitems:\n- kind: Node\n  metadata: {name: n2}\n"
        let snapshot = try SnapshotFile.decode("---\n" + service + "---\n# only a comment\n---\n" + node + "---\n" + list + "---\n")
        #expect(snapshot.services.map(\.metadata.name) == ["web"] && snapshot.nodes.map(\.metadata.name) == ["n1", "n2"])
        #expect { try SnapshotFile.decode(service + "---\nmetadata: {name: half}\n---\n" + node) } throws: {
            "\($0)".contains("document 2 of 3 (from line 4) has no kind")
        }
        #expect { try SnapshotFile.decode(service + "---\nkind: Deployment\nmetadata: {name: d}\n") } throws: {
            "\($0)".contains("document 2 of 2") && "\($0)".contains("is a Deployment")
        }
        // A hostile document is refused before any is read.
        #expect { try SnapshotFile.decode(service + "---\n" + String(repeating: "[", count: 5_000)) } throws: {
            "\($0)".contains("nests deeper than 100 levels")
        }
    }
}

@Suite("Snapshot files read as Kubernetes reads them: the last kind counts, names as the API server checks them")
struct KubernetesReadingTests {
    let service = #""metadata": {"name": "web", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "80:30080"}}, "spec": {"ports": [{"port": 80, "nodePort": 30080}]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}]}"#

    @Test("of duplicate kind keys the last counts, in the fast path and the late one, for every kind")
    func duplicateKinds() throws {
        for (item, services, nodes) in [
            (#"{"kind": "Node", "kind": "Service", \#(service)}"#, 1, 0),
            (#"{"kind": "Service", "kind": "Node", \#(service)}"#, 0, 1),
            (#"{"apiVersion": "v1", "kind": "Service", \#(service), "kind": "Node"}"#, 0, 1),
            (#"{\#(service), "kind": "Node", "kind": "Service"}"#, 1, 0),
            (#"{"kind": "Pod", \#(service), "kind": "Service"}"#, 1, 0),
            (#"{"kind": "Service", \#(service), "kind": "Pod"}"#, 0, 0),
        ] {
            let snapshot = try SnapshotFile.decode(Array(#"{"kind": "List", "items": [\#(item)]}"#.utf8))
            #expect(snapshot.services.count == services && snapshot.nodes.count == nodes, "\(item)")
        }
    }

    @Test("a YAML key given twice in one mapping is refused, as kubectl refuses it; the same key in two mappings is fine")
    func duplicateYAMLKeys() throws {
        let twice = "kind: List\nitems:\n- kind: Service\n  metadata: {name: web, namespace: default}\n  kind: Node\n  spec: {}\n"
        #expect { try SnapshotFile.decode(twice) } throws: { "\($0)".contains("has the key \"kind\" twice in one mapping (line 5)") }
        let apart = "kind: List\nitems:\n- kind: Service\n  metadata: {name: a, namespace: default}\n  spec: {ports: [{port: 80, nodePort: 30080}]}\n- kind: Service\n  metadata: {name: b, namespace: default}\n  spec: {}\n"
        #expect(try SnapshotFile.decode(apart).services.map(\.metadata.name) == ["a", "b"])
    }

    @Test("names the API server refuses are errors naming them: two spellings of café, a Kelvin sign, upper case, a Service starting with a digit", arguments: [
        ("Service", "caf\u{e9}", "default"), ("Service", "cafe\u{301}", "default"), ("Service", "\u{212a}ube", "default"),
        ("Service", "Web", "default"), ("Service", "1web", "default"), ("Service", "web", "Team-A"), ("Service", "web", "caf\u{e9}"),
        ("Node", "pi_b", ""), ("Node", "a..b", ""), ("Service", "web\nforged", "default"),
    ])
    func refusedNames(kind: String, name: String, namespace: String) throws {
        let meta: [String: Any] = namespace.isEmpty ? ["name": name] : ["name": name, "namespace": namespace]
        let item: [String: Any] = ["kind": kind, "metadata": meta, "spec": ["ports": [["port": 80, "nodePort": 30080]]]]
        let json = try JSONSerialization.data(withJSONObject: ["kind": "List", "items": [item]])
        #expect { try SnapshotFile.decode(Array(json)) } throws: { error in
            let text = "\(error)"
            return text.contains("the API server refuses it") && !text.contains("\n")
        }
        let yaml = try Yams.dump(object: ["kind": "List", "items": [item]])
        #expect(throws: (any Error).self, "\(yaml)") { try SnapshotFile.decode(yaml) }
    }

    @Test("names the API server takes are read: dotted Node names, hyphens, digits")
    func acceptedNames() throws {
        let json = #"{"kind": "List", "items": [{"kind": "Node", "metadata": {"name": "pi-b.lan.example"}}, {"kind": "Service", "metadata": {"name": "web-2", "namespace": "team-a1"}, "spec": {}}]}"#
        let snapshot = try SnapshotFile.decode(Array(json.utf8))
        #expect(snapshot.nodes.map(\.metadata.name) == ["pi-b.lan.example"] && snapshot.services.map(\.metadata.name) == ["web-2"])
    }
}
