import Dataplane

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
        case invalidRateLimit = "InvalidRateLimit"
        case invalidLoadBalancerIP = "InvalidLoadBalancerIP"
        case invalidHealthCheck = "InvalidHealthCheck"
        case invalidEgress = "InvalidEgress"
        case invalidBridge = "InvalidExternalService"
        case unknownService = "UnknownService"
        case invalidHostname = "InvalidHostname"
        case hostnameConflict = "HostnameConflict"
        case referenceNotPermitted = "RefNotPermitted"
        case misplacedAnnotation = "MisplacedAnnotation"
        case ambiguousAnnotation = "AmbiguousAnnotation"
        case addressTaken = "AddressTaken"
    }

    /// Whether the problem only advises: what was asked is applied as written (`--once` still exits 0).
    public var isAdvisory: Bool { reason == .ambiguousAnnotation }

    /// `Service namespace/name` or `Node name`.
    public var object: String
    public var reason: Reason
    public var message: String
    /// The Service concerned, when it is one.
    public var service: ServiceRef?
    /// The object the problem is reported on (its Event's object): the Service, or a StaticEgressIP or an
    /// ExternalService.
    public var owner: ObjectRef?

    /// `object` and `message` may quote user text: they are kept escaped (no line breaks or control
    /// characters, so a log line cannot be forged) and cut to a readable length.
    public init(object: String, reason: Reason, message: String, service: ServiceRef? = nil, owner: ObjectRef? = nil) {
        self.object = Escaped.text(object, limit: 300)
        self.reason = reason
        self.message = Escaped.text(message, limit: 1000)
        self.service = service
        self.owner = owner ?? service.map(ObjectRef.init)
    }

    public var description: String { "\(object): \(message)" }
}
