import Dataplane

// The rules for host ports: what a Service may claim, and who keeps a contested port.

/// Bounds on what one Service may ask for, so that no Service makes every transaction slow.
public enum ServiceLimits {
    /// Distinct HTTP health-check paths one namespace's Services may use (each costs a probe per node and interval).
    public static let healthPathsPerNamespace = 4
    /// Entries of `epok.getbetter.ro/externalports`.
    public static let mappings = 1000
    /// CIDRs of `allow-range` and `loadBalancerSourceRanges` together.
    public static let sourceRanges = 1000
    /// Allow-range elements (mappings × disjoint ranges). Removing a Service's elements from the kernel's
    /// interval set costs more than linearly (about 0.25 s for 2,000 in key order, 5 s in hash order; see the
    /// benchmark row), so this keeps any one transaction short.
    public static let allowElements = 2_000
    /// Ports, and sources, of one ExternalService (each source's pods times the ports are its exits).
    public static let bridgePorts = 100
}

/// Which of two Services claiming one host port keeps it: the older (by creationTimestamp, read as a time;
/// a missing or unparsable one counts as newest), then the first by namespace/name.
public struct ClaimPrecedence: Comparable, Sendable {
    public var created: Int64
    public var service: ServiceRef

    public init(_ service: Service) {
        created = service.metadata.createdSeconds ?? .max
        self.service = service.ref
    }

    init(created: Int64, service: ServiceRef) {
        self.created = created
        self.service = service
    }

    public static func < (a: ClaimPrecedence, b: ClaimPrecedence) -> Bool {
        a.created != b.created ? a.created < b.created : a.service < b.service
    }
}

/// RFC 3339 timestamps as the API server writes them.
public enum Timestamp {
    /// Seconds since 1970 of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; nil for anything else.
    public static func seconds(_ text: String) -> Int64? {
        var text = text
        return text.withUTF8(seconds(utf8:))
    }

    static func seconds(utf8 b: UnsafeBufferPointer<UInt8>) -> Int64? {
        var fraction = 0.0
        return seconds(utf8: b, fraction: &fraction)
    }

    /// `unixTime` (seconds since 1970) as RFC 3339 in UTC, as the API server writes times: to the second
    /// (`2024-05-01T10:00:00Z`), or with `microseconds` six digits more (`metav1.MicroTime`); the fraction is cut,
    /// not rounded. Foundation's formatters would do it through ICU's calendars, 3 MB of the daemon's memory.
    public static func text(_ unixTime: Double, microseconds: Bool = false) -> String {
        let micros = Int64((unixTime * 1_000_000).rounded(.down))
        // Rounded down, so that a time before 1970 falls in the second it is in.
        let (whole, fraction) = micros.quotientAndRemainder(dividingBy: 1_000_000)
        let (seconds, micro) = fraction < 0 ? (whole - 1, fraction + 1_000_000) : (whole, fraction)
        return String(unsafeUninitializedCapacity: microseconds ? 27 : 20) { out in
            write(seconds, into: out)
            guard microseconds else { return 20 }
            out[19] = UInt8(ascii: ".")
            put(micro, into: out, at: 20, width: 6)
            out[26] = UInt8(ascii: "Z")
            return 27
        }
    }

    /// Writes `YYYY-MM-DDTHH:MM:SSZ` of `seconds` (years 0 to 9999) into the first 20 bytes of `out`.
    static func write(_ seconds: Int64, into out: UnsafeMutableBufferPointer<UInt8>) {
        // Civil from days (proleptic Gregorian), after Howard Hinnant's algorithm: eras of 400 years from March 1.
        let days = seconds >= 0 ? seconds / 86400 : (seconds - 86399) / 86400
        let time = seconds - days * 86400
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        put(year, into: out, at: 0, width: 4); out[4] = UInt8(ascii: "-"); put(month, into: out, at: 5, width: 2)
        out[7] = UInt8(ascii: "-"); put(day, into: out, at: 8, width: 2); out[10] = UInt8(ascii: "T")
        put(time / 3600, into: out, at: 11, width: 2); out[13] = UInt8(ascii: ":"); put(time / 60 % 60, into: out, at: 14, width: 2)
        out[16] = UInt8(ascii: ":"); put(time % 60, into: out, at: 17, width: 2); out[19] = UInt8(ascii: "Z")
    }

    /// `value`'s last `width` decimal digits at `out[at...]`, zeros before.
    private static func put(_ value: Int64, into out: UnsafeMutableBufferPointer<UInt8>, at: Int, width: Int) {
        var v = value
        for i in stride(from: at + width - 1, through: at, by: -1) {
            out[i] = 0x30 + UInt8(v % 10)
            v /= 10
        }
    }

    /// Seconds since 1970 of an RFC 3339 time with its fraction (`metav1.MicroTime`, `RFC3339Nano`); nil for anything else.
    public static func unixTime(_ text: String) -> Double? {
        var text = text
        var fraction = 0.0
        return text.withUTF8 { seconds(utf8: $0, fraction: &fraction) }.map { Double($0) + fraction }
    }

    private static func seconds(utf8 b: UnsafeBufferPointer<UInt8>, fraction: inout Double) -> Int64? {
        guard b.count >= 20 else { return nil }
        func number(_ range: Range<Int>) -> Int64? {
            var v: Int64 = 0
            for i in range {
                guard (0x30...0x39).contains(b[i]) else { return nil }
                v = v * 10 + Int64(b[i] - 0x30)
            }
            return v
        }
        guard let year = number(0..<4), b[4] == UInt8(ascii: "-"), let month = number(5..<7), b[7] == UInt8(ascii: "-"),
              let day = number(8..<10), b[10] == UInt8(ascii: "T") || b[10] == UInt8(ascii: "t"),
              let hour = number(11..<13), b[13] == UInt8(ascii: ":"), let minute = number(14..<16), b[16] == UInt8(ascii: ":"),
              let second = number(17..<19),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else { return nil }
        var i = 19
        if b[i] == UInt8(ascii: ".") {
            i += 1
            let start = i
            var scale = 0.1
            while i < b.count, (0x30...0x39).contains(b[i]) {
                fraction += Double(b[i] - 0x30) * scale
                scale /= 10
                i += 1
            }
            guard i > start else { return nil }
        }
        guard i < b.count else { return nil }
        var offset: Int64 = 0
        if b[i] == UInt8(ascii: "Z") || b[i] == UInt8(ascii: "z") {
            i += 1
        } else if b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
            guard i + 6 == b.count, let oh = number((i + 1)..<(i + 3)), b[i + 3] == UInt8(ascii: ":"),
                  let om = number((i + 4)..<(i + 6)), oh < 24, om < 60 else { return nil }
            offset = (oh * 3600 + om * 60) * (b[i] == UInt8(ascii: "+") ? 1 : -1)
            i += 6
        } else {
            return nil
        }
        guard i == b.count else { return nil }
        // Days from civil (proleptic Gregorian), after Howard Hinnant's algorithm.
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146_097 + doe - 719_468
        return days * 86400 + hour * 3600 + minute * 60 + second - offset
    }
}

extension DesiredState {
    /// The Service's requested mappings that are valid on their own (conflicts are settled by the caller).
    static func mappings(of service: Service, options: ForwardingOptions, limit: RateLimit? = nil, problems: inout [Problem]) -> [Mapping] {
        guard let text = service.metadata.annotation(EpokAnnotation.externalPorts) else { return [] }
        func report(_ reason: Problem.Reason, _ message: String) {
            problems.append(Problem(object: "Service \(service.ref)", reason: reason, message: message, service: service.ref))
        }

        let requests: [PortRequest]
        do {
            requests = try AnnotationParser.externalPorts(text)
        } catch {
            report(.invalidAnnotation, "\(error); no ports are forwarded for this Service")
            return []
        }
        guard requests.count <= ServiceLimits.mappings else {
            report(.tooManyEntries, "\(EpokAnnotation.externalPorts) has \(requests.count) entries, more than the \(ServiceLimits.mappings) a Service may have; no ports are forwarded for this Service")
            return []
        }

        let allowed: [CIDR]?
        do {
            allowed = try allowedSources(of: service)
        } catch {
            report(.invalidAllowRange, "\(error); no ports are forwarded for this Service until it is fixed")
            return []
        }
        if let allowed {
            let ranges = AddressRange.union(of: allowed).count
            guard allowed.count <= ServiceLimits.sourceRanges, ranges * requests.count <= ServiceLimits.allowElements else {
                report(.tooManyEntries, "\(allowed.count) source ranges for \(requests.count) ports exceed the limits (\(ServiceLimits.sourceRanges) ranges, \(ServiceLimits.allowElements) port-range pairs per Service); no ports are forwarded for this Service until it is fixed")
                return []
            }
        }

        let internalValue = service.metadata.annotation(EpokAnnotation.internal)
        let internalOnly = internalValue != nil
        if let value = internalValue, ["false", "no", "0", "off"].contains(value.lowercased()) {
            report(.ambiguousAnnotation, "\(EpokAnnotation.internal) is \"\(value)\", but as in Epok the key itself makes the Service internal, whatever its value: its ports are not forwarded from the external interface (remove the key to forward them)")
        }
        let nodePorts = (service.spec.ports ?? []).compactMap { p -> (L4Protocol, Port)? in
            guard let n = p.nodePort, let port = Dataplane.Port(n), let proto = L4Protocol(p.protocol ?? "TCP") else { return nil }
            return (proto, port)
        }
        // A Service has a few ports, looked through in place; a table only for many.
        let table = nodePorts.count > 16 ? Set(nodePorts.map { PortKey(proto: $0.0, port: $0.1) }) : nil
        func known(_ request: PortRequest) -> Bool {
            table?.contains(PortKey(proto: request.proto, port: request.nodePort)) ?? nodePorts.contains { $0 == (request.proto, request.nodePort) }
        }
        var unknown: [PortRequest] = []
        var outside: [PortRequest] = []
        var result: [Mapping] = []
        for request in requests {
            guard known(request) else {
                unknown.append(request)
                continue
            }
            if let allowedPorts = options.hostPorts, !allowedPorts.contains(where: { $0.contains(request.hostPort) }) {
                outside.append(request)
                continue
            }
            result.append(Mapping(proto: request.proto, hostPort: request.hostPort, nodePort: request.nodePort,
                                  internalOnly: internalOnly, allowedSources: allowed, label: service.ref.description, limit: limit))
        }
        if !unknown.isEmpty {
            // One problem for all of them, listing a few: a long annotation must not make a long report.
            let has = nodePorts.isEmpty
                ? "it has none (type \(service.spec.type ?? "ClusterIP"); epokd forwards to NodePort and LoadBalancer Services)"
                : "it has " + nodePorts.prefix(10).map { "\($0.1)/\($0.0)" }.joined(separator: ", ") + (nodePorts.count > 10 ? " and \(nodePorts.count - 10) more" : "")
            let entries = unknown.prefix(5).map(\.description).joined(separator: ", ") + (unknown.count > 5 ? " and \(unknown.count - 5) more" : "")
            report(.unknownNodePort, "\(EpokAnnotation.externalPorts): \(unknown.count == 1 ? "entry" : "entries") \(entries): not a node port of this Service (\(has)); \(unknown.count == 1 ? "this entry is" : "these entries are") ignored")
        }
        if !outside.isEmpty, let allowedPorts = options.hostPorts {
            let entries = outside.prefix(5).map(\.description).joined(separator: ", ") + (outside.count > 5 ? " and \(outside.count - 5) more" : "")
            let ranges = allowedPorts.map { $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }.joined(separator: ",")
            report(.hostPortNotAllowed, "\(EpokAnnotation.externalPorts): host \(outside.count == 1 ? "port" : "ports") of \(entries) outside --host-ports \(ranges); ignored")
        }
        return result
    }

    /// The union of `epok.getbetter.ro/allow-range` and `spec.loadBalancerSourceRanges`; nil when neither is
    /// given (everyone is allowed). Any bad CIDR is an error: an allow-list is never guessed at.
    static func allowedSources(of service: Service) throws(AnnotationError) -> [CIDR]? {
        var allowed: [CIDR]?
        if let range = service.metadata.annotation(EpokAnnotation.allowRange) {
            allowed = try AnnotationParser.cidrs(range)
        }
        if let ranges = service.spec.loadBalancerSourceRanges, !ranges.isEmpty {
            let more = try AnnotationParser.cidrs(ranges, annotation: "spec.loadBalancerSourceRanges")
            allowed = Array(Set((allowed ?? []) + more)).sorted()
        }
        return allowed
    }
}
