import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// A connection the kernel tracks, as far as epokd cares: its original tuple and where it was NATed to.
public struct TrackedFlow: Hashable, Sendable, CustomStringConvertible {
    public var proto: L4Protocol
    public var source: IPAddress
    public var sourcePort: UInt16
    public var destination: IPAddress
    public var destinationPort: UInt16
    /// The reply's source: the backend a DNATed flow was sent to.
    public var replySource: IPAddress
    public var replySourcePort: UInt16
    /// The kernel DNATed this flow.
    public var destinationNAT: Bool
    /// The reply's destination: the address a SNATed flow left with.
    public var replyDestination: IPAddress
    /// The kernel SNATed this flow.
    public var sourceNAT: Bool
    /// The kernel's id for the entry, so that a delete never hits a newer entry with the same tuple.
    public var id: UInt32

    public init(proto: L4Protocol, source: IPAddress, sourcePort: UInt16, destination: IPAddress, destinationPort: UInt16,
                replySource: IPAddress, replySourcePort: UInt16, destinationNAT: Bool, replyDestination: IPAddress? = nil,
                sourceNAT: Bool = false, id: UInt32) {
        self.replyDestination = replyDestination ?? source
        self.sourceNAT = sourceNAT
        self.proto = proto
        self.source = source
        self.sourcePort = sourcePort
        self.destination = destination
        self.destinationPort = destinationPort
        self.replySource = replySource
        self.replySourcePort = replySourcePort
        self.destinationNAT = destinationNAT
        self.id = id
    }

    public var description: String {
        "\(proto) \(source):\(sourcePort) -> \(destination):\(destinationPort) via \(replySource):\(replySourcePort)"
    }
}

/// What the kernel filters a conntrack dump by (every field optional).
public struct ConntrackFilter: Hashable, Sendable {
    public var proto: L4Protocol?
    public var destinationPort: Port?
    public var replySource: IPAddress?
    /// The address a SNATed flow left with.
    public var replyDestination: IPAddress?

    public init(proto: L4Protocol? = nil, destinationPort: Port? = nil, replySource: IPAddress? = nil, replyDestination: IPAddress? = nil) {
        self.proto = proto
        self.destinationPort = destinationPort
        self.replySource = replySource
        self.replyDestination = replyDestination
    }
}

/// The kernel's connection-tracking table over ctnetlink: kernel-filtered dumps and batched deletes.
public final class Conntrack {
    private let socket: NetlinkSocket

    /// Connects to conntrack in the network namespace at `namespacePath`, or in the process's own.
    public init(namespacePath: String? = nil) throws(NetlinkError) {
        socket = try NetlinkSocket(bus: NETLINK_NETFILTER, namespacePath: namespacePath)
        try socket.prepareForReplies()
    }

    /// The tracked TCP and UDP flows that `filter` selects; the kernel does the filtering.
    public func flows(_ filter: ConntrackFilter = ConntrackFilter()) throws(NetlinkError) -> [TrackedFlow] {
        switch filter.replySource ?? filter.replyDestination {
        case .v4?: return try flows(filter, family: UInt8(AF_INET))
        case .v6?: return try flows(filter, family: UInt8(AF_INET6))
        case nil where filter == ConntrackFilter(): return try flows(filter, family: UInt8(AF_UNSPEC))
        // The kernel filters tuples only within one address family.
        case nil: return try flows(filter, family: UInt8(AF_INET)) + flows(filter, family: UInt8(AF_INET6))
        }
    }

    private func flows(_ filter: ConntrackFilter, family: UInt8) throws(NetlinkError) -> [TrackedFlow] {
        var result: [TrackedFlow] = []
        let request = NetlinkRequest(type: cnf_conntrack_type(UInt16(IPCTNL_MSG_CT_GET.rawValue)),
                                     flags: NLM_F_REQUEST | NLM_F_DUMP, family: family, sequence: socket.nextSequence())
        var originalFlags: UInt32 = 0, replyFlags: UInt32 = 0
        if filter.proto != nil || filter.destinationPort != nil {
            request.nest(UInt16(CTA_TUPLE_ORIG.rawValue)) {
                request.nest(UInt16(CTA_TUPLE_PROTO.rawValue)) {
                    if let p = filter.proto {
                        request.put(UInt16(CTA_PROTO_NUM.rawValue), p.rawValue)
                        originalFlags |= UInt32(CNF_CTA_FILTER_PROTO_NUM)
                    }
                    if let port = filter.destinationPort {
                        request.put(UInt16(CTA_PROTO_DST_PORT.rawValue), port.rawValue.bigEndian)
                        originalFlags |= UInt32(CNF_CTA_FILTER_PROTO_DST_PORT)
                    }
                }
            }
        }
        if filter.replySource != nil || filter.replyDestination != nil {
            request.nest(UInt16(CTA_TUPLE_REPLY.rawValue)) {
                request.nest(UInt16(CTA_TUPLE_IP.rawValue)) {
                    if let source = filter.replySource { request.put(address: source, source: true) }
                    if let destination = filter.replyDestination { request.put(address: destination, source: false) }
                }
            }
            if filter.replySource != nil { replyFlags |= UInt32(CNF_CTA_FILTER_IP_SRC) }
            if filter.replyDestination != nil { replyFlags |= UInt32(CNF_CTA_FILTER_IP_DST) }
        }
        if originalFlags != 0 || replyFlags != 0 {
            request.nest(UInt16(CTA_FILTER.rawValue)) {
                request.put(UInt16(CTA_FILTER_ORIG_FLAGS.rawValue), originalFlags)
                request.put(UInt16(CTA_FILTER_REPLY_FLAGS.rawValue), replyFlags)
            }
        }
        try socket.dump(try request.bytes(), operation: "dump conntrack entries") { message in
            if let flow = Self.decode(message) { result.append(flow) }
        }
        return result
    }

    /// Deletes `flows` with batched requests; flows already gone are not an error. Returns how many were deleted.
    @discardableResult
    public func delete(_ flows: [TrackedFlow]) throws(NetlinkError) -> Int {
        var deleted = 0
        for chunk in stride(from: 0, to: flows.count, by: 512).map({ flows[$0..<min($0 + 512, flows.count)] }) {
            var batch: [UInt8] = []
            var sequences: [UInt32: TrackedFlow] = [:]
            for flow in chunk {
                let seq = socket.nextSequence()
                sequences[seq] = flow
                let request = NetlinkRequest(type: cnf_conntrack_type(UInt16(IPCTNL_MSG_CT_DELETE.rawValue)),
                                             flags: NLM_F_REQUEST | NLM_F_ACK, family: flow.source.isV4 ? UInt8(AF_INET) : UInt8(AF_INET6),
                                             sequence: seq)
                request.nest(UInt16(CTA_TUPLE_ORIG.rawValue)) {
                    request.nest(UInt16(CTA_TUPLE_IP.rawValue)) {
                        request.put(address: flow.source, source: true)
                        request.put(address: flow.destination, source: false)
                    }
                    request.nest(UInt16(CTA_TUPLE_PROTO.rawValue)) {
                        request.put(UInt16(CTA_PROTO_NUM.rawValue), flow.proto.rawValue)
                        request.put(UInt16(CTA_PROTO_SRC_PORT.rawValue), flow.sourcePort.bigEndian)
                        request.put(UInt16(CTA_PROTO_DST_PORT.rawValue), flow.destinationPort.bigEndian)
                    }
                }
                request.put(UInt16(CTA_ID.rawValue), flow.id.bigEndian)
                batch += try request.bytes()
            }
            try socket.send(batch, operation: "delete \(chunk.count) conntrack entries")
            var answered = 0
            while answered < chunk.count, let datagram = try socket.receive(wait: true, operation: "delete conntrack entries") {
                try NetlinkMessages.forEach(in: datagram) { (header, pointer) throws(NetlinkError) in
                    guard Int32(header.nlmsg_type) == NLMSG_ERROR, let flow = sequences[header.nlmsg_seq] else { return }
                    answered += 1
                    let reply = NetlinkMessages.errorReply(pointer)
                    switch reply.code {
                    case 0: deleted += 1
                    case ENOENT: break
                    default:
                        throw NetlinkError(code: reply.code, operation: "delete conntrack entry", subject: flow.description, kernelMessage: reply.message)
                    }
                }
            }
        }
        return deleted
    }

    private static func decode(_ message: UnsafePointer<nlmsghdr>) -> TrackedFlow? {
        guard let ct = nfct_new() else { return nil }
        defer { nfct_destroy(ct) }
        guard nfct_nlmsg_parse(message, ct) >= 0 else { return nil }
        let l4 = nfct_get_attr_u8(ct, ATTR_ORIG_L4PROTO)
        guard l4 == UInt8(IPPROTO_TCP) || l4 == UInt8(IPPROTO_UDP) else { return nil }
        let v4 = nfct_get_attr_u8(ct, ATTR_ORIG_L3PROTO) == UInt8(AF_INET)
        func address(_ a4: nf_conntrack_attr, _ a6: nf_conntrack_attr) -> IPAddress {
            if v4 { return .v4(IPv4Address(value: UInt32(bigEndian: nfct_get_attr_u32(ct, a4)))) }
            let raw = nfct_get_attr(ct, a6)!
            return .v6(IPv6Address(bytes: UnsafeRawBufferPointer(start: raw, count: 16)))
        }
        return TrackedFlow(
            proto: L4Protocol(rawValue: l4),
            source: address(ATTR_ORIG_IPV4_SRC, ATTR_ORIG_IPV6_SRC),
            sourcePort: UInt16(bigEndian: nfct_get_attr_u16(ct, ATTR_ORIG_PORT_SRC)),
            destination: address(ATTR_ORIG_IPV4_DST, ATTR_ORIG_IPV6_DST),
            destinationPort: UInt16(bigEndian: nfct_get_attr_u16(ct, ATTR_ORIG_PORT_DST)),
            replySource: address(ATTR_REPL_IPV4_SRC, ATTR_REPL_IPV6_SRC),
            replySourcePort: UInt16(bigEndian: nfct_get_attr_u16(ct, ATTR_REPL_PORT_SRC)),
            destinationNAT: nfct_get_attr_u32(ct, ATTR_STATUS) & UInt32(IPS_DST_NAT.rawValue) != 0,
            replyDestination: address(ATTR_REPL_IPV4_DST, ATTR_REPL_IPV6_DST),
            sourceNAT: nfct_get_attr_u32(ct, ATTR_STATUS) & UInt32(IPS_SRC_NAT.rawValue) != 0,
            id: nfct_get_attr_u32(ct, ATTR_ID))
    }
}

/// A netlink request assembled with libmnl in a buffer of its own.
final class NetlinkRequest {
    /// Room for a header and a few tuple attributes; the memory is the request's own for its whole life.
    private static let capacity = 1024
    private let storage = UnsafeMutableRawPointer.allocate(byteCount: NetlinkRequest.capacity, alignment: 8)
    private let header: UnsafeMutablePointer<nlmsghdr>

    init(type: UInt16, flags: Int32, family: UInt8, sequence: UInt32) {
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: NetlinkRequest.capacity)
        header = mnl_nlmsg_put_header(storage)
        header.pointee.nlmsg_type = type
        header.pointee.nlmsg_flags = UInt16(flags)
        header.pointee.nlmsg_seq = sequence
        let extra = mnl_nlmsg_put_extra_header(header, MemoryLayout<nfgenmsg>.size)!.assumingMemoryBound(to: nfgenmsg.self)
        extra.pointee.nfgen_family = family
        extra.pointee.version = UInt8(NFNETLINK_V0)
        extra.pointee.res_id = 0
    }

    deinit { storage.deallocate() }

    /// Whether an attribute did not fit: every write is checked against the buffer before it is made (libmnl's
    /// `_check` calls), so a request that outgrows it is refused whole, never written past its end.
    private var overflowed = false

    /// The request's bytes; an error if an attribute did not fit.
    func bytes() throws(NetlinkError) -> [UInt8] {
        guard !overflowed else { throw NetlinkError(code: EMSGSIZE, operation: "build a conntrack request", subject: "more than \(NetlinkRequest.capacity) bytes") }
        return Array(UnsafeRawBufferPointer(start: storage, count: Int(header.pointee.nlmsg_len)))
    }

    private func checked(_ written: Bool) {
        if !written { overflowed = true }
    }

    func nest(_ type: UInt16, _ body: () -> Void) {
        guard let start = mnl_attr_nest_start_check(header, NetlinkRequest.capacity, type) else { return checked(false) }
        body()
        mnl_attr_nest_end(header, start)
    }

    func put(_ type: UInt16, _ value: UInt8) { checked(mnl_attr_put_u8_check(header, NetlinkRequest.capacity, type, value)) }
    func put(_ type: UInt16, _ value: UInt16) { checked(mnl_attr_put_u16_check(header, NetlinkRequest.capacity, type, value)) }
    func put(_ type: UInt16, _ value: UInt32) { checked(mnl_attr_put_u32_check(header, NetlinkRequest.capacity, type, value)) }

    /// An address attribute of a `CTA_TUPLE_IP` nest (IPv4 or IPv6, source or destination).
    func put(address: IPAddress, source: Bool) {
        switch address {
        case .v4(let a):
            put(UInt16(source ? CTA_IP_V4_SRC.rawValue : CTA_IP_V4_DST.rawValue), a.value.bigEndian)
        case .v6(let a):
            a.bytes.withUnsafeBytes {
                checked(mnl_attr_put_check(header, NetlinkRequest.capacity, UInt16(source ? CTA_IP_V6_SRC.rawValue : CTA_IP_V6_DST.rawValue), 16, $0.baseAddress))
            }
        }
    }
}
