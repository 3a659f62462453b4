import CNetfilter
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Follows a network namespace's addresses as rtnetlink announces them (RTMGRP_IPV4_IFADDR and
/// RTMGRP_IPV6_IFADDR), no polling: `changed` is called on a thread of its own after each burst of
/// notifications (and after a lost one: the socket's buffer overran).
public final class AddressWatcher: @unchecked Sendable {
    private let fd: Int32
    private let lock = NSLock()
    private var stopped = false
    private var thread: OwnThread?

    /// Subscribes in the namespace at `namespacePath` (or this process's).
    public init(namespacePath: String? = nil) throws(NetlinkError) {
        fd = try subscribedNetlinkSocket(bus: NETLINK_ROUTE, groups: [UInt32(RTNLGRP_IPV4_IFADDR.rawValue), UInt32(RTNLGRP_IPV6_IFADDR.rawValue)],
                                         namespacePath: namespacePath, what: "address notifications")
    }

    /// Starts calling `changed` after every burst of notifications, until `stop`.
    public func start(_ changed: @escaping @Sendable () -> Void) throws(ThreadRefused) {
        let started = try OwnThread.start("epokd-addresses") { [self] in
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while !lock.withLock({ stopped }) {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, 200) > 0 else { continue }
                // Take the whole burst (an interface brought up announces several addresses), then say it once.
                while true {
                    let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                    if n < 0 && errno == ENOBUFS { continue }
                    if n <= 0 { break }
                }
                changed()
            }
        }
        lock.withLock { thread = started }
    }

    public func stop() {
        lock.withLock { stopped = true; return thread }?.join()
    }

    deinit { close(fd) }
}
