import Dataplane

// The LoadBalancer firewall's part of the desired state: which LB IP . protocol . port a Service holds, from
// whom, and at what rate.

extension ServiceLimits {
    /// Distinct per-source rates one namespace may bring in (a rate another namespace uses already costs it
    /// nothing). Each rate is one pair of rules (IPv4, IPv6) in chain `per_source` and four sets; only traffic to
    /// a LoadBalancer with a per-source limit walks that chain, so the rates one namespace uses never cost
    /// another namespace's traffic, and there is no cluster-wide cap that one tenant could fill.
    public static let perSourceRatesPerNamespace = 8
}

/// A Service's rate limits, from its annotations.
public struct ServiceRateLimits: Hashable, Sendable {
    /// The Service's aggregate limit (`epok.getbetter.ro/ratelimit`, or arbf-nft-operator's bare `ratelimit`).
    public var aggregate: RateLimit?
    /// What any one source may send (`epok.getbetter.ro/ratelimit-per-source`).
    public var perSource: RateLimit?
}

extension DesiredState {
    private static let aggregateNames = [EpokAnnotation.rateLimit, EpokAnnotation.bareRateLimit]
    private static let perSourceNames = [EpokAnnotation.rateLimitPerSource]

    /// The Service's rate limits. An invalid one is a problem naming the offending token, and the Service stays
    /// forwarded without that limit.
    static func rateLimits(of service: Service, problems: inout [Problem]) -> ServiceRateLimits {
        func parse(_ names: [String]) -> RateLimit? {
            for name in names {
                guard let text = service.metadata.annotation(name) else { continue }
                do {
                    return try AnnotationParser.rateLimit(text, annotation: name)
                } catch {
                    problems.append(Problem(object: "Service \(service.ref)", reason: .invalidRateLimit,
                                            message: "\(error); the Service is forwarded without this limit", service: service.ref))
                    return nil
                }
            }
            return nil
        }
        return ServiceRateLimits(aggregate: parse(aggregateNames), perSource: parse(perSourceNames))
    }

    /// The LB IP . protocol . port entries of a `type: LoadBalancer` Service (its `status.loadBalancer.ingress`
    /// IPs, by every port of its spec), when the firewall is on. An invalid allow-range admits nobody (no entries).
    /// A host's or a Node's address (`reserved`) is never admitted as a LoadBalancer IP.
    /// An IP `taken` names a holder for (an older Service without the same sharing key) is not admitted either.
    static func loadBalancers(of service: Service, options: ForwardingOptions, limits: ServiceRateLimits,
                              reserved: ReservedAddresses = ReservedAddresses(), taken: (IPAddress) -> String? = { _ in nil },
                              problems: inout [Problem]) -> [LoadBalancerEntry] {
        guard !options.firewallInterfaces.isEmpty, service.spec.type == "LoadBalancer" else { return [] }
        let object = "Service \(service.ref)"
        var addresses: [IPAddress] = []
        for ingress in service.status?.loadBalancer?.ingress ?? [] {
            guard let text = ingress.ip else { continue }
            guard let address = IPAddress(text), Self.specialPurpose(address) == nil else {
                let what = IPAddress(text).flatMap(Self.specialPurpose) ?? "not an IPv4 or IPv6 address"
                problems.append(Problem(object: object, reason: .invalidLoadBalancerIP,
                                        message: "status.loadBalancer.ingress ip \"\(text)\" is \(what); ignored", service: service.ref))
                continue
            }
            if let why = reserved.why(address) {
                problems.append(Problem(object: object, reason: .invalidLoadBalancerIP,
                                        message: "status.loadBalancer.ingress ip \(address) is \(why), never a LoadBalancer IP; ignored", service: service.ref))
                continue
            }
            if let holder = taken(address) {
                problems.append(Problem(object: object, reason: .addressTaken,
                                        message: "LoadBalancer IP \(address) belongs to \(holder), which held it first; it is shared only between Services with the same \(EpokAnnotation.allowSharedIP) value; not admitted",
                                        service: service.ref))
                continue
            }
            addresses.append(address)
        }
        guard !addresses.isEmpty else { return [] }
        let allowed: [CIDR]?
        do {
            allowed = try allowedSources(of: service)
        } catch {
            problems.append(Problem(object: object, reason: .invalidAllowRange,
                                    message: "\(error); its LoadBalancer IPs admit nobody until it is fixed", service: service.ref))
            return []
        }
        let ports = (service.spec.ports ?? []).compactMap { p -> (L4Protocol, Port)? in
            guard let port = Port(p.port), let proto = L4Protocol(p.protocol ?? "TCP") else { return nil }
            return (proto, port)
        }
        let count = Set(addresses).count * ports.count
        let ranges = allowed.map { AddressRange.union(of: $0).count } ?? 0
        guard count <= ServiceLimits.mappings, ranges * count <= ServiceLimits.allowElements else {
            problems.append(Problem(object: object, reason: .tooManyEntries,
                                    message: "\(count) LoadBalancer IP . port pairs with \(ranges) source ranges exceed the limits (\(ServiceLimits.mappings) pairs, \(ServiceLimits.allowElements) pair-range combinations per Service); its LoadBalancer IPs admit nobody until it is fixed",
                                    service: service.ref))
            return []
        }
        var seen = Set<LoadBalancerKey>()
        var result: [LoadBalancerEntry] = []
        for address in addresses {
            for (proto, port) in ports {
                let entry = LoadBalancerEntry(address: address, proto: proto, port: port, allowedSources: allowed,
                                              limit: limits.aggregate, perSourceLimit: limits.perSource, label: service.ref.description)
                if seen.insert(entry.key).inserted { result.append(entry) }
            }
        }
        return result
    }
}
