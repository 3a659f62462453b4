import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// What a rule, a chain's return or its policy decided for a traced packet.
public enum TraceVerdict: Hashable, Sendable, CustomStringConvertible {
    case accept, drop, `continue`, `return`
    case jump(String), goto(String)
    case other(Int32)

    init(code: UInt32, target: String?) {
        switch Int32(bitPattern: code) {
        case NFT_JUMP.rawValue: self = .jump(target ?? "?")
        case NFT_GOTO.rawValue: self = .goto(target ?? "?")
        case NFT_RETURN.rawValue: self = .return
        case NFT_CONTINUE.rawValue, NFT_BREAK.rawValue: self = .continue
        case let c where c >= 0 && c & 0xff == NF_DROP: self = .drop
        case let c where c >= 0 && c & 0xff == NF_ACCEPT: self = .accept
        case let c: self = .other(c)
        }
    }

    public var description: String {
        switch self {
        case .accept: "accept"
        case .drop: "drop"
        case .continue: "continue"
        case .return: "return"
        case .jump(let chain): "jump \(chain)"
        case .goto(let chain): "goto \(chain)"
        case .other(let code): "verdict \(code)"
        }
    }
}

/// One event of the kernel's nftables trace (`NFNLGRP_NFTRACE`): a traced packet, known by its trace id, meeting a
/// rule, or leaving a chain by its end (return) or its policy.
public struct TraceEvent: Sendable {
    public enum Kind: UInt32, Sendable { case policy = 1, `return` = 2, rule = 3 }

    public var id: UInt32
    public var kind: Kind
    public var table: String
    public var chain: String
    /// The rule's handle (rule events).
    public var ruleHandle: UInt64?
    public var verdict: TraceVerdict?
    /// The packet's protocol family (`NFPROTO_IPV4`, `NFPROTO_IPV6`).
    public var nfproto: UInt8
    public var inputInterface: UInt32?
    /// The packet's network and transport headers as they were at this point (after any NAT before it).
    public var network: [UInt8]
    public var transport: [UInt8]

    public init(id: UInt32, kind: Kind, table: String, chain: String, ruleHandle: UInt64? = nil, verdict: TraceVerdict? = nil,
                nfproto: UInt8, inputInterface: UInt32? = nil, network: [UInt8], transport: [UInt8]) {
        self.id = id
        self.kind = kind
        self.table = table
        self.chain = chain
        self.ruleHandle = ruleHandle
        self.verdict = verdict
        self.nfproto = nfproto
        self.inputInterface = inputInterface
        self.network = network
        self.transport = transport
    }
}

/// A subscription to the nftables trace group of one network namespace, over libmnl's netlink socket and
/// libnftnl's trace parser: no `nft monitor`.
public final class TraceMonitor {
    private let fd: Int32
    private var buffer = [UInt8](repeating: 0, count: 1 << 18)

    /// Subscribes in the namespace at `namespacePath` (or this process's).
    public init(namespacePath: String? = nil) throws(NetlinkError) {
        fd = try subscribedNetlinkSocket(bus: NETLINK_NETFILTER, groups: [UInt32(NFNLGRP_NFTRACE.rawValue)], namespacePath: namespacePath,
                                         what: "nftables trace events (needs CAP_NET_ADMIN)", receiveBuffer: 1 << 22)
    }

    deinit { close(fd) }

    /// The events that arrive within `timeout` seconds (none when it passes quietly); `lost` is set when the kernel
    /// dropped events because the socket's buffer was full.
    public func next(timeout: Double, lost: inout Bool) throws(NetlinkError) -> [TraceEvent] {
        var events: [TraceEvent] = []
        let traceType = cnf_nftables_type(UInt16(NFT_MSG_TRACE.rawValue))
        try receiveNotifications(fd, into: &buffer, timeout: timeout, lost: &lost, what: "trace events") { message in
            if message.pointee.nlmsg_type == traceType, let event = Self.parse(message) { events.append(event) }
        }
        return events
    }

    private static func parse(_ message: UnsafePointer<nlmsghdr>) -> TraceEvent? {
        guard let t = nftnl_trace_alloc() else { return nil }
        defer { nftnl_trace_free(t) }
        guard nftnl_trace_nlmsg_parse(message, t) >= 0 else { return nil }
        func has(_ attr: nftnl_trace_attr) -> Bool { nftnl_trace_is_set(t, UInt16(attr.rawValue)) }
        func string(_ attr: nftnl_trace_attr) -> String? { has(attr) ? nftnl_trace_get_str(t, UInt16(attr.rawValue)).map { String(cString: $0) } : nil }
        func u32(_ attr: nftnl_trace_attr) -> UInt32? { has(attr) ? nftnl_trace_get_u32(t, UInt16(attr.rawValue)) : nil }
        func bytes(_ attr: nftnl_trace_attr) -> [UInt8] {
            var length: UInt32 = 0
            guard has(attr), let data = nftnl_trace_get_data(t, UInt16(attr.rawValue), &length) else { return [] }
            return Array(UnsafeRawBufferPointer(start: data, count: Int(length)))
        }
        guard let id = u32(NFTNL_TRACE_ID), let kind = u32(NFTNL_TRACE_TYPE).flatMap(TraceEvent.Kind.init) else { return nil }
        return TraceEvent(id: id, kind: kind, table: string(NFTNL_TRACE_TABLE) ?? "", chain: string(NFTNL_TRACE_CHAIN) ?? "",
                          ruleHandle: has(NFTNL_TRACE_RULE_HANDLE) ? nftnl_trace_get_u64(t, UInt16(NFTNL_TRACE_RULE_HANDLE.rawValue)) : nil,
                          verdict: u32(NFTNL_TRACE_VERDICT).map { TraceVerdict(code: $0, target: string(NFTNL_TRACE_JUMP_TARGET)) },
                          nfproto: UInt8(truncatingIfNeeded: u32(NFTNL_TRACE_NFPROTO) ?? 0), inputInterface: u32(NFTNL_TRACE_IIF),
                          network: bytes(NFTNL_TRACE_NETWORK_HEADER), transport: bytes(NFTNL_TRACE_TRANSPORT_HEADER))
    }
}
