import Dataplane
import Foundation
import Yams

/// Reads a cluster snapshot from the output of `kubectl get services,nodes -A -o yaml` (or `-o json`), strictly:
/// a file that is not a complete `List` (or a single Service or Node) is an error, never an empty cluster.
public enum SnapshotFile {
    /// Why a snapshot file could not be read.
    public struct ReadError: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        /// The file is not there (yet): a daemon may wait for it.
        public var isMissing = false
        public var description: String { "\(path): \(reason)" }

        public init(path: String, reason: String, isMissing: Bool = false) {
            self.path = path
            self.reason = reason
            self.isMissing = isMissing
        }
    }

    private struct Kind: Decodable { var kind: String? }

    private enum Item: Decodable {
        case service(Service)
        case node(Node)
        case endpointSlice(EndpointSlice)
        case staticEgressIP(StaticEgressIP)
        case externalService(ExternalService)
        case ingress(Ingress)
        case referenceGrant(ReferenceGrant)
        case other(String)

        init(from decoder: Decoder) throws {
            switch try Kind(from: decoder).kind {
            case "Service": self = .service(try Service(from: decoder))
            case "Node": self = .node(try Node(from: decoder))
            case "EndpointSlice": self = .endpointSlice(try EndpointSlice(from: decoder))
            case "StaticEgressIP": self = .staticEgressIP(try StaticEgressIP(from: decoder))
            case "ExternalService": self = .externalService(try ExternalService(from: decoder))
            case "Ingress": self = .ingress(try Ingress(from: decoder))
            case "ReferenceGrant": self = .referenceGrant(try ReferenceGrant(from: decoder))
            case let kind?: self = .other(kind)
            case nil:
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "an item has no kind"))
            }
        }
    }

    private struct Document: Decodable {
        var kind: String?
        var items: [Item]?
    }

    /// Why a document is not a snapshot.
    public struct FormatError: Error, CustomStringConvertible {
        public var description: String
    }

    /// `decode(_:)` of a file's bytes: JSON is read from the bytes as they are, YAML as text.
    public static func decode(_ bytes: [UInt8]) throws -> ClusterSnapshot {
        guard let first = bytes.first(where: { !ASCIISpace.contains($0) }), first == UInt8(ascii: "{") else {
            return try decode(String(decoding: bytes, as: UTF8.self))
        }
        return try decode(json: bytes)
    }

    /// Decodes a `List` (with `items`), or a single Service or Node, in YAML or JSON. Items of other kinds in a
    /// List are skipped (`kubectl get all` lists Pods too); anything else is an error. EndpointSlices in the
    /// List (`kubectl get services,nodes,endpointslices -A -o yaml`) say where each Service's endpoints run.
    public static func decode(_ text: String) throws -> ClusterSnapshot {
        guard text.utf8.contains(where: { !ASCIISpace.contains($0) }) else { throw FormatError(description: "is empty") }
        let json = text.utf8.first(where: { !ASCIISpace.contains($0) }) == UInt8(ascii: "{")
        if json { return try Self.decode(json: Array(text.utf8)) }
        // Yams builds a tree recursively: hostile nesting is refused before it sees the text (and keys given twice).
        let documents: [Range<Int>]?
        do throws(YAMLPrecheck.Refused) {
            documents = try YAMLPrecheck.check(text)
        } catch {
            throw FormatError(description: "\(error)")
        }
        // Several documents (`---`, as kubectl get -o yaml of several files, Helm and hand-written files have them):
        // each is read as a whole file is, every one must be complete, and their objects are joined.
        guard let documents, documents.count > 1 else { return try finished(decodeDocument(text)) }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        var snapshot = ClusterSnapshot()
        for (index, range) in documents.enumerated() {
            let part: ClusterSnapshot
            do {
                part = try decodeDocument(lines[range].joined(separator: "\n"))
            } catch {
                throw FormatError(description: "document \(index + 1) of \(documents.count) (from line \(range.lowerBound + 1)) \(error)")
            }
            snapshot.services += part.services
            snapshot.nodes += part.nodes
            if let slices = part.endpointSlices { snapshot.endpointSlices = (snapshot.endpointSlices ?? []) + slices }
            snapshot.staticEgressIPs += part.staticEgressIPs
            snapshot.externalServices += part.externalServices
            snapshot.ingresses += part.ingresses
            if let grants = part.referenceGrants { snapshot.referenceGrants = (snapshot.referenceGrants ?? []) + grants }
        }
        return try finished(snapshot)
    }

    /// A snapshot read whole: no ReferenceGrant in a file means none, and every name is one the API server takes.
    private static func finished(_ snapshot: ClusterSnapshot) throws(FormatError) -> ClusterSnapshot {
        var snapshot = snapshot
        if snapshot.referenceGrants == nil { snapshot.referenceGrants = [] }
        try checkNames(snapshot)
        return snapshot
    }

    /// One YAML document: a List, or a single object of a kind epokd reads.
    private static func decodeDocument(_ text: String) throws -> ClusterSnapshot {
        func decode<T: Decodable>(_ type: T.Type) throws -> T { try YAMLDecoder().decode(type, from: text) }
        let document: Document
        do {
            document = try decode(Document.self)
        } catch let error as DecodingError {
            throw FormatError(description: Self.describe(error))
        } catch {
            throw FormatError(description: "is not valid YAML (\(error))")
        }
        let items: [Item]
        switch document.kind {
        case nil:
            throw FormatError(description: "has no kind: expected a List (kubectl get services,nodes -A -o yaml), a Service or a Node; a file cut off while it was written has no kind either (kubectl writes it after the items)")
        case let kind? where kind.hasSuffix("List"):
            guard let listed = document.items else { throw FormatError(description: "is a \(kind) without items") }
            items = listed
        case "Service", "Node", "EndpointSlice", "StaticEgressIP", "ExternalService", "Ingress", "ReferenceGrant":
            items = [try decode(Item.self)]
        case let kind?:
            throw FormatError(description: "is a \(kind), not a List or an object of a kind epokd reads (Service, Node, EndpointSlice, StaticEgressIP, ExternalService, Ingress, ReferenceGrant)")
        }
        var snapshot = ClusterSnapshot()
        for item in items {
            switch item {
            case .service(let s): snapshot.services.append(s)
            case .node(let n): snapshot.nodes.append(n)
            case .endpointSlice(let e):
                if snapshot.endpointSlices == nil { snapshot.endpointSlices = [] }
                snapshot.endpointSlices?.append(e)
            case .staticEgressIP(let r): snapshot.staticEgressIPs.append(r)
            case .externalService(let r): snapshot.externalServices.append(r)
            case .ingress(let r): snapshot.ingresses.append(r)
            case .referenceGrant(let r): snapshot.referenceGrants = (snapshot.referenceGrants ?? []) + [r]
            case .other: break
            }
        }
        return snapshot
    }

    /// Refuses a snapshot with a name or namespace the API server would refuse, naming the first.
    static func checkNames(_ snapshot: ClusterSnapshot) throws(FormatError) {
        func check(_ kind: String, _ metadata: ObjectMeta, _ rule: KubernetesName.Rule, namespaced: Bool = true) throws(FormatError) {
            let shown = "\(kind) \"\(Escaped.text(metadata.name, limit: 300))\""
            if let problem = KubernetesName.problem(metadata.name, rule) {
                throw FormatError(description: "has a \(shown) whose name \(problem): the API server refuses it")
            }
            if namespaced, let namespace = metadata.namespace, let problem = KubernetesName.problem(namespace, .label) {
                throw FormatError(description: "has a \(shown) in namespace \"\(Escaped.text(namespace, limit: 300))\", which \(problem): the API server refuses it")
            }
        }
        for o in snapshot.services { try check("Service", o.metadata, .serviceName) }
        for o in snapshot.nodes { try check("Node", o.metadata, .subdomain, namespaced: false) }
        for o in snapshot.endpointSlices ?? [] { try check("EndpointSlice", o.metadata, .subdomain) }
        for o in snapshot.staticEgressIPs { try check("StaticEgressIP", o.metadata, .subdomain) }
        for o in snapshot.externalServices { try check("ExternalService", o.metadata, .subdomain) }
        for o in snapshot.ingresses { try check("Ingress", o.metadata, .subdomain) }
        for o in snapshot.referenceGrants ?? [] { try check("ReferenceGrant", o.metadata, .subdomain) }
    }

    static let ASCIISpace: Set<UInt8> = [0x20, 0x0a, 0x0d, 0x09]

    /// The objects of a List's items as they are read, by kind. Of duplicate `kind` keys the last counts, as the
    /// API server reads them: the typed readers of the many (Services, Nodes, EndpointSlices) note the kind they meet
    /// as they read; the few others are looked through for it first. An item read as another kind than its last is
    /// read again as that one.
    struct ItemCollector {
        var snapshot = ClusterSnapshot()
        var slices: [EndpointSlice] = []

        /// Reads item `index` (at `r`) as `kind` (its leading kind, or its last one when it has no leading kind).
        mutating func read(_ kind: String?, index: Int, _ r: inout JSONReader) throws(FormatError) {
            let start = r
            var again: String?
            do {
                let typed = kind == "Service" || kind == "Node" || kind == "EndpointSlice"
                let kind = typed ? kind : try Self.lastKind(of: start) ?? kind
                r.kindRead = nil
                func misread(_ expected: String) -> Bool {
                    guard let seen = r.kindRead, seen != expected else { return false }
                    again = seen
                    return true
                }
                switch kind {
                case "Service": let o = try Service(json: &r); if !misread("Service") { snapshot.services.append(o) }
                case "Node": let o = try Node(json: &r); if !misread("Node") { snapshot.nodes.append(o) }
                case "EndpointSlice": let o = try EndpointSlice(json: &r); if !misread("EndpointSlice") { slices.append(o) }
                case "StaticEgressIP": snapshot.staticEgressIPs.append(try StaticEgressIP(json: &r))
                case "ExternalService": snapshot.externalServices.append(try ExternalService(json: &r))
                case "Ingress": snapshot.ingresses.append(try Ingress(json: &r))
                case "ReferenceGrant": snapshot.referenceGrants = (snapshot.referenceGrants ?? []) + [try ReferenceGrant(json: &r)]
                case nil: throw JSONReadError(offset: start.offset, reason: "an item has no kind")
                default: try r.skipValue()
                }
            } catch {
                throw FormatError(description: "cannot be read at items[\(index)] (a \(kind ?? "thing without kind")): \(error)")
            }
            if let again {
                r = start
                try read(again, index: index, &r)
            }
        }

        /// The value of an item's last `kind` key (nil if it has none, or it is null).
        static func lastKind(of item: JSONReader) throws(JSONReadError) -> String? {
            var probe = item
            var found: String?
            try probe.readObject { (p: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                if key.is("kind") { found = try p.readOptionalString() } else { try p.skimValue() }
            }
            return found
        }

        /// The item's kind if it comes first, after `apiVersion` at most (nil if it does not; .some(nil) if null).
        static func leadingKind(_ item: JSONReader) throws(JSONReadError) -> String?? {
            var probe = item
            var found: String??
            try probe.readObjectPrefix { (p: inout JSONReader, key: JSONKey) throws(JSONReadError) -> Bool in
                if key.is("kind") { found = .some(try p.readOptionalString()) }
                else if key.is("apiVersion") { try p.skimValue(); return true }
                return false
            }
            return found
        }

        /// Adds the items `later` read, from the items after these on.
        mutating func append(_ later: ItemCollector) {
            snapshot.services += later.snapshot.services
            snapshot.nodes += later.snapshot.nodes
            slices += later.slices
            snapshot.staticEgressIPs += later.snapshot.staticEgressIPs
            snapshot.externalServices += later.snapshot.externalServices
            snapshot.ingresses += later.snapshot.ingresses
            if let grants = later.snapshot.referenceGrants { snapshot.referenceGrants = (snapshot.referenceGrants ?? []) + grants }
        }

        /// The snapshot of a whole file: no ReferenceGrant in it means none; every name one the API server takes.
        func finished() throws(FormatError) -> ClusterSnapshot {
            var snapshot = snapshot
            if !slices.isEmpty { snapshot.endpointSlices = slices }
            if snapshot.referenceGrants == nil { snapshot.referenceGrants = [] }
            try checkNames(snapshot)
            return snapshot
        }
    }

    /// The JSON path (kubectl `-o json`): read from the bytes, keeping only what epokd uses (see `JSONReader`).
    /// One pass over the items: an item whose kind comes first (after `apiVersion` at most, as kubectl and the
    /// API write them) is read as soon as its kind is known; from the first item whose kind comes later on, each
    /// is skimmed for its kind and read after the pass, in order. Errors keep their precedence: a malformed
    /// document first, then one that is not a List, then the first item that cannot be read.
    static func decode(json bytes: [UInt8]) throws(FormatError) -> ClusterSnapshot {
        var reader = JSONReader(bytes)
        var kind: String?
        var hasItems = false
        var items = ItemCollector()
        var failure: FormatError?
        var late: [(index: Int, offset: Int, kind: String?)] = []
        do {
            try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                if key.is("kind") { kind = try r.readOptionalString() }
                else if key.is("items") {
                    hasItems = !(try r.readNull())
                    guard hasItems else { return }
                    var index = 0
                    try r.readArray { (item: inout JSONReader) throws(JSONReadError) in
                        defer { index += 1 }
                        _ = item.peek()
                        let start = item
                        if late.isEmpty, let itemKind = try ItemCollector.leadingKind(item) {
                            guard failure == nil else { return try item.skimValue() }
                            do throws(FormatError) {
                                try items.read(itemKind, index: index, &item)
                            } catch {
                                // Moved past by a skim, which finds the document malformed if the item was.
                                failure = error
                                item = start
                                try item.skimValue()
                            }
                            return
                        }
                        var itemKind: String?
                        try item.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                            if key.is("kind") { itemKind = try r.readOptionalString() } else { try r.skimValue() }
                        }
                        late.append((index, start.offset, itemKind))
                    }
                } else {
                    try r.skipValue()
                }
            }
            try reader.readEnd()
        } catch {
            throw FormatError(description: "is malformed: \(error)")
        }
        switch kind {
        case nil:
            throw FormatError(description: "has no kind: expected a List (kubectl get services,nodes -A -o json), a Service or a Node; a file cut off while it was written has no kind either")
        case let kind? where kind.hasSuffix("List"):
            guard hasItems else { throw FormatError(description: "is a \(kind) without items") }
            if let failure { throw failure }
        case "Service", "Node":
            (items, late) = (ItemCollector(), [(0, 0, kind)])
        case let kind?:
            throw FormatError(description: "is a \(kind), not a List of Services and Nodes")
        }
        for item in late {
            var r = JSONReader(bytes, offset: item.offset)
            try items.read(item.kind, index: item.index, &r)
        }
        return try items.finished()
    }

    private static func describe(_ error: DecodingError) -> String {
        func at(_ path: [CodingKey]) -> String {
            path.isEmpty ? "" : " at " + path.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined().drop { $0 == "." }
        }
        switch error {
        case .typeMismatch(let type, let context): return "has a value of the wrong type\(at(context.codingPath)) (expected \(type))"
        case .valueNotFound(_, let context): return "has a missing value\(at(context.codingPath))"
        case .keyNotFound(let key, let context): return "has no \(key.stringValue)\(at(context.codingPath))"
        case .dataCorrupted(let context):
            let underlying = context.underlyingError.map { " (\($0))" } ?? ""
            return "is malformed\(at(context.codingPath)): \(context.debugDescription)\(underlying)"
        @unknown default: return "cannot be decoded (\(error))"
        }
    }

    /// Reads and decodes the file at `path`; errors say in words what is wrong with it.
    public static func load(_ path: String) throws(ReadError) -> ClusterSnapshot {
        try loadWithDigest(path).snapshot
    }

    /// A file's digest: what tells its versions apart, and what its stamp is made from. Eight bytes a step, each
    /// word mixed in by a multiply and a fold (so that every bit of it reaches every bit of the digest), then the
    /// last bytes and the length; it tells versions of a file apart, it is not meant to resist forgery.
    public static func digest(_ bytes: [UInt8]) -> UInt64 {
        var digest = Digest()
        bytes.withUnsafeBytes { digest.update($0) }
        return digest.finish()
    }

    /// What a table made from a file of `digest` (see `digest(_:)`) with `options` by this build stands on, as a
    /// stamp for `Firewall.synchronize(_:stamp:)`: the file's digest, and a digest of the options with the
    /// skeleton's fingerprint.
    public static func stamp(digest input: UInt64, options: ForwardingOptions, skeleton: Skeleton) -> String {
        func digest(_ bytes: some Sequence<UInt8>) -> String { String(Skeleton.digest(bytes), radix: 16) }
        // Every option by name (SnapshotStampTests checks that none is left out), an absent one apart from an empty one.
        let setup = ["interfaces \(options.interfaces)", "externalInterface \(String(describing: options.externalInterface))",
                     "hostPorts \(String(describing: options.hostPorts))", "nodeCIDRs \(String(describing: options.nodeCIDRs))",
                     "hostAddresses \(options.hostAddresses.map(\.description).sorted())", "firewallInterfaces \(options.firewallInterfaces)",
                     "inputPorts \(String(describing: options.inputPorts))", "addressPools \(String(describing: options.addressPools))", "gateways \(options.gateways.map(\.description).sorted())", "skeleton \(skeleton.fingerprint)"].joined(separator: "; ")
        return "input \(String(input, radix: 16)) setup \(digest(setup.utf8))"
    }

    /// The file's bytes, after checking that it is a readable regular file: read in one go into an array of its
    /// size (no copy, no growth, unless it grows while it is read).
    public static func read(_ path: String) throws(ReadError) -> [UInt8] {
        let fd = try openRegular(path)
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw failure(errno, path) }
        // One byte more than its size, to see the end of the file; a file that grows while it is read is read on.
        var failed: ReadError?
        var bytes = [UInt8](unsafeUninitializedCapacity: Int(info.st_size) + 1) { buffer, count in
            do throws(ReadError) {
                count = try fill(fd, UnsafeMutableRawBufferPointer(buffer), path: path)
            } catch {
                (failed, count) = (error, 0)
            }
        }
        if let failed { throw failed }
        guard bytes.count > Int(info.st_size) else { return bytes }
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let count = try chunk.withUnsafeMutableBytes { buffer in Result { () throws(ReadError) in try fill(fd, buffer, path: path) } }.get()
            guard count > 0 else { return bytes }
            bytes += chunk[..<count]
        }
    }
}
