import Dataplane
import NetnsLab
import Testing

private let web4 = IPAddress("198.51.100.10")!
private let web6 = IPAddress("2001:db8:100::10")!
private let perSecond100 = RateLimit(rate: 100, unit: .packets, per: .second)
private let twoMegabytes = RateLimit(rate: 2 << 20, unit: .bytes, per: .second, burst: 512 << 10)

let firewallState = ForwardingState(
    interfaces: ["eth0"], externalInterfaces: ["eth0"],
    nodes: [NodeAddress(node: "a", ipv4: IPv4Address(10, 0, 1, 1))],
    mappings: [Mapping(proto: .udp, hostPort: Port(53)!, nodePort: Port(30053)!, label: "default/dns", limit: perSecond100)],
    firewallInterfaces: ["eth0"], inputInterfaces: ["eth0"], inputPorts: [PortKey(proto: .tcp, port: Port(22)!)],
    loadBalancers: [
        LoadBalancerEntry(address: web4, proto: .tcp, port: Port(443)!, allowedSources: [try! CIDR(parsing: "192.0.2.0/24")],
                          limit: twoMegabytes, perSourceLimit: perSecond100, label: "default/web"),
        LoadBalancerEntry(address: web6, proto: .tcp, port: Port(443)!, limit: perSecond100, label: "default/web"),
        LoadBalancerEntry(address: web4, proto: .udp, port: Port(443)!, perSourceLimit: RateLimit(rate: 10, unit: .packets, per: .minute)),
    ])

@Suite("The LoadBalancer firewall in the kernel")
struct EdgeFirewallTests {
    @Test("LB IPs, ranges and per-element rate limits commit, read back equal, print without an error and reload the same")
    func kernelRoundTrip() throws {
        let ns = try NetworkNamespace("edge")
        let nft = try Nftables(namespacePath: ns.path)
        let skeleton = ForwardingRuleset.skeleton(table: "epok", .init(perSourceLimits: firewallState.perSourceLimits))
        let firewall = Firewall(skeleton: skeleton, nftables: nft)
        let desired = ForwardingRuleset.elements(for: firewallState)
        #expect(desired["lb_limits_bytes4"]?.first?.limit == twoMegabytes)
        #expect(desired["per_source4_\(perSecond100.token)"]?.count == 1)
        #expect(try firewall.synchronize(desired).rebuilt)
        let kernel = try #require(try nft.read(skeleton))
        #expect(kernel.matches(skeleton))
        #expect(kernel.elements == desired, "the kernel gives back every element with its own rate limit")
        #expect(try firewall.synchronize(desired) == Firewall.Outcome(rebuilt: false, added: 0, deleted: 0))

        let listing = try ns.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty)
        #expect(listing.output.contains("limit rate over 2 mbytes/second burst 512 kbytes"))
        #expect(listing.output.contains("update @meter4_\(perSecond100.token) { ip saddr . ip daddr . meta l4proto . th dport limit rate over 100/second"))
        _ = try ns.exec(["nft", "flush", "ruleset"])
        let reload = try ns.exec(["nft", "-f", "-"], input: listing.output)
        #expect(reload.error.isEmpty)
        #expect(try ns.exec(["nft", "list", "ruleset"]).output == listing.output)
    }

    @Test("a changed rate is an element change; the operator's rules in chain local survive a skeleton change")
    func rateChangeAndUserChain() throws {
        let ns = try NetworkNamespace("edge")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: nft)
        var state = firewallState
        state.loadBalancers = state.loadBalancers.map { var e = $0; e.perSourceLimit = nil; return e }
        try firewall.synchronize(ForwardingRuleset.elements(for: state))
        _ = try ns.exec(["nft", "add", "rule", "inet", "epok", "local", "ip", "saddr", "192.0.2.5", "accept"])
        _ = try ns.exec(["nft", "add", "set", "inet", "epok", "blocklist", "{ type ipv4_addr; }"])
        _ = try ns.exec(["nft", "add", "rule", "inet", "epok", "local", "ip", "saddr", "@blocklist", "drop"])

        state.loadBalancers[1].limit = RateLimit(rate: 50, unit: .packets, per: .second)
        let outcome = try firewall.apply(ForwardingRuleset.elements(for: state))
        #expect(outcome == Firewall.Outcome(rebuilt: false, added: 1, deleted: 1))
        #expect(try nft.read(firewall.skeleton)?.elements["lb_limits_packets6"]?.first?.limit?.rate == 50)

        // A per-source rate appears: two more rules and four sets, in place, around the operator's chain and set.
        let grown = ForwardingRuleset.skeleton(table: "epok", .init(perSourceLimits: firewallState.perSourceLimits))
        firewall.use(grown)
        #expect(try firewall.synchronize(ForwardingRuleset.elements(for: firewallState)).rebuilt)
        let local = try ns.exec(["nft", "list", "chain", "inet", "epok", "local"]).output
        #expect(local.contains("ip saddr 192.0.2.5 accept") && local.contains("ip saddr @blocklist drop"))
        let kernel = try #require(try nft.read(grown))
        #expect(kernel.matches(grown) && kernel.sets["blocklist"] != nil && !kernel.ownedSets.contains("blocklist"))
        #expect(ForwardingRuleset.parameters(of: grown).perSourceLimits == firewallState.perSourceLimits)
        #expect(try ns.exec(["nft", "list", "ruleset"]).error.isEmpty)
    }
}

@Suite("Per-source rates cost only their own traffic")
struct PerSourceChainTests {
    @Test("the rates in use sit in chain per_source, which only traffic to an entry with a per-source limit enters: chain firewall is the same with none or 40 rates")
    func ratesLiveInTheirOwnChain() {
        let rates = (1...40).map { RateLimit(rate: UInt64($0), unit: .packets, per: .second) }
        let none = ForwardingRuleset.skeleton(table: "epok", .init()), many = ForwardingRuleset.skeleton(table: "epok", .init(perSourceLimits: rates))
        func chain(_ name: String, _ skeleton: Skeleton) -> Chain? { skeleton.chains.first { $0.name == name } }
        #expect(chain("firewall", none) == chain("firewall", many))
        #expect(chain(EdgeFirewall.perSourceChain, many)?.rules.count == 80 && chain(EdgeFirewall.perSourceChain, none)?.rules.isEmpty == true)
        // An entry with a per-source limit is in the gate set as well as in its rate's set; one without is in neither.
        var state = ForwardingState(interfaces: ["eth0"])
        state.loadBalancers = [LoadBalancerEntry(address: IPAddress("203.0.113.1")!, proto: .tcp, port: Port(443)!, perSourceLimit: rates[0]),
                               LoadBalancerEntry(address: IPAddress("203.0.113.2")!, proto: .tcp, port: Port(443)!)]
        let elements = ForwardingRuleset.elements(for: state)
        #expect(elements[EdgeFirewall.Sets.perSourceLimited(.ipv4).name]?.count == 1)
        #expect(elements[EdgeFirewall.Sets.perSource(rates[0], .ipv4).name]?.count == 1)
    }
}

@Suite("Rate limits at the kernel's edge")
struct RateLimitKernelTests {
    @Test("property: the kernel accepts a limit exactly when kernelProblem says so, as an element and as a per-source rule")
    func kernelAgrees() throws {
        let ns = try NetworkNamespace("limits")
        let nft = try Nftables(namespacePath: ns.path)
        let skeleton = ForwardingRuleset.skeleton(table: "epok")
        try Firewall(skeleton: skeleton, nftables: nft).synchronize(ForwardingRuleset.elements(for: ForwardingState(interfaces: [])))
        var random = SeededGenerator()
        var accepted = 0, refused = 0
        for round in 0..<300 {
            let unit: RateLimit.Unit = round % 2 == 0 ? .packets : .bytes
            let period = RateLimit.Period.allCases.randomElement(using: &random)!
            // Rates and bursts spread over every magnitude, so that both sides of each bound are met.
            let rate = max(1, UInt64.random(in: 0...(1 << UInt64.random(in: 0...50, using: &random)), using: &random))
            let burst = UInt32.random(in: 0...(UInt32.max >> UInt32.random(in: 0...31, using: &random)), using: &random)
            let limit = RateLimit(rate: rate, unit: unit, per: period, burst: burst)
            var tx = Transaction()
            let set = EdgeFirewall.Sets.limits(unit, .ipv4)
            tx.append(.addElements(skeleton.table, set, [Element(key: [.ipv4(IPv4Address(value: UInt32(round + 1))), .l4proto(.udp), .port(Port(443)!)],
                                                                 limit: limit)]))
            let errors = try nft.check(tx)
            #expect(errors.isEmpty == (limit.kernelProblem == nil), "\(limit): kernel says \(errors), kernelProblem \(limit.kernelProblem ?? "none"), seed \(random)")
            if errors.isEmpty { accepted += 1 } else { refused += 1 }
            // The same limit in a per-source rule, the whole skeleton checked.
            if round % 10 == 0 {
                let withRule = ForwardingRuleset.skeleton(table: "epok", .init(perSourceLimits: [limit]))
                let ruleErrors = try nft.check(Transaction.create(withRule, elements: [:], existing: try nft.read(withRule)))
                #expect(ruleErrors.isEmpty == (limit.kernelProblem == nil), "\(limit) in a rule: \(ruleErrors)")
            }
        }
        #expect(accepted > 50 && refused > 50, "both sides of the bounds were tried: \(accepted) accepted, \(refused) refused")
    }
}

@Suite("Every feature at once, as nft sees it")
struct WholeRulesetPrintTests {
    @Test("port mapping, own groups with down and draining nodes, allow-ranges, LB firewall, limits, per-source rules, egress and bridges: nft lists it without an error and reloads it to the same listing")
    func everythingPrintable() throws {
        let ns = try NetworkNamespace("whole")
        let nft = try Nftables(namespacePath: ns.path)
        let nodes = (1...3).map { NodeAddress(node: "n\($0)", ipv4: IPv4Address(10, 0, 1, UInt8($0)), ipv6: IPv6Address("fd00:1::\($0)")) }
        var state = firewallState
        state.nodes = nodes
        state.draining = [NodeAddress(node: "n4", ipv4: IPv4Address(10, 0, 1, 4))]
        state.egress = [EgressRule(source: IPAddress("10.244.1.5")!, destinations: [try CIDR(parsing: "192.0.2.0/24")],
                                   egress: IPAddress("198.51.100.10")!, label: "default/app"),
                        EgressRule(source: IPAddress("fd00:244::5")!, destinations: [try CIDR(parsing: "2001:db8:9::/48"), try CIDR(parsing: "2001:db8:8::1/128")],
                                   egress: IPAddress("2001:db8::10")!, label: "default/app"),
                        EgressRule(source: IPAddress("10.244.1.6")!, destinations: [try CIDR(parsing: "0.0.0.0/0")],
                                   egress: IPAddress("198.51.100.10")!, label: "StaticEgressIP default/eip"),
                        EgressRule(source: IPAddress("10.244.1.7")!, destinations: [try CIDR(parsing: "4.2.2.2/32")],
                                   egress: IPAddress("198.51.100.10")!, label: "StaticEgressIP default/eip")]
        let v4 = (pod: IPAddress("10.244.1.5")!, server: IPAddress("198.51.100.2")!, entrance: IPAddress("198.51.100.9")!)
        let v6 = (pod: IPAddress("fd00:244::5")!, server: IPAddress("2001:db8:e::2")!, entrance: IPAddress("2001:db8::9")!)
        for (f, other) in [(v4, IPAddress("10.244.2.5")!), (v6, IPAddress("fd00:244::6")!)] {
            state.bridgeExits.append(BridgeExit(pod: f.pod, server: f.server, proto: .tcp, port: Port(7000)!, source: f.entrance, label: "ExternalService default/db"))
            state.bridgeEntrances.append(BridgeEntrance(client: f.server, address: f.entrance, proto: .udp, port: Port(53)!, endpoints: [f.pod, other],
                                                        endpointPort: Port(5353)!, label: "ExternalService default/db"))
            state.bridgeGuarded.append(f.entrance)
        }
        state.mappings += [
            Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!, allowedSources: [try CIDR(parsing: "192.0.2.0/24")], label: "default/ssh",
                    group: NodeGroup(nodes: [nodes[0], nodes[2]], slots: ForwardingRuleset.baseSlots, down: [nodes[1]])),
            Mapping(proto: .udp, hostPort: Port(500)!, nodePort: Port(30500)!, internalOnly: true, label: "default/ike",
                    group: NodeGroup(nodes: [], slots: ForwardingRuleset.baseSlots)),
        ]
        let skeleton = ForwardingRuleset.skeleton(table: "epok", .init(perSourceLimits: state.perSourceLimits))
        let firewall = Firewall(skeleton: skeleton, nftables: nft)
        let desired = ForwardingRuleset.elements(for: state)
        try firewall.synchronize(desired)
        #expect(try nft.read(skeleton)?.elements == desired)
        let listing = try ns.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty, "\(listing.error)")
        for text in ["map groups4", "set down4", "10.0.1.4 comment \"n4\"", "jump nat_grouped", "limit rate over 100/second", "jump local",
                     "snat ip6 to ip6 saddr . ip6 daddr map @egress6", "snat ip to ip saddr map @egress_all4",
                     "snat ip6 to ip6 saddr . ip6 daddr map @egress_hosts6", "10.244.1.7 . 4.2.2.2 counter packets 0 bytes 0 comment \"StaticEgressIP default/eip\" : 198.51.100.10",
                     "typeof ip6 daddr . meta l4proto . th dport . numgen inc mod 60 : ip6 daddr",
                     "dnat ip to ip daddr . meta l4proto . th dport . numgen inc mod 60 map @bridge_in4:ip daddr . meta l4proto . th dport map @bridge_ports4",
                     "snat ip to ip saddr . ip daddr . meta l4proto . th dport map @bridge_out4", "ip daddr @bridge_guard4 counter packets 0 bytes 0 drop"] {
            #expect(listing.output.contains(text), "\(text) is listed")
        }
        // Each chain, set and map by its name, as an operator asks for one (a name nft reads as a keyword fails).
        for chain in skeleton.chains.map(\.name) + skeleton.userChains {
            let one = try ns.exec(["nft", "list", "chain", "inet", "epok", chain], check: false)
            #expect(one.status == 0 && one.error.isEmpty, "nft list chain inet epok \(chain): \(one.error)")
        }
        for set in skeleton.sets {
            let one = try ns.exec(["nft", "list", set.isMap ? "map" : "set", "inet", "epok", set.name], check: false)
            #expect(one.status == 0 && one.error.isEmpty, "nft list \(set.isMap ? "map" : "set") inet epok \(set.name): \(one.error)")
        }
        _ = try ns.exec(["nft", "flush", "ruleset"])
        let reload = try ns.exec(["nft", "-f", "-"], input: listing.output)
        #expect(reload.error.isEmpty, "\(reload.error)")
        #expect(try ns.exec(["nft", "list", "ruleset"]).output == listing.output)
        // What nft reloaded is what epokd made: nothing to repair.
        #expect(try firewall.synchronize(desired) == Firewall.Outcome(rebuilt: false, added: 0, deleted: 0))
    }
}
