import Foundation
import Control
import Dataplane
import Testing

@Suite("Desired state from a cluster snapshot")
struct DesiredStateTests {
    let nodes = [
        node("n1", addresses: ["10.0.1.1", "fd00::1"]),
        node("n2", addresses: ["10.0.1.2"]),
        node("n3", addresses: ["fd00::3"]),
    ]

    @Test("an annotated NodePort Service forwards each entry to every eligible node")
    func basicForwarding() {
        let ssh = service("ssh", annotations: [EpokAnnotation.externalPorts: "22:30022, 53:30053:udp"],
                          nodePorts: [(30022, "TCP"), (30053, "UDP")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [ssh], nodes: nodes), options: options)
        #expect(state.problems.isEmpty)
        #expect(state.forwarding.mappings == [
            Mapping(proto: .tcp, hostPort: .p(22), nodePort: .p(30022), label: "default/ssh"),
            Mapping(proto: .udp, hostPort: .p(53), nodePort: .p(30053), label: "default/ssh"),
        ])
        #expect(state.ports.allSatisfy { $0.service == ServiceRef(namespace: "default", name: "ssh") })
        #expect(state.forwarding.interfaces == ["eth0", "wg0"])
        #expect(state.forwarding.externalInterfaces == ["eth0"])
    }

    @Test("dual-stack nodes contribute both addresses; single-stack nodes one")
    func dualStackNodes() {
        let state = DesiredState(snapshot: ClusterSnapshot(nodes: nodes), options: options)
        #expect(state.nodes == [
            NodeAddress(node: "n1", ipv4: IPv4Address(10, 0, 1, 1), ipv6: IPv6Address("fd00::1")),
            NodeAddress(node: "n2", ipv4: IPv4Address(10, 0, 1, 2)),
            NodeAddress(node: "n3", ipv6: IPv6Address("fd00::3")),
        ])
    }

    @Test("NotReady nodes, excluded nodes (annotation or label) and nodes without InternalIP receive nothing")
    func nodeEligibility() {
        let all = nodes + [
            node("down", ready: false, addresses: ["10.0.1.9"]),
            node("ann", addresses: ["10.0.1.10"], annotations: [EpokAnnotation.exclude: ""]),
            node("lab", addresses: ["10.0.1.11"], labels: [EpokAnnotation.excludeLabel: "true"]),
            node("bare", addresses: []),
        ]
        let state = DesiredState(snapshot: ClusterSnapshot(nodes: all), options: options)
        #expect(state.nodes.map(\.node) == ["n1", "n2", "n3"])
        #expect(state.problems.map(\.reason) == [.nodeWithoutAddress])
    }

    @Test("an entry whose node port the Service lacks is rejected alone, with the Service's node ports listed")
    func unknownNodePort() {
        let s = service("web", annotations: [EpokAnnotation.externalPorts: "80:30080,443:30443"],
                        nodePorts: [(30080, "TCP"), (30053, "UDP")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: options)
        #expect(state.forwarding.mappings.map(\.hostPort) == [.p(80)])
        let problem = try! #require(state.problems.first)
        #expect(problem.reason == .unknownNodePort)
        #expect(problem.message.contains("443:30443:tcp"))
        #expect(problem.message.contains("it has 30080/tcp, 30053/udp"))
    }

    @Test("a node port of the wrong protocol does not match")
    func nodePortProtocolMustMatch() {
        let s = service("dns", annotations: [EpokAnnotation.externalPorts: "53:30053:udp"], nodePorts: [(30053, "TCP")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s]), options: options)
        #expect(state.forwarding.mappings.isEmpty)
        #expect(state.problems.first?.reason == .unknownNodePort)
    }

    @Test("a ClusterIP Service is told why it cannot be forwarded")
    func clusterIPService() {
        let s = service("cip", annotations: [EpokAnnotation.externalPorts: "80:30080"], nodePorts: [], type: "ClusterIP")
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s]), options: options)
        #expect(state.problems.first?.message.contains("it has none (type ClusterIP") == true)
    }

    @Test("a malformed annotation gives the Service no ports at all, and other Services keep theirs")
    func malformedAnnotation() {
        let bad = service("bad", annotations: [EpokAnnotation.externalPorts: "22:30022,oops"])
        let good = service("good", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [bad, good], nodes: nodes), options: options)
        #expect(state.ports.map(\.service.name) == ["good"])
        #expect(state.problems.map(\.reason) == [.invalidAnnotation])
        #expect(state.problems.first?.service?.name == "bad")
    }

    @Test("an invalid allow-range fails closed: the Service gets no ports rather than open ones")
    func invalidAllowRangeFailsClosed() {
        let s = service("db", annotations: [EpokAnnotation.externalPorts: "5432:30022", EpokAnnotation.allowRange: "10.0.0.0/8, 10.0.0.0/33"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: options)
        #expect(state.ports.isEmpty)
        #expect(state.problems.first?.reason == .invalidAllowRange)
        #expect(state.problems.first?.message.contains("10.0.0.0/33") == true)
    }

    @Test("allow-range and loadBalancerSourceRanges together admit the union of both, IPv4 and IPv6")
    func allowRangeUnion() {
        let s = service("db", annotations: [EpokAnnotation.externalPorts: "5432:30022", EpokAnnotation.allowRange: "10.0.0.0/8,2001:db8::/32"],
                        sourceRanges: ["192.168.0.0/16", "10.0.0.0/8"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s]), options: options)
        #expect(state.forwarding.mappings.first?.allowedSources?.map(\.description) == ["10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32"])
        let open = service("open", annotations: [EpokAnnotation.externalPorts: "80:30022"])
        #expect(DesiredState(snapshot: ClusterSnapshot(services: [open]), options: options).forwarding.mappings.first?.allowedSources == nil)
    }

    @Test("the internal annotation, with any value, marks every mapping of the Service")
    func internalAnnotation() {
        let s = service("vpn-only", annotations: [EpokAnnotation.externalPorts: "80:30022", EpokAnnotation.internal: ""])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s]), options: options)
        #expect(state.forwarding.mappings.first?.internalOnly == true)
    }

    @Test("two Services claiming one host port: the older keeps it, the other is told why")
    func conflictOlderWins() {
        let older = service("older", namespace: "zzz", created: "2023-05-01T00:00:00Z", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let newer = service("newer", namespace: "aaa", created: "2024-05-01T00:00:00Z", annotations: [EpokAnnotation.externalPorts: "22:30022,23:30022"])
        for services in [[older, newer], [newer, older]] {
            let state = DesiredState(snapshot: ClusterSnapshot(services: services), options: options)
            #expect(state.ports.map { "\($0.service)@\($0.mapping.hostPort)" } == ["zzz/older@22", "aaa/newer@23"])
            #expect(state.problems.map(\.reason) == [.portConflict])
            // Another namespace's Service is named by its kind only.
            let message = state.problems.first?.message ?? ""
            #expect(message.contains("already forwarded for a Service of another namespace") && !message.contains("zzz"), "\(message)")
        }
    }

    @Test("same creation time: namespace/name decides; same port with another protocol is no conflict")
    func conflictTieBreakAndProtocols() {
        let a = service("a", namespace: "ns", annotations: [EpokAnnotation.externalPorts: "53:30022"])
        let b = service("b", namespace: "ns", annotations: [EpokAnnotation.externalPorts: "53:30022, 53:30053:udp"],
                        nodePorts: [(30022, "TCP"), (30053, "UDP")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [b, a]), options: options)
        #expect(state.ports.map { "\($0.service.name)@\($0.mapping.hostPort)/\($0.mapping.proto)" } == ["a@53/tcp", "b@53/udp"])
    }

    @Test("a deleted Service simply leaves the snapshot, and with it every port, malformed or not")
    func deletedService() {
        let s = service("gone", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let before = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: options)
        let after = DesiredState(snapshot: ClusterSnapshot(services: [], nodes: nodes), options: options)
        #expect(!before.forwarding.mappings.isEmpty)
        #expect(after.forwarding.mappings.isEmpty)
        #expect(ForwardingRuleset.elements(for: after.forwarding)["services"] == [])
    }

    @Test("property: the desired state does not depend on the order Services and Nodes arrive in")
    func orderIndependence() {
        var services: [Service] = []
        for i in 0..<60 {
            let port = 20 + i % 25
            services.append(service("s\(i)", namespace: "ns\(i % 3)", created: "2024-01-0\(1 + i % 7)T00:00:00Z",
                                    annotations: [EpokAnnotation.externalPorts: "\(port):30022"]))
        }
        let reference = DesiredState(snapshot: ClusterSnapshot(services: services, nodes: nodes), options: options)
        #expect(reference.ports.count == 25)
        for _ in 0..<50 {
            let shuffled = DesiredState(snapshot: ClusterSnapshot(services: services.shuffled(), nodes: nodes.shuffled()), options: options)
            #expect(shuffled.ports == reference.ports)
            #expect(shuffled.forwarding == reference.forwarding)
            #expect(Set(shuffled.problems) == Set(reference.problems))
        }
    }

    @Test("a snapshot in kubectl's List format decodes Services and Nodes, skipping other kinds")
    func snapshotFile() throws {
        let yaml = """
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: Service
          metadata:
            name: ssh
            namespace: default
            creationTimestamp: "2024-01-01T00:00:00Z"
            annotations:
              epok.getbetter.ro/externalports: "22:30022"
            someFutureField: {a: 1}
          spec:
            type: NodePort
            ports:
            - {port: 22, protocol: TCP, nodePort: 30022, targetPort: 22}
        - apiVersion: v1
          kind: Node
          metadata: {name: n1}
          status:
            addresses: [{type: InternalIP, address: 10.0.1.1}]
            conditions: [{type: Ready, status: "True"}]
        - apiVersion: v1
          kind: ConfigMap
          metadata: {name: x}
        """
        let snapshot = try SnapshotFile.decode(yaml)
        let state = DesiredState(snapshot: snapshot, options: options)
        #expect(state.ports.map(\.mapping) == [Mapping(proto: .tcp, hostPort: .p(22), nodePort: .p(30022), label: "default/ssh")])
        #expect(state.nodes.map(\.node) == ["n1"])
    }

    @Test("a JSON List is read strictly, deep inside items of every kind, and errors name the item")
    func strictJSONList() throws {
        let service = #"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ssh","annotations":{"epok.getbetter.ro/externalports":"22:30022"}},"spec":{"type":"NodePort","ports":[{"protocol":"TCP","port":22,"nodePort":30022}]}}"#
        func list(_ items: String...) -> [UInt8] { Array((#"{"apiVersion":"v1","kind":"List","items":["# + items.joined(separator: ",") + "]}").utf8) }
        let good = try SnapshotFile.decode(list(service, #"{"kind":"ConfigMap","data":{"a":"}]"}}"#))
        #expect(good.services.map(\.metadata.name) == ["ssh"])
        let broken: [(String, [UInt8], String)] = [
            ("a missing value in a Service's spec", list(#"{"kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":}]}}"#), "items[0] (a Service)"),
            ("a missing comma in a ConfigMap's data", list(service, #"{"kind":"ConfigMap","data":{"a":"1" "b":"2"}}"#), "items[1] (a ConfigMap)"),
            ("a bracket of the wrong kind", list(#"{"kind":"Pod","spec":{"containers":[{"name":"x"}}}"#), "malformed"),
            ("a file cut off inside an item", Array(list(service).dropLast(40)), "malformed"),
            ("invalid UTF-8 inside a skipped item", list(#"{"kind":"Pod","metadata":{"name":""#) + [0xff] + Array(#""}}]}"#.utf8), "UTF-8"),
        ]
        for (what, data, said) in broken {
            #expect(throws: (any Error).self, "\(what)") { try SnapshotFile.decode(data) }
            do { _ = try SnapshotFile.decode(data) } catch { #expect("\(error)".contains(said), "\(what): \(error)") }
        }
    }
}
