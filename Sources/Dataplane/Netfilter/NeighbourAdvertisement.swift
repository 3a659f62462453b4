import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// Unsolicited neighbour advertisements (RFC 4861, 7.2.6): IPv6's counterpart of an ARP announcement.
public enum NeighbourAdvertisement {
    /// Tells every node on the interface at `index` that `addresses` are now at `hardwareAddress` (the Override
    /// flag set, twice, to ff02::1 with hop limit 255), so that neighbours with the old holder cached switch at once.
    public static func announce(_ addresses: Set<IPv6Address>, interfaceIndex index: Int32, hardwareAddress: [UInt8],
                                namespacePath: String?) throws(NetlinkError) {
        guard !addresses.isEmpty, hardwareAddress.count == 6 else { return }
        // A raw ICMPv6 socket: the kernel fills in the checksum.
        let fd = try namespacedSocket(AF_INET6, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_ICMPV6), namespacePath: namespacePath)
        guard fd >= 0 else { throw NetlinkError(code: -fd, operation: "open an ICMPv6 socket for neighbour advertisements (needs CAP_NET_RAW)") }
        defer { close(fd) }
        var hops: Int32 = 255
        var interface = UInt32(index)
        guard setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_MULTICAST_HOPS, &hops, socklen_t(MemoryLayout<Int32>.size)) == 0,
              setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_MULTICAST_IF, &interface, socklen_t(MemoryLayout<UInt32>.size)) == 0 else {
            throw NetlinkError(code: errno, operation: "prepare the neighbour advertisement socket")
        }
        var allNodes = sockaddr_in6()
        allNodes.sin6_family = sa_family_t(AF_INET6)
        allNodes.sin6_scope_id = interface
        withUnsafeMutableBytes(of: &allNodes.sin6_addr) { $0[0] = 0xff; $0[1] = 0x02; $0[15] = 0x01 }
        for _ in 0..<2 {
            for address in addresses.sorted() {
                // Type 136, code 0, checksum (the kernel's), flags Override, the target, its link-layer address option.
                let packet: [UInt8] = [136, 0, 0, 0, 0x20, 0, 0, 0] + address.bytes + [2, 1] + hardwareAddress
                let sent = withUnsafePointer(to: &allNodes) { to in
                    to.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, packet, packet.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
                }
                guard sent == packet.count else { throw NetlinkError(code: errno, operation: "send a neighbour advertisement for \(address)") }
            }
        }
    }
}
