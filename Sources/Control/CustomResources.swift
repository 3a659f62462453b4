import Dataplane

/// kube-static-egress-ip's `staticegressips.nirmata.io/v1alpha1` StaticEgressIP, as its README defines it: the
/// pods of `service-name` (in the resource's namespace) leave for `cidr` with `egressip` as their source.
public struct StaticEgressIP: Codable, Hashable, Sendable {
    public struct Rule: Codable, Hashable, Sendable {
        public var egressip: String?
        public var serviceName: String?
        public var cidr: String?

        enum CodingKeys: String, CodingKey {
            case egressip, cidr
            case serviceName = "service-name"
        }

        public init(egressip: String?, serviceName: String?, cidr: String?) {
            self.egressip = egressip
            self.serviceName = serviceName
            self.cidr = cidr
        }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var rules: [Rule]?
        public init(rules: [Rule]?) { self.rules = rules }
    }

    public static let apiVersion = "staticegressips.nirmata.io/v1alpha1"

    public var metadata: ObjectMeta
    public var spec: Spec?

    public init(metadata: ObjectMeta, spec: Spec?) {
        self.metadata = metadata
        self.spec = spec
    }

    public var ref: ObjectRef { ObjectRef(.staticEgressIP, metadata) }
}

/// k8s-ext-connector's `submariner.io/v1alpha1` ExternalService, as its README defines it: the pods of each
/// source Service reach `targetIP` on `ports` with the source's `sourceIP`, and `targetIP` reaches the Service
/// through `sourceIP` on the Service's own ports.
public struct ExternalService: Codable, Hashable, Sendable {
    public struct Source: Codable, Hashable, Sendable {
        public struct ServiceName: Codable, Hashable, Sendable {
            public var namespace: String?
            public var name: String?
            public init(namespace: String?, name: String?) {
                self.namespace = namespace
                self.name = name
            }
        }
        public var service: ServiceName?
        public var sourceIP: String?

        public init(service: ServiceName?, sourceIP: String?) {
            self.service = service
            self.sourceIP = sourceIP
        }
    }

    public struct PortSpec: Codable, Hashable, Sendable {
        /// `TCP` (the default) or `UDP`.
        public var `protocol`: String?
        /// The external server's port.
        public var port: Int?
        /// The port of the in-cluster Service the seed's connector creates; epokd's pods reach `targetIP`
        /// directly, so it is not used.
        public var targetPort: Int?

        public init(protocol: String? = "TCP", port: Int?, targetPort: Int? = nil) {
            self.protocol = `protocol`
            self.port = port
            self.targetPort = targetPort
        }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var targetIP: String?
        public var sources: [Source]?
        public var ports: [PortSpec]?

        public init(targetIP: String?, sources: [Source]?, ports: [PortSpec]?) {
            self.targetIP = targetIP
            self.sources = sources
            self.ports = ports
        }
    }

    public static let apiVersion = "submariner.io/v1alpha1"

    public var metadata: ObjectMeta
    public var spec: Spec?

    public init(metadata: ObjectMeta, spec: Spec?) {
        self.metadata = metadata
        self.spec = spec
    }

    public var ref: ObjectRef { ObjectRef(.externalService, metadata) }
}

/// An object that asks for something only one may hold (a pod's source address, an entrance): by kind,
/// namespace and name.
public struct ObjectRef: Hashable, Comparable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, Comparable {
        case service = "Service"
        case staticEgressIP = "StaticEgressIP"
        case externalService = "ExternalService"
        case ingress = "Ingress"

        public static func < (a: Kind, b: Kind) -> Bool { a.rawValue < b.rawValue }

        /// The `apiVersion` of objects of this kind.
        public var apiVersion: String {
            switch self {
            case .service: "v1"
            case .staticEgressIP: StaticEgressIP.apiVersion
            case .externalService: ExternalService.apiVersion
            case .ingress: Ingress.apiVersion
            }
        }
    }

    public var kind: Kind
    public var namespace: String
    public var name: String

    public init(_ kind: Kind, namespace: String, name: String) {
        self.kind = kind
        self.namespace = namespace
        self.name = name
    }

    init(_ kind: Kind, _ metadata: ObjectMeta) {
        self.init(kind, namespace: metadata.namespace ?? "default", name: metadata.name)
    }

    public init(_ service: ServiceRef) { self.init(.service, namespace: service.namespace, name: service.name) }

    /// The Service, when this is one.
    public var service: ServiceRef? { kind == .service ? ServiceRef(namespace: namespace, name: name) : nil }

    /// The kind with its article (`a Service`, `an ExternalService`): how another namespace's object is named.
    public var article: String { ("AEIOU".contains(kind.rawValue.first!) ? "an " : "a ") + kind.rawValue }

    /// `Kind namespace/name`, escaped (`Escaped.text`).
    public var description: String { Escaped.text("\(kind.rawValue) \(namespace)/\(name)", limit: 600) }

    public static func < (a: ObjectRef, b: ObjectRef) -> Bool { (a.kind, a.namespace, a.name) < (b.kind, b.namespace, b.name) }
}
