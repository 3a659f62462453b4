import Control
import Dataplane
import FakeKube
import Foundation
import NetnsLab
import Testing

@Suite("The README's router-host steps, followed against the fake API server")
struct RouterHostTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// The shell block of the README that follows `marker`.
    static func block(after marker: String) throws -> String {
        let readme = try String(contentsOfFile: repository + "/README.md", encoding: .utf8)
        let start = try #require(readme.range(of: marker), "the README has no \(marker)")
        let rest = readme[start.upperBound...]
        let open = try #require(rest.range(of: "```sh\n"))
        let close = try #require(rest[open.upperBound...].range(of: "\n```"))
        return String(rest[open.upperBound..<close.lowerBound])
    }

    /// `deploy/epokd.service`'s `key=value` lines of `[Service]`, in order (a key may come more than once).
    static func unit() throws -> [(key: String, value: String)] {
        try String(contentsOfFile: repository + "/deploy/epokd.service", encoding: .utf8).split(separator: "\n")
            .filter { !$0.hasPrefix("#") && $0.contains("=") }
            .map { line in
                let parts = line.split(separator: "=", maxSplits: 1)
                return (String(parts[0]), String(parts[1]))
            }
    }

    @Test("cluster side: rbac.yaml and a kubeconfig from the ServiceAccount's token; router side: the unit's environment and command line, with the kubeconfig handed over as its credential: traffic flows")
    func routerHost() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [])
        let api = try FakeAPIServer()
        defer { api.stop() }
        let scratch = try ScratchDirectory("router")
        // The fake serves no OpenAPI schema, which kubectl apply validates against: the one thing added to the steps.
        let bin = scratch.path + "/bin"
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
        try scratch.write("bin/kubectl", "#!/bin/sh\nif [ \"$1\" = apply ]; then shift; exec /usr/bin/kubectl apply --validate=false \"$@\"; fi\nexec /usr/bin/kubectl \"$@\"\n")
        chmod(bin + "/kubectl", 0o755)
        try FileManager.default.createSymbolicLink(atPath: scratch.path + "/deploy", withDestinationPath: Self.repository + "/deploy")

        // Cluster side, as an administrator would run it (the fake's own kubeconfig).
        let clusterSide = try Self.block(after: "<!-- router-host steps: cluster side")
        let ran = try run(["-C", scratch.path, "PATH=\(bin):/usr/bin:/bin", "KUBECONFIG=\(api.kubeconfig)", "HOME=\(scratch.path)",
                           "bash", "-euo", "pipefail", "-c", clusterSide], check: false)
        #expect(ran.status == 0, "\(ran.error)")
        let kubeconfig = try String(contentsOfFile: scratch.path + "/epokd.kubeconfig", encoding: .utf8)
        #expect(kubeconfig.contains("token: fake-sa-") && kubeconfig.contains("certificate-authority-data:")
                && !kubeconfig.contains("tokenFile"), "a kubeconfig of its own, the ServiceAccount's token and the CA inside:\n\(kubeconfig)")

        // Router side: /etc/default/epokd as the README writes it, the unit's environment, the kubeconfig as its
        // credential (%d), its command line, in the router's namespace.
        let routerSide = try Self.block(after: "<!-- router-host steps: router side")
        let printf = try #require(routerSide.split(separator: "\n").first { $0.hasPrefix("printf ") && $0.hasSuffix("> /etc/default/epokd") })
        let defaults = scratch.path + "/default-epokd"
        _ = try run(["bash", "-c", printf.replacingOccurrences(of: "/etc/default/epokd", with: defaults)])
        let credentials = scratch.path + "/credentials"
        try FileManager.default.createDirectory(atPath: credentials, withIntermediateDirectories: true)
        let unit = try Self.unit()
        var environment: [String: String] = [:]
        var command: [String] = []
        for (key, value) in unit {
            switch key {
            case "Environment":
                let pair = value.split(separator: "=", maxSplits: 1).map(String.init)
                environment[pair[0]] = pair[1].replacingOccurrences(of: "%d", with: credentials)
            case "LoadCredential":
                let (name, source) = (String(value.split(separator: ":")[0]), String(value.split(separator: ":")[1]))
                #expect(source == "/etc/epokd/kubeconfig" && routerSide.contains("install -D -m 0600 epokd.kubeconfig \(source)"))
                try FileManager.default.copyItem(atPath: scratch.path + "/epokd.kubeconfig", toPath: credentials + "/" + name)
            case "EnvironmentFile":
                #expect(value == "-/etc/default/epokd")
                for line in try String(contentsOfFile: defaults, encoding: .utf8).split(separator: "\n") {
                    let pair = line.split(separator: "=", maxSplits: 1).map(String.init)
                    environment[pair[0]] = pair[1]
                }
            case "ExecStart":
                command = value.split(separator: " ").map(String.init)
            default: continue
            }
        }
        #expect(environment["EPOK_KUBECONFIG"] == credentials + "/kubeconfig" && environment["EPOK_INTERFACES"] == "eth0,wg0")
        #expect(command == ["/usr/local/bin/epokd"] && routerSide.contains("install -m 0755 .build/epokd \(command[0])"))

        try api.apply(makeService("ssh", annotation: "22:30022"), kind: "services")
        for n in 1...3 { try api.apply(makeNode("n\(n)", address: ForwardingLab.node4(n)), kind: "nodes") }
        let log = scratch.path + "/epokd.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        // The router is the lab's host namespace; the fake API server listens on the test's loopback, so epokd runs
        // here and programs that namespace (EPOK_NETNS, as /etc/default/epokd would say for a router container).
        environment["EPOK_NETNS"] = lab.host.path
        daemon.arguments = ["-i", "PATH=/usr/bin:/bin"] + environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            + [epokdBinary] + command.dropFirst()
        daemon.standardOutput = FileHandle(forWritingAtPath: log)
        daemon.standardError = daemon.standardOutput
        try daemon.run()
        defer { if daemon.isRunning { kill(daemon.processIdentifier, SIGKILL) } }
        let output = { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        do {
            try waitUntil("ssh forwarded", seconds: 30) {
                try tcpProbe(from: lab.external, to: ForwardingLab.hostExternal4, port: 22, timeout: 0.5).description.hasSuffix(":30022")
            }
        } catch {
            Issue.record("\(error); epokd (\(daemon.isRunning ? "running" : "exited \(daemon.terminationStatus)"), \(daemon.arguments!)) said:\n\(output())")
            return
        }
        #expect(!output().contains("401") && !output().contains("Unauthorized"), "\(output())")
        let status = try run([epokdBinary, "status", "--netns", lab.host.path]).output
        #expect(status.contains("default/ssh"), "\(status)")
        daemon.terminate()
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0, "SIGTERM stops it cleanly: \(output())")
    }
}
