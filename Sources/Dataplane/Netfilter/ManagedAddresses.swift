import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// The addresses epokd adds to one interface for the egress and bridge addresses it SNATs to (rtnetlink, no
/// shell). Each is a /32 or /128 marked with `mark` as its address protocol (IFA_PROTO), which is how epokd
/// knows its own after a restart: it removes only addresses carrying its mark, and never adds one the host
/// already has on any interface.
public final class ManagedAddresses {
    /// The IFA_PROTO value of epokd's addresses (`ip address` shows `proto 0x65`).
    public static let mark: UInt8 = 0x65

    public let interface: String
    private let socket: NetlinkSocket
    private let index: Int32
    private let namespacePath: String?
    /// The interface's hardware address, when it has one and speaks ARP (not loopback, not a WireGuard tunnel).
    private let hardwareAddress: [UInt8]?
    /// Set once probing was refused (no CAP_NET_RAW): said once, then addresses are added unprobed.
    private var probesRefused = false
    /// Whether another mover decides who holds the addresses (`--ha-address`: the active router): they are
    /// then taken without asking the link first (no ARP probe, no duplicate address detection), as keepalived
    /// takes its own, since the old holder may still be letting go of them.
    public var takenWithoutAsking = false

    /// Opens rtnetlink in the namespace at `namespacePath` (or this process's) and finds `interface`.
    public init(interface: String, namespacePath: String? = nil) throws(NetlinkError) {
        self.interface = interface
        self.namespacePath = namespacePath
        socket = try NetlinkSocket(bus: NETLINK_ROUTE, namespacePath: namespacePath)
        try socket.prepareForReplies(timeoutSeconds: 5, receiveBuffer: 1 << 20)
        var found: Int32?
        var hardware: [UInt8]?
        var request = RouteMessage(type: UInt16(RTM_GETLINK), flags: NLM_F_REQUEST | NLM_F_DUMP, sequence: socket.nextSequence())
        request.body(ifinfomsg())
        try socket.dump(request.bytes, operation: "read the interfaces") { message throws(NetlinkError) in
            let info = UnsafeRawPointer(message + 1).loadUnaligned(as: ifinfomsg.self)
            var name: String?, address: [UInt8]?
            RouteMessage.attributes(message, after: MemoryLayout<ifinfomsg>.size) { type, payload in
                if type == IFLA_IFNAME { name = String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self) }
                if type == IFLA_ADDRESS { address = Array(payload) }
            }
            guard name == interface else { return }
            found = info.ifi_index
            hardware = info.ifi_flags & UInt32(IFF_NOARP) == 0 && address?.count == 6 ? address : nil
        }
        guard let found else { throw NetlinkError(code: ENODEV, operation: "find --manage-addresses interface", subject: interface) }
        index = found
        hardwareAddress = hardware
    }

    /// One address of the host: where it is, and whose (its IFA_PROTO).
    public struct HostAddress: Hashable, Sendable {
        public var address: IPAddress
        public var prefixLength: UInt8
        public var interfaceIndex: Int32
        public var proto: UInt8
        /// `IFA_F_*` (an IPv6 address's duplicate address detection: tentative, failed).
        public var flags: UInt32 = 0
    }

    /// Every address of every interface.
    public func read() throws(NetlinkError) -> [HostAddress] { try Self.read(socket) }

    /// The addresses epokd added, on any interface (a run with another `--manage-addresses` left them, or this
    /// one will take them back): they are not the host's own.
    public static func marked(namespacePath: String? = nil) throws(NetlinkError) -> Set<IPAddress> {
        let socket = try NetlinkSocket(bus: NETLINK_ROUTE, namespacePath: namespacePath)
        try socket.prepareForReplies(timeoutSeconds: 5, receiveBuffer: 1 << 20)
        return Set(try read(socket).filter { $0.proto == mark }.map(\.address))
    }

    private static func read(_ socket: NetlinkSocket) throws(NetlinkError) -> [HostAddress] {
        var result: [HostAddress] = []
        var request = RouteMessage(type: UInt16(RTM_GETADDR), flags: NLM_F_REQUEST | NLM_F_DUMP, sequence: socket.nextSequence())
        request.body(ifaddrmsg())
        try socket.dump(request.bytes, operation: "read the host's addresses") { message throws(NetlinkError) in
            let info = UnsafeRawPointer(message + 1).loadUnaligned(as: ifaddrmsg.self)
            var address: IPAddress?
            var proto: UInt8 = 0
            var flags = UInt32(info.ifa_flags)
            RouteMessage.attributes(message, after: MemoryLayout<ifaddrmsg>.size) { type, payload in
                switch type {
                case Int32(IFA_LOCAL) where payload.count == 4, Int32(IFA_ADDRESS) where payload.count == 4 && address == nil:
                    address = .v4(IPv4Address(payload[0], payload[1], payload[2], payload[3]))
                case Int32(IFA_ADDRESS) where payload.count == 16:
                    address = .v6(IPv6Address(bytes: Array(payload)))
                case Int32(IFA_PROTO) where payload.count >= 1:
                    proto = payload[0]
                case Int32(IFA_FLAGS) where payload.count == 4:
                    flags = payload.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
                default: break
                }
            }
            if let address {
                result.append(HostAddress(address: address, prefixLength: info.ifa_prefixlen, interfaceIndex: Int32(info.ifa_index), proto: proto,
                                          flags: flags))
            }
        }
        return result
    }

    /// The addresses epokd added (its mark, on its interface).
    public func owned() throws(NetlinkError) -> Set<IPAddress> {
        Set(try read().filter { $0.proto == Self.mark && $0.interfaceIndex == index }.map(\.address))
    }

    /// What `reconcile` did: the addresses added and removed, those another host on the link answers for (not
    /// added), and why probing could not be done, when it could not.
    public struct Reconciled: Sendable {
        public var added: [IPAddress] = []
        public var removed: [IPAddress] = []
        public var answeredElsewhere: [IPAddress] = []
        public var probeRefused: NetlinkError?
        /// Why the addresses added could not be announced (gratuitous ARP, neighbour advertisements), when they could not.
        public var announceRefused: NetlinkError?
    }

    /// Adds what `needed` lacks (unless the host has it already, anywhere; an IPv4 address another host on the
    /// link answers an ARP probe for is not added), announces what it added to the link, and removes epokd's
    /// addresses no longer needed.
    @discardableResult
    public func reconcile(needed: Set<IPAddress>) throws(NetlinkError) -> Reconciled {
        let present = try read()
        let mine = Set(present.filter { $0.proto == Self.mark && $0.interfaceIndex == index }.map(\.address))
        let anywhere = Set(present.map(\.address))
        var result = Reconciled()
        var candidates = needed.subtracting(anywhere)
        let probed = Set(candidates.compactMap { if case .v4(let v4) = $0 { v4 } else { nil } })
        if let hardwareAddress, !probesRefused, !takenWithoutAsking, !probed.isEmpty {
            do {
                let taken = try ArpProbe.answered(probed, interfaceIndex: index, hardwareAddress: hardwareAddress, namespacePath: namespacePath)
                result.answeredElsewhere = taken.map(IPAddress.v4).sorted()
                candidates.subtract(result.answeredElsewhere)
            } catch {
                probesRefused = true
                result.probeRefused = error
            }
        }
        result.added = candidates.sorted()
        result.removed = mine.subtracting(needed).sorted()
        for address in result.added { try change(address, add: true) }
        for address in result.removed { try change(address, add: false) }
        // IPv6: the kernel's duplicate address detection decides (about a second); an address another host on the
        // link has fails it, and is taken back.
        let added6 = Set(result.added.filter { !$0.isV4 })
        if !added6.isEmpty && !takenWithoutAsking {
            let failed = try awaitDuplicateAddressDetection(added6)
            for address in failed { try change(address, add: false) }
            result.added.removeAll { failed.contains($0) }
            result.answeredElsewhere = (result.answeredElsewhere + failed).sorted()
        }
        if let hardwareAddress, !result.added.isEmpty {
            do {
                try ArpProbe.announce(Set(result.added.compactMap { if case .v4(let a) = $0 { a } else { nil } }), interfaceIndex: index,
                                      hardwareAddress: hardwareAddress, namespacePath: namespacePath)
                try NeighbourAdvertisement.announce(Set(result.added.compactMap { if case .v6(let a) = $0 { a } else { nil } }), interfaceIndex: index,
                                                    hardwareAddress: hardwareAddress, namespacePath: namespacePath)
            } catch {
                result.announceRefused = error
            }
        }
        return result
    }

    /// Waits (at most 3 s) until none of `addresses` is tentative; returns those whose detection failed.
    private func awaitDuplicateAddressDetection(_ addresses: Set<IPAddress>) throws(NetlinkError) -> [IPAddress] {
        for _ in 0..<60 {
            let ours = try read().filter { addresses.contains($0.address) && $0.interfaceIndex == index }
            if !ours.contains(where: { $0.flags & UInt32(IFA_F_TENTATIVE) != 0 && $0.flags & UInt32(IFA_F_DADFAILED) == 0 }) {
                return ours.filter { $0.flags & UInt32(IFA_F_DADFAILED) != 0 }.map(\.address).sorted()
            }
            usleep(50_000)
        }
        return []
    }

    /// Removes every address epokd added (at `--cleanup-on-exit`).
    public func removeAll() throws(NetlinkError) {
        for address in try owned().sorted() { try change(address, add: false) }
    }

    private func change(_ address: IPAddress, add: Bool) throws(NetlinkError) {
        let v4 = address.isV4
        var request = RouteMessage(type: UInt16(add ? RTM_NEWADDR : RTM_DELADDR),
                                   flags: NLM_F_REQUEST | NLM_F_ACK | (add ? NLM_F_CREATE | NLM_F_EXCL : 0), sequence: socket.nextSequence())
        var info = ifaddrmsg()
        info.ifa_family = UInt8(v4 ? AF_INET : AF_INET6)
        info.ifa_prefixlen = v4 ? 32 : 128
        info.ifa_flags = add && takenWithoutAsking && !v4 ? UInt8(IFA_F_NODAD) : 0
        info.ifa_index = UInt32(index)
        request.body(info)
        let bytes = address.bytes
        request.attribute(Int32(IFA_LOCAL), bytes)
        request.attribute(Int32(IFA_ADDRESS), bytes)
        if add { request.attribute(Int32(IFA_PROTO), [Self.mark]) }
        try socket.acknowledged(request.bytes, operation: "\(add ? "add" : "remove") address \(address) \(add ? "to" : "from") \(interface)")
    }

    /// The next hops of the namespace's routes (its gateways), IPv4 and IPv6, of the main table.
    public static func gateways(namespacePath: String? = nil) throws(NetlinkError) -> Set<IPAddress> {
        let socket = try NetlinkSocket(bus: NETLINK_ROUTE, namespacePath: namespacePath)
        try socket.prepareForReplies(timeoutSeconds: 5, receiveBuffer: 1 << 20)
        var result = Set<IPAddress>()
        for family in [AF_INET, AF_INET6] {
            var request = RouteMessage(type: UInt16(RTM_GETROUTE), flags: NLM_F_REQUEST | NLM_F_DUMP, sequence: socket.nextSequence())
            var route = rtmsg()
            route.rtm_family = UInt8(family)
            request.body(route)
            try socket.dump(request.bytes, operation: "read the routes") { message throws(NetlinkError) in
                RouteMessage.attributes(message, after: MemoryLayout<rtmsg>.size) { type, payload in
                    guard type == Int32(RTA_GATEWAY.rawValue) else { return }
                    if payload.count == 4 { result.insert(.v4(IPv4Address(payload[0], payload[1], payload[2], payload[3]))) }
                    if payload.count == 16 { result.insert(.v6(IPv6Address(bytes: Array(payload)))) }
                }
            }
        }
        return result
    }

    /// Whether the host delivers packets for `address` to itself (an address of its own, or a local route):
    /// what an egress address needs for the replies to its flows to come back here.
    public static func isLocal(_ address: IPAddress, namespacePath: String? = nil) throws(NetlinkError) -> Bool {
        let socket = try NetlinkSocket(bus: NETLINK_ROUTE, namespacePath: namespacePath)
        try socket.prepareForReplies(timeoutSeconds: 5, receiveBuffer: 1 << 16)
        var request = RouteMessage(type: UInt16(RTM_GETROUTE), flags: NLM_F_REQUEST, sequence: socket.nextSequence())
        var route = rtmsg()
        route.rtm_family = UInt8(address.isV4 ? AF_INET : AF_INET6)
        route.rtm_dst_len = address.isV4 ? 32 : 128
        request.body(route)
        request.attribute(Int32(RTA_DST.rawValue), address.bytes)
        var local = false
        do {
            try socket.answered(request.bytes, operation: "look up the route to \(address)") { message in
                local = UnsafeRawPointer(message + 1).loadUnaligned(as: rtmsg.self).rtm_type == UInt8(RTN_LOCAL)
            }
        } catch where error.code == ENETUNREACH || error.code == EHOSTUNREACH {
            return false
        }
        return local
    }
}

/// An rtnetlink request being built: header, fixed body, attributes.
struct RouteMessage {
    private(set) var bytes: [UInt8]

    init(type: UInt16, flags: Int32, sequence: UInt32) {
        var header = nlmsghdr(nlmsg_len: 0, nlmsg_type: type, nlmsg_flags: UInt16(flags), nlmsg_seq: sequence, nlmsg_pid: 0)
        bytes = withUnsafeBytes(of: &header) { Array($0) }
    }

    mutating func body<T>(_ value: T) {
        var value = value
        withUnsafeBytes(of: &value) { bytes += $0 }
        pad()
        setLength()
    }

    mutating func attribute(_ type: Int32, _ payload: [UInt8]) {
        var header = (UInt16(4 + payload.count), UInt16(type))
        withUnsafeBytes(of: &header) { bytes += $0 }
        bytes += payload
        pad()
        setLength()
    }

    private mutating func pad() { while bytes.count % 4 != 0 { bytes.append(0) } }

    private mutating func setLength() {
        withUnsafeBytes(of: UInt32(bytes.count)) { for (i, b) in $0.enumerated() { bytes[i] = b } }
    }

    /// Calls `body` with each attribute's type and payload, after a fixed body of `size` bytes.
    static func attributes(_ message: UnsafePointer<nlmsghdr>, after size: Int, _ body: (Int32, UnsafeRawBufferPointer) -> Void) {
        let raw = UnsafeRawPointer(message)
        let total = Int(message.pointee.nlmsg_len)
        var offset = MemoryLayout<nlmsghdr>.size + ((size + 3) & ~3)
        while offset + 4 <= total {
            let length = Int(raw.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            let type = Int32(raw.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self) & 0x3fff)
            guard length >= 4, offset + length <= total else { return }
            body(type, UnsafeRawBufferPointer(start: raw + offset + 4, count: length - 4))
            offset += (length + 3) & ~3
        }
    }
}

extension NetlinkSocket {
    /// Sends a request with NLM_F_ACK and waits for its acknowledgement; a refusal throws.
    func acknowledged(_ request: [UInt8], operation: String) throws(NetlinkError) {
        try answered(request, operation: operation) { _ in }
    }

    /// Sends a request and hands its answer messages to `body` until the acknowledgement (or the one answer).
    func answered(_ request: [UInt8], operation: String, _ body: (UnsafePointer<nlmsghdr>) -> Void) throws(NetlinkError) {
        try send(request, operation: operation)
        let seq = request.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self) }
        let wantsAck = Int32(request.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 6, as: UInt16.self) }) & NLM_F_ACK != 0
        var done = false
        while !done {
            guard let datagram = try receive(wait: true, operation: operation) else { continue }
            try NetlinkMessages.forEach(in: datagram) { (header, pointer) throws(NetlinkError) in
                guard header.nlmsg_seq == seq else { return }
                if Int32(header.nlmsg_type) == NLMSG_ERROR {
                    let reply = NetlinkMessages.errorReply(pointer)
                    if reply.code != 0 { throw NetlinkError(code: reply.code, operation: operation, kernelMessage: reply.message) }
                    done = true
                } else {
                    body(pointer)
                    if !wantsAck { done = true }
                }
            }
        }
    }
}
