import Control
import Dataplane

func service(_ name: String, namespace: String = "default", created: String = "2024-01-01T00:00:00Z",
             annotations: StringMap, nodePorts: [(Int, String)] = [(30022, "TCP")],
             type: String = "NodePort", sourceRanges: [String]? = nil) -> Service {
    Service(
        metadata: ObjectMeta(name: name, namespace: namespace, uid: "uid-\(namespace)-\(name)", creationTimestamp: created,
                             annotations: annotations),
        spec: Service.Spec(type: type,
                           ports: nodePorts.enumerated().map { Service.Port(name: "p\($0.offset)", protocol: $0.element.1, port: 1000 + $0.offset, nodePort: $0.element.0) },
                           loadBalancerSourceRanges: sourceRanges))
}

func node(_ name: String, ready: Bool = true, addresses: [String], annotations: StringMap? = nil,
          labels: StringMap? = nil) -> Node {
    Node(metadata: ObjectMeta(name: name, annotations: annotations, labels: labels),
         status: Node.Status(addresses: addresses.map { Node.Address(type: "InternalIP", address: $0) } + [Node.Address(type: "Hostname", address: name)],
                             conditions: [Node.Condition(type: "Ready", status: ready ? "True" : "False")]))
}

let options = ForwardingOptions(interfaces: ["eth0", "wg0"], externalInterface: "eth0")

extension Port {
    static func p(_ v: Int) -> Port { Port(v)! }
}

/// A `type: LoadBalancer` Service whose `status.loadBalancer.ingress` holds `ips`, with `ports` as (port, protocol).
func loadBalancer(_ name: String, ips: [String], ports: [(Int, String)], annotations: StringMap = [:],
                  sourceRanges: [String]? = nil, created: String = "2024-01-01T00:00:00Z") -> Service {
    Service(
        metadata: ObjectMeta(name: name, namespace: "default", uid: "uid-lb-\(name)", creationTimestamp: created, annotations: annotations),
        spec: Service.Spec(type: "LoadBalancer",
                           ports: ports.enumerated().map { Service.Port(name: "p\($0.offset)", protocol: $0.element.1, port: $0.element.0,
                                                                          nodePort: 31000 + $0.offset) },
                           loadBalancerSourceRanges: sourceRanges),
        status: Service.Status(loadBalancer: .init(ingress: ips.map { .init(ip: $0, hostname: nil) })))
}
