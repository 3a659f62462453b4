import CNetfilter

/// A token-bucket rate: at most `rate` packets (or bytes) per `period`, with `burst` more allowed at once.
/// In the ruleset it is always a limit *over* which packets are dropped (`limit rate over …`).
public struct RateLimit: Hashable, Comparable, Sendable, CustomStringConvertible {
    public enum Unit: UInt32, Sendable, Comparable {
        case packets = 0, bytes = 1
        public static func < (a: Unit, b: Unit) -> Bool { a.rawValue < b.rawValue }
    }

    public enum Period: UInt64, Sendable, CaseIterable, Comparable {
        case second = 1, minute = 60, hour = 3600, day = 86400
        public static func < (a: Period, b: Period) -> Bool { a.rawValue < b.rawValue }
        /// nft's word for the period.
        public var name: String {
            switch self {
            case .second: "second"
            case .minute: "minute"
            case .hour: "hour"
            case .day: "day"
            }
        }
    }

    /// Packets or bytes per period, at least 1.
    public var rate: UInt64
    public var unit: Unit
    public var period: Period
    /// Packets or bytes above the rate let through at once; the defaults (nft's and the kernel's) are 5 packets
    /// and 0 bytes.
    public var burst: UInt32

    public init(rate: UInt64, unit: Unit, per period: Period, burst: UInt32? = nil) {
        precondition(rate > 0, "a rate limit of 0 would drop everything")
        self.rate = rate
        self.unit = unit
        self.period = period
        // The kernel takes a packet burst of 0 as its default, 5: kept as the kernel will report it.
        self.burst = unit == .packets && (burst ?? 0) == 0 ? 5 : burst ?? 0
    }

    /// Why the kernel would refuse this limit (EOVERFLOW in `nft_limit_init`), or nil when it accepts it: the
    /// bucket is kept in nanoseconds, so a packet limit needs `period / rate × burst` and a byte limit
    /// `period × (rate + burst)` to fit in 64 bits.
    public var kernelProblem: String? {
        let nanoseconds = period.rawValue * 1_000_000_000
        switch unit {
        case .packets:
            let (_, overflow) = (nanoseconds / rate).multipliedReportingOverflow(by: UInt64(burst))
            return overflow ? "a burst of \(burst) packets at \(rate)/\(period.name) is more than the kernel's bucket holds; lower the burst or use a shorter period" : nil
        case .bytes:
            let (sum, tooLarge) = rate.addingReportingOverflow(UInt64(burst))
            let (_, overflow) = nanoseconds.multipliedReportingOverflow(by: sum)
            return tooLarge || overflow
                ? "\(Self.bytes(rate)) (burst \(Self.bytes(UInt64(burst)))) per \(period.name) is more than the kernel's bucket holds (rate plus burst at most \(UInt64.max / nanoseconds) bytes per \(period.name)); use a shorter period"
                : nil
        }
    }

    /// nft's spelling (`100/second burst 5 packets`, `2 mbytes/second burst 512 kbytes`).
    public var description: String {
        switch unit {
        case .packets: "\(rate)/\(period.name) burst \(burst) packets"
        case .bytes: "\(Self.bytes(rate))/\(period.name)" + (burst > 0 ? " burst \(Self.bytes(UInt64(burst)))" : "")
        }
    }

    /// A name part for sets that hold one rate (`100pps5`, `2097152Bpm0`): letters, digits and nothing else.
    public var token: String {
        "\(rate)\(unit == .packets ? "p" : "B")p\(period.name.first!)\(burst)"
    }

    /// Reads a `token` back.
    public init?(token: some StringProtocol) {
        let b = Array(token.utf8)
        var i = 0
        func number() -> UInt64? {
            let start = i
            while i < b.count, (0x30...0x39).contains(b[i]) { i += 1 }
            return i > start && i - start <= 19 ? UInt64(String(decoding: b[start..<i], as: UTF8.self)) : nil
        }
        guard let rate = number(), rate > 0, i + 3 <= b.count, b[i + 1] == UInt8(ascii: "p") else { return nil }
        let unit: Unit
        switch b[i] {
        case UInt8(ascii: "p"): unit = .packets
        case UInt8(ascii: "B"): unit = .bytes
        default: return nil
        }
        guard let period = Period.allCases.first(where: { $0.name.utf8.first == b[i + 2] }) else { return nil }
        i += 3
        guard let burst = number(), i == b.count, burst <= UInt64(UInt32.max) else { return nil }
        self.init(rate: rate, unit: unit, per: period, burst: UInt32(burst))
    }

    private static func bytes(_ n: UInt64) -> String {
        if n >= 1 << 20, n % (1 << 20) == 0 { return "\(n >> 20) mbytes" }
        if n >= 1 << 10, n % (1 << 10) == 0 { return "\(n >> 10) kbytes" }
        return "\(n) bytes"
    }

    public static func < (a: RateLimit, b: RateLimit) -> Bool {
        (a.unit, a.period, a.rate, a.burst) < (b.unit, b.period, b.rate, b.burst)
    }

    /// The libnftnl `limit` expression that matches packets over this rate.
    func expression() throws(NetlinkError) -> OpaquePointer {
        let e = try allocateExpression("limit")
        nftnl_expr_set_u64(e, UInt16(NFTNL_EXPR_LIMIT_RATE), rate)
        nftnl_expr_set_u64(e, UInt16(NFTNL_EXPR_LIMIT_UNIT), period.rawValue)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_BURST), burst)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_TYPE), unit.rawValue)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_FLAGS), UInt32(NFT_LIMIT_F_INV.rawValue))
        return e
    }

    /// Reads a `limit` expression back (nil for any other expression, or one that is not "over").
    init?(expression e: OpaquePointer) {
        guard let name = nftnl_expr_get_str(e, UInt16(NFTNL_EXPR_NAME)), String(cString: name) == "limit",
              nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_LIMIT_FLAGS)) & UInt32(NFT_LIMIT_F_INV.rawValue) != 0,
              let unit = Unit(rawValue: nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_LIMIT_TYPE))),
              let period = Period(rawValue: nftnl_expr_get_u64(e, UInt16(NFTNL_EXPR_LIMIT_UNIT))) else { return nil }
        let rate = nftnl_expr_get_u64(e, UInt16(NFTNL_EXPR_LIMIT_RATE))
        guard rate > 0 else { return nil }
        self.init(rate: rate, unit: unit, per: period, burst: nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_LIMIT_BURST)))
    }
}
