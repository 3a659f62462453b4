import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Warns about forwarding switches that are off, or turns them on (`--enable-forwarding`), in the namespace programmed.
func checkForwarding(_ switches: ForwardingSwitches, enable: Bool, logger: Logger) {
    let where_ = switches.namespacePath.map { " in \($0)" } ?? ""
    do {
        for name in try switches.off() {
            if enable {
                do {
                    try switches.enable(name)
                    logger.notice("set \(name) = 1\(where_)")
                } catch {
                    logger.error("cannot set \(name) = 1\(where_): \(error)")
                }
            } else {
                logger.warning("\(name) is 0\(where_): forwarded connections will not leave this host (use --enable-forwarding or sysctl -w \(name)=1)")
            }
        }
    } catch {
        logger.warning("cannot read the forwarding switches\(where_): \(error)")
    }
}

/// The addresses of the interfaces of epokd's own network namespace.
enum HostAddresses {
    static func current() -> Set<IPAddress> {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var result = Set<IPAddress>()
        for entry in sequence(first: first, next: { $0.pointee.ifa_next }) {
            guard let address = entry.pointee.ifa_addr else { continue }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                result.insert(.v4(IPv4Address(value: v4)))
            case AF_INET6:
                var v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                result.insert(.v6(IPv6Address(bytes: withUnsafeBytes(of: &v6) { Array($0) })))
            default: continue
            }
        }
        return result
    }
}
