import Control
import Dataplane
import Testing

@Suite("Mistakes that used to pass in silence: keys outside annotations, internal: \"false\"")
struct SlipTests {
    /// The indentation slip: `annotations:` left empty, its key one level too far left (in metadata).
    static let slipYAML = """
        kind: List
        items:
        - kind: Service
          apiVersion: v1
          metadata:
            name: web
            namespace: default
            annotations:
            epok.getbetter.ro/externalports: "22:30022"
            labels:
              epok.getbetter.ro/exclude: "true"
          spec:
            type: NodePort
            ports: [{port: 22, nodePort: 30022, protocol: TCP}]
        """

    static let slipJSON = """
        {"kind": "List", "items": [{"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": null,
          "epok.getbetter.ro/externalports": "22:30022", "labels": {"epok.getbetter.ro/exclude": "true"}},
          "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}}]}
        """

    @Test("an epok.getbetter.ro/ key in metadata or in the labels is named, read from YAML and from JSON, and the Service has a MisplacedAnnotation problem", arguments: [slipYAML, slipJSON])
    func misplaced(_ text: String) throws {
        let snapshot = try SnapshotFile.decode(text)
        let web = try #require(snapshot.services.first)
        #expect(web.metadata.misplacedKeys?.sorted() == ["metadata.epok.getbetter.ro/externalports", "metadata.labels.epok.getbetter.ro/exclude"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: snapshot.services, nodes: [node("n1", addresses: ["10.0.0.1"])]), options: options)
        let problems = state.problems.filter { $0.reason == .misplacedAnnotation }
        #expect(problems.count == 2)
        #expect(problems.contains { $0.message.contains("metadata.epok.getbetter.ro/externalports is not read: epokd reads its keys only under metadata.annotations") })
        #expect(problems.allSatisfy { !$0.isAdvisory })
    }

    @Test("keys where they belong are no slip")
    func inPlace() throws {
        let text = Self.slipYAML.replacingOccurrences(of: "    annotations:\n    epok", with: "    annotations:\n      epok")
            .replacingOccurrences(of: "      epok.getbetter.ro/exclude: \"true\"", with: "      app: web")
        let web = try #require(try SnapshotFile.decode(text).services.first)
        #expect(web.metadata.misplacedKeys == nil)
        #expect(web.metadata.annotation(EpokAnnotation.externalPorts) == "22:30022")
    }

    @Test("internal: \"false\" keeps Epok's meaning (internal) and says so, as advice")
    func internalFalse() throws {
        let nodes = [node("n1", addresses: ["10.0.0.1"])]
        for value in ["false", "No", "0"] {
            let web = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.internal: value])
            let state = DesiredState(snapshot: ClusterSnapshot(services: [web], nodes: nodes), options: options)
            let advice = try #require(state.problems.first { $0.reason == .ambiguousAnnotation }, "\(value)")
            #expect(advice.isAdvisory && advice.message.contains("the key itself makes the Service internal"))
            #expect(state.ports.allSatisfy { $0.mapping.internalOnly }, "\(value): still internal, as in Epok")
        }
        let plain = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.internal: "true"])
        #expect(DesiredState(snapshot: ClusterSnapshot(services: [plain], nodes: nodes), options: options).problems.isEmpty)
    }
}
