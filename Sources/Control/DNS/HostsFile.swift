import Dataplane
import Foundation

/// The hosts file epokd keeps for the router's DNS server (`--dns-hosts`): `ADDRESS NAME...`, one line per
/// address, IPv4 before IPv6, each sorted, under a header that says who writes it. It is replaced atomically (a
/// temporary file in the same directory, renamed over it), and only when its content changes, so that dnsmasq's
/// `hostsdir=` (inotify) reads each version once, whole, with no signal.
public final class HostsFile {
    public let path: String
    /// The router's own address, for names of Services that hold host ports (`--dns-address`).
    public let address: IPAddress?
    /// What the file holds, as epokd last wrote or found it.
    private var written: String?

    public static let header = "# Written by epokd (--dns-hosts): LoadBalancer and Ingress hostnames of the cluster. Changes made here are overwritten.\n"

    /// Why the file could not be written.
    public struct WriteError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Checks that the directory of `path` exists; the file is written at the first `update`.
    public init(path: String, address: IPAddress?) throws(WriteError) {
        self.path = path
        self.address = address
        let directory = Self.directory(of: path)
        var info = stat()
        guard stat(directory, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw WriteError(description: "--dns-hosts \(path): the directory \(directory) does not exist")
        }
        if stat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR {
            throw WriteError(description: "--dns-hosts \(path) is a directory: give a file in it (dnsmasq's hostsdir= names the directory)")
        }
        written = try? String(contentsOfFile: path, encoding: .utf8)
    }

    /// The file's text for `names`.
    public static func render(_ names: [DNSName: Set<IPAddress>]) -> String {
        var byAddress: [IPAddress: [DNSName]] = [:]
        for (name, addresses) in names {
            for address in addresses { byAddress[address, default: []].append(name) }
        }
        var text = header
        for (address, names) in byAddress.sorted(by: { $0.key < $1.key }) {
            text += address.description + " " + names.sorted().map(\.text).joined(separator: " ") + "\n"
        }
        return text
    }

    /// Writes `names` if they differ from what the file holds; returns whether it was written.
    @discardableResult
    public func update(_ names: [DNSName: Set<IPAddress>]) throws(WriteError) -> Bool {
        let text = Self.render(names)
        guard text != written else { return false }
        try Self.replace(path, with: text)
        written = text
        return true
    }

    /// Removes the file (`--cleanup-on-exit`).
    public func remove() {
        unlink(path)
        written = nil
    }

    /// The names a file of this format holds, by name (for `epokd status`); nil if there is no file.
    public static func read(_ path: String) -> [(name: String, addresses: [String])]? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        var names: [String: [String]] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let address = fields.first else { continue }
            for name in fields.dropFirst() { names[String(name), default: []].append(String(address)) }
        }
        return names.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    private static func reason(_ code: Int32) -> String { strerror(code).map { String(cString: $0) } ?? "error \(code)" }

    private static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// Writes `text` to a new file beside `path` (a dot file, which dnsmasq's hostsdir ignores), flushes it to the
    /// disk and renames it over `path`: a reader sees the old file or the new one, never part of one.
    private static func replace(_ path: String, with text: String) throws(WriteError) {
        let name = path.split(separator: "/").last.map(String.init) ?? path
        let temporary = directory(of: path) + "/." + name + ".epokd-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw WriteError(description: "cannot create \(temporary) beside \(path): \(Self.reason(errno))") }
        func fail(_ what: String) -> WriteError {
            let reason = Self.reason(errno)
            close(fd)
            unlink(temporary)
            return WriteError(description: "cannot write \(path) (\(what)): \(reason)")
        }
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw fail("write") }
            bytes = bytes.dropFirst(n)
        }
        guard fchmod(fd, 0o644) == 0 else { throw fail("chmod") }
        guard fsync(fd) == 0 else { throw fail("fsync") }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let reason = Self.reason(errno)
            unlink(temporary)
            throw WriteError(description: "cannot rename a new version over \(path): \(reason)")
        }
    }
}
