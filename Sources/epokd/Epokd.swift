import ArgumentParser
import CMalloc
import Control
import Dataplane
import Foundation
import Logging
import Prometheus
import Synchronization

/// Environment fallbacks for options (`EPOK_*`).
enum Environment {
    static func value(_ name: String) -> String? {
        ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 }
    }

    static func flag(_ name: String) -> Bool {
        ["1", "true", "yes"].contains(value(name)?.lowercased() ?? "")
    }
}

/// What forwarding is wanted and where: the options `run` and `plan` share.
struct ForwardingArguments: ParsableArguments {
    @Option(name: [.short, .long], help: ArgumentHelp("Comma-separated interfaces to forward from (required) [env: EPOK_INTERFACES].", valueName: "ifaces"))
    var interfaces: String?

    @Option(name: .long, help: ArgumentHelp("Interface that internal Services are unreachable from; one of --interfaces [env: EPOK_EXTERNAL_INTERFACE].", valueName: "iface"))
    var externalInterface: String?

    @Option(name: .long, help: ArgumentHelp("nftables table (family inet) that epokd owns (default: epok) [env: EPOK_TABLE].", valueName: "name"))
    var table: String?

    @Option(name: .long, help: ArgumentHelp("Host ports Services may claim, e.g. 80,443,1024-65535; others are refused with a Warning (default: all, as Epok) [env: EPOK_HOST_PORTS].", valueName: "ranges"))
    var hostPorts: String?

    @Option(name: .long, help: ArgumentHelp("Only node addresses inside these prefixes receive traffic, e.g. 10.0.0.0/16,fd00::/64 (default: any usable address) [env: EPOK_NODE_CIDRS].", valueName: "cidrs"))
    var nodeCidrs: String?

    @Option(name: .long, help: ArgumentHelp("How new connections pick a node: round-robin (each router in turn) or hash (a hash of the flow's addresses and ports: every router with the same --hash-seed sends a flow to the same node, so flows that ECMP moves between routers keep their node) [env: EPOK_SPREAD].", valueName: "mode"))
    var spread: String?

    @Option(name: .long, help: ArgumentHelp("With --spread hash: the hash's seed, the same on every router (default 0) [env: EPOK_HASH_SEED].", valueName: "n"))
    var hashSeed: String?

    @Option(name: .long, help: ArgumentHelp("Egress and bridge source addresses must lie in these prefixes, e.g. 198.51.100.16/28; a host address inside them may be used (default: any address that is neither the host's nor a Node's) [env: EPOK_ADDRESS_POOLS].", valueName: "cidrs"))
    var addressPools: String?

    @Option(name: .long, help: ArgumentHelp("Comma-separated interfaces whose forwarded traffic passes the LoadBalancer firewall: only LoadBalancer IP . port (from allowed sources) and replies get through [env: EPOK_FIREWALL_INTERFACE].", valueName: "ifaces"))
    var firewallInterface: String?

    @Option(name: .long, help: ArgumentHelp("What the firewall does with the rest: drop, or accept (and count) to try it out (default: drop) [env: EPOK_FIREWALL_POLICY].", valueName: "drop|accept"))
    var firewallPolicy: String?

    @Option(name: .long, help: ArgumentHelp("Filter traffic from the firewall interfaces to this host too: only these ports, e.g. tcp/22,tcp/179, plus replies and ICMP (default: input not touched) [env: EPOK_FIREWALL_INPUT].", valueName: "proto/port,..."))
    var firewallInput: String?

    /// The forwarding options, validated; `namespace` is the network namespace epokd programs (nil: its own).
    func options(namespace: String?) throws -> ForwardingOptions {
        guard let list = interfaces ?? Environment.value("EPOK_INTERFACES") else {
            throw ValidationError("--interfaces (or EPOK_INTERFACES) is required, e.g. --interfaces eth0,wg0")
        }
        let names = try Self.interfaceNames(list, option: "--interfaces")
        let external = externalInterface ?? Environment.value("EPOK_EXTERNAL_INTERFACE")
        if let external {
            guard !external.isEmpty, external.utf8.count < 16, !external.contains(",") else {
                throw ValidationError("--external-interface: \"\(external)\" is not an interface name (one name, at most 15 characters)")
            }
        }
        var options = ForwardingOptions(interfaces: names, externalInterface: external)
        if let text = hostPorts ?? Environment.value("EPOK_HOST_PORTS") {
            do {
                options.hostPorts = try AnnotationParser.portRanges(text)
            } catch {
                throw ValidationError("--host-ports: \(error.message)")
            }
        }
        if let text = nodeCidrs ?? Environment.value("EPOK_NODE_CIDRS") {
            do {
                options.nodeCIDRs = try AnnotationParser.cidrs(text, annotation: "--node-cidrs")
            } catch {
                throw ValidationError("\(error)")
            }
        }
        if let text = addressPools ?? Environment.value("EPOK_ADDRESS_POOLS") {
            do {
                options.addressPools = try AnnotationParser.cidrs(text, annotation: "--address-pools")
            } catch {
                throw ValidationError("\(error)")
            }
        }
        if let list = firewallInterface ?? Environment.value("EPOK_FIREWALL_INTERFACE") {
            options.firewallInterfaces = try Self.interfaceNames(list, option: "--firewall-interface")
        }
        if let text = firewallInput ?? Environment.value("EPOK_FIREWALL_INPUT") {
            guard !options.firewallInterfaces.isEmpty else {
                throw ValidationError("--firewall-input needs --firewall-interface: it filters what arrives on those interfaces")
            }
            options.inputPorts = try text.split(separator: ",", omittingEmptySubsequences: false).map { item in
                let parts = item.trimmingCharacters(in: .whitespaces).split(separator: "/", omittingEmptySubsequences: false)
                guard parts.count == 2, let proto = L4Protocol(parts[0]), let port = Port(parts[1]) else {
                    throw ValidationError("--firewall-input: \"\(item)\" is not PROTOCOL/PORT, e.g. tcp/22 or udp/51820")
                }
                return PortKey(proto: proto, port: port)
            }
        }
        _ = try policy()
        options.hostAddresses = Self.hostAddresses(namespace: namespace)
        options.gateways = (try? ManagedAddresses.gateways(namespacePath: namespace)) ?? []
        return options
    }

    /// The host's own addresses (with --netns, that namespace's), which never become backends nor a tenant's;
    /// those epokd added (--manage-addresses, maybe in an earlier run) are not the host's own.
    static func hostAddresses(namespace: String?) -> Set<IPAddress> {
        ((try? HostAddresses.read(namespacePath: namespace)) ?? []).subtracting((try? ManagedAddresses.marked(namespacePath: namespace)) ?? [])
    }

    /// What is odd about the interfaces, said once at start-up: names that do not exist (yet: wg0 may come up
    /// later) in the namespace epokd programs (`--netns`, or its own), and an external interface that epokd does
    /// not forward from.
    func interfaceWarnings(_ options: ForwardingOptions, namespace: String?) -> [String] {
        var warnings: [String] = []
        let place = namespace.map { " in \($0)" } ?? ""
        if let present = try? HostAddresses.interfaceNames(namespacePath: namespace) {
            for name in options.interfaces + (options.externalInterface.map { [$0] } ?? []) where !present.contains(name) {
                warnings.append("interface \(name) does not exist\(place) (yet): nothing arrives through it until it does; the rules take it as soon as it appears")
            }
        }
        if let external = options.externalInterface, !options.interfaces.contains(external) {
            warnings.append("--external-interface \(external) is not one of --interfaces \(options.interfaces.joined(separator: ",")): epokd forwards nothing from it at all, so marking it external changes nothing (add it to --interfaces to forward Services that are not internal from it)")
        }
        return Array(Set(warnings)).sorted()
    }

    var tableName: String { table ?? Environment.value("EPOK_TABLE") ?? "epok" }

    /// A comma-separated list of interface names (empty entries between commas are ignored).
    private static func interfaceNames(_ list: String, option: String) throws -> [String] {
        let names = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !names.isEmpty, names.allSatisfy({ $0.utf8.count < 16 }) else {
            throw ValidationError("\(option): \"\(list)\" is not a comma-separated list of interface names (at most 15 characters each)")
        }
        return names
    }

    /// `--firewall-policy`, validated.
    func policy() throws -> FirewallPolicy {
        let text = firewallPolicy ?? Environment.value("EPOK_FIREWALL_POLICY") ?? "drop"
        guard let policy = FirewallPolicy(rawValue: text.lowercased()) else {
            throw ValidationError("--firewall-policy: \"\(text)\" is not drop or accept")
        }
        return policy
    }

    /// The skeleton the options ask for (per-source rates and slots follow the cluster, see `ReconcileLoop`).
    func skeleton(counters: Bool = true) throws -> Skeleton {
        ForwardingRuleset.skeleton(table: tableName, .init(counters: counters, firewallPolicy: try policy(), spread: try spreading()))
    }

    /// `--spread` and `--hash-seed`, validated.
    func spreading() throws -> ForwardingRuleset.Spread {
        let mode = spread ?? Environment.value("EPOK_SPREAD") ?? "round-robin"
        let seedText = hashSeed ?? Environment.value("EPOK_HASH_SEED")
        switch mode.lowercased() {
        case "round-robin":
            if seedText != nil { throw ValidationError("--hash-seed goes with --spread hash") }
            return .roundRobin
        case "hash":
            guard let seed = UInt32(seedText ?? "0") else { throw ValidationError("--hash-seed: \"\(seedText ?? "")\" is not a number from 0 to 4294967295") }
            return .hash(seed: seed)
        default:
            throw ValidationError("--spread: \"\(mode)\" is not round-robin or hash")
        }
    }
}

/// Runs the daemon, or `epokd status` / `epokd plan`: two command trees, so that the daemon's options and the
/// subcommands' (`--netns`, `--table`) never compete for the same words.
@main
enum Main {
    static func main() {
        tuneAllocator(ProcessInfo.processInfo.environment)
        // The relocation table (2.2 MB: 94,000 relative relocations, which glibc 2.35 cannot take packed), which
        // the dynamic loader read through at start, would stay resident for the life of the process.
        _ = cmalloc_release_relocations()
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let first = arguments.first, ["status", "plan", "trace"].contains(first) {
            Tools.main(arguments)
        } else {
            Epokd.main(arguments)
        }
    }
}

/// Sets glibc's allocator for a long-running process with a few threads, before any thread starts: allocations of
/// 128 KiB or more (list pages, the batch, large arrays) are mapped on their own and returned when freed, instead
/// of raising the threshold and staying in the heap as glibc does by default; and the threads share two arenas
/// instead of one each. At 50k Services the daemon's peak falls from 112 to 94 MiB, cold start unchanged within
/// noise. The operator's own settings (`MALLOC_*` or `GLIBC_TUNABLES` in the environment) are left to rule.
func tuneAllocator(_ environment: [String: String]) {
    guard environment["GLIBC_TUNABLES"] == nil, !environment.keys.contains(where: { $0.hasPrefix("MALLOC_") }) else { return }
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    mallopt(M_ARENA_MAX, 2)
}

/// epokd's release (`buildCommit`, the commit it was built from, is written by Plugins/BuildInfo).
let epokdVersion = "0.3.0"

/// The daemon: keeps the host's firewall equal to the cluster's Services and Nodes.
struct Epokd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "epokd",
        abstract: "Forward this host's ports to Kubernetes NodePort Services: nftables over netlink, kept equal to the cluster.",
        usage: """
        epokd --interfaces <ifaces> [--external-interface <iface>] [--kubeconfig <path> | --source <file>] [<options>]
          epokd status [--json] [--netns <path>]      show the mappings the kernel holds
          epokd plan --source <file> --interfaces <ifaces>      show what a snapshot would change
          epokd trace [--proto tcp|udp] [--port <n>] [--source <cidr>]      what epokd does with each packet
        """,
        discussion: """
        Example: forward from eth0 and wg0, with internal Services unreachable through eth0:

          epokd --interfaces eth0,wg0 --external-interface eth0

        A MetalLB router: only LoadBalancer IPs and ports get through eth0; SSH and BGP reach the router:

          epokd --interfaces eth0 --firewall-interface eth0 --firewall-input tcp/22,tcp/179

        Without --source, epokd watches the API server found through --kubeconfig, $KUBECONFIG, the \
        in-cluster service account or ~/.kube/config. Every option can also be given as an environment \
        variable (shown as [env: ...]). Epok's `local`/`ssh` executor argument and --batch-* options are \
        accepted and ignored. See 'epokd status --help', 'epokd plan --help' and 'epokd trace --help'.
        """,
        version: "epokd \(epokdVersion) (commit \(buildCommit))")

    @OptionGroup var daemon: DaemonArguments

    @Argument(help: ArgumentHelp("Epok's executor (local or ssh), ignored.", visibility: .hidden))
    var executor: String?

    func validate() throws {
        if let executor, !["local", "ssh"].contains(executor) {
            throw ValidationError("unexpected argument '\(executor)' (subcommands: status, plan, trace)")
        }
    }

    func run() throws { try daemon.run(executor: executor) }
}

/// `epokd status` and `epokd plan`.
struct Tools: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "epokd", subcommands: [Status.self, PlanCommand.self, Trace.self])
}

/// The daemon's options: what `epokd` (and Epok's `epokd local` / `epokd ssh`) take.
struct DaemonArguments: ParsableArguments {

    @OptionGroup var forwarding: ForwardingArguments

    @Option(name: .long, help: ArgumentHelp("Program the network namespace at this path (/run/netns/NAME) instead of epokd's own, e.g. a router container's; needs CAP_SYS_ADMIN [env: EPOK_NETNS].", valueName: "path"))
    var netns: String?

    @Option(name: .long, help: ArgumentHelp("Read Services and Nodes from this file (kubectl get services,nodes -A -o yaml) instead of the API; re-read when it changes [env: EPOK_SOURCE].", valueName: "file"))
    var source: String?

    @Option(name: .long, help: ArgumentHelp("kubeconfig to reach the API server; otherwise $KUBECONFIG, the in-cluster service account, then ~/.kube/config [env: EPOK_KUBECONFIG].", valueName: "path"))
    var kubeconfig: String?

    @Option(name: .long, help: ArgumentHelp("Add the egress and bridge source addresses (StaticEgressIP, egress-ip, ExternalService) to this interface as /32 or /128, and remove them when no rule needs them; addresses epokd did not add are never removed [env: EPOK_MANAGE_ADDRESSES].", valueName: "iface"))
    var manageAddresses: String?

    @Option(name: .long, help: ArgumentHelp("This router is the active one of several while ADDR is on one of its interfaces (the address keepalived moves): only then does it hold the --manage-addresses addresses (announced by gratuitous ARP and neighbour advertisements) and post Events; repeatable or comma-separated [env: EPOK_HA_ADDRESS].", valueName: "addr"))
    var haAddress: [String] = []

    @Option(name: .long, help: ArgumentHelp("With --ha-address and an API server: the namespace of the Lease epokd-TABLE the active router holds (default: the service account's, else kube-system) [env: EPOK_LEASE_NAMESPACE].", valueName: "namespace"))
    var leaseNamespace: String?

    @Option(name: .long, help: ArgumentHelp("This router's name in the Lease (default: $NODE_NAME, else the host name) [env: EPOK_NODE_NAME].", valueName: "name"))
    var nodeName: String?

    @Option(name: .long, help: ArgumentHelp("Keep this hosts file (for dnsmasq's hostsdir=) with the LoadBalancer Services' external-dns hostnames and the Ingresses' hosts, each to its addresses [env: EPOK_DNS_HOSTS].", valueName: "file"))
    var dnsHosts: String?

    @Option(name: .long, help: ArgumentHelp("With --dns-hosts: the router's LAN address, for hostnames of Services that hold host ports [env: EPOK_DNS_ADDRESS].", valueName: "address"))
    var dnsAddress: String?

    @Flag(name: .long, help: "Delete the table (and the --dns-hosts file) on exit (by default they stay, so a restart does not cut traffic) [env: EPOK_CLEANUP_ON_EXIT].")
    var cleanupOnExit = false

    @Flag(name: .long, inversion: .prefixedNo, help: "Count packets and bytes per mapping in the kernel (for status and /metrics); --no-counters makes creating tens of thousands of mappings about twice as fast [env: EPOK_COUNTERS=0 disables].")
    var counters = true

    @Option(name: .long, help: ArgumentHelp("Seconds between read-backs that repair drift, e.g. elements deleted by hand (default: 60) [env: EPOK_DRIFT_INTERVAL].", valueName: "seconds"))
    var driftInterval: Double?

    @Option(name: .long, help: ArgumentHelp("Serve /metrics, /healthz and /readyz on HOST:PORT, or \"off\" (default: 127.0.0.1:9877) [env: EPOK_METRICS_ADDRESS].", valueName: "host:port"))
    var metricsAddress: String?


    @Flag(name: .long, help: "Apply the desired state once and exit: 0 when everything was committed, 1 when nothing was, 2 when the rest was committed but something was refused, set aside or left out (listed) [env: EPOK_ONCE].")
    var once = false

    @Flag(name: .long, help: "With --once: exit 0 when the rest was committed although something was refused or left out (still listed) [env: EPOK_ALLOW_PROBLEMS].")
    var allowProblems = false

    @Flag(name: .long, help: "With --source: print what would change and exit; touch nothing [env: EPOK_DRY_RUN].")
    var dryRun = false

    @Flag(name: .long, help: "Set net.ipv4.ip_forward and net.ipv6.conf.all.forwarding to 1 at start-up [env: EPOK_ENABLE_FORWARDING].")
    var enableForwarding = false

    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error or critical (default: info) [env: EPOK_LOG_LEVEL].", valueName: "level"))
    var logLevel: String?

    @Option(name: .long, help: ArgumentHelp("Seconds after which an idle metrics connection is closed.", visibility: .hidden))
    var metricsIdleTimeout: Int64 = 10

    @Option(name: .long, help: ArgumentHelp("Most metrics connections open at once.", visibility: .hidden))
    var metricsMaxConnections = 256

    @Option(name: .long, help: ArgumentHelp("Epok option, ignored.", visibility: .hidden))
    var batchCommands: String?

    @Option(name: .long, help: ArgumentHelp("Epok option, ignored.", visibility: .hidden))
    var batchSize: String?

    /// `--once`, or `EPOK_ONCE`.
    var runsOnce: Bool { once || Environment.flag("EPOK_ONCE") }

    /// Runs the daemon; `executor` is Epok's `local` or `ssh` word, if it was given.
    func run(executor: String?) throws {
        let level = Logger.Level(rawValue: logLevel ?? Environment.value("EPOK_LOG_LEVEL") ?? "info") ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "epokd")

        if let executor { logger.notice("the '\(executor)' executor no longer applies: epokd always programs the host it runs on") }
        if batchCommands != nil || batchSize != nil || Environment.value("EPOK_BATCH_COMMANDS") != nil || Environment.value("EPOK_BATCH_SIZE") != nil {
            logger.notice("--batch-commands/--batch-size no longer apply: every change is one netlink transaction")
        }

        let namespace = netns ?? Environment.value("EPOK_NETNS")
        let options = try forwarding.options(namespace: namespace)
        let followed = try highAvailabilityAddresses()
        forwarding.interfaceWarnings(options, namespace: namespace).forEach { logger.warning("\($0)") }
        if !options.firewallInterfaces.isEmpty {
            let policy = try forwarding.policy()
            let input = options.inputPorts.map { "input to this host: \($0.map { "\($0.proto)/\($0.port)" }.joined(separator: ",")), replies and ICMP" }
            logger.notice("LoadBalancer firewall on \(options.firewallInterfaces.joined(separator: ",")): policy \(policy.rawValue); \(input ?? "input not filtered")")
        }
        let counted = counters && !["0", "false", "no"].contains(Environment.value("EPOK_COUNTERS")?.lowercased() ?? "")
        let firewall = Firewall(skeleton: try forwarding.skeleton(counters: counted),
                                nftables: try Nftables(namespacePath: namespace))
        let sourcePath = source ?? Environment.value("EPOK_SOURCE")
        if dryRun || Environment.flag("EPOK_DRY_RUN") {
            guard let sourcePath else {
                throw ValidationError("--dry-run works with --source FILE (kubectl get services,nodes -A -o yaml > FILE)")
            }
            print(try Plan.render(firewall: firewall, options: options, source: sourcePath))
            return
        }
        // A trace killed before it could remove its selector left it in the table: gone now (its packets would be
        // traced, for nobody, until then).
        if let nftables = try? Nftables(namespacePath: namespace),
           let removed = try? Tracing.removeStale(nftables, table: firewall.skeleton.table), removed > 0 {
            logger.notice("removed \(removed) trace selectors left by an epokd trace that was killed")
        }
        checkForwarding(ForwardingSwitches(namespacePath: namespace), enable: enableForwarding || Environment.flag("EPOK_ENABLE_FORWARDING"),
                        logger: logger)
        // A `--once` run from a file whose table is already what the same file and options make, untouched since
        // (the stamp's ruleset generation has not moved), has nothing to do. Not with --manage-addresses: the
        // addresses are not covered by the stamp.
        var stamp: String?
        var preloaded: (snapshot: ClusterSnapshot, digest: UInt64)?
        if let sourcePath, runsOnce, (manageAddresses ?? Environment.value("EPOK_MANAGE_ADDRESSES")) == nil {
            // The file's digest is taken only when the table has a stamp to compare it with.
            let stamped = try firewall.stamped {
                (try? SnapshotFile.digest(path: sourcePath)).map { SnapshotFile.stamp(digest: $0, options: options, skeleton: firewall.skeleton) }
            }
            if stamped {
                logger.notice("--once: table \(Escaped.text(firewall.skeleton.table.name, limit: 100)) already holds what \(sourcePath) makes with these options, and nothing was committed since; nothing to do")
                return
            }
            // The stamp is of the version read and applied (the file may have been rewritten since its digest).
            if let read = try? SnapshotFile.loadWithDigest(sourcePath) {
                (stamp, preloaded) = (SnapshotFile.stamp(digest: read.digest, options: options, skeleton: firewall.skeleton), read)
            }
        }
        let hostsFile = try hostsFile()
        let registry = MetricsServer.bootstrap()
        let conntrack = try Conntrack(namespacePath: namespace)
        let feed: ClusterFeed
        let events: EventRecorder?
        var apiClient: KubeClient?
        if let sourcePath {
            feed = FileFeed(path: sourcePath, logger: logger, preloaded: preloaded)
            preloaded = nil
            events = nil
        } else {
            let connection: ClusterConnection
            do {
                connection = try KubeConfigResolver.resolve(explicitPath: kubeconfig ?? Environment.value("EPOK_KUBECONFIG"))
            } catch {
                throw ValidationError(error.description)
            }
            connection.warnings.forEach { logger.warning("\($0)") }
            logger.info("watching \(connection.server) (\(connection.origin))")
            let client = KubeClient(connection: connection)
            apiClient = client
            let watch = ClusterWatch(client: client, logger: logger, ingresses: hostsFile != nil)
            let recorder = EventRecorder(client: client, logger: logger)
            watch.report(to: recorder)
            (feed, events) = (APIFeed(watch: watch), recorder)
        }
        let loop = ReconcileLoop(firewall: firewall, conntrack: conntrack, events: events, options: options, logger: logger)
        var leaseKeeper: LeaseKeeper?
        if let followed {
            let ha = HighAvailability(followed: followed, hostAddresses: options.hostAddresses)
            loop.highAvailability = ha
            logger.notice("--ha-address: this router is \(ha.describe(hostAddresses: options.hostAddresses)) at start: \(ReconcileLoop.duties(active: ha.isActive))")
            if let events, let client = apiClient {
                events.gate = { ha.postsEvents }
                leaseKeeper = LeaseKeeper(client: client, namespace: leaseNamespaceName(), table: firewall.skeleton.table.name,
                                          identity: routerName(), role: ha, events: events, logger: logger)
            }
        }
        loop.stamp = stamp
        loop.dnsHosts = hostsFile
        // A file arrives whole, as one update: nothing to coalesce.
        if feed is FileFeed { loop.coalescing = 0 }
        loop.listeners = { () throws(NetlinkError) in try ListeningSockets.read(namespacePath: namespace) }
        if let interface = manageAddresses ?? Environment.value("EPOK_MANAGE_ADDRESSES") {
            loop.addresses = try ManagedAddresses(interface: interface, namespacePath: namespace)
            loop.addresses?.takenWithoutAsking = loop.highAvailability != nil
        } else {
            loop.isLocal = { (address) throws(NetlinkError) in try ManagedAddresses.isLocal(address, namespacePath: namespace) }
        }
        if let interval = driftInterval ?? Environment.value("EPOK_DRIFT_INTERVAL").flatMap(Double.init) {
            guard interval > 0 else { throw ValidationError("--drift-interval must be a positive number of seconds") }
            loop.driftInterval = interval
        }
        // The periodic drift check reads the table back on a socket and a thread of its own.
        if !runsOnce {
            loop.checkDrift(with: try Nftables(namespacePath: namespace))
            // What a snapshot or a read-back held goes back to the system, not only to the allocator's free lists.
            loop.onBulkCommit = { _ = malloc_trim(0) }
        }
        try serve(loop: loop, feed: feed, events: events, lease: leaseKeeper, firewall: firewall, namespace: namespace, registry: registry, logger: logger)
        // Everything that must end before the exit has ended (the loop, the watches, the table's clean-up). A
        // `--once` that succeeded ends here: freeing the state it held, object by object, would only delay the exit.
        // The daemon too: some helper threads (the HTTP server's, the traffic sampler) are told to stop but not
        // joined, and the C libraries' exit handlers running while one of them still allocates corrupted the heap
        // once at SIGTERM (`malloc_consolidate(): invalid chunk size`, exit status 6).
        fflush(nil)
        _exit(EXIT_SUCCESS)
    }
}

extension DaemonArguments {
    /// The `--ha-address` addresses, checked; nil without the option.
    func highAvailabilityAddresses() throws -> Set<IPAddress>? {
        let texts = (haAddress.isEmpty ? Environment.value("EPOK_HA_ADDRESS").map { [$0] } ?? [] : haAddress)
            .flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !texts.isEmpty else { return nil }
        if runsOnce { throw ValidationError("--ha-address follows this router's role while the daemon runs; it does not go with --once") }
        var addresses = Set<IPAddress>()
        for text in texts {
            guard let address = IPAddress(text) else { throw ValidationError("--ha-address \(text) is not an IPv4 or IPv6 address") }
            addresses.insert(address)
        }
        return addresses
    }

    /// The Lease's namespace: `--lease-namespace`, the service account's, or kube-system.
    func leaseNamespaceName() -> String {
        if let name = leaseNamespace ?? Environment.value("EPOK_LEASE_NAMESPACE") { return name }
        let account = (try? String(contentsOfFile: "/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return account.flatMap { $0.isEmpty ? nil : $0 } ?? "kube-system"
    }

    /// This router's name in the Lease.
    func routerName() -> String {
        nodeName ?? Environment.value("EPOK_NODE_NAME") ?? Environment.value("NODE_NAME") ?? ProcessInfo.processInfo.hostName
    }

    /// The `--dns-hosts` file with its `--dns-address`, checked; nil without the option.
    func hostsFile() throws -> HostsFile? {
        guard let path = dnsHosts ?? Environment.value("EPOK_DNS_HOSTS") else {
            if dnsAddress != nil { throw ValidationError("--dns-address goes with --dns-hosts FILE") }
            return nil
        }
        var address: IPAddress?
        if let text = dnsAddress ?? Environment.value("EPOK_DNS_ADDRESS") {
            guard let parsed = IPAddress(text) else { throw ValidationError("--dns-address \(text) is not an IPv4 or IPv6 address") }
            address = parsed
        }
        do {
            return try HostsFile(path: path, address: address)
        } catch {
            throw ValidationError(error.description)
        }
    }

    /// Runs the reconcile loop, the feed and the metrics server until SIGTERM or SIGINT (or, with --once, the first commit).
    func serve(loop: ReconcileLoop, feed: ClusterFeed, events: EventRecorder?, lease: LeaseKeeper?, firewall: Firewall, namespace: String?,
               registry: PrometheusCollectorRegistry, logger: Logger) throws {
        // Before any thread that lives on starts: this thread takes them, below.
        let signals = StopSignals()
        let stop = StopSignal()
        let cleanup = cleanupOnExit || Environment.flag("EPOK_CLEANUP_ON_EXIT")
        let once = runsOnce
        // Health checks need time to say anything: not with --once.
        let prober = once ? nil : HealthProber(namespacePath: namespace, logger: logger) { loop.submit(.backendHealth($0)) }
        loop.prober = prober
        // Without a thread for the feed, the loop or the Lease the daemon cannot do its work: it says why and stops
        // (the kernel keeps the table it has, as at any stop), for its supervisor to start it again.
        @discardableResult
        func essential<Started>(_ start: () throws(ThreadRefused) -> Started) -> Started {
            do {
                return try start()
            } catch {
                logger.critical("\(error); stopping")
                fflush(nil)
                _exit(EXIT_FAILURE)
            }
        }
        essential { () throws(ThreadRefused) in try feed.start { loop.submit($0) } }
        // The loop's thread next, before those that can be done without, to run once all is set up (below).
        let setUp = DispatchSemaphore(value: 0)
        let loopThread = essential { () throws(ThreadRefused) in
            try OwnThread.start("epokd-loop") {
                setUp.wait()
                loop.run(until: stop)
            }
        }
        // The host's addresses as they change (rtnetlink notifications), not only as they were at start.
        var addressWatcher: AddressWatcher?
        if !once {
            do {
                let watcher = try AddressWatcher(namespacePath: namespace)
                let last = Mutex(loop.hostAddresses)
                try watcher.start {
                    let now = ForwardingArguments.hostAddresses(namespace: namespace)
                    guard last.withLock({ held in defer { held = now }; return held != now }) else { return }
                    loop.submit(.hostAddresses(now))
                }
                addressWatcher = watcher
            } catch {
                logger.warning("\(error); the host's addresses are those read at start")
            }
        }
        let address = metricsAddress ?? Environment.value("EPOK_METRICS_ADDRESS") ?? "127.0.0.1:9877"
        let server = MetricsServer(registry: registry, address: address, firewall: firewall.skeleton, namespacePath: namespace,
                                   notReadyReason: { loop.notReadyReason }, restarts: (feed.restartsMetric, { feed.restarts }))
        server.idleTimeout = .seconds(max(1, metricsIdleTimeout))
        server.maxConnections = max(1, metricsMaxConnections)
        let serving = address != "off" && !once
        if serving {
            let history = TrafficHistory()
            do {
                try history.start(namespacePath: namespace, table: firewall.skeleton.table, until: stop)
            } catch {
                logger.warning("the status page shows no traffic history: \(error)")
            }
            let table = firewall.skeleton.table.name
            server.statusJSON = {
                let nftables = try? Nftables(namespacePath: namespace)
                let kernel = nftables.flatMap { try? StatusReport.readTable(table, $0) }
                var report = kernel.map { StatusReport(table: table, kernel: $0) }
                    ?? StatusReport(table: table, mappings: [], loadBalancers: [], firewallDropped: [:], reason: "table inet \(table) does not exist yet")
                report.programming = ProgrammingLatency.parse(registry.emitToString())
                return LiveStatus(report: report, view: loop.currentView(), history: history.current).json()
            }
        }
        if serving { server.start(logger: logger) }
        // The Lease is looked at as soon as the role changes, not at its next renewal; /metrics shows it at once.
        loop.onRoleChange = {
            lease?.roleChanged()
            server.invalidate()
        }
        if let lease { essential { () throws(ThreadRefused) in try lease.start() } }
        // --once ends as soon as the loop has committed or failed, which it says after every batch; a feed's failure
        // is looked for every 20 ms.
        let applied = DispatchSemaphore(value: 0)
        if once { loop.onApplied = { applied.signal() } }
        setUp.signal()
        var failedOnce = false
        while !stop.isStopped {
            if let number = signals.next(waiting: once ? 0 : 3600) {
                logger.notice("signal \(number): stopping\(cleanup ? " and removing the table" : "; the table stays in place")")
                stop.stop()
                break
            }
            guard once else { continue }
            _ = applied.wait(timeout: .now() + 0.02)
            // --once says what went wrong with its exit status instead of retrying forever.
            if loop.isReady {
                stop.stop()
            } else if let failure = loop.failure {
                logger.critical("--once: \(failure); nothing was committed")
                failedOnce = true
                stop.stop()
            } else if !loop.isReady, let file = feed as? FileFeed, let failure = file.failure {
                logger.critical("--once: \(failure)")
                failedOnce = true
                stop.stop()
            }
        }
        if serving { server.stop() }
        loop.wake()
        feed.stop()
        addressWatcher?.stop()
        lease?.stop()
        prober?.stop()
        loopThread.join()
        events?.flush(seconds: 2)
        events?.shutdown()
        var problemsOnce = false
        if once, !failedOnce {
            // Committed: whatever was refused, set aside or left out is listed, and says so with the exit status.
            var list = loop.problems.map(\.description)
            if let blocked = loop.failure { list.insert("\(blocked)", at: 0) }
            if !list.isEmpty {
                let shown = list.prefix(50).map { "\n  - \($0)" }.joined() + (list.count > 50 ? "\n  - and \(list.count - 50) more" : "")
                // Each item is a Problem (escaped when it was made) or a NetlinkError (whose rule names are escaped).
                let listing = "--once: everything else is committed, but \(list.count) \(list.count == 1 ? "thing was" : "things were") refused, set aside or left out:\(shown)"
                if allowProblems || Environment.flag("EPOK_ALLOW_PROBLEMS") { logger.warning("\(listing)") } else {
                    logger.critical("\(listing)\n(exit status 2; --allow-problems makes it 0)")
                    problemsOnce = true
                }
            }
        }
        if cleanup {
            try firewall.remove()
            logger.notice("removed table \(Escaped.text(firewall.skeleton.table.name, limit: 100))")
            if let addresses = loop.addresses {
                try addresses.removeAll()
                logger.notice("removed the addresses epokd added to \(addresses.interface)")
            }
            if let hosts = loop.dnsHosts {
                hosts.remove()
                logger.notice("removed \(hosts.path)")
            }
        }
        if failedOnce { throw ExitCode.failure }
        if problemsOnce { throw ExitCode(2) }
    }
}
