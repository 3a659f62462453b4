import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Prints what the kernel forwards, read from the table over netlink.
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the active mappings, read from the kernel.")

    @Option(name: .long, help: "nftables table (family inet) [env: EPOK_TABLE].")
    var table: String?

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    @Option(name: .long, help: ArgumentHelp("Read the network namespace at this path instead of epokd's own [env: EPOK_NETNS].", valueName: "path"))
    var netns: String?

    func run() throws {
        let skeleton = ForwardingRuleset.skeleton(table: table ?? Environment.value("EPOK_TABLE") ?? "epok")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let kernel = try Nftables(namespacePath: netns ?? Environment.value("EPOK_NETNS")).read(skeleton) else {
            let reason = "table inet \(skeleton.table.name) does not exist: epokd has not run here (or was cleaned up)"
            print(json ? String(decoding: try encoder.encode(StatusReport(table: skeleton.table.name, mappings: [], reason: reason)), as: UTF8.self) : reason)
            throw ExitCode(3)
        }
        let mappings = ActiveMapping.all(in: kernel)
        if json {
            print(String(decoding: try encoder.encode(StatusReport(table: skeleton.table.name, mappings: mappings, reason: nil)), as: UTF8.self))
            return
        }
        if !kernel.isEpokds || !skeleton.sets.allSatisfy({ kernel.sets[$0.name]?.decodable == true }) {
            print("warning: the table does not hold this version's skeleton; epokd will rebuild it on start")
        }
        let header = ["HOST PORT", "PROTO", "SERVICE", "NODE PORT", "NODES", "ACCESS", "PACKETS", "BYTES"]
        let rows = mappings.map { [String($0.hostPort), $0.proto, $0.service ?? "-", String($0.nodePort), $0.nodes.joined(separator: ","),
                                   ($0.internalOnly ? "internal " : "") + ($0.allowedSources.map { "allow " + $0.joined(separator: ",") } ?? "any"),
                                   String($0.packets), String($0.bytes)] }
        let widths = header.indices.map { c in ([header] + rows).map { $0[c].count }.max() ?? 0 }
        for row in [header] + rows {
            print(row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  "))
        }
    }
}

/// What `epokd status --json` prints: the mappings, or none and why.
struct StatusReport: Encodable {
    var table: String
    var mappings: [ActiveMapping]
    var reason: String?
}

/// One mapping as the kernel holds it.
struct ActiveMapping: Encodable {
    var hostPort: UInt16
    var proto: String
    var service: String?
    var nodePort: UInt16
    var nodes: [String]
    var internalOnly: Bool
    var allowedSources: [String]?
    var packets: UInt64
    var bytes: UInt64

    static func all(in kernel: KernelTable) -> [ActiveMapping] {
        let elements = kernel.elements
        let forwarding = ForwardingRuleset.forwarding(from: elements)
        var counters: [PortKey: ElementCounter] = [:]
        for (key, counter) in kernel.sets[PortMapping.Sets.services.name]?.counters ?? [:] {
            guard case .l4proto(let p)? = key.key.first, case .port(let port)? = key.key.last else { continue }
            counters[PortKey(proto: p, port: port)] = counter
        }
        var allowed: [[Field]: [String]] = [:]
        for set in [AccessControl.Sets.allow4.name, AccessControl.Sets.allow6.name] {
            for e in elements[set] ?? [] {
                guard let first = e.key.last, let last = e.keyEnd?.last else { continue }
                allowed[Array(e.key.prefix(2)), default: []].append("\(first)-\(last)")
            }
        }
        return forwarding.mappings.map { m -> ActiveMapping in
            let key: [Field] = [.l4proto(m.proto), .port(m.hostPort)]
            func contains(_ set: String) -> Bool { elements[set]?.contains(Element(key: key)) ?? false }
            let counter = counters[PortKey(m)]
            return ActiveMapping(hostPort: m.hostPort.rawValue, proto: m.proto.description, service: m.label, nodePort: m.nodePort.rawValue,
                                 nodes: forwarding.nodes.map(\.node).sorted(), internalOnly: contains(AccessControl.Sets.internalPorts.name),
                                 allowedSources: contains(AccessControl.Sets.restricted.name) ? (allowed[key] ?? []).sorted() : nil,
                                 packets: counter?.packets ?? 0, bytes: counter?.bytes ?? 0)
        }.sorted { ($0.proto, $0.hostPort) < ($1.proto, $1.hostPort) }
    }
}
