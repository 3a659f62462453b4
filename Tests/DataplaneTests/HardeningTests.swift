import Dataplane
import Foundation
import NetnsLab
import Testing

private func cidrs(_ text: String) -> [CIDR] {
    text.split(separator: ",").map { try! CIDR(parsing: $0) }
}

@Suite("Allow-ranges as disjoint intervals")
struct AddressRangeTests {
    @Test("nested, overlapping and adjacent prefixes become the ranges they cover together")
    func merges() {
        #expect(AddressRange.union(of: cidrs("10.0.0.0/8,10.1.0.0/16")).map(\.description) == ["10.0.0.0-10.255.255.255"])
        #expect(AddressRange.union(of: cidrs("10.0.0.0/25,10.0.0.128/25,10.0.1.0/24")).map(\.description) == ["10.0.0.0-10.0.1.255"],
                "adjacent prefixes join")
        #expect(AddressRange.union(of: cidrs("192.168.0.0/24,10.0.0.0/8,192.168.2.0/24")).map(\.description)
                == ["10.0.0.0-10.255.255.255", "192.168.0.0-192.168.0.255", "192.168.2.0-192.168.2.255"], "gaps stay gaps, in order")
        #expect(AddressRange.union(of: cidrs("0.0.0.0/0,255.255.255.255/32")).map(\.description) == ["0.0.0.0-255.255.255.255"])
        #expect(AddressRange.union(of: cidrs("2001:db8::/32,2001:db8:1::/48,10.0.0.1/32")).map(\.description)
                == ["10.0.0.1", "2001:db8::-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"], "IPv4 first, then IPv6")
        #expect(AddressRange.union(of: cidrs("::/0,ffff::/16")).map(\.description) == ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
        #expect(AddressRange.union(of: cidrs("::/1,8000::/1")).count == 1, "adjacent across the 64-bit halves join")
    }

    @Test("property: the ranges are sorted, disjoint, not adjacent, and hold exactly the addresses the prefixes hold")
    func sameAddresses() {
        var rng = SeededGenerator()
        for _ in 0..<300 {
            let prefixes = (0..<Int.random(in: 1...12, using: &rng)).map { _ in
                CIDR(unchecked: .v4(IPv4Address(value: UInt32.random(in: 0...0xFFFF, using: &rng) << 16)), prefixLength: Int.random(in: 8...24, using: &rng))
            }
            let ranges = AddressRange.union(of: prefixes)
            func value(_ a: IPAddress) -> UInt32 { if case .v4(let v) = a { v.value } else { 0 } }
            for (a, b) in zip(ranges, ranges.dropFirst()) {
                #expect(UInt64(value(a.last)) + 1 < UInt64(value(b.first)), "\(rng): \(a) and \(b) touch or overlap")
            }
            for _ in 0..<200 {
                let probe = IPAddress.v4(IPv4Address(value: UInt32.random(in: 0...UInt32.max, using: &rng) & 0xFFFF_FF00 | 0x80))
                let inPrefix = prefixes.contains { $0.contains(probe) }
                let inRange = ranges.contains { value($0.first) <= value(probe) && value(probe) <= value($0.last) }
                #expect(inPrefix == inRange, "\(rng): \(probe) with \(prefixes)")
            }
        }
    }

    @Test("a range prints as the fewest prefixes that cover exactly it, in plan and status (field by field in an element)")
    func prefixes() throws {
        func range(_ a: String, _ b: String) -> AddressRange { AddressRange(first: IPAddress(a)!, last: IPAddress(b)!) }
        #expect(range("10.0.0.0", "10.0.1.255").cidrs.map(\.description) == ["10.0.0.0/23"])
        #expect(range("10.0.0.1", "10.0.0.6").cidrs.map(\.description) == ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"])
        #expect(range("0.0.0.0", "255.255.255.255").cidrs.map(\.description) == ["0.0.0.0/0"])
        #expect(range("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").cidrs.map(\.description) == ["::/0"])
        #expect(range("2001:db8::", "2001:db8:0:1:ffff:ffff:ffff:ffff").cidrs.map(\.description) == ["2001:db8::/63"])
        #expect(range("10.0.0.9", "10.0.0.1").cidrs.isEmpty)
        // Random ranges: the prefixes are aligned, adjacent, in order, and cover exactly the range, the fewest that can.
        var rng = SeededGenerator()
        for _ in 0..<2_000 {
            let a = UInt32.random(in: 0...UInt32.max, using: &rng), b = Bool.random(using: &rng) ? a &+ UInt32.random(in: 0...300, using: &rng) : UInt32.random(in: 0...UInt32.max, using: &rng)
            let (first, last) = (min(a, b), max(a, b))
            let prefixes = AddressRange(first: .v4(IPv4Address(value: first)), last: .v4(IPv4Address(value: last))).cidrs
            var next = UInt64(first)
            for p in prefixes {
                guard case .v4(let start) = p.range.first, case .v4(let end) = p.range.last else { Issue.record("\(rng): \(p) is not IPv4"); return }
                #expect(UInt64(start.value) == next && p.address == p.range.first, "\(rng): \(prefixes)")
                next = UInt64(end.value) + 1
            }
            #expect(next == UInt64(last) + 1, "\(rng): \(prefixes) end at \(next), not after \(last)")
            // Fewest: no two neighbours of one length could merge into the prefix above them.
            for (p, q) in zip(prefixes, prefixes.dropFirst()) where p.prefixLength == q.prefixLength && p.prefixLength > 0 {
                guard case .v4(let start) = p.address else { continue }
                #expect(start.value & (UInt32(1) << (32 - p.prefixLength)) != 0, "\(rng): \(p) and \(q) make one prefix")
            }
        }
        let element = Element(key: [.ipv4(IPv4Address("198.51.100.0")!), .l4proto(.tcp), .port(Port(25565)!)],
                              keyEnd: [.ipv4(IPv4Address("198.51.100.255")!), .l4proto(.tcp), .port(Port(25565)!)])
        #expect(element.description == "198.51.100.0/24 . tcp . 25565")
    }
}

@Suite("Hostile values at the kernel boundary, in a throwaway namespace")
struct KernelBoundaryTests {
    @Test("nested allow-ranges in both families commit; overlapping intervals sent as they are would be refused")
    func nestedRangesCommit() throws {
        let ns = try NetworkNamespace("nested")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: nft)
        let mapping = Mapping(proto: .tcp, hostPort: Port(22)!, nodePort: Port(30022)!,
                              allowedSources: cidrs("10.0.0.0/8,10.1.0.0/16,10.2.3.0/24,2001:db8::/32,2001:db8:5::/48"), label: "ns/nested")
        let desired = ForwardingRuleset.elements(for: ForwardingState(interfaces: ["eth0"], mappings: [mapping]))
        try firewall.synchronize(desired)
        let kernel = try #require(try nft.read(firewall.skeleton))
        #expect(kernel.elements["allow4"]?.count == 1 && kernel.elements["allow6"]?.count == 1)
        #expect(kernel.elements == desired)

        // What the merge prevents: the same prefixes as separate intervals are refused, and the check names the element.
        let key: Fields = [.l4proto(.tcp), .port(Port(23)!)]
        let outer = Element(key: key + [.ipv4(IPv4Address(10, 0, 0, 0))], keyEnd: key + [.ipv4(IPv4Address(10, 255, 255, 255))])
        let inner = Element(key: key + [.ipv4(IPv4Address(10, 1, 0, 0))], keyEnd: key + [.ipv4(IPv4Address(10, 1, 255, 255))])
        var overlapping = desired
        overlapping["allow4"]!.formUnion([outer, inner])
        let before = try ns.nftList("inet", "epok")
        let error = #expect(throws: NetlinkError.self) { try firewall.apply(overlapping) }
        #expect(error?.code == EEXIST)
        let refusals = try firewall.rejectedElements(overlapping)
        #expect(refusals.count == 1, "\(refusals)")
        #expect(refusals.first?.rejected.first?.set == "allow4")
        // The same check when only epokd's chains differ (idle ones left out): the sets stay, the diff is checked.
        let fewerChains = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok", for: desired), nftables: nft)
        let held = try #require(try nft.read(fewerChains.skeleton))
        #expect(held.holdsSets(of: fewerChains.skeleton) && !held.matches(fewerChains.skeleton))
        let chainRefusals = try fewerChains.rejectedElements(overlapping)
        #expect(chainRefusals.count == 1 && chainRefusals.first?.rejected.first?.set == "allow4", "\(chainRefusals)")
        #expect(try ns.nftList("inet", "epok") == before, "neither the refused commit nor the checks changed anything")
    }

    @Test("element comments with multi-byte characters and control bytes are cut on a character boundary and read back equal")
    func comments() throws {
        let ns = try NetworkNamespace("comment")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "epok"), nftables: nft)
        let labels = [String(repeating: "é", count: 100) + "/x",            // 202 bytes, a cut at 127 would split "é"
                      String(repeating: "a", count: 126) + "€",              // 129 bytes: the euro sign must go whole
                      "ns/evil\nname\u{0}with\u{7f}controls", "🙂" + String(repeating: "b", count: 200)]
        let mappings = labels.enumerated().map { Mapping(proto: .tcp, hostPort: Port(100 + $0.offset)!, nodePort: Port(30000 + $0.offset)!, label: $0.element) }
        let desired = ForwardingRuleset.elements(for: ForwardingState(interfaces: ["eth0"], mappings: mappings))
        for element in desired["services"]! {
            let comment = try #require(element.comment)
            #expect(comment.utf8.count <= Element.commentLimit)
            #expect(!comment.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f })
        }
        try firewall.synchronize(desired)
        let outcome = try firewall.synchronize(desired)
        #expect(outcome == Firewall.Outcome(rebuilt: false, added: 0, deleted: 0), "a read-back of an unchanged table repairs nothing")
        #expect(try #require(try nft.read(firewall.skeleton)).elements == desired)
    }

    @Test("a table of that name that epokd did not make is never replaced, flushed or deleted")
    func foreignTable() throws {
        let ns = try NetworkNamespace("foreign")
        try ns.exec(["nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; add rule inet filter input tcp dport 22 accept"])
        let before = try ns.nftList("inet", "filter")
        let firewall = Firewall(skeleton: ForwardingRuleset.skeleton(table: "filter"), nftables: try Nftables(namespacePath: ns.path))
        let desired = ForwardingRuleset.elements(for: ForwardingState(interfaces: ["eth0"]))
        let error = #expect(throws: NetlinkError.self) { try firewall.synchronize(desired) }
        #expect(error?.description.contains("table inet filter exists and is not epokd's: choose another --table") == true, "\(String(describing: error))")
        #expect(throws: NetlinkError.self) { try firewall.remove() }
        #expect(throws: NetlinkError.self) { try firewall.plan(desired) }
        #expect(try ns.nftList("inet", "filter") == before)
    }

    @Test("the host's own addresses are read in the namespace epokd programs")
    func hostAddresses() throws {
        let ns = try NetworkNamespace("addrs")
        try ns.exec(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        try ns.exec(["ip", "addr", "add", "10.9.8.7/24", "dev", "d0"])
        try ns.exec(["ip", "addr", "add", "fd00:9::7/64", "dev", "d0", "nodad"])
        let addresses = try HostAddresses.read(namespacePath: ns.path)
        #expect(addresses.contains(IPAddress("10.9.8.7")!) && addresses.contains(IPAddress("fd00:9::7")!) && addresses.contains(IPAddress("127.0.0.1")!))
        #expect(!(try HostAddresses.read()).contains(IPAddress("10.9.8.7")!), "not epokd's own namespace's")
    }

    @Test("a diff sends interval-set elements in key order")
    func sortedIntervals() {
        let skeleton = ForwardingRuleset.skeleton()
        var rng = SeededGenerator()
        var diff = ElementDiff()
        for _ in 0..<200 {
            let first = UInt32.random(in: 0...0xFFFF_0000, using: &rng)
            let key: Fields = [.l4proto(.tcp), .port(Port(Int.random(in: 1...3, using: &rng))!)]
            diff.remove(Element(key: key + [.ipv4(IPv4Address(value: first))], keyEnd: key + [.ipv4(IPv4Address(value: first + 10))]), from: "allow4")
        }
        for operation in diff.transaction(for: skeleton).operations {
            guard case .deleteElements(_, let set, let elements) = operation, set.name == "allow4" else { continue }
            #expect(zip(elements, elements.dropFirst()).allSatisfy { !$1.key.lexicographicallyPrecedes($0.key) }, "\(rng)")
        }
    }
}
