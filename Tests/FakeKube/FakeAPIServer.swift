import Control
import Foundation
import NetnsLab

/// Certificates for the fake API server, made once per test process with openssl.
public enum TestPKI {
    public struct Files: Sendable {
        public var directory: String
        public var ca: String { directory + "/ca.crt" }
        public var serverCertificate: String { directory + "/server.crt" }
        public var serverKey: String { directory + "/server.key" }
        public var clientCertificate: String { directory + "/client.crt" }
        public var clientKey: String { directory + "/client.key" }
        /// A CA that signed nothing the server presents.
        public var otherCA: String { directory + "/other-ca.crt" }
    }

    public static let files: Files = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("epokd-pki-\(getpid())").path
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        func openssl(_ args: [String]) { _ = try! run(["openssl"] + args) }
        for ca in ["ca", "other-ca"] {
            openssl(["req", "-x509"] + key + ["-keyout", "\(dir)/\(ca).key", "-out", "\(dir)/\(ca).crt", "-subj", "/CN=epokd test \(ca)", "-days", "2"])
        }
        for (name, subject, ext) in [("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                                     ("client", "/CN=epokd-client/O=system:nodes", "extendedKeyUsage=clientAuth")] {
            openssl(["req"] + key + ["-keyout", "\(dir)/\(name).key", "-out", "\(dir)/\(name).csr", "-subj", subject])
            try! ext.write(toFile: "\(dir)/\(name).ext", atomically: true, encoding: .utf8)
            openssl(["x509", "-req", "-in", "\(dir)/\(name).csr", "-CA", "\(dir)/ca.crt", "-CAkey", "\(dir)/ca.key",
                     "-CAcreateserial", "-out", "\(dir)/\(name).crt", "-days", "2", "-extfile", "\(dir)/\(name).ext"])
        }
        return Files(directory: dir)
    }()
}

/// The fake API server (Tests/FakeAPIServer/fake_apiserver.py) as a process on loopback, with its test hooks.
public final class FakeAPIServer: @unchecked Sendable {
    public let port: Int
    public let directory: String
    public var tokenFile: String { directory + "/token" }
    public var kubeconfig: String { directory + "/kubeconfig" }
    private let process = Process()
    private let input = Pipe()
    private let lines = LineCollector()

    static let script: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("FakeAPIServer/fake_apiserver.py").path
    }()

    /// A free loopback port (for a server that starts later).
    public static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// With `seed`, the store starts with the objects of that JSON List file.
    public init(port: Int = 0, token: String = "s3cret-token", directory: String? = nil, seed: String? = nil) throws {
        let pki = TestPKI.files
        self.directory = directory ?? FileManager.default.temporaryDirectory.appendingPathComponent("epokd-fake-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
        if !FileManager.default.fileExists(atPath: self.directory + "/token") {
            try token.write(toFile: self.directory + "/token", atomically: true, encoding: .utf8)
        }
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", Self.script, "--port", String(port), "--cert", pki.serverCertificate, "--key", pki.serverKey,
                             "--ca", pki.ca, "--token-file", self.directory + "/token", "--kubeconfig", self.directory + "/kubeconfig",
                             "--control-stdin"] + (seed.map { ["--seed", $0] } ?? [])
        let output = Pipe()
        process.standardOutput = output
        process.standardInput = input
        process.standardError = FileHandle.standardError
        let collector = lines
        output.fileHandleForReading.readabilityHandler = { handle in collector.append(handle.availableData) }
        try process.run()
        // A large seed is read first (a List of 50k Services, 200 MB, takes Python 15-20 s on a small VM).
        let first = try lines.waitFor(prefix: "listening on ", seconds: seed == nil ? 20 : 180)
        self.port = Int(first.split(separator: ":").last!)!
    }

    deinit { stop() }

    /// Stops the server process (connections drop at once).
    public func stop() {
        let pid = process.processIdentifier
        guard pid > 0, kill(pid, 0) == 0 else { return }
        kill(pid, SIGKILL)
        // Foundation's waitUntilExit can miss the exit of a child killed this way: reap it here.
        var status: Int32 = 0
        for _ in 0..<500 where waitpid(pid, &status, WNOHANG) == 0 {
            usleep(10_000)
        }
    }

    /// Runs a test hook (`compact`, `drop-watches`, `fail status=500 count=2`, `split-chunks on=1`, ...) and waits for it.
    @discardableResult
    public func control(_ line: String) throws -> String {
        input.fileHandleForWriting.write(Data((line + "\n").utf8))
        let action = line.split(separator: " ").first.map(String.init) ?? line
        return try lines.waitFor(prefix: "ok \(action) ", seconds: 20)
    }

    /// Creates or merges an object given as JSON, like `kubectl apply`.
    public func apply(_ object: some Encodable, kind: String) throws {
        let file = directory + "/apply-\(UUID().uuidString.prefix(8)).json"
        try JSONEncoder().encode(object).write(to: URL(fileURLWithPath: file))
        try control("apply kind=\(kind) file=\(file)")
    }

    public func delete(kind: String, name: String, namespace: String? = nil) throws {
        try control("delete kind=\(kind) name=\(name)" + (namespace.map { " namespace=\($0)" } ?? ""))
    }

    /// A connection authenticating with the bearer token file.
    public var tokenConnection: ClusterConnection {
        var c = ClusterConnection(server: "https://127.0.0.1:\(port)", origin: "fake API server (token)")
        c.caPEM = FileManager.default.contents(atPath: TestPKI.files.ca)
        c.tokenFile = tokenFile
        return c
    }

    /// A connection authenticating with the test client certificate.
    public var certificateConnection: ClusterConnection {
        var c = ClusterConnection(server: "https://127.0.0.1:\(port)", origin: "fake API server (client certificate)")
        c.caPEM = FileManager.default.contents(atPath: TestPKI.files.ca)
        c.clientCertificatePEM = FileManager.default.contents(atPath: TestPKI.files.clientCertificate)
        c.clientKeyPEM = FileManager.default.contents(atPath: TestPKI.files.clientKey)
        return c
    }
}

/// Lines of a child's output, collected as they arrive.
final class LineCollector: @unchecked Sendable {
    private let condition = NSCondition()
    private var pending = ""
    private var lines: [String] = []

    func append(_ data: Data) {
        condition.withLock {
            pending += String(decoding: data, as: UTF8.self)
            while let newline = pending.firstIndex(of: "\n") {
                lines.append(String(pending[..<newline]))
                pending = String(pending[pending.index(after: newline)...])
            }
            condition.broadcast()
        }
    }

    /// Waits for (and consumes) the first line starting with `prefix`.
    func waitFor(prefix: String, seconds: Double) throws -> String {
        let deadline = Date().addingTimeInterval(seconds)
        return try condition.withLock {
            while true {
                if let i = lines.firstIndex(where: { $0.hasPrefix(prefix) }) { return lines.remove(at: i) }
                guard condition.wait(until: deadline) else { throw LabError.timeout("a line starting with \(prefix)") }
            }
        }
    }
}
