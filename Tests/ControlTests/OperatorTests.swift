import Control
import Dataplane
import Foundation
import NetnsLab
import Testing

@Suite("What an operator sees")
struct OperatorTests {
    @Test("epokd --help shows the usage people type, the example, required options and defaults")
    func help() throws {
        let help = try run([epokdBinary, "--help"]).output
        #expect(help.contains("epokd --interfaces eth0,wg0 --external-interface eth0"))
        #expect(help.contains("USAGE: epokd --interfaces <ifaces>"))
        #expect(help.contains("(required)"))
        #expect(help.contains("(default: epok)") && help.contains("(default: 127.0.0.1:9877)") && help.contains("(default: 60)"))
        #expect(!help.contains("  local ") && !help.contains("  ssh "), "Epok's executor words are accepted but not listed")
        let plan = try run([epokdBinary, "plan", "--help"]).output
        #expect(plan.contains("USAGE: epokd plan --source <file>"), "--source is required for plan")
        #expect(plan.contains("Read the network namespace"), "plan only reads")
        #expect(try run([epokdBinary, "status", "--help"]).output.contains("USAGE: epokd status"))
        let typo = try run([epokdBinary, "statsu"], check: false)
        #expect(typo.status != 0 && typo.error.contains("unexpected argument 'statsu' (subcommands: status, plan)"))
    }

    @Test("status --json on a host without the table prints JSON with an empty list and the reason")
    func statusJSONWithoutTable() throws {
        let ns = try NetworkNamespace("status")
        let result = try run([epokdBinary, "status", "--json", "--netns", ns.path], check: false)
        #expect(result.status == 3)
        struct Report: Decodable { var mappings: [String]; var reason: String? }
        let report = try JSONDecoder().decode(Report.self, from: Data(result.output.utf8))
        #expect(report.mappings.isEmpty && report.reason?.contains("does not exist") == true)
    }

    @Test("interface names: too long is an error, a missing one and an external one not forwarded from are explained")
    func interfaces() throws {
        let long = try run([epokdBinary, "--interfaces", "eth0", "--external-interface", "averyveryverylongname", "--dry-run", "--source", "x"], check: false)
        #expect(long.status != 0 && long.error.contains("at most 15 characters"))
        let ns = try NetworkNamespace("ifaces")
        let scratch = try ScratchDirectory("if")
        let dir = scratch.path
        try scratch.write("empty.json", ScratchDirectory.emptyList)
        let result = try ns.exec([epokdBinary, "--interfaces", "lo,wg7", "--external-interface", "eth9", "--once", "--metrics-address", "off",
                                  "--source", dir + "/empty.json"], check: false)
        #expect(result.status == 0, "\(result.error)")
        #expect(result.error.contains("interface wg7 does not exist (yet)"))
        #expect(result.error.contains("--external-interface eth9 is not one of --interfaces lo,wg7"))
        // With --netns, the names are looked for in that namespace (lo is there; wg7 is not, nor in epokd's own).
        let elsewhere = try run([epokdBinary, "--interfaces", "lo,wg7", "--netns", ns.path, "--once", "--metrics-address", "off",
                                 "--source", dir + "/empty.json"], check: false)
        #expect(elsewhere.status == 0, "\(elsewhere.error)")
        #expect(elsewhere.error.contains("interface wg7 does not exist in \(ns.path) (yet)"), "\(elsewhere.error)")
        #expect(!elsewhere.error.contains("interface lo does not exist"))
    }

    @Test("--once exits 2 when the rest is committed but an annotation was refused (listed), 0 with --allow-problems; internal: \"false\" is advice")
    func onceExitStatus() throws {
        let ns = try NetworkNamespace("exits")
        let scratch = try ScratchDirectory("exits")
        func file(_ services: [(String, [String: String])]) -> String {
            let items = services.map { name, annotations in
                let pairs = annotations.map { "\"\($0.key)\": \"\($0.value)\"" }.joined(separator: ", ")
                return """
                    {"kind": "Service", "metadata": {"name": "\(name)", "namespace": "default", "annotations": {\(pairs)}},
                     "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30022, "protocol": "TCP"}]}}
                    """
            }
            let node = #"{"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.1"}], "conditions": [{"type": "Ready", "status": "True"}]}}"#
            return "{\"kind\": \"List\", \"items\": [\((items + [node]).joined(separator: ", "))]}"
        }
        let mixed = try scratch.write("mixed.json", file([("web", [EpokAnnotation.externalPorts: "2222:30022"]),
                                                          ("bad", [EpokAnnotation.externalPorts: "70000:30022"])]))
        let base = [epokdBinary, "--interfaces", "lo", "--netns", ns.path, "--once", "--metrics-address", "off", "--source"]
        let refused = try run(base + [mixed], check: false)
        #expect(refused.status == 2, "\(refused.error)")
        #expect(refused.error.contains("everything else is committed, but 1 thing was refused, set aside or left out:\n  - Service default/bad:"), "\(refused.error)")
        #expect(try ns.nftList("inet", "epok").contains("2222"), "web's mapping is in the kernel")
        let allowed = try run(base + [mixed, "--allow-problems"], check: false)
        #expect(allowed.status == 0 && allowed.error.contains("Service default/bad:"), "\(allowed.error)")

        let advice = try scratch.write("internal.json", file([("web", [EpokAnnotation.externalPorts: "2222:30022", EpokAnnotation.internal: "false"])]))
        let internalRun = try run(base + [advice], check: false)
        #expect(internalRun.status == 0, "\(internalRun.error)")
        #expect(internalRun.error.contains("as in Epok the key itself makes the Service internal"), "\(internalRun.error)")
    }

    @Test("--netns: that namespace's forwarding switches are checked and set; --dry-run sets nothing")
    func forwardingInNamespace() throws {
        let ns = try NetworkNamespace("fwd")
        let scratch = try ScratchDirectory("fwd")
        let dir = scratch.path
        try scratch.write("empty.json", ScratchDirectory.emptyList)
        func forwarding() throws -> String { try ns.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).output.trimmingCharacters(in: .whitespacesAndNewlines) }
        let base = [epokdBinary, "--interfaces", "eth0", "--netns", ns.path, "--source", dir + "/empty.json"]
        #expect(try forwarding() == "0")
        let dry = try run(base + ["--dry-run", "--enable-forwarding"])
        #expect(try forwarding() == "0", "--dry-run changed nothing: \(dry.error)")
        let warned = try run(base + ["--once", "--metrics-address", "off"])
        #expect(warned.error.contains("net.ipv4.ip_forward is 0 in \(ns.path)"), "\(warned.error)")
        _ = try run(base + ["--once", "--metrics-address", "off", "--enable-forwarding"])
        #expect(try forwarding() == "1")
        #expect(try ns.exec(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).output.hasPrefix("1"))
    }
}
