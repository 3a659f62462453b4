import Foundation

/// The end-to-end lab: an epokd host namespace between clients and nodes.
///
/// ```
///  ext  (198.51.100.2, .3 / 2001:db8:e::2, ::3) ── eth0 ┐
///                                                       host (198.51.100.1, 100.64.0.1, 10.0.1.254 ...)
///  int  (100.64.0.2 / fd00:64::2) ───────────────── wg0 ┘   └ br0 ── n1 (10.0.1.1, fd00:1::1)
///                                                                 ├─ n2 (10.0.1.2, fd00:1::2)
///                                                                 └─ n3 (10.0.1.3, fd00:1::3)
/// ```
/// Nodes route through the host; every node answers `nX:PORT` on its TCP and UDP ports.
public final class ForwardingLab: @unchecked Sendable {
    public let host: NetworkNamespace
    public let external: NetworkNamespace
    public let `internal`: NetworkNamespace
    public let nodes: [NetworkNamespace]
    public let nodeNames: [String]
    private var servers: [NameServer] = []

    public static let hostExternal4 = "198.51.100.1", hostExternal6 = "2001:db8:e::1"
    public static let hostInternal4 = "100.64.0.1", hostInternal6 = "fd00:64::1"
    public static let externalClient4 = "198.51.100.2", externalClient6 = "2001:db8:e::2"
    public static let otherExternalClient4 = "198.51.100.3", otherExternalClient6 = "2001:db8:e::3"
    public static let internalClient4 = "100.64.0.2", internalClient6 = "fd00:64::2"

    public static func node4(_ i: Int) -> String { "10.0.1.\(i)" }
    public static func node6(_ i: Int) -> String { "fd00:1::\(i)" }

    public init(nodeCount: Int = 3, tcpPorts: [UInt16], udpPorts: [UInt16], echoPorts: [UInt16] = []) throws {
        host = try NetworkNamespace("host")
        external = try NetworkNamespace("ext")
        `internal` = try NetworkNamespace("int")
        nodes = try (1...nodeCount).map { try NetworkNamespace("n\($0)") }
        nodeNames = (1...nodeCount).map { "n\($0)" }
        ports = (tcpPorts, udpPorts, echoPorts)

        try host.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        try link(host, "eth0", external, "eth0", hostAddresses: ["198.51.100.1/24", "2001:db8:e::1/64"],
                 peerAddresses: ["198.51.100.2/24", "198.51.100.3/24", "2001:db8:e::2/64", "2001:db8:e::3/64"],
                 gateway: [Self.hostExternal4, Self.hostExternal6])
        try link(host, "wg0", `internal`, "eth0", hostAddresses: ["100.64.0.1/24", "fd00:64::1/64"],
                 peerAddresses: ["100.64.0.2/24", "fd00:64::2/64"], gateway: [Self.hostInternal4, Self.hostInternal6])
        try host.exec(["ip", "link", "add", "br0", "type", "bridge"])
        try host.exec(["ip", "link", "set", "br0", "up"])
        for a in ["10.0.1.254/24", "fd00:1::fe/64"] { try host.exec(["ip", "addr", "add", a, "dev", "br0", "nodad"]) }
        for (i, node) in nodes.enumerated() {
            let n = i + 1
            try run(["ip", "link", "add", "n\(n)", "netns", host.name, "type", "veth", "peer", "name", "eth0", "netns", node.name])
            try host.exec(["ip", "link", "set", "n\(n)", "master", "br0", "up"])
            try configure(node, "eth0", addresses: ["\(Self.node4(n))/24", "\(Self.node6(n))/64"], gateway: ["10.0.1.254", "fd00:1::fe"])
        }
        for index in nodes.indices { servers.append(try server(index)) }
    }

    private let ports: (tcp: [UInt16], udp: [UInt16], echo: [UInt16])

    private func server(_ index: Int) throws -> NameServer {
        try NameServer(in: nodes[index], name: nodeNames[index], tcpPorts: ports.tcp, udpPorts: ports.udp, echoPorts: ports.echo)
    }

    /// Stops the servers of node `index` (its ports stop answering, the node stays up).
    public func stopServers(_ index: Int) { servers[index].stop() }

    /// Starts the servers of node `index` again.
    public func restartServers(_ index: Int) throws { servers[index] = try server(index) }

    private func link(_ a: NetworkNamespace, _ aName: String, _ b: NetworkNamespace, _ bName: String,
                      hostAddresses: [String], peerAddresses: [String], gateway: [String]) throws {
        try run(["ip", "link", "add", aName, "netns", a.name, "type", "veth", "peer", "name", bName, "netns", b.name])
        try configure(a, aName, addresses: hostAddresses, gateway: [])
        try configure(b, bName, addresses: peerAddresses, gateway: gateway)
    }

    private func configure(_ ns: NetworkNamespace, _ device: String, addresses: [String], gateway: [String]) throws {
        try ns.exec(["ip", "link", "set", device, "up"])
        for a in addresses { try ns.exec(["ip", "addr", "add", a, "dev", device, "nodad"]) }
        for g in gateway { try ns.exec(["ip", g.contains(":") ? "-6" : "-4", "route", "add", "default", "via", g]) }
    }

    deinit { servers.forEach { $0.stop() } }
}
