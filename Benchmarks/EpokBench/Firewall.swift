import Control
import Dataplane
import Foundation
import NetnsLab

// The LoadBalancer firewall's rows: a one-Service change among N LoadBalancer Services, and new UDP flows per
// second routed through the firewall to the last of N LB IPs, against plain routing and against the seed
// operator's layout (arbf-nft-operator: one accept rule per LB IP . port, policy drop).

/// `n` LoadBalancer Services, each with one IP in 10.12.0.0/16 and UDP port 20000.
func loadBalancerServices(_ n: Int) -> [Service] {
    (0..<n).map { i in
        Service(metadata: ObjectMeta(name: "lb-\(i)", namespace: "bench", creationTimestamp: "2024-01-01T00:00:00Z"),
                spec: Service.Spec(type: "LoadBalancer", ports: [Service.Port(protocol: "UDP", port: 20000, nodePort: 30000 + i % 2000)]),
                status: Service.Status(loadBalancer: .init(ingress: [.init(ip: loadBalancerIP(i))])))
    }
}

func loadBalancerIP(_ i: Int) -> String { "10.12.\(i / 256).\(i % 256)" }

/// The least a firewall can do: established flows, then one lookup of LB IP . protocol . port, then drop.
func bareFirewallText(_ n: Int) -> String {
    var s = "table inet bare {\n set lb {\n  type ipv4_addr . inet_proto . inet_service\n  elements = {\n"
    s += (0..<n).map { "   \(loadBalancerIP($0)) . udp . 20000" }.joined(separator: ",\n")
    s += "\n  }\n }\n chain forward {\n  type filter hook forward priority 0; policy drop;\n  ct state established,related accept\n"
    return s + "  iif \"r0\" ip daddr . meta l4proto . th dport @lb accept\n }\n}\n"
}

/// The seed operator's forward chain: one rule per LB IP . port.
func seedFirewallText(_ n: Int) -> String {
    var s = "table inet filter {\n chain forward {\n  type filter hook forward priority 0; policy drop;\n  ct state established,related accept\n"
    for i in 0..<n { s += "  iif \"r0\" ip daddr \(loadBalancerIP(i)) udp dport 20000 accept\n" }
    return s + " }\n}\n"
}

func firewallRows(runs: Int, sizes: [Int], flood: String?) throws -> [Row] {
    var rows: [Row] = []
    let options = ForwardingOptions(interfaces: ["r0"], firewallInterfaces: ["r0"])
    for n in sizes {
        // A change of one LoadBalancer Service (its IP moves), as the daemon makes it: event to commit.
        let ns = try NetworkNamespace("lbbench")
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(counters: false), nftables: try Nftables(namespacePath: ns.path))
        let snapshot = ClusterSnapshot(services: loadBalancerServices(n), nodes: nodes())
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(snapshot)
        try firewall.synchronize(live.elements)
        var toggle = false
        let change = try median(runs) {
            toggle.toggle()
            var s = snapshot.services[n / 2]
            s.status?.loadBalancer?.ingress = [.init(ip: toggle ? "10.13.0.1" : loadBalancerIP(n / 2))]
            try firewall.apply(diff: live.upsert(s))
        }
        rows.append(Row(name: "one LoadBalancer Service changed, incremental (event to commit)", n: n, epokd: change))

        guard let flood else { continue }
        let path = try PacketPath()
        try path.router.exec(["ip", "route", "add", "10.12.0.0/16", "via", "10.10.2.2"])
        let target = loadBalancerIP(n - 1)
        let elements = ForwardingRuleset.elements(for: DesiredState(snapshot: snapshot, options: options).forwarding)
        let routed = try Firewall(skeleton: ForwardingRuleset.skeleton(for: elements), nftables: Nftables(namespacePath: path.router.path))
        try routed.synchronize(elements)
        let epokdRate = try path.flowsPerSecond(flood: flood, to: target, port: 20000, expecting: 20000)
        try routed.remove()
        let plainRate = try path.flowsPerSecond(flood: flood, to: target, port: 20000, expecting: 20000)
        rows.append(Row(name: "new UDP flows/s through the LB firewall to the last of N LB IPs (higher is better)", n: n,
                        epokd: epokdRate.divided(by: 1000), baselineName: "no firewall (plain routing)", baseline: plainRate.divided(by: 1000), unit: "k/s"))
        try path.router.exec(["nft", "-f", "-"], input: bareFirewallText(n))
        let bareRate = try path.flowsPerSecond(flood: flood, to: target, port: 20000, expecting: 20000)
        try path.router.exec(["nft", "delete", "table", "inet", "bare"])
        rows.append(Row(name: "new UDP flows/s through the LB firewall to the last of N LB IPs (higher is better)", n: n,
                        epokd: epokdRate.divided(by: 1000), baselineName: "one rule + bare set, policy drop", baseline: bareRate.divided(by: 1000), unit: "k/s"))
        if n <= 10_000 {
            try path.router.exec(["nft", "-f", "-"], input: seedFirewallText(n))
            let seedRate = try path.flowsPerSecond(flood: flood, to: target, port: 20000, expecting: 20000)
            rows.append(Row(name: "new UDP flows/s through the LB firewall to the last of N LB IPs (higher is better)", n: n,
                            epokd: epokdRate.divided(by: 1000), baselineName: "one accept rule per LB IP . port (seed operator)",
                            baseline: seedRate.divided(by: 1000), unit: "k/s"))
        }
    }
    return rows
}
