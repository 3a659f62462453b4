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
        let trace = try run([epokdBinary, "trace", "--help"]).output
        #expect(trace.contains("USAGE: epokd trace [--netns <path>]") && trace.contains("--count <n>") && trace.contains("--json"))
        #expect(help.contains("epokd trace [--proto tcp|udp]"), "the daemon's help names the trace")
        let typo = try run([epokdBinary, "statsu"], check: false)
        #expect(typo.status != 0 && typo.error.contains("unexpected argument 'statsu' (subcommands: status, plan, trace)"))
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
        let spread = try run([epokdBinary, "--interfaces", "eth0", "--spread", "random", "--dry-run", "--source", "x"], check: false)
        #expect(spread.status != 0 && spread.error.contains("--spread: \"random\" is not round-robin or hash"), "\(spread.error)")
        let seed = try run([epokdBinary, "--interfaces", "eth0", "--hash-seed", "7", "--dry-run", "--source", "x"], check: false)
        #expect(seed.status != 0 && seed.error.contains("--hash-seed goes with --spread hash"), "\(seed.error)")
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

    @Test("plan shows every feature in words: nodes with their state and reason, ports, LoadBalancer IPs, allow-ranges as prefixes, egress and bridges")
    func planInWords() throws {
        let ns = try NetworkNamespace("plan")
        let scratch = try ScratchDirectory("plan")
        let file = try scratch.write("cluster.yaml", """
            kind: Node
            metadata: {name: n1}
            status: {addresses: [{type: InternalIP, address: 10.0.1.1}], conditions: [{type: Ready, status: "True"}]}
            ---
            kind: Node
            metadata: {name: pi-b}
            status: {addresses: [{type: InternalIP, address: 10.0.1.2}], conditions: [{type: Ready, status: "False"}]}
            ---
            kind: Node
            metadata: {name: n3, labels: {epok_exclude: "true"}}
            status: {addresses: [{type: InternalIP, address: 10.0.1.3}], conditions: [{type: Ready, status: "True"}]}
            ---
            kind: Node
            metadata: {name: n4, annotations: {epok.getbetter.ro/drain: "true"}}
            status: {addresses: [{type: InternalIP, address: 10.0.1.4}], conditions: [{type: Ready, status: "True"}]}
            ---
            kind: Service
            metadata:
              name: mc
              namespace: games
              annotations: {epok.getbetter.ro/externalports: "25565:30565", epok.getbetter.ro/allow-range: "198.51.100.0/24,198.51.101.0/24"}
            spec: {type: NodePort, ports: [{port: 25565, nodePort: 30565, protocol: TCP}]}
            ---
            kind: Service
            metadata: {name: web, namespace: default, annotations: {epok.getbetter.ro/ratelimit: "100/second"}}
            spec: {type: LoadBalancer, loadBalancerSourceRanges: [203.0.113.0/25, 203.0.113.128/25], ports: [{port: 443, nodePort: 31443, protocol: TCP}]}
            status: {loadBalancer: {ingress: [{ip: 192.0.2.10}]}}
            ---
            kind: Service
            metadata:
              name: backend
              namespace: default
              annotations: {epok.getbetter.ro/egress-ip: 198.51.100.11, epok.getbetter.ro/egress-destinations: 0.0.0.0/0}
            spec: {type: ClusterIP, ports: [{name: web, port: 80, protocol: TCP}]}
            ---
            kind: EndpointSlice
            apiVersion: discovery.k8s.io/v1
            metadata: {name: backend-x, namespace: default, labels: {kubernetes.io/service-name: backend}}
            addressType: IPv4
            endpoints: [{addresses: [10.42.0.5], conditions: {ready: true}, nodeName: n1}]
            ports: [{name: web, port: 8080, protocol: TCP}]
            ---
            apiVersion: submariner.io/v1alpha1
            kind: ExternalService
            metadata: {name: db, namespace: default}
            spec:
              targetIP: 192.168.122.139
              sources: [{service: {namespace: default, name: backend}, sourceIP: 192.168.122.200}]
              ports: [{protocol: TCP, port: 5432, targetPort: 5432}]
            """)
        let base = ["--interfaces", "eth0", "--firewall-interface", "eth0", "--netns", ns.path, "--source", file]
        let plan = try run([epokdBinary, "plan"] + base).output
        for line in ["nodes (1 of 4 get traffic):", "  n1 10.0.1.1: ready", "  pi-b: left out: NotReady (Ready is False)",
                     "  n3: left out: excluded (label epok_exclude)", "  n4 10.0.1.4: draining (epok.getbetter.ro/drain)",
                     "  25565/tcp -> node port 30565  games/mc  [allow 198.51.100.0/24,198.51.101.0/24]",
                     "LoadBalancer IPs admitted (1):", "  192.0.2.10:443/tcp  default/web  [allow 203.0.113.0/25,203.0.113.128/25; limit 100/second burst 5 packets]",
                     "egress (1):", "  pod 10.42.0.5 to 0.0.0.0/0 leaves as 198.51.100.11",
                     "bridges (1 entrances, 1 exits):", "  pod 10.42.0.5 -> 192.168.122.139:5432/tcp leaves as 192.168.122.200",
                     "kernel: table absent or of another version: it would be created whole, in one transaction"] {
            #expect(plan.contains(line), "missing \(line.debugDescription) in:\n\(plan)")
        }
        #expect(plan.contains("  192.168.122.139 -> 192.168.122.200:80/tcp goes to 10.42.0.5 port 8080  ExternalService default/db"), "\(plan)")
        // The kernel's diff prints allow-ranges as prefixes too, once a table is there (198.51.100.0/24 and
        // 198.51.101.0/24 are one /23 there).
        _ = try run([epokdBinary, "--once", "--metrics-address", "off"] + base, check: false)
        try scratch.write("cluster.yaml", try String(contentsOfFile: file, encoding: .utf8).replacingOccurrences(of: "198.51.101.0/24", with: "198.51.102.0/23"))
        let diff = try run([epokdBinary, "plan"] + base).output
        #expect(diff.contains("  - allow4: tcp . 25565 . 198.51.100.0/23") && diff.contains("  + allow4: tcp . 25565 . 198.51.102.0/23"), "\(diff)")
    }

    @Test("an address epokd added in an earlier run (--manage-addresses) is not the host's own: a node on it stays a backend; the host's own address is refused")
    func markedAddressIsNotTheHosts() throws {
        let ns = try NetworkNamespace("marked")
        try ns.exec(["ip", "link", "set", "lo", "up"])
        let scratch = try ScratchDirectory("marked")
        let file = try scratch.write("cluster.json", """
            {"kind": "List", "items": [
              {"kind": "Service", "metadata": {"name": "ssh", "namespace": "default", "annotations": {"epok.getbetter.ro/externalports": "22:30022"}},
               "spec": {"type": "NodePort", "ports": [{"port": 22, "nodePort": 30022, "protocol": "TCP"}]}},
              {"kind": "Node", "metadata": {"name": "n2"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.70.2.2"}],
               "conditions": [{"type": "Ready", "status": "True"}]}}]}
            """)
        let epokd = [epokdBinary, "--interfaces", "lo", "--netns", ns.path, "--once", "--metrics-address", "off", "--source", file]
        // What an earlier run with --manage-addresses lo left (a tenant's egress IP on a node's address, say).
        try ManagedAddresses(interface: "lo", namespacePath: ns.path).reconcile(needed: [IPAddress("10.70.2.2")!])
        let marked = try run(epokd, check: false)
        #expect(marked.status == 0 && !marked.error.contains("an address of this host"), "\(marked.error)")
        #expect(try ns.nftList("inet", "epok").contains("10.70.2.2"), "n2 is a backend")
        // The same address as the host's own (no mark): never a backend.
        try ns.exec(["ip", "addr", "flush", "dev", "lo"])
        try ns.exec(["ip", "addr", "add", "10.70.2.2/32", "dev", "lo"])
        let own = try run(epokd, check: false)
        #expect(own.status == 2 && own.error.contains("InternalIP 10.70.2.2 is an address of this host"), "\(own.error)")
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
