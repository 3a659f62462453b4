import CNetfilter
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a probe connection got back.
public enum Probe: Equatable, Sendable, CustomStringConvertible {
    /// The server's answer (its node name and port).
    case answered(String)
    /// An RST or ICMP port-unreachable came back.
    case refused
    /// Nothing came back within the probe's timeout (dropped).
    case timedOut
    case failed(String)

    public var description: String {
        switch self {
        case .answered(let s): "answered \(s)"
        case .refused: "refused"
        case .timedOut: "timed out"
        case .failed(let s): "failed: \(s)"
        }
    }
}

/// A socket address for an IPv4 or IPv6 text address.
public struct SocketAddress {
    var storage: sockaddr_storage
    var length: socklen_t
    var family: Int32

    public init(_ address: String, port: UInt16) {
        var storage = sockaddr_storage()
        if address.contains(":") {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = port.bigEndian
            precondition(inet_pton(AF_INET6, address, &a.sin6_addr) == 1, "bad address \(address)")
            withUnsafeBytes(of: a) { src in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) } }
            self.storage = storage
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            family = AF_INET6
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            precondition(inet_pton(AF_INET, address, &a.sin_addr) == 1, "bad address \(address)")
            withUnsafeBytes(of: a) { src in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) } }
            self.storage = storage
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
            family = AF_INET
        }
    }

    public func withPointer<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
    }
}

/// Opens a socket inside `namespace`.
public func openSocket(in namespace: NetworkNamespace, family: Int32, type: Int32) throws -> Int32 {
    let nsfd = open(namespace.path, O_RDONLY | O_CLOEXEC)
    guard nsfd >= 0 else { throw LabError.commandFailed("open \(namespace.path)", errno, "") }
    defer { close(nsfd) }
    let fd = cnf_socket_open(family, type, 0, nsfd)
    guard fd >= 0 else { throw LabError.commandFailed("socket in \(namespace.name)", -fd, String(cString: strerror(-fd))) }
    return fd
}

private func waitFor(_ fd: Int32, _ events: Int16, seconds: Double) -> Bool {
    var p = pollfd(fd: fd, events: events, revents: 0)
    return poll(&p, 1, Int32(seconds * 1000)) == 1
}

private func readAll(_ fd: Int32, seconds: Double) -> Probe {
    var collected: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 512)
    while true {
        guard waitFor(fd, Int16(POLLIN), seconds: seconds) else { return collected.isEmpty ? .timedOut : .answered(text(collected)) }
        let n = recv(fd, &buffer, buffer.count, 0)
        if n > 0 { collected += buffer[0..<n]; continue }
        if n == 0 { return .answered(text(collected)) }
        return errno == ECONNREFUSED || errno == ECONNRESET ? (collected.isEmpty ? .refused : .answered(text(collected))) : .failed(String(cString: strerror(errno)))
    }
}

private func text(_ bytes: [UInt8]) -> String {
    String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

private func bindSource(_ fd: Int32, _ source: String?) {
    guard let source else { return }
    let address = SocketAddress(source, port: 0)
    _ = address.withPointer { bind(fd, $0, $1) }
}

/// Connects over TCP from `namespace` and returns what the server said before closing.
public func tcpProbe(from namespace: NetworkNamespace, to address: String, port: UInt16, source: String? = nil, timeout: Double = 1.5) throws -> Probe {
    let target = SocketAddress(address, port: port)
    let fd = try openSocket(in: namespace, family: target.family, type: Int32(SOCK_STREAM.rawValue))
    defer { close(fd) }
    bindSource(fd, source)
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    let rc = target.withPointer { connect(fd, $0, $1) }
    if rc != 0 && errno != EINPROGRESS { return errno == ECONNREFUSED ? .refused : .failed(String(cString: strerror(errno))) }
    guard waitFor(fd, Int16(POLLOUT), seconds: timeout) else { return .timedOut }
    var error: Int32 = 0
    var length = socklen_t(MemoryLayout<Int32>.size)
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length)
    if error == ECONNREFUSED || error == EHOSTUNREACH || error == ENETUNREACH { return .refused }
    if error != 0 { return .failed(String(cString: strerror(error))) }
    return readAll(fd, seconds: timeout)
}

/// Sends one datagram from `namespace` and returns the answer.
public func udpProbe(from namespace: NetworkNamespace, to address: String, port: UInt16, source: String? = nil, timeout: Double = 1.5) throws -> Probe {
    let target = SocketAddress(address, port: port)
    let fd = try openSocket(in: namespace, family: target.family, type: Int32(SOCK_DGRAM.rawValue))
    defer { close(fd) }
    bindSource(fd, source)
    guard target.withPointer({ connect(fd, $0, $1) }) == 0 else { return .failed(String(cString: strerror(errno))) }
    _ = send(fd, "ping", 4, 0)
    var buffer = [UInt8](repeating: 0, count: 512)
    guard waitFor(fd, Int16(POLLIN), seconds: timeout) else { return .timedOut }
    let n = recv(fd, &buffer, buffer.count, 0)
    if n < 0 { return errno == ECONNREFUSED ? .refused : .failed(String(cString: strerror(errno))) }
    return .answered(text(Array(buffer[0..<n])))
}

/// TCP and UDP servers on `[::]:port` inside a namespace that answer every connection or datagram with `NAME:PORT`.
public final class NameServer: @unchecked Sendable {
    private var fds: [Int32] = []
    private let lock = NSLock()
    private var stopping = false
    private var threads: [Thread] = []
    private let finished = DispatchGroup()
    private let reportingPeer: Bool

    /// `echoPorts` keep TCP connections open and answer every message with `NAME:PORT:MESSAGE`; with
    /// `reportingPeer`, TCP answers are `NAME:PORT from ADDRESS`, the client's address as the server sees it.
    public init(in namespace: NetworkNamespace, name: String, tcpPorts: [UInt16], udpPorts: [UInt16], echoPorts: [UInt16] = [],
                reportingPeer: Bool = false) throws {
        self.reportingPeer = reportingPeer
        for (port, type) in (tcpPorts + echoPorts).map({ ($0, SOCK_STREAM) }) + udpPorts.map({ ($0, SOCK_DGRAM) }) {
            let fd = try openSocket(in: namespace, family: AF_INET6, type: Int32(type.rawValue))
            var off: Int32 = 0, on: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size))
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
            let address = SocketAddress("::", port: port)
            guard address.withPointer({ bind(fd, $0, $1) }) == 0 else {
                throw LabError.commandFailed("bind [::]:\(port) in \(namespace.name)", errno, String(cString: strerror(errno)))
            }
            if type == SOCK_STREAM { listen(fd, 64) }
            fds.append(fd)
            let answer = "\(name):\(port)"
            let echo = echoPorts.contains(port)
            finished.enter()
            let thread = Thread { [unowned self] in
                defer { finished.leave() }
                type == SOCK_STREAM ? serveTCP(fd, answer, echo: echo) : serveUDP(fd, answer)
            }
            threads.append(thread)
        }
        threads.forEach { $0.start() }
    }

    private var isStopping: Bool { lock.withLock { stopping } }

    private func serveTCP(_ fd: Int32, _ answer: String, echo: Bool) {
        while !isStopping {
            guard waitFor(fd, Int16(POLLIN), seconds: 0.1) else { continue }
            var peer = sockaddr_in6()
            var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            let client = withUnsafeMutablePointer(to: &peer) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(fd, $0, &length) } }
            guard client >= 0 else { continue }
            guard echo else {
                var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                inet_ntop(AF_INET6, &peer.sin6_addr, &text, socklen_t(text.count))
                let address = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                let reply = reportingPeer ? answer + " from " + (address.hasPrefix("::ffff:") ? String(address.dropFirst(7)) : address) : answer
                _ = reply.withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                close(client)
                continue
            }
            finished.enter()
            Thread { [unowned self] in
                defer { finished.leave(); close(client) }
                var buffer = [UInt8](repeating: 0, count: 2048)
                while !isStopping {
                    guard waitFor(client, Int16(POLLIN), seconds: 0.1) else { continue }
                    let n = recv(client, &buffer, buffer.count, 0)
                    guard n > 0 else { return }
                    let reply = answer + ":" + String(decoding: buffer[0..<n], as: UTF8.self)
                    _ = reply.withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                }
            }.start()
        }
    }

    private func serveUDP(_ fd: Int32, _ answer: String) {
        var buffer = [UInt8](repeating: 0, count: 2048)
        while !isStopping {
            guard waitFor(fd, Int16(POLLIN), seconds: 0.1) else { continue }
            var peer = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let n = withUnsafeMutablePointer(to: &peer) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
            }
            guard n >= 0 else { continue }
            _ = withUnsafePointer(to: &peer) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    answer.withCString { sendto(fd, $0, strlen($0), 0, sa, length) }
                }
            }
        }
    }

    /// Stops the servers and closes their sockets.
    public func stop() {
        guard !lock.withLock({ let was = stopping; stopping = true; return was }) else { return }
        finished.wait()
        fds.forEach { close($0) }
    }

    deinit { stop() }
}

/// A client socket that stays open inside a namespace: one UDP 5-tuple or one TCP connection.
public final class FlowClient: @unchecked Sendable {
    public let fd: Int32

    /// A UDP socket connected to `address:port` (its source port stays the same for every datagram).
    public static func udp(from ns: NetworkNamespace, to address: String, port: UInt16) throws -> FlowClient {
        let target = SocketAddress(address, port: port)
        let fd = try openSocket(in: ns, family: target.family, type: Int32(SOCK_DGRAM.rawValue))
        guard target.withPointer({ connect(fd, $0, $1) }) == 0 else {
            let code = errno
            close(fd)
            throw LabError.commandFailed("udp connect", code, "")
        }
        return FlowClient(fd: fd)
    }

    /// A TCP connection to `address:port`, from `source` if given.
    public static func tcp(from ns: NetworkNamespace, to address: String, port: UInt16, source: String? = nil) throws -> FlowClient {
        let target = SocketAddress(address, port: port)
        let fd = try openSocket(in: ns, family: target.family, type: Int32(SOCK_STREAM.rawValue))
        bindSource(fd, source)
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard target.withPointer({ connect(fd, $0, $1) }) == 0 else {
            let code = errno
            close(fd)
            throw LabError.commandFailed("tcp connect", code, String(cString: strerror(code)))
        }
        return FlowClient(fd: fd)
    }

    private init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Sends `message` and returns the first answer, or what went wrong.
    public func exchange(_ message: String, timeout: Double = 1.5) -> Probe {
        let sent = message.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        if sent < 0 { return errno == ECONNREFUSED ? .refused : .failed(String(cString: strerror(errno))) }
        var buffer = [UInt8](repeating: 0, count: 2048)
        guard waitFor(fd, Int16(POLLIN), seconds: timeout) else { return .timedOut }
        let n = recv(fd, &buffer, buffer.count, 0)
        if n < 0 { return errno == ECONNREFUSED || errno == ECONNRESET ? .refused : .failed(String(cString: strerror(errno))) }
        if n == 0 { return .failed("closed") }
        return .answered(text(Array(buffer[0..<n])))
    }
}

/// A TCP connection to loopback from the test process.
public final class LoopbackConnection {
    public let fd: Int32

    public init?(port: Int) {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let address = SocketAddress("127.0.0.1", port: UInt16(port))
        // A failed init still runs deinit (every property is set): the socket is closed there, once. Closing it
        // here too would close whatever another thread opened with the same number meanwhile.
        guard fd >= 0, address.withPointer({ connect(fd, $0, $1) }) == 0 else { return nil }
    }

    deinit { if fd >= 0 { close(fd) } }

    public func send(_ text: String) { _ = text.withCString { Glibc.send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) } }

    /// Whether the server has closed the connection (a read returns end of file or an error), waiting up to `seconds`.
    public func closedByServer(within seconds: Double) -> Bool {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, Int32(seconds * 1000)) > 0 else { return false }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n == 0 || (n < 0 && errno != EAGAIN) { return true }
            if n < 0 { return false }
        }
    }

    /// Everything the server sends until it closes, read at most `piece` bytes at a time.
    public func readAll(piece: Int = 65536) -> String {
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: piece)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            response += buffer[0..<n]
        }
        return String(decoding: response, as: UTF8.self)
    }
}

/// A plain HTTP GET on loopback (Connection: close, 10 s receive timeout): (status, body), or nil if nothing
/// answered.
public func httpGet(port: Int, path: String) -> (Int, String)? {
    guard let connection = LoopbackConnection(port: port) else { return nil }
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(connection.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    connection.send("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    let text = connection.readAll()
    guard let status = text.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return nil }
    return (status, text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n"))
}

/// Counts the UDP datagrams (and their payload bytes) arriving at `[::]:port` in a namespace, per source address.
public final class DatagramCounter: @unchecked Sendable {
    private let fd: Int32
    private let lock = NSLock()
    private var stopping = false
    private var counts: [String: (packets: Int, bytes: Int)] = [:]
    private let finished = DispatchGroup()

    public init(in namespace: NetworkNamespace, port: UInt16) throws {
        fd = try openSocket(in: namespace, family: AF_INET6, type: Int32(SOCK_DGRAM.rawValue))
        var off: Int32 = 0, size: Int32 = 8 << 20
        setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        guard SocketAddress("::", port: port).withPointer({ bind(fd, $0, $1) }) == 0 else {
            throw LabError.commandFailed("bind [::]:\(port) in \(namespace.name)", errno, String(cString: strerror(errno)))
        }
        finished.enter()
        Thread { [unowned self] in
            defer { finished.leave() }
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !lock.withLock({ stopping }) {
                guard waitFor(fd, Int16(POLLIN), seconds: 0.1) else { continue }
                var peer = sockaddr_in6()
                var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
                let n = withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
                }
                guard n >= 0 else { continue }
                var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                inet_ntop(AF_INET6, &peer.sin6_addr, &text, socklen_t(text.count))
                var source = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if source.hasPrefix("::ffff:") { source.removeFirst(7) }
                lock.withLock {
                    let before = counts[source] ?? (0, 0)
                    counts[source] = (before.packets + 1, before.bytes + n)
                }
            }
        }.start()
    }

    /// Datagrams and payload bytes received from `source` so far.
    public func received(from source: String) -> (packets: Int, bytes: Int) { lock.withLock { counts[source] ?? (0, 0) } }

    public func stop() {
        guard !lock.withLock({ let was = stopping; stopping = true; return was }) else { return }
        finished.wait()
        close(fd)
    }

    deinit { stop() }
}

/// Sends UDP datagrams of `payload` bytes from `namespace` (from `source`, if given) at `packetsPerSecond`,
/// paced in 1 ms slices, for `seconds`; returns how many were sent and over how long, as measured.
public func udpFlood(from namespace: NetworkNamespace, to address: String, port: UInt16, source: String? = nil,
                     payload: Int = 64, packetsPerSecond: Int, seconds: Double) throws -> (sent: Int, elapsed: Double) {
    let target = SocketAddress(address, port: port)
    let fd = try openSocket(in: namespace, family: target.family, type: Int32(SOCK_DGRAM.rawValue))
    defer { close(fd) }
    bindSource(fd, source)
    var size: Int32 = 8 << 20
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    guard target.withPointer({ connect(fd, $0, $1) }) == 0 else { throw LabError.commandFailed("udp connect", errno, "") }
    let data = [UInt8](repeating: 0x61, count: payload)
    let start = DispatchTime.now().uptimeNanoseconds
    let end = start + UInt64(seconds * 1e9)
    var sent = 0
    while true {
        let now = DispatchTime.now().uptimeNanoseconds
        if now >= end { break }
        let due = Int(Double(now - start) / 1e9 * Double(packetsPerSecond))
        if sent >= due {
            usleep(200)
            continue
        }
        while sent < due {
            // ICMP errors from a dropped path (none here: drops are silent) or a full buffer just cost a retry.
            if send(fd, data, data.count, Int32(MSG_DONTWAIT)) == data.count { sent += 1 } else { break }
        }
    }
    return (sent, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
}

/// A TCP server in a namespace that answers every connection with an HTTP status line (`status`, settable), or,
/// with `silent`, accepts and never answers.
public final class HTTPStatusServer: @unchecked Sendable {
    private let fd: Int32
    private let lock = NSLock()
    private var stopping = false
    private var current: Int
    private let finished = DispatchGroup()

    public init(in namespace: NetworkNamespace, port: UInt16, status: Int = 200, silent: Bool = false) throws {
        current = status
        fd = try openSocket(in: namespace, family: AF_INET6, type: Int32(SOCK_STREAM.rawValue))
        var off: Int32 = 0, on: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        guard SocketAddress("::", port: port).withPointer({ bind(fd, $0, $1) }) == 0 else {
            throw LabError.commandFailed("bind [::]:\(port) in \(namespace.name)", errno, String(cString: strerror(errno)))
        }
        listen(fd, 1024)
        guard !silent else { return }
        finished.enter()
        Thread { [unowned self] in
            defer { finished.leave() }
            while !lock.withLock({ stopping }) {
                guard waitFor(fd, Int16(POLLIN), seconds: 0.1) else { continue }
                let client = accept(fd, nil, nil)
                guard client >= 0 else { continue }
                var buffer = [UInt8](repeating: 0, count: 1024)
                if waitFor(client, Int16(POLLIN), seconds: 1) { _ = recv(client, &buffer, buffer.count, 0) }
                let reply = "HTTP/1.1 \(lock.withLock { current }) Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                _ = reply.withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                close(client)
            }
        }.start()
    }

    /// The status later connections are answered with.
    public var status: Int {
        get { lock.withLock { current } }
        set { lock.withLock { current = newValue } }
    }

    public func stop() {
        guard !lock.withLock({ let was = stopping; stopping = true; return was }) else { return }
        finished.wait()
        close(fd)
    }

    deinit { stop() }
}
