import Control
import FakeKube
import Foundation
import NetnsLab
import Testing

/// Real kubectl, written by the Kubernetes project, is the check that the fake speaks the real protocol.
@Suite("kubectl against the fake API server")
struct KubectlTests {
    @Test("kubectl apply, annotate, get -w and delete node work, and the informers see each change")
    func kubectlDrivesTheFake() throws {
        let api = try FakeAPIServer()
        let kubectl = ["kubectl", "--kubeconfig", api.kubeconfig]
        let services = RunningInformer<Service>(api.tokenConnection)
        let nodes = RunningInformer<Node>(api.tokenConnection)
        try waitUntil("both lists") { services.informer.hasSynced && nodes.informer.hasSynced }

        let manifest = api.directory + "/web.yaml"
        try """
        apiVersion: v1
        kind: Service
        metadata:
          name: web
          namespace: default
          annotations: {epok.getbetter.ro/externalports: "80:30080"}
        spec:
          type: NodePort
          ports: [{port: 80, protocol: TCP, nodePort: 30080}]
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n1}
        status:
          addresses: [{type: InternalIP, address: 10.0.1.1}]
          conditions: [{type: Ready, status: "True"}]
        """.write(toFile: manifest, atomically: true, encoding: .utf8)
        let applied = try run(kubectl + ["apply", "--validate=false", "-f", manifest])
        #expect(applied.output.contains("service/web created") && applied.output.contains("node/n1 created"))
        try waitUntil("the applied objects") { services.names() == ["web"] && nodes.names() == ["n1"] }

        let watcher = Process()
        watcher.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        watcher.arguments = kubectl + ["get", "services", "-A", "-w", "-o", "name"]
        let watchOutput = Pipe()
        watcher.standardOutput = watchOutput
        watcher.standardError = FileHandle.nullDevice
        let seen = Deliveries<String>()
        watchOutput.fileHandleForReading.readabilityHandler = { seen.append(String(decoding: $0.availableData, as: UTF8.self)) }
        try watcher.run()
        defer { kill(watcher.processIdentifier, SIGKILL) }
        try waitUntil("kubectl's watch to list web") { seen.all.joined().contains("service/web") }

        try run(kubectl + ["annotate", "service", "web", "epok.getbetter.ro/internal=yes"])
        try waitUntil("the annotation through the informer") {
            services.informer.cache.first?.metadata.annotations?[EpokAnnotation.internal] == "yes"
        }
        try waitUntil("kubectl's watch to print the change") { seen.all.joined().components(separatedBy: "service/web").count >= 3 }

        let listed = try run(kubectl + ["get", "services", "-A", "-o", "jsonpath={.items[*].metadata.name}"])
        #expect(listed.output == "web")
        let deleted = try run(kubectl + ["delete", "node", "n1"])
        #expect(deleted.output.contains("node \"n1\" deleted"))
        try waitUntil("the node deletion through the informer") { nodes.names().isEmpty }
    }
}
