#if canImport(Glibc)
import Glibc
#endif

/// A transport protocol that a mapping forwards (the `meta l4proto` byte).
public struct L4Protocol: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let tcp = L4Protocol(rawValue: 6)
    public static let udp = L4Protocol(rawValue: 17)
    public static let icmp = L4Protocol(rawValue: 1)
    public static let icmpv6 = L4Protocol(rawValue: 58)

    /// Parses `tcp` or `udp` in any case, ignoring surrounding white space.
    public init?(_ text: String) {
        switch text {
        case "TCP", "tcp": self = .tcp  // as the API server and most annotations write them
        case "UDP", "udp": self = .udp
        default: self.init(bytes: text.utf8)
        }
    }
    public init?(_ text: Substring) { self.init(bytes: text.utf8) }
    /// Parses `tcp` or `udp` in any case from UTF-8 bytes, ignoring surrounding white space.
    public init?(utf8: ArraySlice<UInt8>) { self.init(bytes: utf8) }

    private init?(bytes utf8: some BidirectionalCollection<UInt8>) {
        let bytes = ASCII.trimmed(utf8: utf8)
        guard bytes.count == 3 else { return nil }
        var next = bytes.makeIterator()
        switch (next.next()! | 0x20, next.next()! | 0x20, next.next()! | 0x20) {
        case (UInt8(ascii: "t"), UInt8(ascii: "c"), UInt8(ascii: "p")): self = .tcp
        case (UInt8(ascii: "u"), UInt8(ascii: "d"), UInt8(ascii: "p")): self = .udp
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .tcp: "tcp"
        case .udp: "udp"
        case .icmp: "icmp"
        case .icmpv6: "ipv6-icmp"
        default: "proto-\(rawValue)"
        }
    }

    public static func < (a: L4Protocol, b: L4Protocol) -> Bool { a.rawValue < b.rawValue }
}

/// A TCP or UDP port, 1...65535.
public struct Port: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16

    /// Fails for port 0.
    public init?(rawValue: UInt16) {
        guard rawValue != 0 else { return nil }
        self.rawValue = rawValue
    }

    /// Fails outside 1...65535.
    public init?(_ value: Int) {
        guard (1...65535).contains(value) else { return nil }
        self.rawValue = UInt16(value)
    }

    /// Parses a decimal port number, ignoring surrounding white space.
    public init?(_ text: String) { self.init(bytes: text.utf8) }
    public init?(_ text: Substring) { self.init(bytes: text.utf8) }
    /// Parses a decimal port number from UTF-8 bytes, ignoring surrounding white space.
    public init?(utf8: ArraySlice<UInt8>) { self.init(bytes: utf8) }

    private init?(bytes utf8: some BidirectionalCollection<UInt8>) {
        guard let value = ASCII.decimal(ASCII.trimmed(utf8: utf8), maxDigits: 5) else { return nil }
        self.init(value)
    }

    public var description: String { String(rawValue) }
    public static func < (a: Port, b: Port) -> Bool { a.rawValue < b.rawValue }
}

/// An IPv4 address, stored in network byte order.
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The four octets, most significant first.
    public let octets: (UInt8, UInt8, UInt8, UInt8)

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) { octets = (a, b, c, d) }

    /// The address as a host-order integer (`10.0.0.1` is `0x0A000001`).
    public var value: UInt32 {
        UInt32(octets.0) << 24 | UInt32(octets.1) << 16 | UInt32(octets.2) << 8 | UInt32(octets.3)
    }

    public init(value: UInt32) {
        octets = (UInt8(value >> 24), UInt8(value >> 16 & 0xff), UInt8(value >> 8 & 0xff), UInt8(value & 0xff))
    }

    /// Parses dotted-quad notation strictly (no leading zeros, no short forms).
    public init?(_ text: some StringProtocol) {
        var octets: [UInt8] = []
        octets.reserveCapacity(4)
        for part in Array(text.utf8).split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard part.count == 1 || part.first != UInt8(ascii: "0"),
                  let v = ASCII.decimal(part, maxDigits: 3), v <= 255 else { return nil }
            octets.append(UInt8(v))
        }
        guard octets.count == 4 else { return nil }
        self.init(octets[0], octets[1], octets[2], octets[3])
    }

    public var bytes: [UInt8] { [octets.0, octets.1, octets.2, octets.3] }
    public var description: String { "\(octets.0).\(octets.1).\(octets.2).\(octets.3)" }
    public static func == (a: IPv4Address, b: IPv4Address) -> Bool { a.value == b.value }
    public func hash(into h: inout Hasher) { h.combine(value) }
    public static func < (a: IPv4Address, b: IPv4Address) -> Bool { a.value < b.value }
}

/// An IPv6 address, 16 bytes in network byte order.
public struct IPv6Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// High and low 64 bits, host order.
    public let high: UInt64
    public let low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    public init(bytes: some Collection<UInt8>) {
        precondition(bytes.count == 16, "an IPv6 address has 16 bytes")
        var h: UInt64 = 0, l: UInt64 = 0
        for (i, b) in bytes.enumerated() {
            if i < 8 { h = h << 8 | UInt64(b) } else { l = l << 8 | UInt64(b) }
        }
        self.init(high: h, low: l)
    }

    /// Parses RFC 4291 text form (with `::` compression and an optional dotted-quad tail).
    public init?(_ text: some StringProtocol) {
        let s = String(text)
        guard !s.isEmpty, s.utf8.allSatisfy({ ASCII.isHexDigit($0) || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: ".") }) else { return nil }
        var storage = in6_addr()
        guard inet_pton(AF_INET6, s, &storage) == 1 else { return nil }
        self.init(bytes: withUnsafeBytes(of: &storage) { Array($0) })
    }

    public var bytes: [UInt8] {
        (0..<8).map { UInt8(high >> (56 - 8 * UInt64($0)) & 0xff) } + (0..<8).map { UInt8(low >> (56 - 8 * UInt64($0)) & 0xff) }
    }

    public var description: String {
        var storage = in6_addr()
        withUnsafeMutableBytes(of: &storage) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        inet_ntop(AF_INET6, &storage, &buffer, socklen_t(buffer.count))
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func < (a: IPv6Address, b: IPv6Address) -> Bool { (a.high, a.low) < (b.high, b.low) }
}

/// An IPv4 or IPv6 address.
public enum IPAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    case v4(IPv4Address)
    case v6(IPv6Address)

    /// Parses either family; an IPv6 text must contain a colon.
    public init?(_ text: some StringProtocol) {
        let trimmed = String(decoding: ASCII.trimmed(text), as: UTF8.self)
        if trimmed.utf8.contains(UInt8(ascii: ":")) {
            guard let a = IPv6Address(trimmed) else { return nil }
            self = .v6(a)
        } else {
            guard let a = IPv4Address(trimmed) else { return nil }
            self = .v4(a)
        }
    }

    public var description: String {
        switch self {
        case .v4(let a): a.description
        case .v6(let a): a.description
        }
    }

    /// The address in network byte order.
    public var bytes: [UInt8] {
        switch self {
        case .v4(let a): a.bytes
        case .v6(let a): a.bytes
        }
    }
}

/// An IP prefix such as `10.0.0.0/8` or `2001:db8::/32`; host bits are always zero.
public struct CIDR: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    /// Why a CIDR text was rejected.
    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case malformedAddress(String)
        case invalidPrefix(String)
        case hostBitsSet(String, canonical: String)

        public var description: String {
            switch self {
            case .malformedAddress(let t): "\"\(t)\" is not an IPv4 or IPv6 address"
            case .invalidPrefix(let t): "\"\(t)\" has an invalid prefix length"
            case .hostBitsSet(let t, let c): "\"\(t)\" has host bits set (did you mean \(c)?)"
            }
        }
    }

    /// Parses `ADDRESS/PREFIX` strictly; a bare address is a /32 or /128.
    public init(parsing text: some StringProtocol) throws(ParseError) {
        let bytes = ASCII.trimmed(text)
        let trimmed = String(decoding: bytes, as: UTF8.self)
        let pieces = bytes.split(separator: UInt8(ascii: "/"), maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(String(decoding: pieces[0], as: UTF8.self)) else { throw .malformedAddress(trimmed) }
        let maxLength = address.isV4 ? 32 : 128
        var length = maxLength
        if pieces.count == 2 {
            let p = pieces[1]
            guard p.count == 1 || p.first != UInt8(ascii: "0"), let v = ASCII.decimal(p, maxDigits: 3), v <= maxLength else {
                throw .invalidPrefix(trimmed)
            }
            length = v
        }
        let canonical = CIDR(unchecked: address, prefixLength: length)
        guard canonical.address == address else {
            throw .hostBitsSet(trimmed, canonical: canonical.description)
        }
        self = canonical
    }

    /// A prefix with host bits cleared.
    public init(unchecked address: IPAddress, prefixLength: Int) {
        self.prefixLength = prefixLength
        switch address {
        case .v4(let a):
            let mask: UInt32 = prefixLength == 0 ? 0 : ~UInt32(0) << (32 - prefixLength)
            self.address = .v4(IPv4Address(value: a.value & mask))
        case .v6(let a):
            let (hm, lm) = CIDR.v6Mask(prefixLength)
            self.address = .v6(IPv6Address(high: a.high & hm, low: a.low & lm))
        }
    }

    static func v6Mask(_ length: Int) -> (UInt64, UInt64) {
        let hm: UInt64 = length >= 64 ? ~0 : (length == 0 ? 0 : ~UInt64(0) << (64 - length))
        let lm: UInt64 = length <= 64 ? 0 : (length == 128 ? ~0 : ~UInt64(0) << (128 - length))
        return (hm, lm)
    }

    /// The first and last address the prefix covers.
    public var range: (first: IPAddress, last: IPAddress) {
        switch address {
        case .v4(let a):
            let hostMask: UInt32 = prefixLength == 0 ? ~0 : ~(~UInt32(0) << (32 - prefixLength))
            return (.v4(a), .v4(IPv4Address(value: a.value | hostMask)))
        case .v6(let a):
            let (hm, lm) = CIDR.v6Mask(prefixLength)
            return (.v6(a), .v6(IPv6Address(high: a.high | ~hm, low: a.low | ~lm)))
        }
    }

    /// Whether `other` lies inside this prefix.
    public func contains(_ other: IPAddress) -> Bool {
        CIDR(unchecked: other, prefixLength: prefixLength) == self && address.isV4 == other.isV4
    }

    public var description: String { "\(address)/\(prefixLength)" }
    public static func < (a: CIDR, b: CIDR) -> Bool { (a.address, a.prefixLength) < (b.address, b.prefixLength) }
}

/// An inclusive range of addresses of one family, as an interval-set element holds it.
public struct AddressRange: Hashable, Sendable, CustomStringConvertible {
    public var first: IPAddress
    public var last: IPAddress

    public init(first: IPAddress, last: IPAddress) {
        self.first = first
        self.last = last
    }

    public var description: String { first == last ? first.description : "\(first)-\(last)" }

    /// The fewest prefixes that cover exactly this range, in address order (`10.0.0.0-10.0.1.255` is
    /// `10.0.0.0/23`); empty when `last` comes before `first` or the two are of different families.
    public var cidrs: [CIDR] {
        let bits: Int
        let start: UInt128, end: UInt128
        switch (first, last) {
        case (.v4(let a), .v4(let b)): (bits, start, end) = (32, UInt128(a.value), UInt128(b.value))
        case (.v6(let a), .v6(let b)): (bits, start, end) = (128, UInt128(a.high) << 64 | UInt128(a.low), UInt128(b.high) << 64 | UInt128(b.low))
        default: return []
        }
        var result: [CIDR] = []
        var next = start
        while next <= end {
            // The largest aligned block at `next` that does not pass `end`.
            var size = min(next == 0 ? bits : next.trailingZeroBitCount, bits)
            while size > 0 && (size == 128 ? end - next != .max : end - next < (UInt128(1) << size) - 1) { size -= 1 }
            let address: IPAddress = bits == 32 ? .v4(IPv4Address(value: UInt32(next)))
                : .v6(IPv6Address(high: UInt64(next >> 64), low: UInt64(truncatingIfNeeded: next)))
            result.append(CIDR(unchecked: address, prefixLength: bits - size))
            guard size < 128 else { break }
            let (after, overflow) = next.addingReportingOverflow(UInt128(1) << size)
            if overflow || (bits == 32 && after > UInt128(UInt32.max)) { break }
            next = after
        }
        return result
    }

    /// The range as people write it: its prefixes (`198.51.100.0/24,203.0.113.0/28`) when at most `limit`
    /// cover it, otherwise `first-last`.
    public func prefixesDescription(limit: Int = 16) -> String {
        let prefixes = cidrs
        return prefixes.isEmpty || prefixes.count > limit ? description : prefixes.map(\.description).joined(separator: ",")
    }

    /// The union of `cidrs` as disjoint, non-adjacent ranges, IPv4 before IPv6, each family in address order.
    ///
    /// The kernel refuses overlapping elements in an interval set (`EEXIST`), so nested, overlapping and
    /// adjacent prefixes (`10.0.0.0/8` and `10.1.0.0/16`) become the one range they cover together.
    public static func union(of cidrs: [CIDR]) -> [AddressRange] {
        let v4 = cidrs.compactMap { c -> (Wide, Wide)? in
            guard case .v4(let first) = c.range.first, case .v4(let last) = c.range.last else { return nil }
            return (Wide(high: 0, low: UInt64(first.value)), Wide(high: 0, low: UInt64(last.value)))
        }
        var result = merge(v4).map {
            AddressRange(first: .v4(IPv4Address(value: UInt32($0.0.low))), last: .v4(IPv4Address(value: UInt32($0.1.low))))
        }
        let v6 = cidrs.compactMap { c -> (Wide, Wide)? in
            guard case .v6(let first) = c.range.first, case .v6(let last) = c.range.last else { return nil }
            return (Wide(high: first.high, low: first.low), Wide(high: last.high, low: last.low))
        }
        result += merge(v6).map {
            AddressRange(first: .v6(IPv6Address(high: $0.0.high, low: $0.0.low)), last: .v6(IPv6Address(high: $0.1.high, low: $0.1.low)))
        }
        return result
    }

    /// A 128-bit unsigned value (an IPv6 address, or an IPv4 one in `low`).
    private struct Wide: Comparable {
        var high: UInt64
        var low: UInt64
        static func < (a: Wide, b: Wide) -> Bool { (a.high, a.low) < (b.high, b.low) }
        /// `self + 1`, or nil at the top of the space.
        var successor: Wide? {
            if low != .max { return Wide(high: high, low: low + 1) }
            return high == .max ? nil : Wide(high: high + 1, low: 0)
        }
    }

    private static func merge(_ ranges: [(Wide, Wide)]) -> [(Wide, Wide)] {
        var result: [(Wide, Wide)] = []
        for (first, last) in ranges.sorted(by: { $0.0 < $1.0 }) {
            if let previous = result.last, previous.1.successor.map({ first <= $0 }) ?? true {
                result[result.count - 1].1 = max(previous.1, last)
            } else {
                result.append((first, last))
            }
        }
        return result
    }
}

extension IPAddress {
    /// Whether this is an IPv4 address.
    public var isV4: Bool { if case .v4 = self { true } else { false } }
}

/// Byte-level helpers for parsing ASCII protocol text quickly and strictly.
enum ASCII {
    static func isSpace(_ b: UInt8) -> Bool { b == 0x20 || b == 0x09 || b == 0x0a || b == 0x0d }
    static func isHexDigit(_ b: UInt8) -> Bool {
        (0x30...0x39).contains(b) || (0x41...0x46).contains(b) || (0x61...0x66).contains(b)
    }

    /// The UTF-8 bytes of `text` without surrounding white space.
    static func trimmed(_ text: some StringProtocol) -> ArraySlice<UInt8> { trimmed(utf8: Array(text.utf8)) }

    /// `bytes` without surrounding white space, not copied.
    static func trimmed<Bytes: BidirectionalCollection<UInt8>>(utf8 bytes: Bytes) -> Bytes.SubSequence {
        guard let start = bytes.firstIndex(where: { !isSpace($0) }) else { return bytes[bytes.endIndex...] }
        return bytes[start...bytes.lastIndex(where: { !isSpace($0) })!]
    }

    /// A non-empty run of at most `maxDigits` decimal digits, and nothing else.
    static func decimal(_ bytes: some Collection<UInt8>, maxDigits: Int) -> Int? {
        guard !bytes.isEmpty, bytes.count <= maxDigits else { return nil }
        var value = 0
        for b in bytes {
            guard (0x30...0x39).contains(b) else { return nil }
            value = value * 10 + Int(b - 0x30)
        }
        return value
    }
}
