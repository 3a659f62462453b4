import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// The addresses of a network namespace's interfaces: epokd's own, or the one at `namespacePath`.
public enum HostAddresses {
    public static func read(namespacePath: String? = nil) throws(NetlinkError) -> Set<IPAddress> {
        var nsfd: Int32 = -1
        if let namespacePath {
            nsfd = open(namespacePath, O_RDONLY | O_CLOEXEC)
            guard nsfd >= 0 else { throw NetlinkError(code: errno, operation: "open network namespace", subject: namespacePath) }
        }
        defer { if nsfd >= 0 { close(nsfd) } }
        var list: UnsafeMutablePointer<ifaddrs>?
        let result = cnf_getifaddrs(nsfd, &list)
        guard result == 0 else { throw NetlinkError(code: -result, operation: "read the host's addresses", subject: namespacePath) }
        defer { freeifaddrs(list) }
        var addresses = Set<IPAddress>()
        for entry in sequence(first: list, next: { $0?.pointee.ifa_next }) {
            guard let address = entry?.pointee.ifa_addr else { continue }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                addresses.insert(.v4(IPv4Address(value: v4)))
            case AF_INET6:
                var v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                addresses.insert(.v6(IPv6Address(bytes: withUnsafeBytes(of: &v6) { Array($0) })))
            default: continue
            }
        }
        return addresses
    }
}

/// The thread that calls `enter` does all its networking in another network namespace from then on.
public enum NamespaceThread {
    /// Moves the calling thread into the network namespace at `path`; call it only on a thread of your own.
    public static func enter(_ path: String) throws(NetlinkError) {
        let nsfd = open(path, O_RDONLY | O_CLOEXEC)
        guard nsfd >= 0 else { throw NetlinkError(code: errno, operation: "open network namespace", subject: path) }
        defer { close(nsfd) }
        let result = cnf_enter_network_namespace(nsfd)
        guard result == 0 else { throw NetlinkError(code: -result, operation: "enter network namespace", subject: path) }
    }
}
