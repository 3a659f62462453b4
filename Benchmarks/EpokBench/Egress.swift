import Control
import Dataplane
import Foundation
import NetnsLab

// Static source addresses: one endpoint change among N pods in egress rules (event to commit), and new UDP
// flows per second SNATed to an egress address through the whole skeleton, against plain forwarding and
// against one SNAT rule.

/// The address of pod `i` (10.11.0.0 upwards, as the flood generator's sources).
func podAddress(_ i: Int) -> String { "10.11.\(i / 256).\(i % 256)" }

/// A Service's EndpointSlices holding pods `range`, 100 to a slice, as the EndpointSlice controller cuts them.
func podSlices(_ service: String, _ count: Int) -> [EndpointSlice] {
    stride(from: 0, to: count, by: 100).map { start in
        EndpointSlice(metadata: ObjectMeta(name: "\(service)-\(start / 100)", namespace: "bench", labels: [EndpointSlice.serviceNameLabel: service]),
                      endpoints: (start..<min(count, start + 100)).map { .init(addresses: [podAddress($0)], conditions: .init(ready: true)) })
    }
}

func egressRows(runs: Int, sizes: [Int], flood: String?) throws -> [Row] {
    var rows: [Row] = []
    let options = ForwardingOptions(interfaces: ["r0"])
    let app = Service(metadata: ObjectMeta(name: "app", namespace: "bench", creationTimestamp: "2024-01-01T00:00:00Z"),
                      spec: Service.Spec(type: "ClusterIP", ports: [Service.Port(name: "web", port: 80)]))
    func rule(_ cidr: String) -> StaticEgressIP {
        StaticEgressIP(metadata: ObjectMeta(name: "eip", namespace: "bench", creationTimestamp: "2024-01-01T00:00:00Z"),
                       spec: .init(rules: [.init(egressip: "10.10.2.1", serviceName: "app", cidr: cidr)]))
    }
    for n in sizes {
        let slices = podSlices("app", n)
        let snapshot = ClusterSnapshot(services: [app], nodes: nodes(), endpointSlices: slices, staticEgressIPs: [rule("10.10.2.2/32")])
        // One endpoint of one slice replaced by another (a pod rescheduled), as the daemon commits it: to a
        // single destination (a hash map) and to a range (the interval map, whose element removal the kernel
        // pays for in proportion to its size).
        for (cidr, what) in [("10.10.2.2/32", "an address"), ("192.0.2.0/24", "a range")] {
            let ns = try NetworkNamespace("egbench")
            let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(), nftables: try Nftables(namespacePath: ns.path))
            let live = LiveDesiredState(options: options)
            var changed = snapshot
            changed.staticEgressIPs = [rule(cidr)]
            _ = live.replaceAll(changed)
            try firewall.synchronize(live.elements)
            var toggle = false
            let change = try median(runs) {
                toggle.toggle()
                var slice = slices[slices.count / 2]
                slice.endpoints![0].addresses = [toggle ? "10.12.0.1" : podAddress(slices.count / 2 * 100)]
                try firewall.apply(diff: live.upsert(slice))
            }
            rows.append(Row(name: "one endpoint of N in egress rules to \(what) changed, incremental (event to commit)", n: n, epokd: change))
        }

        guard let flood else { continue }
        // Every flood source is one of the N pods, leaving for the server as the router's 10.10.2.1.
        let path = try PacketPath()
        let elements = ForwardingRuleset.elements(for: DesiredState(snapshot: snapshot, options: options).forwarding)
        let routed = try Firewall(skeleton: ForwardingRuleset.skeleton(for: elements), nftables: Nftables(namespacePath: path.router.path))
        try routed.synchronize(elements)
        let epokdRate = try path.flowsPerSecond(flood: flood, to: "10.10.2.2", port: 20000, expecting: 20000, sources: n)
        let snatted = try path.router.exec(["conntrack", "-L", "-p", "udp", "--reply-dst", "10.10.2.1"], check: false).output
        guard snatted.contains("dst=10.10.2.1") else { throw LabError.commandFailed("no flow was SNATed to 10.10.2.1", 1, "") }
        try routed.remove()
        let plainRate = try path.flowsPerSecond(flood: flood, to: "10.10.2.2", port: 20000, expecting: 20000, sources: n)
        rows.append(Row(name: "new UDP flows/s SNATed to an egress address, N pods in egress rules (higher is better)", n: n,
                        epokd: epokdRate.divided(by: 1000), baselineName: "plain forwarding (no NAT, no conntrack)", baseline: plainRate.divided(by: 1000), unit: "k/s"))
        try path.router.exec(["nft", "-f", "-"], input: """
            table ip one {
              chain post {
                type nat hook postrouting priority srcnat;
                ip daddr 10.10.2.2 snat to 10.10.2.1
              }
            }
            """)
        let oneRuleRate = try path.flowsPerSecond(flood: flood, to: "10.10.2.2", port: 20000, expecting: 20000, sources: n)
        try path.router.exec(["nft", "delete", "table", "ip", "one"])
        rows.append(Row(name: "new UDP flows/s SNATed to an egress address, N pods in egress rules (higher is better)", n: n,
                        epokd: epokdRate.divided(by: 1000), baselineName: "one SNAT rule for every source", baseline: oneRuleRate.divided(by: 1000), unit: "k/s"))
    }
    return rows
}
