// The objects epokd keeps, read straight from JSON bytes (see `JSONReader`): only the fields the desired state
// uses are built, and of the annotations and labels only epokd's. A wrong type, a missing required field or
// malformed JSON is an error at its byte offset, as Foundation's decoder would refuse the same document.

extension ObjectMeta {
    /// Whether epokd reads an annotation with this key (`epok.getbetter.ro/...`, arbf-nft-operator's `ratelimit`,
    /// external-dns's hostname, MetalLB's sharing key).
    public static func keeps(annotation key: String) -> Bool {
        key.hasPrefix(EpokAnnotation.prefix) || key == EpokAnnotation.bareRateLimit || key == ExternalDNS.hostnameAnnotation
            || key == EpokAnnotation.allowSharedIP
    }

    /// `keeps(annotation:)` of a key as it stands in JSON (no String is made for a key epokd does not keep).
    static func keeps(annotation key: JSONKey) -> Bool {
        key.hasPrefix(EpokAnnotation.prefix) || key.equals(EpokAnnotation.bareRateLimit) || key.equals(ExternalDNS.hostnameAnnotation)
            || key.equals(EpokAnnotation.allowSharedIP)
    }

    /// Whether epokd reads a label with this key.
    public static func keeps(label key: String) -> Bool {
        key == EpokAnnotation.excludeLabel || key == EndpointSlice.serviceNameLabel
    }

    /// `keeps(label:)` of a key as it stands in JSON.
    static func keeps(label key: JSONKey) -> Bool {
        key.equals(EpokAnnotation.excludeLabel) || key.equals(EndpointSlice.serviceNameLabel)
    }

    /// The metadata with only the annotations and labels epokd reads.
    public var projected: ObjectMeta {
        var result = self
        result.annotations = annotations?.filter { Self.keeps(annotation: $0.key) }
        result.labels = labels?.filter { Self.keeps(label: $0.key) }
        return result
    }

    /// A `metav1.Time` (to the second) in seconds since 1970, read packed, without building a string in its usual
    /// shape; nil for null or what is not a time.
    private static func readTime(_ reader: inout JSONReader) throws(JSONReadError) -> Double? {
        guard let text = try reader.readOptionalPackedText() else { return nil }
        if let seconds = text.packedSeconds { return Double(seconds) }
        return Timestamp.unixTime(text.text)
    }

    init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var name: String?, namespace: String?, uid: PackedText?, resourceVersion: String?, created: PackedText?
        var annotations: StringMap?, labels: StringMap?, misplaced: [String] = []
        var changed: Double?
        func strings(_ reader: inout JSONReader, keep: (JSONKey) -> Bool, misplacedAs path: String? = nil) throws(JSONReadError) -> StringMap? {
            if try reader.readNull() { return nil }
            var result = StringMap()
            try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                // A value epokd does not keep (a last-applied-configuration, say) is checked, never built.
                if keep(key) {
                    let name = r.intern(key)
                    result[name] = try r.readString()
                } else if key.equals(EndpointSlice.changeTriggerAnnotation) {
                    changed = Timestamp.unixTime(try r.readString())
                } else {
                    if let path, key.hasPrefix(EpokAnnotation.prefix) { misplaced.append(path + r.intern(key)) }
                    try r.skipString()
                }
            }
            return result
        }
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("name") { name = try r.readOptionalString() }
            else if key.is("namespace") { namespace = try r.readOptionalString() }
            else if key.is("uid") { uid = try r.readOptionalPackedText() }
            else if key.is("resourceVersion") { resourceVersion = try r.readOptionalString() }
            else if key.is("creationTimestamp") { created = try r.readOptionalPackedText() }
            else if key.is("annotations") { annotations = try strings(&r, keep: Self.keeps(annotation:)) }
            else if key.is("labels") { labels = try strings(&r, keep: Self.keeps(label:), misplacedAs: "metadata.labels.") }
            else if key.is("managedFields") {
                // Each manager's last write: the latest is when the object last changed.
                try r.readArray { (entry: inout JSONReader) throws(JSONReadError) in
                    try entry.readObject { (e: inout JSONReader, field: JSONKey) throws(JSONReadError) in
                        guard field.is("time") else { return try e.skipValue() }
                        if let time = try Self.readTime(&e) { changed = max(changed ?? time, time) }
                    }
                }
            }
            else {
                if key.hasPrefix(EpokAnnotation.prefix) { misplaced.append("metadata." + r.intern(key)) }
                try r.skipValue()
            }
        }
        guard let name else { throw JSONReadError(offset: start, reason: "metadata has no name") }
        self.init(name: name, namespace: namespace, resourceVersion: resourceVersion, annotations: annotations, labels: labels)
        if !misplaced.isEmpty { misplacedKeys = misplaced }
        changedAt = changed
        packedUID = uid
        packedCreated = created
    }
}

/// Reads an object whose fields `field` handles (skipping the others); a missing object is an error naming it.
private func required<T>(_ value: T?, _ what: String, at offset: Int) throws(JSONReadError) -> T {
    guard let value else { throw JSONReadError(offset: offset, reason: "\(what) is missing") }
    return value
}

extension Service {
    public init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var metadata: ObjectMeta?, spec: Spec?, status: Status?
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("metadata") { metadata = try ObjectMeta(json: &r) }
            else if key.is("spec") { spec = try Spec(json: &r) }
            else if key.is("status") { status = try r.readNull() ? nil : Status(json: &r) }
            else if key.is("kind") { r.kindRead = try r.readOptionalString() }
            else { try r.skipValue() }
        }
        self.init(metadata: try required(metadata, "metadata", at: start), spec: try required(spec, "spec", at: start), status: status)
    }
}

extension Service.Spec {
    init(json reader: inout JSONReader) throws(JSONReadError) {
        self.init(type: nil)
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("type") { type = try r.readOptionalString() }
            else if key.is("ports") { ports = try r.readList { (p: inout JSONReader) throws(JSONReadError) in try Service.Port(json: &p) } }
            else if key.is("loadBalancerSourceRanges") { loadBalancerSourceRanges = try r.readStrings() }
            else if key.is("externalTrafficPolicy") { externalTrafficPolicy = try r.readOptionalString() }
            else if key.is("healthCheckNodePort") { healthCheckNodePort = try r.readOptionalInt() }
            else { try r.skipValue() }
        }
    }
}

extension Service.Port {
    init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var name: String?, proto: String?, port: Int?, nodePort: Int?
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("name") { name = try r.readOptionalString() }
            else if key.is("protocol") { proto = try r.readOptionalString() }
            else if key.is("port") { port = try r.readInt() }
            else if key.is("nodePort") { nodePort = try r.readOptionalInt() }
            else { try r.skipValue() }
        }
        self.init(name: name, protocol: proto, port: try required(port, "a port's port", at: start), nodePort: nodePort)
    }
}

extension Service.Status {
    init(json reader: inout JSONReader) throws(JSONReadError) {
        var ingress: [LoadBalancer.Ingress]?
        var hasLoadBalancer = false
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            guard key.is("loadBalancer"), !(try r.readNull()) else { return try r.skipValue() }
            hasLoadBalancer = true
            try r.readObject { (lb: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                guard key.is("ingress") else { return try lb.skipValue() }
                ingress = try lb.readList { (i: inout JSONReader) throws(JSONReadError) in
                    var ip: String?, hostname: String?
                    try i.readObject { (e: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                        if key.is("ip") { ip = try e.readOptionalString() }
                        else if key.is("hostname") { hostname = try e.readOptionalString() }
                        else { try e.skipValue() }
                    }
                    return LoadBalancer.Ingress(ip: ip, hostname: hostname)
                }
            }
        }
        self.init(loadBalancer: hasLoadBalancer ? LoadBalancer(ingress: ingress) : nil)
    }
}

extension Node {
    public init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var metadata: ObjectMeta?, spec: Spec?, status: Status?
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("metadata") { metadata = try ObjectMeta(json: &r) }
            else if key.is("spec") {
                guard !(try r.readNull()) else { return }
                var unschedulable: Bool?
                try r.readObject { (s: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                    if key.is("unschedulable") { unschedulable = try s.readOptionalBool() } else { try s.skipValue() }
                }
                spec = Spec(unschedulable: unschedulable)
            } else if key.is("status") {
                guard !(try r.readNull()) else { return }
                var addresses: [Address]?, conditions: [Condition]?
                try r.readObject { (s: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                    if key.is("addresses") {
                        addresses = try s.readList { (a: inout JSONReader) throws(JSONReadError) in
                            let (type, address) = try a.readPair("type", "address")
                            return Address(type: type, address: address)
                        }
                    } else if key.is("conditions") {
                        conditions = try s.readList { (c: inout JSONReader) throws(JSONReadError) in
                            let (type, status) = try c.readPair("type", "status")
                            return Condition(type: type, status: status)
                        }
                    } else {
                        try s.skipValue()
                    }
                }
                status = Status(addresses: addresses, conditions: conditions)
            } else if key.is("kind") {
                r.kindRead = try r.readOptionalString()
            } else {
                try r.skipValue()
            }
        }
        self.init(metadata: try required(metadata, "metadata", at: start), spec: spec, status: status)
    }
}

extension EndpointSlice {
    public init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var metadata: ObjectMeta?, addressType: String?, endpoints: [Endpoint]?, ports: [EndpointPort]?
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("metadata") { metadata = try ObjectMeta(json: &r) }
            else if key.is("addressType") { addressType = try r.readOptionalString() }
            else if key.is("endpoints") { endpoints = try r.readList { (e: inout JSONReader) throws(JSONReadError) in try Endpoint(json: &e) } }
            else if key.is("ports") {
                ports = try r.readList { (p: inout JSONReader) throws(JSONReadError) in
                    var name: String?, port: Int?, proto: String?
                    try p.readObject { (f: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                        if key.is("name") { name = try f.readOptionalString() }
                        else if key.is("port") { port = try f.readOptionalInt() }
                        else if key.is("protocol") { proto = try f.readOptionalString() }
                        else { try f.skipValue() }
                    }
                    return EndpointPort(name: name, port: port, protocol: proto)
                }
            } else if key.is("kind") {
                r.kindRead = try r.readOptionalString()
            } else {
                try r.skipValue()
            }
        }
        self.init(metadata: try required(metadata, "metadata", at: start), addressType: addressType, endpoints: endpoints, ports: ports)
    }
}

extension EndpointSlice.Endpoint {
    init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        var addresses: [String]?, conditions: EndpointSlice.Conditions?, nodeName: String?
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("addresses") { addresses = try r.readStrings() }
            else if key.is("nodeName") { nodeName = try r.readOptionalString() }
            else if key.is("conditions") {
                guard !(try r.readNull()) else { return }
                var ready: Bool?, serving: Bool?, terminating: Bool?
                try r.readObject { (c: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                    if key.is("ready") { ready = try c.readOptionalBool() }
                    else if key.is("serving") { serving = try c.readOptionalBool() }
                    else if key.is("terminating") { terminating = try c.readOptionalBool() }
                    else { try c.skipValue() }
                }
                conditions = EndpointSlice.Conditions(ready: ready, serving: serving, terminating: terminating)
            } else {
                try r.skipValue()
            }
        }
        self.init(addresses: try required(addresses, "an endpoint's addresses", at: start), conditions: conditions, nodeName: nodeName)
    }
}

extension JSONReader {
    /// An object's two required string fields `a` and `b` (a Node address's type and address, a condition's type
    /// and status); other fields are skipped.
    mutating func readPair(_ a: StaticString, _ b: StaticString) throws(JSONReadError) -> (String, String) {
        let start = offset
        var first: String?, second: String?
        try readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is(a) { first = try r.readString() }
            else if key.is(b) { second = try r.readString() }
            else { try r.skipValue() }
        }
        return (try required(first, "\(a)", at: start), try required(second, "\(b)", at: start))
    }
}
