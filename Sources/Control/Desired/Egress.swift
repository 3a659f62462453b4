import Dataplane

extension EpokAnnotation {
    /// The static source addresses of a Service's pods: `198.51.100.10[,2001:db8::10]`.
    public static let egressIP = "epok.getbetter.ro/egress-ip"
    /// The destinations (CIDRs, `0.0.0.0/0` allowed) to which the pods leave with `egress-ip`; required.
    public static let egressDestinations = "epok.getbetter.ro/egress-destinations"
}

extension DesiredState {
    /// The egress rules of a Service's pods (every endpoint address of its EndpointSlices), from its
    /// annotations; an invalid or incomplete pair is a problem and gives no rule (pods keep their own source).
    static func egressRules(of service: Service, pods: Set<IPAddress>, problems: inout [Problem]) -> [EgressRule] {
        let annotations = service.metadata.annotations ?? [:]
        guard let ipText = annotations[EpokAnnotation.egressIP] else { return [] }
        func fail(_ message: String) -> [EgressRule] {
            problems.append(Problem(object: "Service \(service.ref)", reason: .invalidEgress,
                                    message: "\(message); its pods keep their own source address", service: service.ref))
            return []
        }
        var egress: [IPAddress] = []
        for item in ipText.split(separator: ",", omittingEmptySubsequences: false) {
            guard let address = IPAddress(item), !egress.contains(where: { $0.isV4 == address.isV4 }) else {
                return fail("\(EpokAnnotation.egressIP): \"\(item)\" is not an IP address, or a second one of its family")
            }
            egress.append(address)
        }
        guard let destinationsText = annotations[EpokAnnotation.egressDestinations] else {
            return fail("\(EpokAnnotation.egressDestinations) is missing (the destinations to use \(EpokAnnotation.egressIP) for; 0.0.0.0/0 for all)")
        }
        let destinations: [CIDR]
        do {
            destinations = try AnnotationParser.cidrs(destinationsText, annotation: EpokAnnotation.egressDestinations)
        } catch {
            return fail("\(error)")
        }
        guard destinations.count <= ServiceLimits.sourceRanges else { return fail("more than \(ServiceLimits.sourceRanges) destinations") }
        return pods.sorted().compactMap { pod in
            guard let address = egress.first(where: { $0.isV4 == pod.isV4 }) else { return nil }
            let ranges = destinations.filter { $0.address.isV4 == pod.isV4 }
            return ranges.isEmpty ? nil : EgressRule(source: pod, destinations: ranges, egress: address, label: service.ref.description)
        }
    }
}
