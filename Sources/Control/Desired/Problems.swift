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
    }

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

/// User-supplied text made safe for logs and Events.
public enum Escaped {
    /// `text` with control characters written as `\n`, `\t`, `\u{..}`, cut to `limit` characters (with `…`).
    public static func text(_ text: String, limit: Int) -> String {
        // Most text (every name the API server accepts) is printable ASCII within the limit: kept as it is.
        if text.utf8.count <= limit, text.utf8.allSatisfy({ (0x20..<0x7f).contains($0) }) { return text }
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
