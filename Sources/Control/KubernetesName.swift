import Dataplane

/// Object names and namespaces as the API server validates them, for snapshot files (which no API server has
/// checked): a name it would refuse, or two spellings of one name (`café` in NFC and NFD), never reach the state.
public enum KubernetesName {
    /// What the API server requires of a name of this kind.
    public enum Rule: Sendable {
        /// RFC 1123 label: at most 63 lower-case letters, digits and `-`, alphanumeric at both ends (namespaces).
        case label
        /// RFC 1035 label: the same, starting with a letter (Service names).
        case serviceName
        /// RFC 1123 subdomain: labels joined by `.`, at most 253 bytes (Nodes, EndpointSlices, custom resources).
        case subdomain
    }

    /// Why `name` is refused under `rule`, or nil if the API server would take it.
    public static func problem(_ name: String, _ rule: Rule) -> String? {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty else { return "is empty" }
        let limit = rule == .subdomain ? 253 : 63
        guard bytes.count <= limit else { return "is \(bytes.count) bytes long (at most \(limit))" }
        func isAlphanumeric(_ b: UInt8) -> Bool { (0x61...0x7a).contains(b) || (0x30...0x39).contains(b) }
        let labels = rule == .subdomain ? bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) : [bytes[...]]
        for label in labels {
            guard let first = label.first, let last = label.last else { return "has an empty part between dots" }
            if let bad = label.first(where: { !isAlphanumeric($0) && $0 != UInt8(ascii: "-") }) {
                return bad >= 0x80 ? "is not ASCII (the API server takes lower-case letters, digits and '-' only)"
                    : "contains \"\(Escaped.text(String(Character(Unicode.Scalar(bad))), limit: 10))\" (the API server takes lower-case letters, digits and '-' only)"
            }
            guard isAlphanumeric(first), isAlphanumeric(last) else { return "must start and end with a letter or digit" }
            if rule == .serviceName, !(0x61...0x7a).contains(first) { return "must start with a letter (a Service name is an RFC 1035 label)" }
        }
        return nil
    }
}
