import Dataplane

extension EpokAnnotation {
    /// The static source addresses of a Service's pods: `198.51.100.10[,2001:db8::10]`.
    public static let egressIP = "epok.getbetter.ro/egress-ip"
    /// The destinations (CIDRs, `0.0.0.0/0` allowed) to which the pods leave with `egress-ip`; required.
    public static let egressDestinations = "epok.getbetter.ro/egress-destinations"
}

/// What a Service's egress annotations, or one StaticEgressIP rule, ask for the pods of one Service: per family,
/// an egress address for some destinations.
struct EgressTemplate: Equatable {
    var service: ServiceRef
    var egress: [IPAddress]
    var destinations: [CIDR]
    /// The rule's place in its object.
    var index: Int
    var label: String

    /// The ask for one pod: nil when the template has no address or destination of its family.
    func ask(_ pod: IPAddress) -> EgressAsk? {
        guard let address = egress.first(where: { $0.isV4 == pod.isV4 }) else { return nil }
        let ranges = destinations.filter { $0.address.isV4 == pod.isV4 }
        return ranges.isEmpty ? nil : EgressAsk(rule: EgressRule(source: pod, destinations: ranges, egress: address, label: label), index: index)
    }
}

/// What the static-source computations need of a Service: its ports, and its endpoints from the EndpointSlices.
struct ServicePods {
    /// The Service's own ports (`spec.ports`).
    var ports: [Service.Port]
    /// Every endpoint address.
    var all: Set<IPAddress>
    /// The ready endpoints of each (port name, protocol), with the port they listen on.
    var ready: [ReadyKey: (port: Port, addresses: Set<IPAddress>)]

    struct ReadyKey: Hashable {
        var name: String
        var proto: L4Protocol
    }
}

extension DesiredState {
    /// Endpoints a bridge entrance spreads over, at most (its round-robin slots).
    static let bridgeEndpoints = Int(Bridge.slots)

    /// What a Service's egress annotations ask for its pods (none when it has none); an invalid or incomplete
    /// pair is a problem and asks nothing (the pods keep their own source address).
    /// `taken` says why an address is another's (`belongs to a StaticEgressIP of another namespace, which asked
    /// first`, `is a LoadBalancer IP`), if it is.
    static func egressTemplates(of service: Service, reserved: ReservedAddresses,
                                taken: (IPAddress) -> String? = { _ in nil }) -> (templates: [EgressTemplate], problems: [Problem]) {
        guard let ipText = service.metadata.annotation(EpokAnnotation.egressIP) else { return ([], []) }
        func fail(_ message: String) -> ([EgressTemplate], [Problem]) {
            ([], [Problem(object: "Service \(service.ref)", reason: .invalidEgress,
                          message: "\(message); its pods keep their own source address", service: service.ref)])
        }
        var egress: [IPAddress] = []
        for item in ipText.split(separator: ",", omittingEmptySubsequences: false) {
            guard let address = IPAddress(item), !egress.contains(where: { $0.isV4 == address.isV4 }) else {
                return fail("\(EpokAnnotation.egressIP): \"\(item)\" is not an IP address, or a second one of its family")
            }
            if let special = specialPurpose(address) { return fail("\(EpokAnnotation.egressIP): \(address) is \(special)") }
            if let why = reserved.why(address, source: true) { return fail("\(EpokAnnotation.egressIP): \(address) is \(why), which no Service may take") }
            if let holder = taken(address) {
                return ([], [Problem(object: "Service \(service.ref)", reason: .addressTaken,
                                     message: "\(EpokAnnotation.egressIP): \(address) \(holder); its pods keep their own source address",
                                     service: service.ref)])
            }
            egress.append(address)
        }
        guard let destinationsText = service.metadata.annotation(EpokAnnotation.egressDestinations) else {
            return fail("\(EpokAnnotation.egressDestinations) is missing (the destinations to use \(EpokAnnotation.egressIP) for; 0.0.0.0/0 for all)")
        }
        let destinations: [CIDR]
        do {
            destinations = try AnnotationParser.cidrs(destinationsText, annotation: EpokAnnotation.egressDestinations)
        } catch {
            return fail("\(error)")
        }
        guard destinations.count <= ServiceLimits.sourceRanges else { return fail("more than \(ServiceLimits.sourceRanges) destinations") }
        return ([EgressTemplate(service: service.ref, egress: egress, destinations: destinations, index: 0, label: service.ref.description)], [])
    }

    /// A StaticEgressIP's rules (kube-static-egress-ip): each rule's Service pods leave for its `cidr` with its
    /// `egressip`. An invalid rule, or one naming a Service that is not `known`, is a problem; the others apply.
    static func egressTemplates(of resource: StaticEgressIP, reserved: ReservedAddresses, taken: (IPAddress) -> String? = { _ in nil },
                                known: (ServiceRef) -> Bool) -> (templates: [EgressTemplate], problems: [Problem]) {
        var templates: [EgressTemplate] = [], problems: [Problem] = []
        let ref = resource.ref
        for (index, rule) in (resource.spec?.rules ?? []).prefix(ServiceLimits.sourceRanges).enumerated() {
            func fail(_ message: String, _ reason: Problem.Reason = .invalidEgress) {
                problems.append(Problem(object: ref.description, reason: reason, message: "spec.rules[\(index)]: \(message)", owner: ref))
            }
            guard let text = rule.egressip, let egress = IPAddress(text) else {
                fail("egressip \"\(rule.egressip ?? "")\" is not an IP address; the rule is skipped")
                continue
            }
            if let special = specialPurpose(egress) ?? reserved.why(egress, source: true) {
                fail("egressip \(egress) is \(special); the rule is skipped")
                continue
            }
            if let holder = taken(egress) {
                fail("egressip \(egress) \(holder); the rule is skipped", .addressTaken)
                continue
            }
            let destinations: [CIDR]
            do {
                destinations = try AnnotationParser.cidrs(rule.cidr ?? "", annotation: "cidr")
            } catch {
                fail("\(error); the rule is skipped")
                continue
            }
            guard let name = rule.serviceName, !name.isEmpty else {
                fail("service-name is missing; the rule is skipped")
                continue
            }
            let service = ServiceRef(namespace: ref.namespace, name: name)
            guard known(service) else {
                fail("Service \(service) does not exist (yet); the rule applies once it does", .unknownService)
                continue
            }
            templates.append(EgressTemplate(service: service, egress: [egress], destinations: destinations, index: index,
                                            label: "\(ref.kind.rawValue) \(ref.namespace)/\(ref.name)"))
        }
        return (templates, problems)
    }

    /// What `templates` ask for every pod of their Services.
    static func egressAsks(_ templates: [EgressTemplate], pods: (ServiceRef) -> Set<IPAddress>) -> [IPAddress: [EgressAsk]] {
        var result: [IPAddress: [EgressAsk]] = [:]
        for template in templates {
            for pod in pods(template.service) {
                if let ask = template.ask(pod) { result[pod, default: []].append(ask) }
            }
        }
        return result
    }

    /// An ExternalService's bridges (k8s-ext-connector): for each source, its Service's pods leave for
    /// `targetIP` on `ports` with `sourceIP`, and `targetIP` reaches the Service's ready endpoints through
    /// `sourceIP` on the Service's own ports. An invalid source or port is a problem and is skipped.
    /// A source in another namespace is bridged only when `granted` says a ReferenceGrant there allows it.
    /// No host or Node address (`reserved`) is a target or a source.
    static func bridgeRequest(of resource: ExternalService, reserved: ReservedAddresses, taken: (IPAddress) -> String? = { _ in nil },
                              pods: (ServiceRef) -> ServicePods?, granted: (ServiceRef) -> Bool) -> StaticSourceRequest {
        var request = StaticSourceRequest()
        let ref = resource.ref
        let label = "\(ref.kind.rawValue) \(ref.namespace)/\(ref.name)"
        func fail(_ message: String, _ reason: Problem.Reason = .invalidBridge) {
            request.problems.append(Problem(object: ref.description, reason: reason, message: message, owner: ref))
        }
        guard let text = resource.spec?.targetIP, let target = IPAddress(text), specialPurpose(target) == nil else {
            fail("spec.targetIP \"\(resource.spec?.targetIP ?? "")\" is not a usable IP address; nothing is bridged")
            return request
        }
        if let why = reserved.why(target) {
            fail("spec.targetIP \(target) is \(why), never a bridge's target; nothing is bridged")
            return request
        }
        var ports: [(L4Protocol, Port)] = []
        for (index, spec) in (resource.spec?.ports ?? []).prefix(ServiceLimits.bridgePorts).enumerated() {
            guard let proto = L4Protocol(spec.protocol ?? "TCP"), proto == .tcp || proto == .udp,
                  let port = spec.port.flatMap(Port.init) else {
                fail("spec.ports[\(index)]: \(spec.protocol ?? "TCP") port \(spec.port.map(String.init) ?? "(none)") is not a TCP or UDP port; skipped")
                continue
            }
            ports.append((proto, port))
        }
        for (index, source) in (resource.spec?.sources ?? []).prefix(ServiceLimits.bridgePorts).enumerated() {
            guard let name = source.service?.name, !name.isEmpty else {
                fail("spec.sources[\(index)]: service.name is missing; skipped")
                continue
            }
            guard let text = source.sourceIP, let address = IPAddress(text), address.isV4 == target.isV4, specialPurpose(address) == nil else {
                fail("spec.sources[\(index)]: sourceIP \"\(source.sourceIP ?? "")\" is not a usable IP address of targetIP's family; skipped")
                continue
            }
            if let why = reserved.why(address, source: true) {
                fail("spec.sources[\(index)]: sourceIP \(address) is \(why), never a bridge's source; skipped")
                continue
            }
            if let holder = taken(address) {
                fail("spec.sources[\(index)]: sourceIP \(address) \(holder); skipped", .addressTaken)
                continue
            }
            let service = ServiceRef(namespace: source.service?.namespace ?? ref.namespace, name: name)
            guard service.namespace == ref.namespace || granted(service) else {
                fail("spec.sources[\(index)]: Service \(service) is in another namespace, and no ReferenceGrant there lets ExternalServices of \(ref.namespace) name it; skipped", .referenceNotPermitted)
                continue
            }
            guard let found = pods(service) else {
                fail("spec.sources[\(index)]: Service \(service) does not exist (yet); bridged once it does", .unknownService)
                continue
            }
            // Guarded only once a bridge to a Service that exists stands on it: a source naming nothing cannot
            // black-hole an address (the host's own, a node's, another tenant's).
            request.guarded.insert(address)
            for pod in found.all.sorted() where pod.isV4 == target.isV4 {
                for (proto, port) in ports {
                    request.exits.append(BridgeExit(pod: pod, server: target, proto: proto, port: port, source: address, label: label))
                }
            }
            for servicePort in found.ports {
                guard let proto = L4Protocol(servicePort.protocol ?? "TCP"), proto == .tcp || proto == .udp,
                      let port = Port(servicePort.port),
                      let ready = found.ready[ServicePods.ReadyKey(name: servicePort.name ?? "", proto: proto)] else { continue }
                let endpoints = ready.addresses.filter { $0.isV4 == target.isV4 }.sorted()
                guard !endpoints.isEmpty else { continue }
                if endpoints.count > bridgeEndpoints {
                    fail("spec.sources[\(index)]: Service \(service) has \(endpoints.count) ready endpoints on \(port)/\(proto); the entrance spreads over the first \(bridgeEndpoints)", .tooManyEntries)
                }
                request.entrances.append(BridgeEntrance(client: target, address: address, proto: proto, port: port,
                                                        endpoints: Array(endpoints.prefix(bridgeEndpoints)), endpointPort: ready.port, label: label))
            }
        }
        return request
    }
}
