import Dataplane

/// How epokd was told to forward (`--interfaces`, `--external-interface`, `--host-ports`, `--node-cidrs`).
public struct ForwardingOptions: Hashable, Sendable {
    public var interfaces: [String]
    public var externalInterface: String?
    /// Host ports Services may claim; nil allows every port (as Epok does).
    public var hostPorts: [ClosedRange<Port>]?
    /// Prefixes node addresses must lie in to receive traffic; nil allows any usable address.
    public var nodeCIDRs: [CIDR]?
    /// The host's own addresses, never used as a backend (that would loop traffic back to the host).
    public var hostAddresses: Set<IPAddress>

    public init(interfaces: [String], externalInterface: String? = nil, hostPorts: [ClosedRange<Port>]? = nil,
                nodeCIDRs: [CIDR]? = nil, hostAddresses: Set<IPAddress> = []) {
        self.interfaces = interfaces
        self.externalInterface = externalInterface
        self.hostPorts = hostPorts
        self.nodeCIDRs = nodeCIDRs
        self.hostAddresses = hostAddresses
    }
}

/// Bounds on what one Service may ask for, so that no Service makes every transaction slow.
public enum ServiceLimits {
    /// Entries of `epok.getbetter.ro/externalports`.
    public static let mappings = 1000
    /// CIDRs of `allow-range` and `loadBalancerSourceRanges` together.
    public static let sourceRanges = 1000
    /// Allow-range elements (mappings × disjoint ranges). Removing a Service's elements from the kernel's
    /// interval set costs more than linearly (about 0.25 s for 2,000 in key order, 5 s in hash order; see the
    /// benchmark row), so this keeps any one transaction short.
    public static let allowElements = 2_000
}

/// Something in the cluster's state that epokd refused, with the reason a Kubernetes Event carries.
public struct Problem: Hashable, Sendable, CustomStringConvertible {
    public enum Reason: String, Sendable {
        case invalidAnnotation = "InvalidAnnotation"
        case invalidAllowRange = "InvalidAllowRange"
        case unknownNodePort = "UnknownNodePort"
        case portConflict = "PortConflict"
        case nodeWithoutAddress = "NodeWithoutInternalIP"
        case invalidNodeAddress = "InvalidNodeAddress"
        case hostPortNotAllowed = "HostPortNotAllowed"
        case tooManyEntries = "TooManyEntries"
        case rejectedByKernel = "RejectedByKernel"
    }

    /// `Service namespace/name` or `Node name`.
    public var object: String
    public var reason: Reason
    public var message: String
    /// The Service concerned, when it is one.
    public var service: ServiceRef?

    /// `object` and `message` may quote user text: they are kept escaped (no line breaks or control
    /// characters, so a log line cannot be forged) and cut to a readable length.
    public init(object: String, reason: Reason, message: String, service: ServiceRef? = nil) {
        self.object = Escaped.text(object, limit: 300)
        self.reason = reason
        self.message = Escaped.text(message, limit: 1000)
        self.service = service
    }

    public var description: String { "\(object): \(message)" }
}

/// User-supplied text made safe for logs and Events.
public enum Escaped {
    /// `text` with control characters written as `\n`, `\t`, `\u{..}`, cut to `limit` characters (with `…`).
    public static func text(_ text: String, limit: Int) -> String {
        var result = ""
        var count = 0
        for scalar in text.unicodeScalars {
            if count >= limit {
                result += "…"
                break
            }
            switch scalar {
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case _ where scalar.value < 0x20 || (0x7f...0x9f).contains(scalar.value) || scalar == "\u{2028}" || scalar == "\u{2029}":
                result += "\\u{" + String(scalar.value, radix: 16) + "}"
            default: result.unicodeScalars.append(scalar)
            }
            count += 1
        }
        return result
    }
}

/// Which of two Services claiming one host port keeps it: the older (by creationTimestamp, read as a time;
/// a missing or unparsable one counts as newest), then the first by namespace/name.
public struct ClaimPrecedence: Comparable, Sendable {
    public var created: Int64
    public var service: ServiceRef

    public init(_ service: Service) {
        created = service.metadata.creationTimestamp.flatMap(Timestamp.seconds) ?? .max
        self.service = service.ref
    }

    public static func < (a: ClaimPrecedence, b: ClaimPrecedence) -> Bool {
        a.created != b.created ? a.created < b.created : a.service < b.service
    }
}

/// RFC 3339 timestamps as the API server writes them.
public enum Timestamp {
    /// Seconds since 1970 of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; nil for anything else.
    public static func seconds(_ text: String) -> Int64? {
        let b = Array(text.utf8)
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
            while i < b.count, (0x30...0x39).contains(b[i]) { i += 1 }
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

/// A host port that a Service was granted.
public struct ForwardedPort: Hashable, Sendable {
    public var service: ServiceRef
    public var mapping: Mapping
}

/// What the host should forward, computed from a snapshot: plain values, no I/O.
public struct DesiredState: Hashable, Sendable {
    public var forwarding: ForwardingState
    /// Every granted host port with its Service, sorted by protocol and port.
    public var ports: [ForwardedPort]
    public var problems: [Problem]
    /// Ready, not excluded nodes with an InternalIP.
    public var nodes: [NodeAddress]

    /// Computes the desired forwarding of `snapshot` under `options`.
    ///
    /// Each Service's annotations are parsed strictly: a malformed annotation or allow-range gives that Service
    /// no ports at all (never stale ones, never an open port that was meant to be restricted), an entry whose
    /// node port the Service lacks is dropped alone, and when two Services claim one host port and protocol the
    /// older one (see `ClaimPrecedence`) keeps it. Problems are reported, never thrown. This is the incremental
    /// state (`LiveDesiredState`) fed everything at once: one implementation of the rules for both paths.
    public init(snapshot: ClusterSnapshot, options: ForwardingOptions) {
        let live = LiveDesiredState(claimsOnly: options)
        _ = live.replaceAll(snapshot)
        self = live.state
    }

    init(ports: [ForwardedPort], problems: [Problem], nodes: [NodeAddress], options: ForwardingOptions) {
        self.ports = ports
        self.problems = problems
        self.nodes = nodes
        forwarding = ForwardingState(
            interfaces: options.interfaces,
            externalInterfaces: options.externalInterface.map { [$0] } ?? [],
            nodes: nodes,
            mappings: ports.map(\.mapping))
    }

    /// The Service's requested mappings that are valid on their own (conflicts are settled by the caller).
    static func mappings(of service: Service, options: ForwardingOptions, problems: inout [Problem]) -> [Mapping] {
        let annotations = service.metadata.annotations ?? [:]
        guard let text = annotations[EpokAnnotation.externalPorts] else { return [] }
        let object = "Service \(service.ref)"
        func report(_ reason: Problem.Reason, _ message: String) {
            problems.append(Problem(object: object, reason: reason, message: message, service: service.ref))
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

        var allowed: [CIDR]?
        do {
            if let range = annotations[EpokAnnotation.allowRange] {
                allowed = try AnnotationParser.cidrs(range)
            }
            if let ranges = service.spec.loadBalancerSourceRanges, !ranges.isEmpty {
                let more = try AnnotationParser.cidrs(ranges, annotation: "spec.loadBalancerSourceRanges")
                allowed = Array(Set((allowed ?? []) + more)).sorted()
            }
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

        let internalOnly = annotations[EpokAnnotation.internal] != nil
        let nodePorts = (service.spec.ports ?? []).compactMap { p -> (L4Protocol, Port)? in
            guard let n = p.nodePort, let port = Dataplane.Port(n), let proto = L4Protocol(p.protocol ?? "TCP") else { return nil }
            return (proto, port)
        }
        let known = Set(nodePorts.map { PortKey(proto: $0.0, port: $0.1) })
        var unknown: [PortRequest] = []
        var outside: [PortRequest] = []
        var result: [Mapping] = []
        for request in requests {
            guard known.contains(PortKey(proto: request.proto, port: request.nodePort)) else {
                unknown.append(request)
                continue
            }
            if let allowedPorts = options.hostPorts, !allowedPorts.contains(where: { $0.contains(request.hostPort) }) {
                outside.append(request)
                continue
            }
            result.append(Mapping(proto: request.proto, hostPort: request.hostPort, nodePort: request.nodePort,
                                  internalOnly: internalOnly, allowedSources: allowed, label: service.ref.description))
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

    /// Ready nodes without the exclude annotation or label, with their first usable InternalIP of each family.
    /// An address that cannot be a backend (loopback, unspecified, link-local, multicast, broadcast, one of the
    /// host's own, or outside `--node-cidrs`) is refused with a problem naming the Node.
    static func eligibleNodes(_ nodes: [Node], options: ForwardingOptions, problems: inout [Problem]) -> [NodeAddress] {
        var result: [NodeAddress] = []
        for node in nodes where node.isReady {
            if node.metadata.annotations?[EpokAnnotation.exclude] != nil || node.metadata.labels?[EpokAnnotation.excludeLabel] != nil {
                continue
            }
            let object = "Node \(node.metadata.name)"
            var address = NodeAddress(node: node.metadata.name)
            var refused: [String] = []
            for a in node.status?.addresses ?? [] where a.type == "InternalIP" {
                guard let ip = IPAddress(a.address) else {
                    refused.append("\"\(a.address)\" is not an IP address")
                    continue
                }
                if let why = unusableBackend(ip, options: options) {
                    refused.append("\(ip) is \(why)")
                    continue
                }
                switch ip {
                case .v4(let v4): if address.ipv4 == nil { address.ipv4 = v4 }
                case .v6(let v6): if address.ipv6 == nil { address.ipv6 = v6 }
                }
            }
            if !refused.isEmpty {
                problems.append(Problem(object: object, reason: .invalidNodeAddress,
                                        message: "InternalIP " + refused.prefix(4).joined(separator: "; ") + ": never used as a backend"))
            }
            guard address.ipv4 != nil || address.ipv6 != nil else {
                problems.append(Problem(object: object, reason: .nodeWithoutAddress,
                                        message: "has no usable InternalIP address; it receives no forwarded traffic"))
                continue
            }
            result.append(address)
        }
        return result.sorted()
    }

    /// Why `ip` cannot receive forwarded traffic, or nil if it can.
    static func unusableBackend(_ ip: IPAddress, options: ForwardingOptions) -> String? {
        switch ip {
        case .v4(let a):
            let v = a.value
            if v == 0 { return "the unspecified address" }
            if v >> 24 == 127 { return "a loopback address" }
            if v >> 16 == 0xA9FE { return "a link-local address" }
            if v >> 28 == 0xE { return "a multicast address" }
            if v == .max { return "the broadcast address" }
            if v >> 24 == 0 { return "in 0.0.0.0/8 (this network)" }
        case .v6(let a):
            if a.high == 0 && a.low == 0 { return "the unspecified address" }
            if a.high == 0 && a.low == 1 { return "the loopback address" }
            if a.high >> 54 == 0x3FA { return "a link-local address" }
            if a.high >> 56 == 0xFF { return "a multicast address" }
            if a.high == 0 && a.low >> 32 == 0xFFFF { return "an IPv4-mapped address (give the IPv4 address instead)" }
        }
        if options.hostAddresses.contains(ip) { return "an address of this host (forwarding there would loop)" }
        if let allowed = options.nodeCIDRs, !allowed.contains(where: { $0.contains(ip) }) {
            return "outside --node-cidrs " + allowed.map(\.description).joined(separator: ",")
        }
        return nil
    }
}
