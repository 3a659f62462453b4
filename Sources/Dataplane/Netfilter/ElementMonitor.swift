import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// A set element the kernel announced as added or deleted (`NFNLGRP_NFTABLES`), when it was read.
public struct ElementNotice: Sendable {
    public var table: String
    public var set: String
    public var key: [UInt8]
    public var added: Bool
    /// Wall-clock seconds since 1970 when the notification was read.
    public var time: Double
}

/// A subscription to the nftables notifications of one network namespace, for the element changes every
/// committed transaction announces (what `nft monitor` prints), read in-process with libnftnl.
public final class ElementMonitor {
    private let fd: Int32
    private var buffer = [UInt8](repeating: 0, count: 1 << 18)

    /// Subscribes in the namespace at `namespacePath` (or this process's).
    public init(namespacePath: String? = nil) throws(NetlinkError) {
        fd = try subscribedNetlinkSocket(bus: NETLINK_NETFILTER, groups: [UInt32(NFNLGRP_NFTABLES.rawValue)], namespacePath: namespacePath,
                                         what: "nftables notifications (needs CAP_NET_ADMIN)", receiveBuffer: 1 << 24)
    }

    deinit { close(fd) }

    /// The element changes announced within `timeout` seconds; `lost` is set when the kernel dropped notifications.
    public func next(timeout: Double, lost: inout Bool) throws(NetlinkError) -> [ElementNotice] {
        var notices: [ElementNotice] = []
        let newType = cnf_nftables_type(UInt16(NFT_MSG_NEWSETELEM.rawValue)), deleteType = cnf_nftables_type(UInt16(NFT_MSG_DELSETELEM.rawValue))
        try receiveNotifications(fd, into: &buffer, timeout: timeout, lost: &lost, what: "nftables notifications") { message in
            let type = message.pointee.nlmsg_type
            guard type == newType || type == deleteType, let s = nftnl_set_alloc() else { return }
            defer { nftnl_set_free(s) }
            guard nftnl_set_elems_nlmsg_parse(message, s) >= 0, let iterator = nftnl_set_elems_iter_create(s) else { return }
            defer { nftnl_set_elems_iter_destroy(iterator) }
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            let time = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
            let table = nftnl_set_get_str(s, UInt16(NFTNL_SET_TABLE.rawValue)).map { String(cString: $0) } ?? ""
            let set = nftnl_set_get_str(s, UInt16(NFTNL_SET_NAME.rawValue)).map { String(cString: $0) } ?? ""
            while let e = nftnl_set_elems_iter_next(iterator) {
                var length: UInt32 = 0
                guard let data = nftnl_set_elem_get(e, UInt16(NFTNL_SET_ELEM_KEY), &length) else { continue }
                notices.append(ElementNotice(table: table, set: set, key: Array(UnsafeRawBufferPointer(start: data, count: Int(length))),
                                             added: type == newType, time: time))
            }
        }
        return notices
    }
}
