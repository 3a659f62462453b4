import Dataplane
import Foundation
import NetnsLab

/// What each base chain and each rule of epokd's skeleton costs new UDP flows forwarded to the last of `n`
/// mappings, in the packet-path namespaces: the rate with one chain (its hook with it) or one rule of a
/// prerouting, forward or postrouting chain deleted, against the whole table measured right after it is restored
/// (in one transaction), so that the machine's drift cancels. Two measurements of the whole table give the noise a
/// figure must exceed to mean anything. A rule without which nothing arrives is one the flow needs (rate 0).
func ruleCostRows(flood: String, n: Int) throws -> [Row] {
    let path = try PacketPath()
    let state = ForwardingState(interfaces: ["r0"], nodes: [NodeAddress(node: "server", ipv4: IPv4Address(10, 10, 2, 2))],
                                mappings: (0..<n).map { Mapping(proto: .udp, hostPort: Dataplane.Port(1024 + $0)!, nodePort: Dataplane.Port(20_000 + $0 % 10_000)!) })
    let elements = ForwardingRuleset.elements(for: state)
    let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(for: elements), nftables: try Nftables(namespacePath: path.router.path))
    try firewall.synchronize(elements)
    let measure = { () throws -> Double in
        (try? path.flowsPerSecond(flood: flood, port: 1024 + n - 1, expecting: 20_000 + (n - 1) % 10_000).median) ?? 0
    }
    let name = "new UDP flows/s to the last of N mappings, without (higher: it costs)"
    var rows = [Row(name: name + ": nothing (noise)", n: n, epokd: try measure() / 1000, baselineName: "the whole table", baseline: try measure() / 1000, unit: "k/s")]
    /// Applies `change` (nft JSON commands), measures, restores the table and measures it whole.
    func without(_ what: String, _ change: String) throws {
        try path.router.exec(["nft", "-j", "-f", "-"], input: #"{"nftables": [\#(change)]}"#)
        let rate = try measure()
        try firewall.synchronize(elements)
        rows.append(Row(name: "\(name): \(what)", n: n, epokd: rate / 1000, baselineName: "the whole table", baseline: try measure() / 1000, unit: "k/s"))
    }
    let chains = firewall.skeleton.chains.filter { [.prerouting, .forward, .postrouting].contains($0.hook) }
    for chain in chains {
        let id = #""family": "inet", "table": "epok", "name": "\#(chain.name)""#
        try without("chain \(chain.name) (\(chain.rules.count) rules)", #"{"flush": {"chain": {\#(id)}}}, {"delete": {"chain": {\#(id)}}}"#)
    }
    for chain in chains {
        for (index, rule) in chain.rules.enumerated() {
            // Handles are read afresh (the restore before made the chain anew), through nft's JSON.
            let listing = try path.router.exec(["nft", "-j", "list", "table", "inet", "epok"]).output
            let objects = (try JSONSerialization.jsonObject(with: Data(listing.utf8)) as? [String: Any])?["nftables"] as? [[String: Any]] ?? []
            let handles = objects.compactMap { $0["rule"] as? [String: Any] }.filter { $0["chain"] as? String == chain.name }.compactMap { $0["handle"] as? Int }
            guard handles.count == chain.rules.count else { throw LabError.commandFailed("nft -j list table inet epok (chain \(chain.name))", 0, listing) }
            try without("\(chain.name): \(rule.comment)",
                        #"{"delete": {"rule": {"family": "inet", "table": "epok", "chain": "\#(chain.name)", "handle": \#(handles[index])}}}"#)
        }
    }
    return rows
}
