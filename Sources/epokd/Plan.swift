import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Shows what running with `--source FILE` would change in the kernel, and changes nothing.
struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan", abstract: "Show what a snapshot file would change in the kernel; touch nothing.",
                                                    usage: "epokd plan --source <file> --interfaces <ifaces> [<options>]")

    @Option(name: .long, help: ArgumentHelp("Services and Nodes (kubectl get services,nodes -A -o yaml).", valueName: "file"))
    var source: String

    @OptionGroup var forwarding: ForwardingArguments

    @Option(name: .long, help: ArgumentHelp("Read the network namespace at this path instead of epokd's own [env: EPOK_NETNS].", valueName: "path"))
    var netns: String?

    func run() throws {
        let namespace = netns ?? Environment.value("EPOK_NETNS")
        let firewall = Firewall(skeleton: try forwarding.skeleton(),
                                nftables: try Nftables(namespacePath: namespace))
        print(try Plan.render(firewall: firewall, options: try forwarding.options(namespace: namespace), source: source))
    }
}

/// Renders a plan for people.
enum Plan {
    /// The desired state of `source` and its diff against what the kernel holds.
    static func render(firewall: Firewall, options: ForwardingOptions, source: String) throws -> String {
        let snapshot = try SnapshotFile.load(source)
        let state = DesiredState(snapshot: snapshot, options: options)
        let elements = ForwardingRuleset.elements(for: state.forwarding)
        firewall.use(ForwardingRuleset.skeleton(table: firewall.skeleton.table.name, ForwardingRuleset.parameters(of: firewall.skeleton), for: elements))
        return render(state: state, nodes: snapshot.nodes, diff: try firewall.plan(elements))
    }

    /// Every feature's part of `state` in words (nodes with their state, ports, LoadBalancer IPs, egress,
    /// bridges, problems), then the kernel's element diff.
    static func render(state: DesiredState, nodes: [Node], diff: ElementDiff?) -> String {
        var lines: [String] = []
        lines.append("nodes (\(state.nodes.count) of \(nodes.count) get traffic):")
        let eligible = Set(state.nodes.map(\.node)), draining = Set(state.forwarding.draining.map(\.node))
        for node in nodes.sorted(by: { $0.metadata.name < $1.metadata.name }) {
            let name = Escaped.text(node.metadata.name, limit: 253)
            let address = (state.nodes + state.forwarding.draining).first { $0.node == node.metadata.name }
                .map { " " + [$0.ipv4?.description, $0.ipv6?.description].compactMap { $0 }.joined(separator: ",") } ?? ""
            lines.append("  \(name)\(address): " + nodeState(node, eligible: eligible, draining: draining))
        }
        lines.append("ports (\(state.ports.count)):")
        for p in state.ports {
            var notes: [String] = []
            if p.mapping.internalOnly { notes.append("internal") }
            if let allowed = p.mapping.allowedSources { notes.append("allow " + allowed.map(\.description).joined(separator: ",")) }
            if let limit = p.mapping.limit { notes.append("limit \(limit)") }
            if let group = p.mapping.group {
                notes.append("own nodes " + (group.nodes.isEmpty ? "none" : group.nodes.map(\.node).joined(separator: ","))
                             + (group.down.isEmpty ? "" : ", down " + group.down.map(\.node).joined(separator: ",")))
            }
            lines.append("  \(p.mapping.hostPort)/\(p.mapping.proto) -> node port \(p.mapping.nodePort)  \(p.service)" + (notes.isEmpty ? "" : "  [\(notes.joined(separator: "; "))]"))
        }
        if !state.loadBalancers.isEmpty {
            lines.append("LoadBalancer IPs admitted (\(state.loadBalancers.count)):")
            for e in state.loadBalancers {
                var notes: [String] = []
                if let allowed = e.allowedSources { notes.append("allow " + allowed.map(\.description).joined(separator: ",")) }
                if let limit = e.limit { notes.append("limit \(limit)") }
                if let limit = e.perSourceLimit { notes.append("per source \(limit)") }
                let address = e.address.isV4 ? "\(e.address)" : "[\(e.address)]"
                lines.append("  \(address):\(e.port)/\(e.proto)  \(e.label ?? "")" + (notes.isEmpty ? "" : "  [\(notes.joined(separator: "; "))]"))
            }
        }
        let f = state.forwarding
        if !f.egress.isEmpty {
            lines.append("egress (\(f.egress.count)):")
            for rule in f.egress {
                lines.append("  pod \(rule.source) to \(rule.destinations.map(\.description).joined(separator: ",")) leaves as \(rule.egress)  \(rule.label ?? "")")
            }
        }
        if !f.bridgeEntrances.isEmpty || !f.bridgeExits.isEmpty {
            lines.append("bridges (\(f.bridgeEntrances.count) entrances, \(f.bridgeExits.count) exits):")
            for e in f.bridgeEntrances {
                lines.append("  \(e.client) -> \(e.address):\(e.port)/\(e.proto) goes to \(e.endpoints.map(\.description).joined(separator: ",")) port \(e.endpointPort)  \(e.label ?? "")")
            }
            for e in f.bridgeExits {
                lines.append("  pod \(e.pod) -> \(e.server):\(e.port)/\(e.proto) leaves as \(e.source)  \(e.label ?? "")")
            }
        }
        for problem in state.problems { lines.append("\(problem.isAdvisory ? "advice" : "rejected"): \(problem)") }
        guard let diff else {
            lines.append("kernel: table absent or of another version: it would be created whole, in one transaction")
            return lines.joined(separator: "\n")
        }
        lines.append("kernel: +\(diff.addedCount) -\(diff.deletedCount) elements")
        for (set, elements) in diff.deleted.sorted(by: { $0.key < $1.key }) {
            for e in elements.map(\.description).sorted() { lines.append("  - \(set): \(e)") }
        }
        for (set, elements) in diff.added.sorted(by: { $0.key < $1.key }) {
            for e in elements.map(\.description).sorted() { lines.append("  + \(set): \(e)") }
        }
        return lines.joined(separator: "\n")
    }

    /// A node's state in words: why it gets no traffic, when it gets none.
    static func nodeState(_ node: Node, eligible: Set<String>, draining: Set<String>) -> String {
        if eligible.contains(node.metadata.name) { return "ready" }
        if draining.contains(node.metadata.name) { return "draining (\(EpokAnnotation.drain)): no new connections, open flows kept" }
        guard node.isReady else {
            let ready = node.status?.conditions?.first { $0.type == "Ready" }
            return "left out: NotReady" + (ready.map { " (Ready is \(Escaped.text($0.status, limit: 20)))" } ?? " (no Ready condition)")
        }
        if node.metadata.annotation(EpokAnnotation.exclude) != nil { return "left out: excluded (\(EpokAnnotation.exclude))" }
        if node.metadata.labels?[EpokAnnotation.excludeLabel] != nil { return "left out: excluded (label \(EpokAnnotation.excludeLabel))" }
        return "left out: no usable InternalIP (see the problems below)"
    }
}
