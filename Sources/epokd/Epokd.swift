import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging

@main
struct Epokd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epokd",
        abstract: "Forwards a host's ports to Kubernetes NodePort services, programming nftables over netlink.",
        discussion: """
        Every option can also be given as an environment variable (shown as [env: ...]).
        Epok's `local`/`ssh` executor argument and --batch-* options are accepted and ignored:
        epokd always runs on the host and always applies one netlink transaction.
        """)

    @Option(name: [.short, .long], help: "Comma-separated interfaces to forward from [env: EPOK_INTERFACES].")
    var interfaces: String?

    @Option(name: .long, help: "Interface that internal services are unreachable from [env: EPOK_EXTERNAL_INTERFACE].")
    var externalInterface: String?

    @Option(name: .long, help: "Read Services and Nodes from this file (kubectl get services,nodes -A -o yaml) instead of the API; re-read when it changes [env: EPOK_SOURCE].")
    var source: String?

    @Option(name: .long, help: "nftables table (family inet) that epokd owns [env: EPOK_TABLE].")
    var table: String?

    @Flag(name: .long, help: "Apply the desired state once and exit 0 once committed [env: EPOK_ONCE].")
    var once = false

    @Flag(name: .long, help: "Print what would change and exit; touch nothing [env: EPOK_DRY_RUN].")
    var dryRun = false

    @Flag(name: .long, help: "Set net.ipv4.ip_forward and net.ipv6.conf.all.forwarding to 1 at start-up [env: EPOK_ENABLE_FORWARDING].")
    var enableForwarding = false

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical [env: EPOK_LOG_LEVEL].")
    var logLevel: String?

    @Option(name: .long, help: ArgumentHelp("Epok option, ignored.", visibility: .hidden))
    var batchCommands: String?

    @Option(name: .long, help: ArgumentHelp("Epok option, ignored.", visibility: .hidden))
    var batchSize: String?

    @Argument(help: ArgumentHelp("Epok's executor (local or ssh), ignored.", visibility: .hidden))
    var executor: String?

    private static func env(_ name: String) -> String? {
        ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 }
    }

    private static func envFlag(_ name: String) -> Bool {
        ["1", "true", "yes"].contains(env(name)?.lowercased() ?? "")
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel ?? Self.env("EPOK_LOG_LEVEL") ?? "info") ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "epokd")

        if let executor { logger.notice("the '\(executor)' executor no longer applies: epokd always programs the host it runs on") }
        if batchCommands != nil || batchSize != nil || Self.env("EPOK_BATCH_COMMANDS") != nil || Self.env("EPOK_BATCH_SIZE") != nil {
            logger.notice("--batch-commands/--batch-size no longer apply: every change is one netlink transaction")
        }

        guard let list = interfaces ?? Self.env("EPOK_INTERFACES") else {
            throw ValidationError("--interfaces (or EPOK_INTERFACES) is required, e.g. --interfaces eth0,wg0")
        }
        let names = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !names.isEmpty, names.allSatisfy({ $0.utf8.count < 16 }) else {
            throw ValidationError("--interfaces: \"\(list)\" is not a comma-separated list of interface names (at most 15 characters each)")
        }
        let options = ForwardingOptions(interfaces: names, externalInterface: externalInterface ?? Self.env("EPOK_EXTERNAL_INTERFACE"))
        guard let sourcePath = source ?? Self.env("EPOK_SOURCE") else {
            throw ValidationError("--source FILE is required: this build reads Services and Nodes from a snapshot file; the Kubernetes API client is not part of it yet")
        }

        Forwarding.check(enable: enableForwarding || Self.envFlag("EPOK_ENABLE_FORWARDING"), logger: logger)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: table ?? Self.env("EPOK_TABLE") ?? "epok"),
                                nftables: try Nftables())
        let reconciler = Reconciler(firewall: firewall, conntrack: try Conntrack(), options: options, logger: logger)

        if dryRun || Self.envFlag("EPOK_DRY_RUN") {
            let (state, diff) = try reconciler.plan(try SnapshotFile.load(sourcePath))
            print(Plan.render(state: state, diff: diff))
            return
        }
        let once = once || Self.envFlag("EPOK_ONCE")
        var lastModified: Date?
        var failures = 0
        while true {
            let modified = (try? FileManager.default.attributesOfItem(atPath: sourcePath)[.modificationDate]) as? Date
            if modified != lastModified || failures > 0 {
                do {
                    try reconciler.reconcile(try SnapshotFile.load(sourcePath))
                    lastModified = modified
                    failures = 0
                } catch {
                    failures += 1
                    logger.error("\(error); the kernel keeps its previous state, retrying")
                    if once { throw ExitCode.failure }
                }
                if once && failures == 0 { return }
            } else {
                reconciler.retryConntrackFlush()
            }
            Thread.sleep(forTimeInterval: min(30, failures == 0 ? 1 : Double(1 << min(failures, 5))))
        }
    }
}

/// The kernel's forwarding switches, which epokd needs on.
enum Forwarding {
    static let switches = ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"]

    static func check(enable: Bool, logger: Logger) {
        for path in switches {
            let name = path.dropFirst("/proc/sys/".count).replacingOccurrences(of: "/", with: ".")
            guard let value = try? String(contentsOfFile: path, encoding: .utf8), value.hasPrefix("0") else { continue }
            if enable {
                do {
                    try "1\n".write(toFile: path, atomically: false, encoding: .utf8)
                    logger.notice("set \(name) = 1")
                } catch {
                    logger.error("cannot set \(name) = 1: \(error)")
                }
            } else {
                logger.warning("\(name) is 0: forwarded connections will not leave this host (use --enable-forwarding or sysctl -w \(name)=1)")
            }
        }
    }
}

/// Renders a plan for people.
enum Plan {
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
