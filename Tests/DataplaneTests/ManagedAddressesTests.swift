import Dataplane
import NetnsLab
import Testing

@Suite("Addresses epokd adds for egress and bridges, over rtnetlink")
struct ManagedAddressesTests {
    @Test("needed addresses are added with epokd's mark and removed when unneeded, also by a new instance; the operator's are used, never removed")
    func addAndRemove() throws {
        let ns = try NetworkNamespace("addrs")
        try ns.exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        try ns.exec(["ip", "link", "set", "eth0", "up"])
        try ns.exec(["ip", "addr", "add", "198.51.100.20/32", "dev", "eth1"])
        let ours = IPAddress("198.51.100.9")!, ours6 = IPAddress("2001:db8::9")!, operators = IPAddress("198.51.100.20")!
        let addresses = try ManagedAddresses(interface: "eth0", namespacePath: ns.path)
        #expect(try !ManagedAddresses.isLocal(ours, namespacePath: ns.path))
        let done = try addresses.reconcile(needed: [ours, ours6, operators])
        #expect(done.added == [ours, ours6] && done.removed.isEmpty, "the operator's address, on another interface, is used as it is")
        #expect(done.answeredElsewhere.isEmpty && done.probeRefused == nil)
        let listing = try ns.exec(["ip", "addr", "show", "dev", "eth0"]).output
        #expect(listing.contains("198.51.100.9/32") && listing.contains("2001:db8::9/128"), "\(listing)")
        #expect(try ManagedAddresses.isLocal(ours, namespacePath: ns.path) && ManagedAddresses.isLocal(ours6, namespacePath: ns.path))
        // A restart: a new instance knows its own by the mark.
        let restarted = try ManagedAddresses(interface: "eth0", namespacePath: ns.path)
        #expect(try restarted.owned() == [ours, ours6])
        #expect(try restarted.reconcile(needed: [ours6]).removed == [ours])
        try restarted.removeAll()
        #expect(try restarted.owned().isEmpty)
        #expect(try ns.exec(["ip", "addr", "show", "dev", "eth1"]).output.contains("198.51.100.20/32"), "the operator's address stays")
        #expect(try ManagedAddresses.isLocal(operators, namespacePath: ns.path) && !ManagedAddresses.isLocal(ours, namespacePath: ns.path))
        #expect(throws: NetlinkError.self) { _ = try ManagedAddresses(interface: "nope0", namespacePath: ns.path) }
    }

    @Test("an address another host on the link has is not taken (IPv4: an ARP probe, RFC 5227; IPv6: the kernel's duplicate address detection); a free one is",
          arguments: [("192.0.2.50", "192.0.2.51"), ("2001:db8::50", "2001:db8::51")])
    func answeredElsewhere(taken: String, free: String) throws {
        let router = try NetworkNamespace("probe-r"), lan = try NetworkNamespace("probe-l")
        try router.link(to: lan, address: "192.0.2.1/24", otherAddress: "192.0.2.50/24")
        if taken.contains(":") {
            try lan.exec(["ip", "-6", "addr", "add", "\(taken)/64", "dev", "eth0", "nodad"])
            // The lab turns detection off for its interfaces; a router's link has it on.
            try router.exec(["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1"])
        }
        let addresses = try ManagedAddresses(interface: "eth0", namespacePath: router.path)
        let done = try addresses.reconcile(needed: [IPAddress(taken)!, IPAddress(free)!])
        #expect(done.answeredElsewhere == [IPAddress(taken)!] && done.added == [IPAddress(free)!], "\(done)")
        #expect(try addresses.owned() == [IPAddress(free)!])
    }

    @Test("the gateways are read from the kernel's routes, IPv4 and IPv6")
    func gateways() throws {
        let ns = try NetworkNamespace("gw")
        try ns.vethPair("v0", "v1", address: "192.0.2.1/24")
        try ns.exec(["ip", "-6", "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad"])
        try ns.exec(["ip", "route", "add", "default", "via", "192.0.2.254"])
        try ns.exec(["ip", "-6", "route", "add", "default", "via", "2001:db8::fe"])
        #expect(try ManagedAddresses.gateways(namespacePath: ns.path) == [IPAddress("192.0.2.254")!, IPAddress("2001:db8::fe")!])
    }
}
