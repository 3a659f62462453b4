import Dataplane
import Foundation
import NetnsLab
import Testing

@Suite("Idle chains: left out while they can do nothing, put back around the sets")
struct IdleChainsTests {
    @Test("every optional chain names chains and sets of the skeleton; it is idle exactly while all its sets are empty; a chain left out is jumped to from nowhere")
    func optionalChainsAreIdleWhenTheirSetsAreEmpty() throws {
        let whole = ForwardingRuleset.skeleton()
        let any = Element(key: [.mark(1)])
        #expect(ForwardingRuleset.idleChains(in: [:]) == Set(ForwardingRuleset.optionalChains.keys))
        for (chain, sets) in ForwardingRuleset.optionalChains {
            #expect(whole.chains.contains { $0.name == chain }, "\(chain) is a chain of the skeleton")
            let lean = ForwardingRuleset.skeleton(table: "epok", .init(idleChains: [chain]))
            #expect(!lean.chains.contains { $0.name == chain })
            #expect(!lean.chains.flatMap(\.rules).flatMap(\.expressions).contains(.verdict(.jump(chain))), "no rule jumps to \(chain)")
            #expect(!sets.isEmpty)
            for set in sets {
                #expect(whole.set(named: set) != nil, "\(chain): set \(set) is in the skeleton")
                #expect(!ForwardingRuleset.idleChains(in: [set: [any]]).contains(chain), "\(chain) is in use with an element in \(set)")
                #expect(ForwardingRuleset.idleChains(in: [set: []]).contains(chain))
            }
        }
    }

    @Test("a skeleton leaves out exactly its idle chains (and forward without counters), and its parameters say so")
    func skeletonLeavesOutIdleChains() {
        let idle: Set = ["egress", "bridge_in", "firewall", "guard"]
        for policy in [FirewallPolicy.drop, .accept] {
            let parameters = ForwardingRuleset.Parameters(firewallPolicy: policy, perSourceLimits: [RateLimit(rate: 10, unit: .packets, per: .second)],
                                                          idleChains: idle)
            let lean = ForwardingRuleset.skeleton(table: "epok", parameters)
            let names = Set(ForwardingRuleset.skeleton().chains.map(\.name))
            #expect(Set(lean.chains.map(\.name)) == names.subtracting(idle))
            // The firewall chain carries the policy: with it idle, the default comes back, and makes the same skeleton.
            var read = ForwardingRuleset.parameters(of: lean)
            #expect(read.idleChains == idle && read.perSourceLimits == parameters.perSourceLimits)
            read.firewallPolicy = policy
            #expect(ForwardingRuleset.skeleton(table: "epok", read) == lean)
        }
        let uncounted = ForwardingRuleset.skeleton(counters: false)
        #expect(!uncounted.chains.contains { $0.name == "forward" })
        #expect(ForwardingRuleset.skeleton(counters: true).chains.contains { $0.name == "forward" })
    }

    @Test("a chain coming into use and going idle replaces epokd's chains only: the sets stay the same kernel objects, elements and counters stay, traffic flows throughout")
    func chainsComeAndGoAroundTheSets() throws {
        let lab = try ForwardingLab(tcpPorts: [30022], udpPorts: [])
        let state = ForwardingState(interfaces: ["eth0", "wg0"], externalInterfaces: ["eth0"],
                                    nodes: (1...3).map { NodeAddress(node: "n\($0)", ipv4: IPv4Address(10, 0, 1, UInt8($0))) },
                                    mappings: [Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!, label: "default/ssh")])
        let plain = ForwardingRuleset.elements(for: state)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(for: plain), nftables: try Nftables(namespacePath: lab.host.path))
        #expect(try firewall.synchronize(plain).rebuilt)
        let listing = try lab.host.nftList("inet", "epok")
        for chain in ["egress", "bridge_in", "bridge_guard", "bridge_out", "rate_limits", "firewall", "firewall_input", "guard", "nat_grouped"] {
            #expect(!listing.contains("chain \(chain) {"), "\(chain) is idle and left out")
        }
        #expect(listing.contains("chain nat_prerouting {") && listing.contains("chain forward {"))

        func answered() throws -> Bool {
            if case .answered = try FlowClient.tcp(from: lab.external, to: ForwardingLab.hostExternal4, port: 22).exchange("m") { return true }
            return false
        }
        /// The kernel's handle of every set of the table (a set made anew gets a new one).
        func setHandles() throws -> [String: String] {
            let text = try lab.host.exec(["nft", "-a", "list", "table", "inet", "epok"]).output
            let pattern = try NSRegularExpression(pattern: #"(?:set|map) (\w+) \{ # handle (\d+)"#)
            var handles: [String: String] = [:]
            for match in pattern.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                handles[String(text[Range(match.range(at: 1), in: text)!])] = String(text[Range(match.range(at: 2), in: text)!])
            }
            return handles
        }
        func sshPackets() throws -> Int {
            let text = try lab.host.exec(["nft", "list", "map", "inet", "epok", "services"]).output
            let line = try #require(text.split(separator: "\n").first { $0.contains("default/ssh") })
            let packets = try #require(line.firstRange(of: "packets ").map { line[$0.upperBound...].prefix { $0.isNumber } })
            return try #require(Int(packets))
        }

        #expect(try answered())
        let handles = try setHandles()
        #expect(handles.count == firewall.skeleton.sets.count, "\(handles)")
        let counted = try sshPackets()
        #expect(counted > 0)

        // A pod with an egress address and an internal port: the postrouting NAT chain and the guard come into use.
        var used = plain
        used["egress_all4"] = [Element(key: [.ipv4(IPv4Address(10, 0, 9, 9))], value: [.ipv4(IPv4Address(198, 51, 100, 1))])]
        used["internal"] = [Element(key: [.l4proto(.tcp), .port(Port(2222)!)])]
        firewall.use(ForwardingRuleset.skeleton(for: used))
        let outcome = try firewall.synchronize(used)
        #expect(outcome.chainsReplaced && !outcome.rebuilt && outcome.added == 2 && outcome.deleted == 0, "\(outcome)")
        let withChains = try lab.host.nftList("inet", "epok")
        #expect(withChains.contains("chain egress {") && withChains.contains("chain guard {"))
        #expect(try setHandles() == handles, "no set was made anew")
        #expect(try sshPackets() >= counted, "the per-mapping counter kept its count")
        #expect(try Nftables(namespacePath: lab.host.path).read(firewall.skeleton)?.matches(firewall.skeleton) == true)
        #expect(try answered())
        _ = try lab.host.exec(["nft", "list", "ruleset"])

        firewall.use(ForwardingRuleset.skeleton(for: plain))
        let back = try firewall.synchronize(plain)
        #expect(back.chainsReplaced && back.deleted == 2 && back.added == 0, "\(back)")
        let without = try lab.host.nftList("inet", "epok")
        #expect(!without.contains("chain egress {") && !without.contains("chain guard {"))
        #expect(try setHandles() == handles)
        #expect(try sshPackets() >= counted)
        #expect(try answered())

        // The state known, the next commit replaces the chains with its elements, without reading the table back.
        firewall.use(ForwardingRuleset.skeleton(for: used))
        let known = try firewall.apply(used)
        #expect(known.chainsReplaced && known.added == 2, "\(known)")
        #expect(try lab.host.nftList("inet", "epok").contains("chain egress {"))
        #expect(try setHandles() == handles)
        #expect(try Nftables(namespacePath: lab.host.path).read(firewall.skeleton)?.matches(firewall.skeleton) == true)
        #expect(try answered())
    }
}
