import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// The kernel's forwarding switches (`net.ipv4.ip_forward`, `net.ipv6.conf.all.forwarding`) of a network
/// namespace: epokd's own, or the one at `namespacePath`.
public struct ForwardingSwitches: Sendable {
    public static let names = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]

    public let namespacePath: String?

    public init(namespacePath: String? = nil) {
        self.namespacePath = namespacePath
    }

    /// The switches that are off.
    public func off() throws(NetlinkError) -> [String] {
        var result: [String] = []
        for name in Self.names where try read(name).first == UInt8(ascii: "0") { result.append(name) }
        return result
    }

    /// Turns `name` on.
    public func enable(_ name: String) throws(NetlinkError) {
        let fd = try open(name, O_WRONLY)
        defer { close(fd) }
        guard write(fd, "1\n", 2) == 2 else { throw NetlinkError(code: errno, operation: "set \(name) = 1") }
    }

    private func read(_ name: String) throws(NetlinkError) -> [UInt8] {
        let fd = try open(name, O_RDONLY)
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 16)
        let n = Glibc.read(fd, &buffer, buffer.count)
        guard n > 0 else { throw NetlinkError(code: n < 0 ? errno : EIO, operation: "read \(name)") }
        return Array(buffer.prefix(n))
    }

    private func open(_ name: String, _ flags: Int32) throws(NetlinkError) -> Int32 {
        let path = "/proc/sys/" + name.split(separator: ".").joined(separator: "/")
        var nsfd: Int32 = -1
        if let namespacePath {
            nsfd = Glibc.open(namespacePath, O_RDONLY | O_CLOEXEC)
            guard nsfd >= 0 else { throw NetlinkError(code: errno, operation: "open network namespace", subject: namespacePath) }
        }
        defer { if nsfd >= 0 { close(nsfd) } }
        let fd = cnf_file_open(path, flags, nsfd)
        guard fd >= 0 else { throw NetlinkError(code: -fd, operation: "open \(path)", subject: namespacePath.map { "in \($0)" }) }
        return fd
    }
}
