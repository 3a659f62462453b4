/// A `networking.k8s.io/v1` Ingress, reduced to what epokd's DNS names use: the hosts of its rules and the
/// addresses its controller published in `status.loadBalancer.ingress`.
public struct Ingress: Codable, Hashable, Sendable {
    public struct Rule: Codable, Hashable, Sendable {
        public var host: String?
        public init(host: String?) { self.host = host }
    }

    public struct Spec: Codable, Hashable, Sendable {
        public var rules: [Rule]?
        public init(rules: [Rule]?) { self.rules = rules }
    }

    public static let apiVersion = "networking.k8s.io/v1"

    public var metadata: ObjectMeta
    public var spec: Spec?
    /// The same shape as a Service's: `loadBalancer.ingress[].ip`.
    public var status: Service.Status?

    public init(metadata: ObjectMeta, spec: Spec?, status: Service.Status? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    public var ref: ObjectRef { ObjectRef(.ingress, metadata) }
}
