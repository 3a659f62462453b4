import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// A netlink socket bound to one network namespace; closed when released.
public final class NetlinkSocket {
    let fd: Int32
    private var sequence: UInt32
    /// Reused for every datagram: a dump answers in hundreds of them.
    private var receiveBuffer = [UInt8](repeating: 0, count: 1 << 18)

    /// Opens a socket on `bus`, inside the network namespace at `namespacePath`
    /// (`/run/netns/NAME`, `/proc/PID/ns/net`) or in the process's own when nil.
    public init(bus: Int32 = NETLINK_NETFILTER, namespacePath: String? = nil) throws(NetlinkError) {
        let result = try namespacedSocket(AF_NETLINK, Int32(SOCK_RAW.rawValue), bus, namespacePath: namespacePath)
        guard result >= 0 else {
            if let namespacePath, -result == EPERM {
                throw NetlinkError(code: EPERM, operation: "enter network namespace \(namespacePath)",
                                   subject: "--netns needs CAP_SYS_ADMIN (setns) as well as CAP_NET_ADMIN"
                                    // systemd sets INVOCATION_ID for the processes of a unit.
                                    + (getenv("INVOCATION_ID") != nil ? ", and in a systemd unit RestrictNamespaces=net (RestrictNamespaces=yes refuses setns)" : ""))
            }
            throw NetlinkError(code: -result, operation: "open netlink socket")
        }
        fd = result
        sequence = UInt32(truncatingIfNeeded: time(nil))
        // Extended acks name the rejected attribute; capped acks keep error replies small.
        try setOption(SOL_NETLINK, NETLINK_EXT_ACK, Int32(1), "enable extended acknowledgements")
        try setOption(SOL_NETLINK, NETLINK_CAP_ACK, Int32(1), "cap acknowledgements")
        var address = sockaddr_nl()
        address.nl_family = sa_family_t(AF_NETLINK)
        let fd = fd
        _ = try Syscall.call("bind netlink socket") {
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_nl>.size)) }
            }
        }
        // A failure above leaves the socket to deinit, which runs for an initializer that throws once every
        // property is set: closing it here as well would close a number another thread may have reused.
    }

    /// `setsockopt` of one value; a failure throws with the errno read at once.
    private func setOption<T: BitwiseCopyable>(_ level: Int32, _ name: Int32, _ value: T, _ what: String) throws(NetlinkError) {
        let fd = fd
        var value = value
        _ = try Syscall.call(what) { setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<T>.size)) }
    }

    deinit { close(fd) }

    /// Bounds how long a reply may take and makes room for large answers (dumps, many acknowledgements).
    /// `SO_RCVBUFFORCE` needs CAP_NET_ADMIN; without it the ordinary (capped) `SO_RCVBUF` is used.
    func prepareForReplies(timeoutSeconds: Int = 10, receiveBuffer: Int32 = 4 << 20) throws(NetlinkError) {
        try setOption(SOL_SOCKET, SO_RCVTIMEO, timeval(tv_sec: timeoutSeconds, tv_usec: 0), "set the netlink receive timeout")
        do {
            try setOption(SOL_SOCKET, SO_RCVBUFFORCE, receiveBuffer, "raise the netlink receive buffer")
        } catch {
            try setOption(SOL_SOCKET, SO_RCVBUF, receiveBuffer, "raise the netlink receive buffer")
        }
    }

    /// Hands out `count` consecutive sequence numbers.
    func nextSequence(count: UInt32 = 1) -> UInt32 {
        defer { sequence &+= count }
        return sequence
    }

    /// Makes room for a batch of `bytes` in the send buffer (`SO_SNDBUFFORCE`, needs CAP_NET_ADMIN).
    func ensureSendBuffer(_ bytes: Int) throws(NetlinkError) {
        var current: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        let fd = fd
        _ = try Syscall.call("read the netlink send buffer size") { getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &current, &length) }
        // The kernel doubles the value it is given and reports the doubled size.
        guard Int(current) < bytes * 2 else { return }
        let wanted = Int32(clamping: bytes + 65536)
        do {
            try setOption(SOL_SOCKET, SO_SNDBUFFORCE, wanted, "raise the netlink send buffer")
        } catch {
            try setOption(SOL_SOCKET, SO_SNDBUF, wanted, "raise the netlink send buffer")
        }
    }

    /// Sends one message (a request or a dump request).
    func send(_ message: [UInt8], operation: String) throws(NetlinkError) {
        var address = sockaddr_nl()
        address.nl_family = sa_family_t(AF_NETLINK)
        let fd = fd
        let sent = try Syscall.call(operation) {
            message.withUnsafeBytes { buffer in
                withUnsafePointer(to: &address) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { kernel in
                        sendto(fd, buffer.baseAddress, buffer.count, 0, kernel, socklen_t(MemoryLayout<sockaddr_nl>.size))
                    }
                }
            }
        }
        guard sent == message.count else { throw NetlinkError(code: EMSGSIZE, operation: operation, subject: "sent \(sent) of \(message.count) bytes") }
    }

    /// Receives one datagram; nil when `wait` is false and nothing is queued.
    func receive(wait: Bool, operation: String) throws(NetlinkError) -> [UInt8]? {
        let fd = fd
        let n: Int
        do {
            n = try Syscall.call(operation) {
                receiveBuffer.withUnsafeMutableBytes { raw in recv(fd, raw.baseAddress, raw.count, wait ? 0 : Int32(MSG_DONTWAIT)) }
            }
        } catch where !wait && (error.code == EAGAIN || error.code == EWOULDBLOCK) {
            return nil
        }
        return Array(receiveBuffer[0..<n])
    }

    /// Sends a dump request and hands each answer message to `body` until `NLMSG_DONE`.
    func dump(_ request: [UInt8], operation: String, _ body: (UnsafePointer<nlmsghdr>) throws(NetlinkError) -> Void) throws(NetlinkError) {
        try send(request, operation: operation)
        let seq = request.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self) }
        var interrupted = false
        while true {
            guard let datagram = try receive(wait: true, operation: operation) else { continue }
            var done = false
            try NetlinkMessages.forEach(in: datagram) { (header, pointer) throws(NetlinkError) in
                guard header.nlmsg_seq == seq else { return }
                if Int32(header.nlmsg_flags) & NLM_F_DUMP_INTR != 0 { interrupted = true }
                switch Int32(header.nlmsg_type) {
                case NLMSG_DONE:
                    done = true
                case NLMSG_ERROR:
                    let reply = NetlinkMessages.errorReply(pointer)
                    if reply.code != 0 {
                        throw NetlinkError(code: reply.code, operation: operation, kernelMessage: reply.message)
                    }
                    done = true
                default:
                    try body(pointer)
                }
            }
            if done { break }
        }
        // A commit during a multi-message dump makes it inconsistent: the caller reads again.
        if interrupted { throw NetlinkError(code: EINTR, operation: operation, subject: "the table changed during the dump") }
    }

}

/// System calls in the style of swift-nio's wrappers: errno is read inside the call, right after it fails,
/// EINTR is retried, and every other failure throws.
enum Syscall {
    static func call<T: FixedWidthInteger>(_ operation: @autoclosure () -> String, _ body: () -> T) throws(NetlinkError) -> T {
        while true {
            var code: Int32 = 0
            let result = { () -> T in
                let r = body()
                if r < 0 { code = errno }
                return r
            }()
            if result >= 0 { return result }
            if code == EINTR { continue }
            throw NetlinkError(code: code, operation: operation())
        }
    }
}

/// Walking and decoding raw netlink messages.
enum NetlinkMessages {
    /// Calls `body` for each message of a datagram.
    static func forEach(in datagram: [UInt8], _ body: (nlmsghdr, UnsafePointer<nlmsghdr>) throws(NetlinkError) -> Void) throws(NetlinkError) {
        var failure: NetlinkError?
        datagram.withUnsafeBytes { raw in
            var offset = 0
            while offset + MemoryLayout<nlmsghdr>.size <= raw.count {
                let header = raw.loadUnaligned(fromByteOffset: offset, as: nlmsghdr.self)
                let length = Int(header.nlmsg_len)
                guard length >= MemoryLayout<nlmsghdr>.size, offset + length <= raw.count else { return }
                let pointer = (raw.baseAddress! + offset).assumingMemoryBound(to: nlmsghdr.self)
                do throws(NetlinkError) {
                    try body(header, pointer)
                } catch {
                    failure = error
                    return
                }
                offset += (length + 3) & ~3
            }
        }
        if let failure { throw failure }
    }

    /// The errno, extended-ack text and offending-attribute offset of an `NLMSG_ERROR` message.
    static func errorReply(_ message: UnsafePointer<nlmsghdr>) -> (code: Int32, message: String?, attributeOffset: Int?) {
        let raw = UnsafeRawPointer(message)
        let total = Int(message.pointee.nlmsg_len)
        let headerSize = MemoryLayout<nlmsghdr>.size
        guard total >= headerSize + 4 else { return (EPROTO, nil, nil) }
        let code = -raw.loadUnaligned(fromByteOffset: headerSize, as: Int32.self)
        let flags = Int32(message.pointee.nlmsg_flags)
        guard flags & NLM_F_ACK_TLVS != 0 else { return (code, nil, nil) }
        // The request is echoed whole unless the reply is capped to its header.
        let echoed = raw.loadUnaligned(fromByteOffset: headerSize + 4, as: nlmsghdr.self)
        let echoedLength = flags & NLM_F_CAPPED != 0 ? headerSize : Int(echoed.nlmsg_len)
        var offset = headerSize + 4 + ((echoedLength + 3) & ~3)
        var text: String?
        var attributeOffset: Int?
        while offset + 4 <= total {
            let length = Int(raw.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            let type = Int32(raw.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self) & 0x3fff)
            guard length >= 4, offset + length <= total else { break }
            let payload = UnsafeRawBufferPointer(start: raw + offset + 4, count: length - 4)
            if type == Int32(NLMSGERR_ATTR_MSG.rawValue) {
                text = String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self)
            } else if type == Int32(NLMSGERR_ATTR_OFFS.rawValue), payload.count >= 4 {
                attributeOffset = Int(payload.loadUnaligned(as: UInt32.self))
            }
            offset += (length + 3) & ~3
        }
        return (code, text, attributeOffset)
    }
}

/// A socket opened inside the network namespace at `namespacePath` (or this process's): its descriptor, or minus
/// the errno of what failed (entering the namespace, or the socket itself), for the caller to say which socket.
func namespacedSocket(_ domain: Int32, _ type: Int32, _ proto: Int32, namespacePath: String?) throws(NetlinkError) -> Int32 {
    var nsfd: Int32 = -1
    if let namespacePath {
        nsfd = open(namespacePath, O_RDONLY | O_CLOEXEC)
        guard nsfd >= 0 else { throw NetlinkError(code: errno, operation: "open network namespace", subject: namespacePath) }
    }
    defer { if nsfd >= 0 { close(nsfd) } }
    return cnf_socket_open(domain, type, proto, nsfd)
}

/// A raw netlink socket on `bus` inside the network namespace at `namespacePath` (or this process's), bound and
/// subscribed to the multicast `groups`: what a watcher of notifications reads from. Returns its descriptor.
/// With `receiveBuffer`, the socket's buffer is made that large (room for a burst; what does not fit is lost, ENOBUFS).
func subscribedNetlinkSocket(bus: Int32, groups: [UInt32], namespacePath: String?, what: String, receiveBuffer: Int32? = nil) throws(NetlinkError) -> Int32 {
    let fd = try namespacedSocket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), bus, namespacePath: namespacePath)
    guard fd >= 0 else { throw NetlinkError(code: -fd, operation: "open a netlink socket for \(what)") }
    if var size = receiveBuffer { _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, 4) }
    var address = sockaddr_nl()
    address.nl_family = sa_family_t(AF_NETLINK)
    var joined = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_nl>.size)) } } == 0
    for group in groups where joined {
        var group = group
        joined = setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, 4) == 0
    }
    guard joined else {
        let code = errno
        close(fd)
        throw NetlinkError(code: code, operation: "subscribe to \(what)")
    }
    return fd
}

/// Waits at most `timeout` seconds for notifications on the subscribed socket `fd`, then hands every netlink
/// message that has arrived to `body` (walked with libmnl); `lost` is set when the kernel dropped some because
/// the socket's buffer was full.
func receiveNotifications(_ fd: Int32, into buffer: inout [UInt8], timeout: Double, lost: inout Bool, what: String,
                          _ body: (UnsafePointer<nlmsghdr>) -> Void) throws(NetlinkError) {
    var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    let ready = poll(&poller, 1, Int32(max(0, timeout * 1000)))
    if ready < 0 {
        if errno == EINTR { return }
        throw NetlinkError(code: errno, operation: "wait for \(what)")
    }
    guard ready > 0 else { return }
    while true {
        let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
        if n < 0 {
            if errno == ENOBUFS { lost = true; continue }
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { break }
            throw NetlinkError(code: errno, operation: "read \(what)")
        }
        if n == 0 { break }
        buffer.withUnsafeBytes { raw in
            guard let start = raw.baseAddress else { return }
            var remaining = Int32(n)
            var message: UnsafePointer<nlmsghdr>? = start.assumingMemoryBound(to: nlmsghdr.self)
            while let current = message, mnl_nlmsg_ok(current, remaining) {
                body(current)
                message = UnsafePointer(mnl_nlmsg_next(current, &remaining))
            }
        }
    }
}
