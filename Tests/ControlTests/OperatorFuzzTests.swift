import Control
import Dataplane
import Foundation
import Logging
import NetnsLab
import Testing

@Suite("Kernel fuzz with an operator at work beside epokd")
struct OperatorFuzzTests {
    /// What the operator made, as `nft list` prints it, to be found intact after every step.
    struct OperatorObjects {
        let ns: NetworkNamespace
        func make() throws {
            try ns.exec(["nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; add rule inet filter input tcp dport 22 accept"])
            try ns.exec(["nft", "add set inet epok blocked { type ipv4_addr; }; add element inet epok blocked { 192.0.2.66 }"])
            try ns.exec(["nft", "add rule inet epok local ip saddr @blocked drop"])
            try ns.exec(["nft", "add rule inet epok local ip daddr . meta l4proto . th dport @lb4 counter accept"])
            // services is made anew when --no-counters is toggled: this rule blocks that, until it goes.
            try ns.exec(["nft", "add rule inet epok local meta l4proto . th dport @services counter"])
        }
        /// The operator deletes the rule naming `services`, which let epokd make that map anew.
        func releaseServices() throws {
            let listing = try ns.exec(["nft", "-a", "list", "chain", "inet", "epok", "local"]).output
            let handle = try #require(listing.split(separator: "\n").first { $0.contains("@services") }?.split(separator: " ").last)
            try ns.exec(["nft", "delete", "rule", "inet", "epok", "local", "handle", String(handle)])
        }
        /// Why the operator's objects are not as made, or nil.
        func damage(foreign: String, servicesRule: Bool) throws -> String? {
            guard try ns.nftList("inet", "filter") == foreign else { return "the foreign table changed" }
            let local = try ns.exec(["nft", "list", "chain", "inet", "epok", "local"]).output
            guard local.contains("ip saddr @blocked drop"), local.contains("ip daddr . meta l4proto . th dport @lb4 counter"),
                  local.contains("meta l4proto . th dport @services counter") == servicesRule else { return "chain local lost a rule:\n\(local)" }
            guard try ns.exec(["nft", "list", "set", "inet", "epok", "blocked"]).output.contains("192.0.2.66") else { return "the operator's set lost its element" }
            let listing = try ns.exec(["nft", "list", "ruleset"], check: false)
            guard listing.status == 0, listing.error.isEmpty else { return "nft list ruleset failed: \(listing.error)" }
            return nil
        }
    }

    @Test("hostile Services, LoadBalancers with rates that come and go, restarts with --no-counters toggled, an operator's set, rules naming epokd's sets and a foreign table: after every step the kernel holds the desired state and the operator's objects are intact")
    func operatorFuzz() throws {
        let ns = try NetworkNamespace("opfuzz")
        var options = ForwardingOptions(interfaces: ["eth0", "wg0"], externalInterface: "eth0", firewallInterfaces: ["eth0"])
        options.hostAddresses = []
        var rng = SeededGenerator()
        var grammar = HostileGrammar()
        let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        var counters = true
        func restart() throws -> (ReconcileLoop, Firewall) {
            let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok", .init(counters: counters)), nftables: try Nftables(namespacePath: ns.path))
            return (ReconcileLoop(firewall: firewall, conntrack: nil, events: nil, options: options, logger: quiet), firewall)
        }
        var (loop, firewall) = try restart()
        let operatorObjects = OperatorObjects(ns: ns)
        var foreign: String?
        var servicesRule = true
        var blockedSteps = 0
        var services: [ServiceRef: Service] = [:]
        var nodes: [String: Node] = [:]
        let rates = ["100/second", "200/second", "1000/minute", "50/second burst 10 packets"]
        func lb(_ i: Int) -> Service {
            var annotations: StringMap = [:]
            if Bool.random(using: &rng) { annotations[EpokAnnotation.rateLimitPerSource] = rates.randomElement(using: &rng)! }
            if Bool.random(using: &rng) { annotations[EpokAnnotation.rateLimit] = rates.randomElement(using: &rng)! }
            return loadBalancer("lb\(i)", ips: ["203.0.113.\(i)"], ports: [(443, "TCP"), (53, "UDP")], annotations: annotations)
        }
        for step in 0..<60 {
            var updates: [ClusterUpdate] = []
            if step == 0 || Int.random(in: 0..<8, using: &rng) == 0 {
                services = Dictionary((0..<Int.random(in: 0...12, using: &rng)).map { _ in grammar.service(&rng) }.map { ($0.ref, $0) }, uniquingKeysWith: { $1 })
                for i in 1...Int.random(in: 1...6, using: &rng) { let s = lb(i); services[s.ref] = s }
                nodes = Dictionary((1...Int.random(in: 1...5, using: &rng)).map { grammar.hostileNode($0, &rng) }.map { ($0.metadata.name, $0) }, uniquingKeysWith: { $1 })
                updates.append(.snapshot(ClusterSnapshot(services: Array(services.values), nodes: Array(nodes.values))))
            } else {
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    let s = Bool.random(using: &rng) ? lb(Int.random(in: 1...8, using: &rng)) : grammar.service(&rng)
                    services[s.ref] = s
                    updates.append(.serviceChanged(s))
                }
            }
            // A restart with a flag toggled, now and then: epokd's skeleton changes under the operator's rules.
            // At step 20 always, with --no-counters: services must be made anew while the operator's rule names it.
            if step == 20 || step > 0 && Int.random(in: 0..<6, using: &rng) == 0 {
                counters = step == 20 ? false : !counters
                (loop, firewall) = try restart()
                updates = [.snapshot(ClusterSnapshot(services: Array(services.values), nodes: Array(nodes.values)))]
            }
            do {
                try loop.apply(updates)
            } catch {
                Issue.record("\(rng) step \(step): the commit failed: \(error)")
                return
            }
            if step == 0 {
                try operatorObjects.make()
                foreign = try ns.nftList("inet", "filter")
            }
            var expected = ForwardingRuleset.elements(for: DesiredState(snapshot: ClusterSnapshot(services: Array(services.values), nodes: Array(nodes.values)),
                                                                        options: options).forwarding)
            let kernel = try #require(try Nftables(namespacePath: ns.path).read(firewall.skeleton))
            var held = kernel.elements
            if let blocked = loop.failure {
                // Only the rule naming services may hold a skeleton change back; meanwhile every set the kernel
                // holds in the layout of the skeleton gets its elements (a new rate's set waits with the skeleton).
                guard servicesRule, blocked.undeletableSet == "services", "\(blocked)".contains("chain local") else {
                    Issue.record("\(rng) step \(step): the commit is held back: \(blocked)")
                    return
                }
                blockedSteps += 1
                let inPlace = Set(kernel.sets.filter { $0.value.decodable }.keys)
                held = held.filter { inPlace.contains($0.key) }
                expected = expected.filter { inPlace.contains($0.key) }
            }
            guard held == expected else {
                let diff = ElementDiff(from: held, to: expected)
                Issue.record("\(rng) step \(step): the kernel differs from the desired state: missing \(diff.added), extra \(diff.deleted)")
                return
            }
            if step == 40 {
                try operatorObjects.releaseServices()
                servicesRule = false
            }
            if let damage = try operatorObjects.damage(foreign: foreign!, servicesRule: servicesRule) {
                Issue.record("\(rng) step \(step): \(damage)")
                return
            }
        }
        #expect(blockedSteps > 0, "\(rng): a skeleton change was held back by the operator's rule at least once")
    }
}
