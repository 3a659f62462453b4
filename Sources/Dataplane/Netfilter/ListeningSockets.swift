import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// A socket something on the host listens on (TCP) or receives on unconnected (UDP), read over sock_diag.
public struct Listener: Hashable, Sendable {
    public var proto: L4Protocol
    public var port: Port
    /// The local address it is bound to (`0.0.0.0` or `::` for every address).
    public var address: IPAddress
    /// The socket's inode, to find the process that holds it in /proc.
    public var inode: UInt32

    /// Whether traffic from outside can reach it (it is not bound to a loopback address).
    public var isReachable: Bool {
        switch address {
        case .v4(let a): a.value >> 24 != 127
        case .v6(let a): !(a.high == 0 && a.low == 1)
        }
    }
}

/// Reads the host's listening sockets over NETLINK_SOCK_DIAG (no shell, no /proc/net parsing).
public enum ListeningSockets {
    /// TCP sockets in LISTEN and unconnected UDP sockets, IPv4 and IPv6, of the namespace at `namespacePath`
    /// (or epokd's own).
    public static func read(namespacePath: String? = nil) throws(NetlinkError) -> [Listener] {
        let socket = try NetlinkSocket(bus: NETLINK_SOCK_DIAG, namespacePath: namespacePath)
        try socket.prepareForReplies(timeoutSeconds: 5, receiveBuffer: 1 << 20)
        var result: [Listener] = []
        for family in [UInt8(AF_INET), UInt8(AF_INET6)] {
            for (proto, states) in [(L4Protocol.tcp, UInt32(1) << 10), (.udp, UInt32(1) << 7)] {   // TCP_LISTEN, TCP_CLOSE
                try socket.dump(request(socket, family: family, proto: proto, states: states), operation: "read listening \(proto) sockets") { message throws(NetlinkError) in
                    if let listener = decode(message, proto: proto) { result.append(listener) }
                }
            }
        }
        return result
    }

    /// An `inet_diag_req_v2` dump request.
    private static func request(_ socket: NetlinkSocket, family: UInt8, proto: L4Protocol, states: UInt32) -> [UInt8] {
        let headerLength = MemoryLayout<nlmsghdr>.size
        var bytes = [UInt8](repeating: 0, count: headerLength + 56)
        var header = nlmsghdr(nlmsg_len: UInt32(bytes.count), nlmsg_type: 20 /* SOCK_DIAG_BY_FAMILY */,
                              nlmsg_flags: UInt16(NLM_F_REQUEST | NLM_F_DUMP), nlmsg_seq: socket.nextSequence(), nlmsg_pid: 0)
        withUnsafeBytes(of: &header) { for (i, b) in $0.enumerated() { bytes[i] = b } }
        bytes[headerLength] = family
        bytes[headerLength + 1] = proto.rawValue
        withUnsafeBytes(of: states) { for (i, b) in $0.enumerated() { bytes[headerLength + 4 + i] = b } }
        return bytes
    }

    /// Reads an `inet_diag_msg`: family, state, then the socket id (ports, addresses), then the inode at 68.
    private static func decode(_ message: UnsafePointer<nlmsghdr>, proto: L4Protocol) -> Listener? {
        let length = Int(message.pointee.nlmsg_len) - MemoryLayout<nlmsghdr>.size
        guard length >= 72 else { return nil }
        let body = UnsafeRawPointer(message) + MemoryLayout<nlmsghdr>.size
        let family = body.load(as: UInt8.self)
        let port = UInt16(body.load(fromByteOffset: 4, as: UInt8.self)) << 8 | UInt16(body.load(fromByteOffset: 5, as: UInt8.self))
        let remotePort = UInt16(body.load(fromByteOffset: 6, as: UInt8.self)) << 8 | UInt16(body.load(fromByteOffset: 7, as: UInt8.self))
        guard let local = Port(rawValue: port), proto == .tcp || remotePort == 0 else { return nil }
        let source = (0..<16).map { body.load(fromByteOffset: 8 + $0, as: UInt8.self) }
        let address: IPAddress = Int32(family) == AF_INET
            ? .v4(IPv4Address(source[0], source[1], source[2], source[3])) : .v6(IPv6Address(bytes: source))
        return Listener(proto: proto, port: local, address: address, inode: body.loadUnaligned(fromByteOffset: 68, as: UInt32.self))
    }

    /// The command name (`/proc/PID/comm`) of a process holding the socket with `inode`, if one can be found.
    public static func owner(ofInode inode: UInt32) -> String? {
        guard let proc = opendir("/proc") else { return nil }
        defer { closedir(proc) }
        let target = "socket:[\(inode)]"
        while let entry = readdir(proc) {
            let pid = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard pid.utf8.allSatisfy({ (0x30...0x39).contains($0) }), let fds = opendir("/proc/\(pid)/fd") else { continue }
            defer { closedir(fds) }
            while let fd = readdir(fds) {
                let name = withUnsafeBytes(of: fd.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                var buffer = [CChar](repeating: 0, count: 64)
                let n = readlink("/proc/\(pid)/fd/\(name)", &buffer, buffer.count - 1)
                guard n > 0, String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) == target else { continue }
                let file = open("/proc/\(pid)/comm", O_RDONLY | O_CLOEXEC)
                guard file >= 0 else { return nil }
                defer { close(file) }
                var comm = [UInt8](repeating: 0, count: 64)
                let read = Glibc.read(file, &comm, comm.count)
                return read > 0 ? String(decoding: comm.prefix(read).prefix { $0 != 0x0a }, as: UTF8.self) : nil
            }
        }
        return nil
    }
}
