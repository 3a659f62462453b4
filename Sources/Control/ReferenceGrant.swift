/// Gateway API's `gateway.networking.k8s.io/v1beta1` ReferenceGrant: the namespace it lives in lets objects of the
/// kinds and namespaces in `from` name its objects of the kinds (and names) in `to`. epokd reads it for one
/// reference: an ExternalService's `sources[].service` in another namespace.
public struct ReferenceGrant: Codable, Hashable, Sendable {
    public struct From: Codable, Hashable, Sendable {
        public var group: String
        public var kind: String
        public var namespace: String
        public init(group: String, kind: String, namespace: String) {
            self.group = group
            self.kind = kind
            self.namespace = namespace
        }
    }

    public struct To: Codable, Hashable, Sendable {
        public var group: String
        public var kind: String
        /// One object of the kind, or all of them when absent.
        public var name: String?
        public init(group: String, kind: String, name: String? = nil) {
            self.group = group
            self.kind = kind
            self.name = name
        }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var from: [From]
        public var to: [To]
        public init(from: [From], to: [To]) {
            self.from = from
            self.to = to
        }
    }

    public static let apiVersion = "gateway.networking.k8s.io/v1beta1"

    public var metadata: ObjectMeta
    public var spec: Spec?

    public init(metadata: ObjectMeta, spec: Spec?) {
        self.metadata = metadata
        self.spec = spec
    }

    /// `namespace/name`.
    public var key: String { "\(metadata.namespace ?? "default")/\(metadata.name)" }

    /// Whether this grant lets an ExternalService in `namespace` name `service` (which must be in the grant's own
    /// namespace).
    public func lets(externalServicesOf namespace: String, name service: ServiceRef) -> Bool {
        guard (metadata.namespace ?? "default") == service.namespace, let spec else { return false }
        return spec.from.contains { $0.group == "submariner.io" && $0.kind == "ExternalService" && $0.namespace == namespace }
            && spec.to.contains { $0.group == "" && $0.kind == "Service" && ($0.name == nil || $0.name == service.name) }
    }
}
