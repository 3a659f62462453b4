import Dataplane

/// A host name as a hosts file and DNS carry it: RFC 1123 labels of letters, digits and inner hyphens, each at
/// most 63 bytes, at most 253 bytes in all, kept in lower case without a trailing dot.
public struct DNSName: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let text: String

    /// Why a name cannot be published.
    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses `text` (case-insensitive; one trailing dot, as in `app.example.com.`, is allowed).
    public init(_ text: some StringProtocol) throws(Invalid) {
        var bytes = Array(text.utf8)
        if bytes.last == UInt8(ascii: ".") { bytes.removeLast() }
        let shown = "\"\(text)\""
        guard !bytes.isEmpty else { throw Invalid(description: "\(shown) is empty") }
        if bytes.starts(with: "*.".utf8) || bytes == [UInt8(ascii: "*")] {
            throw Invalid(description: "\(shown) is a wildcard, which a hosts file cannot hold: name each host")
        }
        guard bytes.allSatisfy({ $0 < 0x80 }) else {
            throw Invalid(description: "\(shown) is not ASCII: write an internationalized name in its xn-- form")
        }
        guard bytes.count <= 253 else { throw Invalid(description: "\(shown) is \(bytes.count) bytes long; a DNS name has at most 253") }
        for label in bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !label.isEmpty else { throw Invalid(description: "\(shown) has an empty label (two dots in a row, or a leading dot)") }
            guard label.count <= 63 else { throw Invalid(description: "\(shown) has a label of \(label.count) bytes; a label has at most 63") }
            if let bad = label.first(where: { !Self.isLabelByte($0) }) {
                throw Invalid(description: "\(shown) contains \"\(Character(Unicode.Scalar(bad)))\"; a DNS label has only letters, digits and hyphens")
            }
            guard label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-") else {
                throw Invalid(description: "\(shown) has a label that starts or ends with a hyphen")
            }
        }
        self.text = String(decoding: bytes.map { (0x41...0x5a).contains($0) ? $0 | 0x20 : $0 }, as: UTF8.self)
    }

    private static func isLabelByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"): true
        default: false
        }
    }

    public var description: String { text }
    public static func < (a: DNSName, b: DNSName) -> Bool { a.text < b.text }
}

/// What external-dns reads, and so what epokd reads for the router's DNS.
public enum ExternalDNS {
    /// Comma-separated host names of a Service (external-dns's annotation).
    public static let hostnameAnnotation = "external-dns.alpha.kubernetes.io/hostname"
}

/// The names epokd publishes, and the problems of the objects that asked for names it could not publish: made
/// by `DNSNames.records`, written by `HostsFile`.
public struct DNSRecords: Equatable, Sendable {
    /// Each published name with the addresses it resolves to.
    public var names: [DNSName: Set<IPAddress>] = [:]
    /// Problems by the object they are reported on.
    public var problems: [ObjectRef: [Problem]] = [:]

    public init(names: [DNSName: Set<IPAddress>] = [:], problems: [ObjectRef: [Problem]] = [:]) {
        self.names = names
        self.problems = problems
    }
}

/// The Services that carry a hostname annotation and the Ingresses, kept as they change, from which the names are
/// made. Only those objects are held: a cluster's other Services cost nothing here.
public final class DNSNames {
    private var services: [ServiceRef: Service] = [:]
    private var ingresses: [ObjectRef: Ingress] = [:]

    public init() {}

    /// Whether `service` asks for names.
    public static func asksForNames(_ service: Service) -> Bool { service.metadata.annotation(ExternalDNS.hostnameAnnotation) != nil }

    /// Keeps `service` if it asks for names (and forgets an earlier version that did).
    public func upsert(_ service: Service) {
        services[service.ref] = Self.asksForNames(service) ? service : nil
    }

    public func remove(_ ref: ServiceRef) { services[ref] = nil }

    public func upsert(_ ingress: Ingress) { ingresses[ingress.ref] = ingress }

    public func remove(_ ref: ObjectRef) { ingresses[ref] = nil }

    /// Replaces every Service held (after a complete list); with `ingresses`, every Ingress too.
    public func replaceAll(services all: some Sequence<Service>, ingresses listed: [Ingress]?) {
        services = [:]
        for service in all where Self.asksForNames(service) { services[service.ref] = service }
        if let listed { replaceAll(ingresses: listed) }
    }

    public func replaceAll(ingresses listed: [Ingress]) {
        ingresses = Dictionary(listed.map { ($0.ref, $0) }, uniquingKeysWith: { $1 })
    }

    /// The metadata of an object held, for its Events.
    public func metadata(of ref: ObjectRef) -> ObjectMeta? {
        ref.kind == .ingress ? ingresses[ref]?.metadata : ref.service.flatMap { services[$0]?.metadata }
    }

    /// The names of the objects held: see `records(services:ingresses:hasHostPorts:address:)`.
    public func records(hasHostPorts: (ServiceRef) -> Bool, address: IPAddress?) -> DNSRecords {
        Self.records(services: Array(services.values), ingresses: Array(ingresses.values), hasHostPorts: hasHostPorts, address: address)
    }

    /// What each object asks: a Service's annotated names resolve to its LoadBalancer ingress IPs, and to `address`
    /// (the router's) when it holds host ports; an Ingress's rule hosts resolve to its ingress IPs. A name two
    /// objects ask for with different addresses is the older one's (by creation time, then kind, namespace and
    /// name, as host ports are held); the other is told. Names that are not valid DNS names are told too.
    public static func records(services: [Service], ingresses: [Ingress], hasHostPorts: (ServiceRef) -> Bool, address: IPAddress?) -> DNSRecords {
        struct Request {
            var owner: ObjectRef
            var created: Int64
            var names: [DNSName]
            var addresses: Set<IPAddress>
        }
        var records = DNSRecords()
        func problem(_ owner: ObjectRef, _ reason: Problem.Reason, _ message: String) {
            records.problems[owner, default: []].append(Problem(object: owner.description, reason: reason, message: message, owner: owner))
        }
        func ingressIPs(_ status: Service.Status?) -> Set<IPAddress> {
            Set((status?.loadBalancer?.ingress ?? []).compactMap { $0.ip.flatMap { IPAddress($0) } })
        }
        func names(_ texts: [String], of owner: ObjectRef, from what: String) -> [DNSName] {
            var valid: [DNSName] = []
            for text in texts {
                do {
                    let name = try DNSName(text)
                    if !valid.contains(name) { valid.append(name) }
                } catch {
                    problem(owner, .invalidHostname, "\(what): \(error); left out of the router's DNS")
                }
            }
            return valid
        }
        var requests: [Request] = []
        for service in services {
            guard let annotation = service.metadata.annotation(ExternalDNS.hostnameAnnotation) else { continue }
            let owner = ObjectRef(service.ref)
            let texts = annotation.split(separator: ",").map { String($0.trimmingASCIISpaces) }.filter { !$0.isEmpty }
            var addresses = ingressIPs(service.status)
            if let address, hasHostPorts(service.ref) { addresses.insert(address) }
            requests.append(Request(owner: owner, created: service.metadata.createdSeconds ?? .max,
                                    names: names(texts, of: owner, from: ExternalDNS.hostnameAnnotation), addresses: addresses))
        }
        for ingress in ingresses {
            let owner = ingress.ref
            let texts = (ingress.spec?.rules ?? []).compactMap(\.host).filter { !$0.isEmpty }
            requests.append(Request(owner: owner, created: ingress.metadata.createdSeconds ?? .max,
                                    names: names(texts, of: owner, from: "spec.rules[].host"), addresses: ingressIPs(ingress.status)))
        }
        requests.sort { ($0.created, $0.owner) < ($1.created, $1.owner) }
        var holders: [DNSName: ObjectRef] = [:]
        // An object without an address yet (a LoadBalancer not assigned) asks for nothing.
        for request in requests where !request.addresses.isEmpty {
            for name in request.names {
                guard let held = records.names[name] else {
                    records.names[name] = request.addresses
                    holders[name] = request.owner
                    continue
                }
                guard held != request.addresses, let holder = holders[name] else { continue }
                // Another namespace's object is named by its kind only.
                let who = holder.namespace == request.owner.namespace ? holder.description : "a \(holder.kind.rawValue) of another namespace"
                problem(request.owner, .hostnameConflict,
                        "\(name) is held by \(who), created earlier, with \(held.sorted().map(\.description).joined(separator: ", ")); this object's \(request.addresses.sorted().map(\.description).joined(separator: ", ")) are not published for it")
            }
        }
        return records
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs.
    var trimmingASCIISpaces: SubSequence {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return self[endIndex...] }
        return self[first...last]
    }
}
