import Foundation

/// What a test-only helper command printed.
public struct CommandResult: Sendable {
    public var status: Int32
    public var output: String
    public var error: String
}

/// Runs a program (tests only: the daemon never does) and waits for it.
@discardableResult
public func run(_ arguments: [String], input: String? = nil, check: Bool = true) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    let inPipe = Pipe()
    process.standardInput = inPipe
    try process.run()
    if let input { inPipe.fileHandleForWriting.write(Data(input.utf8)) }
    try inPipe.fileHandleForWriting.close()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let result = CommandResult(status: process.terminationStatus,
                               output: String(decoding: outData, as: UTF8.self),
                               error: String(decoding: errData, as: UTF8.self))
    if check && result.status != 0 {
        throw LabError.commandFailed(arguments.joined(separator: " "), result.status, result.error)
    }
    return result
}

public enum LabError: Error, CustomStringConvertible {
    case commandFailed(String, Int32, String)
    case timeout(String)

    public var description: String {
        switch self {
        case .commandFailed(let c, let s, let e): "`\(c)` exited \(s): \(e)"
        case .timeout(let what): "timed out waiting for \(what)"
        }
    }
}

/// A network namespace that exists for one test and is deleted with it.
public final class NetworkNamespace: @unchecked Sendable {
    public let name: String
    /// The path to hand to `Nftables(namespacePath:)`.
    public var path: String { "/run/netns/\(name)" }

    public init(_ label: String = "t") throws {
        name = "epk-\(label.prefix(6))-\(UInt32.random(in: 0...UInt32.max) % 1_000_000_000)"
        try run(["ip", "netns", "add", name])
        try exec(["ip", "link", "set", "lo", "up"])
        // Interfaces created from now on skip duplicate address detection: no tentative addresses to wait for.
        try exec(["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
    }

    deinit {
        _ = try? run(["ip", "netns", "del", name], check: false)
    }

    /// Runs a command inside the namespace.
    @discardableResult
    public func exec(_ arguments: [String], input: String? = nil, check: Bool = true) throws -> CommandResult {
        try run(["ip", "netns", "exec", name] + arguments, input: input, check: check)
    }

    /// A veth pair `interface`/`peer` in this namespace, `interface` up with `address` (a prefix), `peer` up too.
    public func vethPair(_ interface: String, _ peer: String, address: String) throws {
        try exec(["ip", "link", "add", interface, "type", "veth", "peer", "name", peer])
        try exec(["ip", "addr", "add", address, "dev", interface])
        try exec(["ip", "link", "set", interface, "up"])
        try exec(["ip", "link", "set", peer, "up"])
    }

    /// Joins this namespace and `other` by a veth pair named `interface` in both, each end up with its address
    /// (a prefix): a host and its neighbour on one link.
    public func link(to other: NetworkNamespace, interface: String = "eth0", address: String, otherAddress: String) throws {
        try run(["ip", "link", "add", interface, "netns", name, "type", "veth", "peer", "name", interface, "netns", other.name])
        for (ns, prefix) in [(self, address), (other, otherAddress)] {
            try ns.exec(["ip", "addr", "add", prefix, "dev", interface])
            try ns.exec(["ip", "link", "set", interface, "up"])
        }
    }

    /// `nft list table FAMILY NAME` inside the namespace, for tests comparing kernel state as text.
    public func nftList(_ family: String, _ table: String) throws -> String {
        try exec(["nft", "list", "table", family, table]).output
    }
}

/// Polls `condition` every 20 ms until it holds, or throws after `seconds`.
public func waitUntil(_ what: String, seconds: Double = 10, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return }
        Thread.sleep(forTimeInterval: 0.02)
    }
    if try condition() { return }
    throw LabError.timeout(what)
}

/// A directory that exists for one test and is deleted with it.
public final class ScratchDirectory: @unchecked Sendable {
    public let path: String

    /// A snapshot file's text with no objects: a complete, empty cluster.
    public static let emptyList = "{\"kind\": \"List\", \"items\": []}"

    public init(_ label: String) throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-\(label)-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Writes `text` to `name` in the directory and returns the file's path.
    @discardableResult
    public func write(_ name: String, _ text: String) throws -> String {
        try text.write(toFile: path + "/" + name, atomically: true, encoding: .utf8)
        return path + "/" + name
    }
}
