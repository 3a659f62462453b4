import Dataplane

/// Epok's annotation and label names, unchanged so that manifests written for Epok work as they are.
public enum EpokAnnotation {
    /// What every one of Epok's (and epokd's) annotation names begins with.
    public static let prefix = "epok.getbetter.ro/"
    public static let externalPorts = "epok.getbetter.ro/externalports"
    public static let `internal` = "epok.getbetter.ro/internal"
    public static let allowRange = "epok.getbetter.ro/allow-range"
    public static let exclude = "epok.getbetter.ro/exclude"
    public static let excludeLabel = "epok_exclude"
    /// On a Node, any value: no new connections to it; its open flows are left alone (unlike `exclude`).
    public static let drain = "epok.getbetter.ro/drain"
    /// A Service's aggregate rate limit (`2 mbytes/second burst 512 kbytes`, `200/second`).
    public static let rateLimit = "epok.getbetter.ro/ratelimit"
    /// The same, as arbf-nft-operator spells it, for Services moving from there.
    public static let bareRateLimit = "ratelimit"
    /// What any one source address may send to the Service (same syntax).
    public static let rateLimitPerSource = "epok.getbetter.ro/ratelimit-per-source"
    /// MetalLB's sharing key: Services that carry the same value may share a LoadBalancer IP (on other ports).
    public static let allowSharedIP = "metallb.universe.tf/allow-shared-ip"
}

/// One `HOSTPORT:NODEPORT[:PROTO]` entry of the externalports annotation.
public struct PortRequest: Hashable, Sendable, CustomStringConvertible {
    public var hostPort: Port
    public var nodePort: Port
    public var proto: L4Protocol

    public init(hostPort: Port, nodePort: Port, proto: L4Protocol = .tcp) {
        self.hostPort = hostPort
        self.nodePort = nodePort
        self.proto = proto
    }

    public var description: String { "\(hostPort):\(nodePort):\(proto)" }
}

/// Why an annotation was rejected; the text names the annotation, the entry and what is expected.
public struct AnnotationError: Error, Hashable, Sendable, CustomStringConvertible {
    public var annotation: String
    public var message: String

    public var description: String { "\(annotation): \(message)" }
}

/// Parsers for Epok's annotations: strict, so that a typo is reported instead of guessed at.
public enum AnnotationParser {
    /// Parses `epok.getbetter.ro/externalports`, e.g. `22:2022, 53:8053:udp`.
    public static func externalPorts(_ text: String) throws(AnnotationError) -> [PortRequest] {
        func fail(_ message: String) -> AnnotationError {
            AnnotationError(annotation: EpokAnnotation.externalPorts, message: message)
        }
        var result: [PortRequest] = []
        // Parsed from the bytes, in place; text is made only for a message.
        let bytes = Array(text.utf8)
        var rest = bytes[...]
        var index = 0
        while true {
            let end = rest.firstIndex(of: UInt8(ascii: ",")) ?? rest.endIndex
            let entry = rest[..<end].trimmedWhitespace()
            guard !entry.isEmpty else {
                throw fail("entry \(index + 1) of \"\(text)\" is empty (expected HOSTPORT:NODEPORT[:tcp|udp])")
            }
            func shown() -> String { String(decoding: entry, as: UTF8.self) }
            func string(_ field: ArraySlice<UInt8>) -> String { String(decoding: field, as: UTF8.self) }
            guard let (hostField, nodeField, protoField) = entry.portFields() else {
                throw fail("\"\(shown())\" is not HOSTPORT:NODEPORT[:tcp|udp]")
            }
            guard let host = Port(utf8: hostField) else { throw fail("\"\(shown())\": host port \"\(string(hostField))\" is not a port (1-65535)") }
            guard let node = Port(utf8: nodeField) else { throw fail("\"\(shown())\": node port \"\(string(nodeField))\" is not a port (1-65535)") }
            var proto = L4Protocol.tcp
            if let protoField {
                guard let p = L4Protocol(utf8: protoField) else {
                    throw fail("\"\(shown())\": protocol \"\(string(protoField))\" is not tcp or udp")
                }
                proto = p
            }
            result.append(PortRequest(hostPort: host, nodePort: node, proto: proto))
            guard end < rest.endIndex else { break }
            rest = rest[(end + 1)...]
            index += 1
        }
        // Most annotations have one entry: no table to find twice-used host ports in.
        guard result.count > 1 else { return result }
        var seen: [PortKey: PortRequest] = [:]
        for request in result {
            if let earlier = seen.updateValue(request, forKey: PortKey(proto: request.proto, port: request.hostPort)) {
                throw fail("host port \(request.hostPort)/\(request.proto) appears twice (\(earlier) and \(request))")
            }
        }
        return result
    }

    /// Parses comma-separated ports and port ranges (`80,443,1024-65535`).
    public static func portRanges(_ text: String) throws(AnnotationError) -> [ClosedRange<Port>] {
        var result: [ClosedRange<Port>] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = item.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
            guard let low = Port(bounds[0]), let high = bounds.count == 2 ? Port(bounds[1]) : low, low <= high else {
                throw AnnotationError(annotation: "ports", message: "\"\(item)\" is not a port or a range of ports (e.g. 80 or 1024-65535)")
            }
            result.append(low...high)
        }
        return result
    }

    /// Parses a comma-separated list of CIDRs (`epok.getbetter.ro/allow-range`), IPv4 and IPv6.
    public static func cidrs(_ text: String, annotation: String = EpokAnnotation.allowRange) throws(AnnotationError) -> [CIDR] {
        try cidrs(text.split(separator: ",", omittingEmptySubsequences: false).map(String.init), annotation: annotation)
    }

    /// Parses a list of CIDRs; any bad one rejects the list (an allow-list is never guessed at).
    public static func cidrs(_ items: [String], annotation: String) throws(AnnotationError) -> [CIDR] {
        var result: [CIDR] = []
        for item in items {
            let trimmed = String(decoding: Array(item.utf8)[...].trimmedWhitespace(), as: UTF8.self)
            guard !trimmed.isEmpty else {
                throw AnnotationError(annotation: annotation, message: "empty entry in \"\(items.joined(separator: ","))\"")
            }
            do {
                result.append(try CIDR(parsing: trimmed))
            } catch {
                throw AnnotationError(annotation: annotation, message: error.description)
            }
        }
        return Array(Set(result)).sorted()
    }
}

extension AnnotationParser {
    /// The largest rate or burst value accepted (the kernel keeps 64-bit rates; a burst is 32-bit).
    static let largestRate: UInt64 = 1 << 40

    /// Parses a rate limit in nft's and arbf-nft-operator's syntax: `<value> [<unit>]/<period> [burst <value> [<unit>]]`,
    /// units `packets` (the default), `bytes`, `kbytes`, `mbytes`; periods `second`, `minute`, `hour`, `day`.
    /// A packet rate's burst is in packets, a byte rate's in bytes; the error names the offending token.
    public static func rateLimit(_ text: String, annotation: String) throws(AnnotationError) -> RateLimit {
        func fail(_ message: String) -> AnnotationError {
            AnnotationError(annotation: annotation, message: "\"\(text)\": \(message) (expected e.g. \"2 mbytes/second burst 512 kbytes\" or \"200/second\")")
        }
        let halves = text.split(separator: "/", omittingEmptySubsequences: false)
        guard halves.count == 2 else { throw fail(halves.count == 1 ? "no \"/\" between the value and the period" : "more than one \"/\"") }
        let left = halves[0].split(whereSeparator: \.isWhitespace), right = halves[1].split(whereSeparator: \.isWhitespace)
        guard let valueToken = left.first else { throw fail("no value before \"/\"") }
        let value = try number(valueToken, fail)
        guard left.count <= 2 else { throw fail("\"\(left[2])\" after the unit is not expected") }
        let (unit, scale) = try unit(left.count == 2 ? left[1] : nil, fail)
        guard let periodToken = right.first else { throw fail("no period after \"/\"") }
        guard let period = RateLimit.Period.allCases.first(where: { $0.name == periodToken }) else {
            throw fail("period \"\(periodToken)\" is not second, minute, hour or day")
        }
        var burst: UInt64?
        if right.count > 1 {
            guard right[1] == "burst" else { throw fail("\"\(right[1])\" after the period is not \"burst\"") }
            guard right.count >= 3 else { throw fail("no value after \"burst\"") }
            let amount = try number(right[2], fail)
            guard right.count <= 4 else { throw fail("\"\(right[4])\" after the burst is not expected") }
            let (burstUnit, burstScale) = try self.unit(right.count == 4 ? right[3] : nil, fail)
            guard burstUnit == unit else {
                throw fail("the burst is in \(burstUnit) but the rate in \(unit)" + (unit == .bytes ? " (give the burst a byte unit)" : ""))
            }
            burst = amount * burstScale
            guard burst! <= UInt64(UInt32.max) else { throw fail("burst \(right[2]) is larger than 4 GiB or 2^32 packets") }
        }
        let limit = RateLimit(rate: value * scale, unit: unit, per: period, burst: burst.map { UInt32($0) })
        if let problem = limit.kernelProblem { throw fail(problem) }
        return limit
    }

    private static func number(_ token: Substring, _ fail: (String) -> AnnotationError) throws(AnnotationError) -> UInt64 {
        guard !token.isEmpty, token.utf8.allSatisfy({ (0x30...0x39).contains($0) }), token.utf8.count <= 13,
              let value = UInt64(token), value > 0, value <= largestRate else {
            throw fail("\"\(token)\" is not a whole number from 1 to \(largestRate)")
        }
        return value
    }

    private static func unit(_ token: Substring?, _ fail: (String) -> AnnotationError) throws(AnnotationError) -> (RateLimit.Unit, UInt64) {
        switch token {
        case nil, "packets": return (.packets, 1)
        case "bytes": return (.bytes, 1)
        case "kbytes": return (.bytes, 1 << 10)
        case "mbytes": return (.bytes, 1 << 20)
        case let token?: throw fail("unit \"\(token)\" is not packets, bytes, kbytes or mbytes")
        }
    }
}

extension ArraySlice<UInt8> {
    /// The fields of `HOSTPORT:NODEPORT[:PROTOCOL]`, split at its colons without copying; nil unless there are two or three.
    func portFields() -> (ArraySlice<UInt8>, ArraySlice<UInt8>, ArraySlice<UInt8>?)? {
        let colon = UInt8(ascii: ":")
        guard let first = firstIndex(of: colon) else { return nil }
        let afterFirst = self[(first + 1)...]
        guard let second = afterFirst.firstIndex(of: colon) else { return (self[..<first], afterFirst, nil) }
        let third = self[(second + 1)...]
        guard !third.contains(colon) else { return nil }
        return (self[..<first], self[(first + 1)..<second], third)
    }

    /// The bytes without surrounding spaces, tabs and line breaks.
    func trimmedWhitespace() -> ArraySlice<UInt8> {
        let space: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 || $0 == 0x0a || $0 == 0x0d }
        guard let start = firstIndex(where: { !space($0) }) else { return [] }
        return self[start...lastIndex(where: { !space($0) })!]
    }
}
