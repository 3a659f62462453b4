import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// RFC 5227 probes over a packet socket: whether another host on a link already answers for IPv4 addresses,
/// asked before epokd takes them (`--manage-addresses`). Needs CAP_NET_RAW.
public enum ArpProbe {
    /// The addresses among `candidates` that another host on the interface at `index` (whose hardware address
    /// is `hardwareAddress`) claims: each is probed twice, and ARP from any other host that names it as its
    /// sender (a reply, a request of its own, or a probe for it) within `waitMilliseconds` counts.
    public static func answered(_ candidates: Set<IPv4Address>, interfaceIndex index: Int32, hardwareAddress: [UInt8],
                                namespacePath: String?, waitMilliseconds: Int = 300) throws(NetlinkError) -> Set<IPv4Address> {
        guard !candidates.isEmpty, hardwareAddress.count == 6 else { return [] }
        let (fd, link) = try packetSocket(interfaceIndex: index, namespacePath: namespacePath, what: "ARP probes")
        defer { close(fd) }
        var broadcast = link
        broadcast.sll_halen = 6
        withUnsafeMutableBytes(of: &broadcast.sll_addr) { for i in 0..<6 { $0[i] = 0xff } }
        func probe(_ address: IPv4Address) {
            // ARP request, Ethernet/IPv4, sender our hardware address and 0.0.0.0, target the candidate.
            var packet: [UInt8] = [0, 1, 8, 0, 6, 4, 0, 1] + hardwareAddress + [0, 0, 0, 0] + [UInt8](repeating: 0, count: 6)
            withUnsafeBytes(of: address.value.bigEndian) { packet += $0 }
            _ = withUnsafePointer(to: &broadcast) { to in
                to.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, packet, packet.count, 0, $0, socklen_t(MemoryLayout<sockaddr_ll>.size)) }
            }
        }
        candidates.forEach(probe)
        var found = Set<IPv4Address>()
        var buffer = [UInt8](repeating: 0, count: 1500)
        let start = Self.now()
        var probedAgain = false
        while found.count < candidates.count {
            let elapsed = Self.now() - start
            guard elapsed < waitMilliseconds else { break }
            if !probedAgain && elapsed >= waitMilliseconds / 3 {
                probedAgain = true
                candidates.subtracting(found).forEach(probe)
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, Int32(max(1, (probedAgain ? waitMilliseconds : waitMilliseconds / 3) - elapsed))) > 0 else { continue }
            while true {
                let n = recv(fd, &buffer, buffer.count, 0)
                guard n >= 28 else { break }
                // htype 1, ptype IPv4, lengths 6 and 4; a sender that is not us.
                guard buffer[0] == 0, buffer[1] == 1, buffer[2] == 8, buffer[3] == 0, buffer[4] == 6, buffer[5] == 4,
                      Array(buffer[8..<14]) != hardwareAddress else { continue }
                let sender = IPv4Address(buffer[14], buffer[15], buffer[16], buffer[17])
                let target = IPv4Address(buffer[24], buffer[25], buffer[26], buffer[27])
                if candidates.contains(sender) { found.insert(sender) }
                // Another host probing for the same address at the same time (RFC 5227, 2.1.1).
                if sender.value == 0, buffer[7] == 1, candidates.contains(target) { found.insert(target) }
            }
        }
        return found
    }

    /// Announces that `addresses` are now at `hardwareAddress` on the interface at `index` (RFC 5227 ARP
    /// announcements, twice, broadcast), so that neighbours with the old holder in their cache switch at once.
    public static func announce(_ addresses: Set<IPv4Address>, interfaceIndex index: Int32, hardwareAddress: [UInt8],
                                namespacePath: String?) throws(NetlinkError) {
        guard !addresses.isEmpty, hardwareAddress.count == 6 else { return }
        let (fd, link) = try packetSocket(interfaceIndex: index, namespacePath: namespacePath, what: "gratuitous ARP")
        defer { close(fd) }
        var broadcast = link
        broadcast.sll_halen = 6
        withUnsafeMutableBytes(of: &broadcast.sll_addr) { for i in 0..<6 { $0[i] = 0xff } }
        for _ in 0..<2 {
            for address in addresses.sorted() {
                // ARP request, sender and target both the address (an announcement).
                var ip: [UInt8] = []
                withUnsafeBytes(of: address.value.bigEndian) { ip += $0 }
                let packet: [UInt8] = [0, 1, 8, 0, 6, 4, 0, 1] + hardwareAddress + ip + [UInt8](repeating: 0, count: 6) + ip
                _ = withUnsafePointer(to: &broadcast) { to in
                    to.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, packet, packet.count, 0, $0, socklen_t(MemoryLayout<sockaddr_ll>.size)) }
                }
            }
        }
    }

    /// A packet socket for ARP in the namespace at `namespacePath`, bound to the interface at `index`.
    private static func packetSocket(interfaceIndex index: Int32, namespacePath: String?, what: String) throws(NetlinkError) -> (Int32, sockaddr_ll) {
        let arp = UInt16(ETH_P_ARP).bigEndian
        let fd = try namespacedSocket(AF_PACKET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), Int32(arp),
                                      namespacePath: namespacePath)
        guard fd >= 0 else { throw NetlinkError(code: -fd, operation: "open a packet socket for \(what) (needs CAP_NET_RAW)") }
        var link = sockaddr_ll()
        link.sll_family = UInt16(AF_PACKET)
        link.sll_protocol = arp
        link.sll_ifindex = index
        let bound = withUnsafePointer(to: &link) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_ll>.size)) } }
        guard bound == 0 else {
            let code = errno
            close(fd)
            throw NetlinkError(code: code, operation: "bind the \(what) socket")
        }
        return (fd, link)
    }

    /// Milliseconds of the monotonic clock.
    private static func now() -> Int {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return time.tv_sec * 1000 + time.tv_nsec / 1_000_000
    }
}
