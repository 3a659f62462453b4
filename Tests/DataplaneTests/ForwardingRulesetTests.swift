import Dataplane
#if canImport(Glibc)
import Glibc
#endif
import NetnsLab
import Testing

let sampleState = ForwardingState(
    interfaces: ["eth0", "wg0"],
    externalInterfaces: ["eth0"],
    nodes: [
        NodeAddress(node: "node-b", ipv4: IPv4Address(10, 0, 1, 2), ipv6: IPv6Address("fd00:1::2")),
        NodeAddress(node: "node-a", ipv4: IPv4Address(10, 0, 1, 1), ipv6: IPv6Address("fd00:1::1")),
        NodeAddress(node: "node-c", ipv4: IPv4Address(10, 0, 1, 3)),
    ],
    mappings: [
        Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!),
        Mapping(proto: .udp, hostPort: Port(53)!, nodePort: Port(30053)!, internalOnly: true),
        Mapping(proto: .tcp, hostPort: Port(443)!, nodePort: Port(30443)!,
                allowedSources: [try! CIDR(parsing: "192.168.0.0/16"), try! CIDR(parsing: "2001:db8::/32")]),
        Mapping(proto: .tcp, hostPort: Port(8080)!, nodePort: Port(30080)!),
    ])

/// epokd's skeleton and a throwaway namespace to program it in.
private struct SkeletonLab {
    let ns: NetworkNamespace
    let nft: Nftables
    let skeleton = ForwardingRuleset.skeleton(table: "epok")

    init(_ name: String) throws {
        ns = try NetworkNamespace(name)
        nft = try Nftables(namespacePath: ns.path)
    }

    /// A firewall that programs `skeleton` (this lab's own unless given) in the namespace.
    func firewall(_ skeleton: Skeleton? = nil) -> Firewall { Firewall(skeleton: skeleton ?? self.skeleton, nftables: nft) }
}

@Suite("The forwarding ruleset")
struct ForwardingRulesetTests {
    @Test("slots spread round-robin over nodes in name order, per family")
    func slotsSpreadOverNodes() {
        let elements = ForwardingRuleset.elements(for: sampleState)
        let v4 = elements["backends4"]!
        #expect(v4.count == Int(ForwardingRuleset.baseSlots))
        let byNode = Dictionary(grouping: v4, by: { $0.value! })
        #expect(byNode.mapValues(\.count) == [
            [.ipv4(IPv4Address(10, 0, 1, 1))]: 20, [.ipv4(IPv4Address(10, 0, 1, 2))]: 20, [.ipv4(IPv4Address(10, 0, 1, 3))]: 20,
        ])
        #expect(v4.contains(Element(key: [.integer(0)], value: [.ipv4(IPv4Address(10, 0, 1, 1))])))
        #expect(Set(elements["backends6"]!.compactMap(\.value)).count == 2, "node-c has no IPv6 address")
    }

    @Test("a mapping is one element: protocol . host port to node port, named after its Service")
    func mappingElement() {
        let ssh = Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!, label: "default/ssh")
        #expect(ForwardingRuleset.mappingElements(ssh).map(\.0) == ["services"])
        #expect(ForwardingRuleset.mappingElements(ssh).first?.1 == Element(key: [.l4proto(.tcp), .port(Port(22)!)], value: [.port(Port(30022)!)], comment: "default/ssh"))
    }

    @Test("allow-ranges become protocol . port . address intervals; internal and restricted ports are listed")
    func allowRangesAndInternal() {
        let elements = ForwardingRuleset.elements(for: sampleState)
        let https: Fields = [.l4proto(.tcp), .port(Port(443)!)]
        #expect(elements["allow4"] == [Element(key: https + [.ipv4(IPv4Address(192, 168, 0, 0))],
                                                keyEnd: https + [.ipv4(IPv4Address(192, 168, 255, 255))])])
        #expect(elements["allow6"]!.count == 1)
        #expect(elements["restricted"] == [Element(key: https)])
        #expect(elements["internal"] == [Element(key: [.l4proto(.udp), .port(Port(53)!)])])
        #expect(elements["external"] == [Element(key: [.ifname("eth0")])])
    }

    @Test("the forwarding recovered from a table's elements leads back to the same mappings and backends")
    func forwardingFromElements() {
        let elements = ForwardingRuleset.elements(for: sampleState)
        let recovered = ForwardingRuleset.forwarding(from: elements)
        let again = ForwardingRuleset.elements(for: recovered)
        let sameServices = again["services"] == elements["services"]
        #expect(sameServices)
        for set in ["backends4", "backends6"] {
            // Which slot goes to which node may differ (nodes are named by address); who the backends are may not.
            func backends(_ e: TableElements) -> Set<String> { Set((e[set] ?? []).map { "\($0.key.first!) \($0.value!)" }) }
            #expect(backends(again) == backends(elements), "backends of \(set) differ after the round trip")
        }
        #expect(Set(recovered.mappings.map { PortKey($0) }) == Set(sampleState.mappings.map { PortKey($0) }))
    }

    @Test("the kernel accepts the skeleton with its elements and gives them back")
    func kernelAcceptsSkeleton() throws {
        let lab = try SkeletonLab("skel")
        let desired = ForwardingRuleset.elements(for: sampleState)
        #expect(try lab.firewall().synchronize(desired).rebuilt)
        let kernel = try #require(try lab.nft.read(lab.skeleton))
        #expect(kernel.matches(lab.skeleton))
        let same = kernel.elements == desired
        #expect(same)
        let listing = try lab.ns.nftList("inet", "epok")
        #expect(listing.contains("\"eth0\""), "interface names print legibly")
        #expect(listing.contains("tcp . 443 . 192.168.0.0/16"))
        #expect(listing.contains("type nat hook prerouting priority dstnat"))
    }

    @Test("the services map takes a mapping for every TCP and UDP port at once: its fixed size is every key it can hold")
    func servicesMapHoldsEveryPort() throws {
        let lab = try SkeletonLab("everyport")
        var state = sampleState
        state.mappings = [L4Protocol.tcp, .udp].flatMap { proto in
            (1...65_535).map { Mapping(proto: proto, hostPort: Port($0)!, nodePort: Port(30_000 + $0 % 2_000)!) }
        }
        let desired = ForwardingRuleset.elements(for: state)
        #expect(try lab.firewall().synchronize(desired).rebuilt)
        let kernel = try #require(try lab.nft.read(lab.skeleton))
        #expect(kernel.sets["services"]?.elements.count == 2 * 65_535)
        // The size is in the listing, so that `nft -f` of it makes the map as epokd did.
        #expect(try lab.ns.nftList("inet", "epok").contains("size 131072"))
        // A size smaller than the elements is refused, in words that say so.
        var small = lab.skeleton
        small.sets = small.sets.map { var set = $0; if set.capacity != nil { set.capacity = 3 }; return set }
        try lab.firewall().remove()
        #expect {
            try lab.firewall(small).synchronize(ForwardingRuleset.elements(for: sampleState))
        } throws: { error in
            (error as? NetlinkError)?.code == ENFILE && "\(error)".contains("services") && "\(error)".contains("the set is full")
        }
    }

    @Test("a table whose services map has no size (an earlier release's) gets the sized map, every element in it, the other sets kept")
    func servicesMapWithoutSizeIsMadeAgain() throws {
        let lab = try SkeletonLab("unsized")
        var earlier = lab.skeleton
        earlier.sets = earlier.sets.map { var set = $0; set.capacity = nil; return set }
        let desired = ForwardingRuleset.elements(for: sampleState)
        #expect(try lab.firewall(earlier).synchronize(desired).rebuilt)
        #expect(try !lab.ns.nftList("inet", "epok").contains("size 131072"))
        let outcome = try lab.firewall().synchronize(desired)
        #expect(outcome.rebuilt && outcome.keptSets == lab.skeleton.sets.count - 1, "only the services map is made anew")
        let kernel = try #require(try lab.nft.read(lab.skeleton))
        #expect(kernel.matches(lab.skeleton))
        let same = kernel.elements == desired
        #expect(same)
        #expect(try lab.ns.nftList("inet", "epok").contains("size 131072"))
    }

    @Test("a diff committed for a caller that keeps the state it leads to: the kernel holds that state, and the firewall's applied state is the caller's own table, not a second copy")
    func appliedStateKeptByCaller() throws {
        let lab = try SkeletonLab("kept")
        let firewall = lab.firewall()
        let before = ForwardingRuleset.elements(for: sampleState)
        try firewall.synchronize(before)
        var state = sampleState
        state.mappings.append(Mapping(proto: .tcp, hostPort: Port(9_999)!, nodePort: Port(30_999)!, label: "default/added"))
        var current = ForwardingRuleset.elements(for: state)
        /// The storage a set's elements are in (a `Set` is one reference to it).
        func storage(_ elements: TableElements?) -> UnsafeRawPointer? {
            elements?[ForwardingRuleset.servicesSet.name].map { unsafeBitCast($0, to: UnsafeRawPointer.self) }
        }

        // Kept here, the applied state is brought up to date on its own: equal to the caller's, in a table of its own.
        let diff = ElementDiff(from: before, to: current)
        try firewall.apply(diff: diff)
        let same = firewall.applied == current
        #expect(same && storage(firewall.applied) != storage(current))

        // Kept by the caller: the caller's table is the applied state, and follows it.
        current = before
        try firewall.apply(diff: ElementDiff(from: ForwardingRuleset.elements(for: state), to: before), leadingTo: { current })
        #expect(storage(firewall.applied) == storage(current))
        let kernel = try #require(try lab.nft.read(lab.skeleton))
        let held = kernel.elements == before
        #expect(held, "the kernel holds the state the diff leads to")
    }
}
