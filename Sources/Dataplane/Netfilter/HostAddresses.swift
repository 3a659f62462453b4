import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// The addresses of a network namespace's interfaces: epokd's own, or the one at `namespacePath`.
public enum HostAddresses {
    public static func read(namespacePath: String? = nil) throws(NetlinkError) -> Set<IPAddress> {
        var addresses = Set<IPAddress>()
        try forEachEntry(namespacePath: namespacePath) { entry in
            guard let address = entry.ifa_addr else { return }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                addresses.insert(.v4(IPv4Address(value: v4)))
            case AF_INET6:
                var v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                addresses.insert(.v6(IPv6Address(bytes: withUnsafeBytes(of: &v6) { Array($0) })))
            default: return
            }
        }
        return addresses
    }

    /// The names of the namespace's interfaces, every link with or without an address.
    public static func interfaceNames(namespacePath: String? = nil) throws(NetlinkError) -> Set<String> {
        var names = Set<String>()
        try forEachEntry(namespacePath: namespacePath) { entry in
            if let name = entry.ifa_name { names.insert(String(cString: name)) }
        }
        return names
    }

    /// The namespace's interfaces by index (from their link entries).
    public static func interfacesByIndex(namespacePath: String? = nil) throws(NetlinkError) -> [UInt32: String] {
        var names: [UInt32: String] = [:]
        try forEachEntry(namespacePath: namespacePath) { entry in
            guard let name = entry.ifa_name, let address = entry.ifa_addr, Int32(address.pointee.sa_family) == AF_PACKET else { return }
            let index = address.withMemoryRebound(to: sockaddr_ll.self, capacity: 1) { $0.pointee.sll_ifindex }
            names[UInt32(index)] = String(cString: name)
        }
        return names
    }

    /// Calls `body` with every entry getifaddrs(3) gives in the namespace (links and addresses).
    private static func forEachEntry(namespacePath: String?, _ body: (ifaddrs) -> Void) throws(NetlinkError) {
        var nsfd: Int32 = -1
        if let namespacePath {
            nsfd = open(namespacePath, O_RDONLY | O_CLOEXEC)
            guard nsfd >= 0 else { throw NetlinkError(code: errno, operation: "open network namespace", subject: namespacePath) }
        }
        defer { if nsfd >= 0 { close(nsfd) } }
        var list: UnsafeMutablePointer<ifaddrs>?
        let result = cnf_getifaddrs(nsfd, &list)
        guard result == 0 else { throw NetlinkError(code: -result, operation: "read the host's interfaces", subject: namespacePath) }
        defer { freeifaddrs(list) }
        for entry in sequence(first: list, next: { $0?.pointee.ifa_next }) {
            if let entry { body(entry.pointee) }
        }
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
