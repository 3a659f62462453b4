import Dataplane

/// The metadata epokd reads from any Kubernetes object.
public struct ObjectMeta: Codable, Hashable, Sendable {
    public var name: String
    public var namespace: String?
    public var uid: String? {
        get { packedUID?.text }
        set { packedUID = newValue.map(PackedText.init) }
    }
    public var resourceVersion: String?
    /// RFC 3339 in UTC (`2024-05-01T10:00:00Z`), as the API server writes it.
    public var creationTimestamp: String? {
        get { packedCreated?.text }
        set { packedCreated = newValue.map(PackedText.init) }
    }
    public var annotations: StringMap?
    public var labels: StringMap?
    /// Keys of epokd's annotations (`epok.getbetter.ro/...`) found where epokd does not read them, as paths
    /// (`metadata.epok.getbetter.ro/internal`, `metadata.labels.…`): an indentation slip, reported, never read.
    public var misplacedKeys: [String]?
    /// When the object last changed, in seconds since 1970, where it says (read from watch events only): the latest
    /// `managedFields` time of a Service, an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`.
    public var changedAt: Double?
    /// `uid` and `creationTimestamp`, without heap storage in the shape the API server writes them.
    var packedUID: PackedText?
    var packedCreated: PackedText?

    public init(name: String, namespace: String? = nil, uid: String? = nil, resourceVersion: String? = nil,
                creationTimestamp: String? = nil, annotations: StringMap? = nil, labels: StringMap? = nil) {
        self.name = name
        self.namespace = namespace
        self.resourceVersion = resourceVersion
        self.annotations = annotations
        self.labels = labels
        self.uid = uid
        self.creationTimestamp = creationTimestamp
    }

    /// The value of annotation `name`.
    public func annotation(_ name: String) -> String? { annotations?[name] }

    /// Seconds since 1970 of `creationTimestamp`; nil when there is none or it is not an RFC 3339 time.
    var createdSeconds: Int64? { packedCreated.flatMap { $0.packedSeconds ?? Timestamp.seconds($0.text) } }

    private enum CodingKeys: String, CodingKey {
        case name, namespace, uid, resourceVersion, creationTimestamp, annotations, labels
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(name: try c.decode(String.self, forKey: .name), namespace: try c.decodeIfPresent(String.self, forKey: .namespace),
                  uid: try c.decodeIfPresent(String.self, forKey: .uid),
                  resourceVersion: try c.decodeIfPresent(String.self, forKey: .resourceVersion),
                  creationTimestamp: try c.decodeIfPresent(String.self, forKey: .creationTimestamp),
                  annotations: try c.decodeIfPresent(StringMap.self, forKey: .annotations),
                  labels: try c.decodeIfPresent(StringMap.self, forKey: .labels))
        let misplaced = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue).filter { $0.hasPrefix(EpokAnnotation.prefix) }
            .map { "metadata." + $0 } + (labels?.keys.filter { $0.hasPrefix(EpokAnnotation.prefix) }.map { "metadata.labels." + $0 } ?? [])
        if !misplaced.isEmpty { misplacedKeys = misplaced.sorted() }
    }

    /// Any key of an object, to find the ones no field names.
    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encodeIfPresent(namespace, forKey: .namespace)
        try c.encodeIfPresent(uid, forKey: .uid)
        try c.encodeIfPresent(resourceVersion, forKey: .resourceVersion)
        try c.encodeIfPresent(creationTimestamp, forKey: .creationTimestamp)
        try c.encodeIfPresent(annotations, forKey: .annotations)
        try c.encodeIfPresent(labels, forKey: .labels)
    }
}

/// A `core/v1` Service, reduced to the fields epokd uses; unknown fields are ignored.
public struct Service: Codable, Hashable, Sendable {
    public struct Port: Codable, Hashable, Sendable {
        public var name: String?
        /// `TCP`, `UDP` or `SCTP`; the API defaults it to TCP.
        public var `protocol`: String?
        public var port: Int
        public var nodePort: Int?

        public init(name: String? = nil, protocol: String? = "TCP", port: Int, nodePort: Int? = nil) {
            self.name = name
            self.protocol = `protocol`
            self.port = port
            self.nodePort = nodePort
        }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var type: String?
        public var ports: [Port]?
        public var loadBalancerSourceRanges: [String]?
        /// `Cluster` (the default) or `Local`: only nodes with a ready endpoint of the Service receive traffic.
        public var externalTrafficPolicy: String?
        /// With `Local`: the node port where kube-proxy answers `/healthz` with 200 when the node has an endpoint.
        public var healthCheckNodePort: Int?

        public init(type: String? = "NodePort", ports: [Port]? = nil, loadBalancerSourceRanges: [String]? = nil,
                    externalTrafficPolicy: String? = nil) {
            self.type = type
            self.ports = ports
            self.loadBalancerSourceRanges = loadBalancerSourceRanges
            self.externalTrafficPolicy = externalTrafficPolicy
        }
    }

    public struct Status: Codable, Hashable, Sendable {
        public struct LoadBalancer: Codable, Hashable, Sendable {
            public struct Ingress: Codable, Hashable, Sendable {
                public var ip: String?
                public var hostname: String?
                public init(ip: String?, hostname: String? = nil) {
                    self.ip = ip
                    self.hostname = hostname
                }
            }
            public var ingress: [Ingress]?
            public init(ingress: [Ingress]?) { self.ingress = ingress }
        }
        public var loadBalancer: LoadBalancer?
        public init(loadBalancer: LoadBalancer?) { self.loadBalancer = loadBalancer }
    }

    public var metadata: ObjectMeta
    public var spec: Spec
    public var status: Status?

    public init(metadata: ObjectMeta, spec: Spec, status: Status? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    /// `namespace/name`.
    public var ref: ServiceRef { ServiceRef(namespace: metadata.namespace ?? "default", name: metadata.name) }
}

/// A `core/v1` Node, reduced to the fields epokd uses.
public struct Node: Codable, Hashable, Sendable {
    public struct Address: Codable, Hashable, Sendable {
        /// `InternalIP`, `ExternalIP`, `Hostname`...
        public var type: String
        public var address: String

        public init(type: String, address: String) {
            self.type = type
            self.address = address
        }
    }

    public struct Condition: Codable, Hashable, Sendable {
        public var type: String
        /// `True`, `False` or `Unknown`.
        public var status: String

        public init(type: String, status: String) {
            self.type = type
            self.status = status
        }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var unschedulable: Bool?
        public init(unschedulable: Bool? = nil) { self.unschedulable = unschedulable }
    }

    public struct Status: Codable, Hashable, Sendable {
        public var addresses: [Address]?
        public var conditions: [Condition]?

        public init(addresses: [Address]? = nil, conditions: [Condition]? = nil) {
            self.addresses = addresses
            self.conditions = conditions
        }
    }

    public var metadata: ObjectMeta
    public var spec: Spec?
    public var status: Status?

    public init(metadata: ObjectMeta, spec: Spec? = nil, status: Status? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    /// Whether the `Ready` condition is `True`.
    public var isReady: Bool {
        status?.conditions?.contains { $0.type == "Ready" && $0.status == "True" } ?? false
    }
}

/// A `discovery.k8s.io/v1` EndpointSlice, reduced to what epokd uses: which nodes run the Service's endpoints.
public struct EndpointSlice: Codable, Hashable, Sendable {
    public struct Conditions: Codable, Hashable, Sendable {
        public var ready: Bool?
        public var serving: Bool?
        public var terminating: Bool?

        public init(ready: Bool? = nil, serving: Bool? = nil, terminating: Bool? = nil) {
            self.ready = ready
            self.serving = serving
            self.terminating = terminating
        }
    }

    public struct Endpoint: Codable, Hashable, Sendable {
        public var addresses: [String]
        public var conditions: Conditions?
        public var nodeName: String?

        public init(addresses: [String], conditions: Conditions? = nil, nodeName: String? = nil) {
            self.addresses = addresses
            self.conditions = conditions
            self.nodeName = nodeName
        }

        /// Ready as the API defines it: a missing `ready` counts as ready (unknown state is to be treated so).
        public var isReady: Bool { conditions?.ready ?? true }
    }

    /// A port of the slice's endpoints: the Service port of the same `name` reaches them on `port`.
    public struct EndpointPort: Codable, Hashable, Sendable {
        public var name: String?
        public var port: Int?
        public var `protocol`: String?

        public init(name: String? = nil, port: Int?, protocol: String? = "TCP") {
            self.name = name
            self.port = port
            self.protocol = `protocol`
        }
    }

    /// The label that names the Service a slice belongs to.
    public static let serviceNameLabel = "kubernetes.io/service-name"
    /// When the change behind this version of the slice happened (the EndpointSlice controller writes it, RFC 3339).
    public static let changeTriggerAnnotation = "endpoints.kubernetes.io/last-change-trigger-time"

    public var metadata: ObjectMeta
    public var addressType: String?
    public var endpoints: [Endpoint]?
    public var ports: [EndpointPort]?

    public init(metadata: ObjectMeta, addressType: String? = "IPv4", endpoints: [Endpoint]? = nil, ports: [EndpointPort]? = nil) {
        self.metadata = metadata
        self.addressType = addressType
        self.endpoints = endpoints
        self.ports = ports
    }

    /// The Service this slice belongs to, from its label.
    public var service: ServiceRef? {
        metadata.labels?[Self.serviceNameLabel].map { ServiceRef(namespace: metadata.namespace ?? "default", name: $0) }
    }

    /// `namespace/name` of the slice itself.
    public var key: String { "\(metadata.namespace ?? "default")/\(metadata.name)" }
}

/// Identifies a Service in messages and events.
public struct ServiceRef: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var namespace: String
    public var name: String

    public init(namespace: String, name: String) {
        self.namespace = namespace
        self.name = name
    }

    /// `namespace/name`, escaped (`Escaped.text`): safe in a log line, an Event, a kernel comment.
    public var description: String { Escaped.text("\(namespace)/\(name)", limit: 600) }
    public static func < (a: ServiceRef, b: ServiceRef) -> Bool { (a.namespace, a.name) < (b.namespace, b.name) }
}

/// The cluster state one desired-state computation starts from.
public struct ClusterSnapshot: Hashable, Sendable {
    public var services: [Service]
    public var nodes: [Node]
    /// Every EndpointSlice, when known; nil until they are (then Services with `externalTrafficPolicy: Local`
    /// are forwarded to every eligible node, as before epokd read them).
    public var endpointSlices: [EndpointSlice]?
    public var staticEgressIPs: [StaticEgressIP]
    public var externalServices: [ExternalService]
    /// Ingresses, for the router's DNS names (`--dns-hosts`).
    public var ingresses: [Ingress]
    /// ReferenceGrants: which ExternalServices may name a Service of another namespace; nil when not known.
    public var referenceGrants: [ReferenceGrant]?

    public init(services: [Service] = [], nodes: [Node] = [], endpointSlices: [EndpointSlice]? = nil,
                staticEgressIPs: [StaticEgressIP] = [], externalServices: [ExternalService] = [], ingresses: [Ingress] = [],
                referenceGrants: [ReferenceGrant]? = nil) {
        self.services = services
        self.nodes = nodes
        self.endpointSlices = endpointSlices
        self.staticEgressIPs = staticEgressIPs
        self.externalServices = externalServices
        self.ingresses = ingresses
        self.referenceGrants = referenceGrants
    }
}
