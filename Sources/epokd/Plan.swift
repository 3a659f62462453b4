import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Shows what running with `--source FILE` would change in the kernel, and changes nothing.
struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan", abstract: "Show what a snapshot file would change in the kernel; touch nothing.")

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
        let state = DesiredState(snapshot: try SnapshotFile.load(source), options: options)
        let elements = ForwardingRuleset.elements(for: state.forwarding)
        firewall.use(ForwardingRuleset.skeleton(table: firewall.skeleton.table.name, ForwardingRuleset.parameters(of: firewall.skeleton), for: elements))
        return render(state: state, diff: try firewall.plan(elements))
    }

    static func render(state: DesiredState, diff: ElementDiff?) -> String {
        var lines: [String] = []
        lines.append("ports (\(state.ports.count)) -> nodes: " + (state.nodes.isEmpty ? "none" : state.nodes.map(\.description).joined(separator: ", ")))
        for p in state.ports {
            var notes: [String] = []
            if p.mapping.internalOnly { notes.append("internal") }
            if let allowed = p.mapping.allowedSources { notes.append("allow " + allowed.map(\.description).joined(separator: ",")) }
            lines.append("  \(p.mapping.hostPort)/\(p.mapping.proto) -> node port \(p.mapping.nodePort)  \(p.service)" + (notes.isEmpty ? "" : "  [\(notes.joined(separator: "; "))]"))
        }
        for problem in state.problems { lines.append("rejected: \(problem)") }
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
}
