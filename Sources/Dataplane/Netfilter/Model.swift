import CNetfilter

/// An nftables address family.
public enum Family: UInt8, Sendable, CustomStringConvertible {
    case inet = 1, ipv4 = 2, ipv6 = 10

    public var description: String {
        switch self {
        case .inet: "inet"
        case .ipv4: "ip"
        case .ipv6: "ip6"
        }
    }
}

/// A table of the project's own; `fingerprint` names the skeleton it holds.
public struct Table: Hashable, Sendable {
    public var name: String
    public var family: Family

    public init(name: String, family: Family = .inet) {
        self.name = name
        self.family = family
    }
}

/// The type of one field of a set key or map value.
public enum FieldType: Hashable, Sendable, CustomStringConvertible {
    case l4proto, port, ipv4, ipv6, ifname, mark, integer

    /// The field's size in bytes, before padding to a 32-bit register.
    public var length: Int {
        switch self {
        case .l4proto: 1
        case .port: 2
        case .ipv4, .mark, .integer: 4
        case .ipv6, .ifname: 16
        }
    }

    /// nft's datatype number (used only so that `nft list` prints elements legibly). A bare integer needs a
    /// `typeof` description (see `SetTypeof`) for nft to size it.
    var nftType: UInt32 {
        switch self {
        case .integer: 4
        case .ipv4: 7
        case .ipv6: 8
        case .l4proto: 12
        case .port: 13
        case .mark: 19
        case .ifname: 41
        }
    }

    public var description: String {
        switch self {
        case .l4proto: "inet_proto"
        case .port: "inet_service"
        case .ipv4: "ipv4_addr"
        case .ipv6: "ipv6_addr"
        case .ifname: "ifname"
        case .mark: "mark"
        case .integer: "integer"
        }
    }
}

/// One typed value of a set key or map value.
public enum Field: Hashable, Sendable, CustomStringConvertible {
    case l4proto(L4Protocol)
    case port(Port)
    case ipv4(IPv4Address)
    case ipv6(IPv6Address)
    case ifname(String)
    case mark(UInt32)
    case integer(UInt32)

    public var type: FieldType {
        switch self {
        case .l4proto: .l4proto
        case .port: .port
        case .ipv4: .ipv4
        case .ipv6: .ipv6
        case .ifname: .ifname
        case .mark: .mark
        case .integer: .integer
        }
    }

    /// The range from `first` to `last` as people write it: one value when they are equal, addresses as their
    /// prefixes (`198.51.100.0/24,203.0.113.0/28`), anything else as `first-last`.
    public static func range(_ first: Field, _ last: Field) -> String {
        switch (first, last) {
        case _ where first == last: first.description
        case (.ipv4(let a), .ipv4(let b)): AddressRange(first: .v4(a), last: .v4(b)).prefixesDescription()
        case (.ipv6(let a), .ipv6(let b)): AddressRange(first: .v6(a), last: .v6(b)).prefixesDescription()
        default: "\(first)-\(last)"
        }
    }

    /// Writes the kernel's bytes at `offset`, zero-padding to the field's 32-bit width.
    func write(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) {
        let padded = (type.length + 3) & ~3
        for i in 0..<padded { buffer[offset + i] = 0 }
        switch self {
        case .l4proto(let p): buffer[offset] = p.rawValue
        case .port(let p): buffer.storeBytes(of: p.rawValue.bigEndian, toByteOffset: offset, as: UInt16.self)
        case .ipv4(let a): buffer.storeBytes(of: a.value.bigEndian, toByteOffset: offset, as: UInt32.self)
        case .ipv6(let a):
            buffer.storeBytes(of: a.high.bigEndian, toByteOffset: offset, as: UInt64.self)
            buffer.storeBytes(of: a.low.bigEndian, toByteOffset: offset + 8, as: UInt64.self)
        case .ifname(let n):
            for (i, b) in n.utf8.prefix(15).enumerated() { buffer[offset + i] = b }
        case .mark(let v), .integer(let v): buffer.storeBytes(of: v, toByteOffset: offset, as: UInt32.self)
        }
    }

    /// Decodes one field of `type` from the kernel's bytes.
    static func decode(_ type: FieldType, _ b: ArraySlice<UInt8>) -> Field? {
        guard b.count >= type.length else { return nil }
        let s = Array(b.prefix(type.length))
        switch type {
        case .l4proto: return .l4proto(L4Protocol(rawValue: s[0]))
        case .port: return Port(rawValue: UInt16(s[0]) << 8 | UInt16(s[1])).map(Field.port)
        case .ipv4: return .ipv4(IPv4Address(s[0], s[1], s[2], s[3]))
        case .ipv6: return .ipv6(IPv6Address(bytes: s))
        case .ifname: return .ifname(String(decoding: s.prefix { $0 != 0 }, as: UTF8.self))
        case .mark: return .mark(s.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
        case .integer: return .integer(s.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
        }
    }

    public var description: String {
        switch self {
        case .l4proto(let p): p.description
        case .port(let p): p.description
        case .ipv4(let a): a.description
        case .ipv6(let a): a.description
        case .ifname(let n): "\"\(n)\""
        case .mark(let v): "0x" + String(v, radix: 16)
        case .integer(let v): String(v)
        }
    }
}

extension Field {
    /// An address as a set field of its family.
    public init(_ address: IPAddress) {
        switch address {
        case .v4(let v): self = .ipv4(v)
        case .v6(let v): self = .ipv6(v)
        }
    }
}

extension IPAddress {
    /// The address a set field holds, if it holds one.
    public init?(_ field: Field) {
        switch field {
        case .ipv4(let a): self = .v4(a)
        case .ipv6(let a): self = .v6(a)
        default: return nil
        }
    }
}

extension Field: Comparable {
    /// Values of one type in their natural order (addresses and ports numerically); types in declaration order.
    public static func < (a: Field, b: Field) -> Bool {
        switch (a, b) {
        case (.l4proto(let x), .l4proto(let y)): x < y
        case (.port(let x), .port(let y)): x < y
        case (.ipv4(let x), .ipv4(let y)): x < y
        case (.ipv6(let x), .ipv6(let y)): x < y
        case (.ifname(let x), .ifname(let y)): x < y
        case (.mark(let x), .mark(let y)), (.integer(let x), .integer(let y)): x < y
        default: a.type.code < b.type.code
        }
    }
}

extension FieldType {
    /// The type's number: its place in the order of types (`Field`'s `<`), and its code in `Fields`' packed form.
    var code: UInt8 {
        switch self {
        case .l4proto: 0
        case .port: 1
        case .ipv4: 2
        case .ipv6: 3
        case .ifname: 4
        case .mark: 5
        case .integer: 6
        }
    }
}

/// A field list as the kernel sees it: one field has its natural length,
/// a concatenation pads every field to a 32-bit register.
struct FieldLayout: Hashable, Sendable {
    let types: [FieldType]

    var isConcatenation: Bool { types.count > 1 }

    func width(_ t: FieldType) -> Int { isConcatenation ? (t.length + 3) & ~3 : t.length }
    var length: Int { types.reduce(0) { $0 + width($1) } }
    var nftType: UInt32 { types.reduce(0) { $0 << 6 | $1.nftType } }

    /// Calls `body` with the kernel encoding of `fields`, built in a stack buffer (no allocation).
    func withEncoded<R>(_ fields: Fields, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        precondition(fields.count == types.count, "fields \(fields) do not fit \(types)")
        return withUnsafeTemporaryAllocation(byteCount: max(length, 16), alignment: 8) { buffer in
            var offset = 0
            for (f, t) in zip(fields, types) {
                precondition(f.type == t, "fields \(fields) do not fit \(types)")
                f.write(into: buffer, at: offset)
                offset += width(t)
            }
            return body(UnsafeRawBufferPointer(rebasing: buffer[0..<offset]))
        }
    }

    func decode(_ bytes: [UInt8]) -> Fields? {
        guard bytes.count >= length else { return nil }
        var fields: [Field] = []
        var offset = 0
        for t in types {
            guard let f = Field.decode(t, bytes[offset...]) else { return nil }
            fields.append(f)
            offset += width(t)
        }
        return Fields(fields)
    }
}

/// How `nft` is to describe a set whose key no `type` names (`typeof`): kept in the set's userdata, in the
/// encoding nft itself writes, so that `nft list` prints the set and `nft -f` loads the listing again.
public enum SetTypeof: Hashable, Sendable {
    /// `typeof numgen inc mod MODULUS : ip daddr` (or `ip6 daddr`): a round-robin slot to an address.
    case roundRobinSlot(modulus: UInt32, to: Family)
    /// `typeof meta l4proto . th dport . numgen inc mod MODULUS : ip daddr` (or `ip6 daddr`): a port's own
    /// round-robin slot to an address.
    case portSlot(modulus: UInt32, to: Family)
    /// `typeof ip daddr . meta l4proto . th dport . numgen inc mod MODULUS : ip daddr` (or `ip6`): an address
    /// and port's own round-robin slot to an address.
    case addressPortSlot(modulus: UInt32, to: Family)
}

/// A named set (no `value`) or map (with `value`) of the table.
public struct NamedSet: Hashable, Sendable {
    public var name: String
    public var key: [FieldType]
    public var value: [FieldType]?
    /// Elements are ranges (`key` to `keyEnd`); the key must be a concatenation.
    public var interval: Bool
    /// Every element carries a packet and byte counter.
    public var counters: Bool
    /// The `typeof` description, for keys no `type` names.
    public var typeof: SetTypeof?
    /// Every element carries its own rate limit of this unit (`Element.limit`); a lookup that finds an element
    /// over its rate matches, one under it does not.
    public var limits: RateLimit.Unit?
    /// A set the ruleset itself fills (`update @set { … }`).
    public var dynamic: Dynamic?
    /// The most elements the set can ever hold, for a set whose keys are bounded (a protocol and a port): the
    /// kernel then keeps it in a hash table of fixed size (`nft_hash`) instead of one that grows as elements
    /// arrive (`nft_rhash`, whose inserts past each doubling take its slow path until a worker resizes it). The
    /// kernel refuses an element beyond it, so it must be the bound itself, never an estimate.
    public var capacity: UInt32?
    /// A set whose elements another program adds and removes (`epokd trace`'s selectors): created with the table,
    /// its elements never read back, compared or changed by epokd's commits.
    public var external = false
    /// Whether epokd's commits own the elements (neither dynamic nor external).
    public var holdsDesiredElements: Bool { dynamic == nil && !external }

    /// How a dynamic set's elements live: each expires `timeout` seconds after its last packet; at most `size`.
    public struct Dynamic: Hashable, Sendable {
        public var timeout: UInt64
        public var size: UInt32
        public init(timeout: UInt64, size: UInt32) {
            self.timeout = timeout
            self.size = size
        }
    }

    public init(name: String, key: [FieldType], value: [FieldType]? = nil, interval: Bool = false, counters: Bool = false,
                typeof: SetTypeof? = nil, limits: RateLimit.Unit? = nil) {
        precondition(!interval || key.count > 1, "interval sets are concatenations (set \(name))")
        self.name = name
        self.key = key
        self.value = value
        self.interval = interval
        self.counters = counters
        self.typeof = typeof
        self.limits = limits
    }

    /// How the comment of every set epokd makes starts: what tells its sets from an operator's in the same table.
    public static let ownerComment = "managed by epokd"

    /// The set's comment: `ownerComment` and a digest of its definition, so that a skeleton change keeps (with its
    /// elements and counters) every set whose definition is the same, and rules that name it keep working.
    public var comment: String { Self.ownerComment + " " + String(Skeleton.digest(definitionLine.utf8), radix: 16) }

    /// Every property of the set, on one line (what its comment's digest and the skeleton's fingerprint are made of).
    var definitionLine: String {
        var line = "set \(name) key \(key.map(\.description).joined(separator: "."))"
        if let value { line += " value \(value.map(\.description).joined(separator: "."))" }
        if interval { line += " interval" }
        if counters { line += " counters" }
        switch typeof {
        case .roundRobinSlot(let modulus, let family)?: line += " typeof numgen-mod-\(modulus):\(family)-daddr"
        case .portSlot(let modulus, let family)?: line += " typeof l4proto.dport.numgen-mod-\(modulus):\(family)-daddr"
        case .addressPortSlot(let modulus, let family)?: line += " typeof \(family)-daddr.l4proto.dport.numgen-mod-\(modulus):\(family)-daddr"
        case nil: break
        }
        if let limits { line += " limits \(limits)" }
        if let dynamic { line += " dynamic timeout \(dynamic.timeout) size \(dynamic.size)" }
        if let capacity { line += " capacity \(capacity)" }
        return line
    }

    /// The size the kernel is told (`NFTA_SET_DESC_SIZE`), a dynamic set's or a bounded one's: the most elements
    /// it takes.
    var declaredSize: UInt32? { dynamic?.size ?? capacity }

    var keyLayout: FieldLayout { FieldLayout(types: key) }
    var valueLayout: FieldLayout? { value.map { FieldLayout(types: $0) } }
    public var isMap: Bool { value != nil }
}

/// One element of a set or map.
public struct Element: Hashable, Sendable, CustomStringConvertible {
    public var key: Fields
    public var value: Fields?
    /// Kept by the kernel with the element, for people (`nft list`, `epokd status`): the Service it serves.
    public var comment: String?
    /// What few elements have, held apart so that every element of a large set stays small.
    private var rare: Boxed<Rare>?

    private struct Rare: Hashable, Sendable {
        var keyEnd: Fields?
        var limit: RateLimit?
    }

    /// `comment` is stored as the kernel will keep it (see `kernelComment`), so a read-back compares equal.
    public init(key: Fields, keyEnd: Fields? = nil, value: Fields? = nil, comment: String? = nil, limit: RateLimit? = nil) {
        self.key = key
        self.value = value
        self.comment = comment.map(Element.kernelComment)
        rare = Optional(boxing: Rare(keyEnd: keyEnd, limit: limit), unlessEqualTo: Rare())
    }

    /// The last key of the range, for interval sets.
    public var keyEnd: Fields? {
        get { rare?.value.keyEnd }
        set { rare = Optional(boxing: Rare(keyEnd: newValue, limit: limit), unlessEqualTo: Rare()) }
    }

    /// The element's own rate limit, in a set made with `limits`.
    public var limit: RateLimit? {
        get { rare?.value.limit }
        set { rare = Optional(boxing: Rare(keyEnd: keyEnd, limit: newValue), unlessEqualTo: Rare()) }
    }

    /// The longest comment the kernel keeps, in bytes (its limit is 128 with the terminating NUL).
    public static let commentLimit = 127

    /// `text` as an element comment: control characters (NUL included) replaced by `?`, and cut to
    /// `commentLimit` bytes on a character boundary, so the kernel keeps exactly this text.
    public static func kernelComment(_ text: String) -> String {
        var plain = text
        if plain.utf8.count <= commentLimit, plain.withUTF8({ $0.allSatisfy { $0 >= 0x20 && $0 != 0x7f } }) { return text }
        var result = ""
        var bytes = 0
        for character in text {
            let clean = character.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f } ? "?" : character
            let size = String(clean).utf8.count
            guard bytes + size <= commentLimit else { break }
            result.append(clean)
            bytes += size
        }
        return result
    }

    /// The part that identifies the element within its set.
    public var identity: ElementKey { ElementKey(key: key, keyEnd: keyEnd) }

    public var description: String {
        // A range element, field by field: `198.51.100.0/24 . tcp . 25565`, not one range across the concatenation.
        var s = keyEnd.map { end in zip(key, end).map { Field.range($0, $1) }.joined(separator: " . ") } ?? key.description
        if let v = value { s += " : " + v.description }
        if let limit { s += " limit rate over \(limit)" }
        if let comment { s += " (\(comment))" }
        return s
    }
}

/// The elements of one operation of a transaction: a list, or the elements of a set where the set holds them, not
/// copied into an array (a first sync of 50k mappings would otherwise hold 2.8 MB more through its commit).
public struct ElementBatch: Sequence, ExpressibleByArrayLiteral, Sendable {
    private enum Storage: Sendable {
        case list([Element])
        case held(Set<Element>)
    }

    private let storage: Storage

    public init(_ elements: [Element]) { storage = .list(elements) }
    public init(arrayLiteral elements: Element...) { storage = .list(elements) }

    /// The elements as a transaction sends them to `set`: an interval set's in key order, which the kernel
    /// inserts and (above all) deletes much faster than in hash order; other sets' in the order they are held.
    public init(_ elements: Set<Element>, for set: NamedSet) {
        storage = set.interval ? .list(elements.sorted { $0.key.lexicographicallyPrecedes($1.key) }) : .held(elements)
    }

    public var count: Int {
        switch storage {
        case .list(let elements): elements.count
        case .held(let elements): elements.count
        }
    }

    public var isEmpty: Bool { count == 0 }

    /// The element at `offset` in the order of iteration.
    public func element(at offset: Int) -> Element? {
        switch storage {
        case .list(let elements): elements.indices.contains(offset) ? elements[offset] : nil
        case .held(let elements): offset >= 0 ? elements.dropFirst(offset).first : nil
        }
    }

    public struct Iterator: IteratorProtocol {
        fileprivate var list: IndexingIterator<[Element]>?
        fileprivate var held: Set<Element>.Iterator?

        public mutating func next() -> Element? { list != nil ? list!.next() : held!.next() }
    }

    public func makeIterator() -> Iterator {
        switch storage {
        case .list(let elements): Iterator(list: elements.makeIterator())
        case .held(let elements): Iterator(held: elements.makeIterator())
        }
    }
}

/// The key (or key range) that identifies an element.
public struct ElementKey: Hashable, Sendable {
    public var key: Fields
    public var keyEnd: Fields?
}

/// Per-element packet and byte counts read back from the kernel.
public struct ElementCounter: Hashable, Sendable {
    public var packets: UInt64
    public var bytes: UInt64
}

/// A netfilter hook a base chain attaches to.
public enum Hook: UInt32, Sendable {
    case prerouting = 0, input = 1, forward = 2, output = 3, postrouting = 4
}

/// A base chain (with a hook) or a regular chain of the table.
public struct Chain: Hashable, Sendable {
    public enum Kind: String, Sendable { case filter, nat }

    public var name: String
    public var kind: Kind
    public var hook: Hook?
    public var priority: Int32
    public var rules: [Rule]

    public init(name: String, kind: Kind = .filter, hook: Hook?, priority: Int32 = 0, rules: [Rule]) {
        self.name = name
        self.kind = kind
        self.hook = hook
        self.priority = priority
        self.rules = rules
    }
}

/// A rule: expressions evaluated in order, with a comment for people reading `nft list`.
public struct Rule: Hashable, Sendable {
    public var expressions: [Expression]
    public var comment: String

    public init(_ comment: String, _ expressions: [Expression]) {
        self.expressions = expressions
        self.comment = comment
    }
}

/// The fixed part of a ruleset: table, sets and chains. State lives in set elements.
///
/// `userChains` are the operator's: created empty when missing, never changed or deleted by epokd (a skeleton
/// change replaces epokd's own chains and sets around them, in one transaction), so rules added there stay.
public struct Skeleton: Hashable, Sendable {
    public var table: Table
    public var sets: [NamedSet]
    public var chains: [Chain]
    public var userChains: [String]

    public init(table: Table, sets: [NamedSet], chains: [Chain], userChains: [String] = []) {
        self.table = table
        self.sets = sets
        self.chains = chains
        self.userChains = userChains
    }

    /// A stable digest of the skeleton, stored in the table and its chains so a restart can tell whether the kernel
    /// holds this one: the digest of the sets (and user chains), a dot, then that of the chains, so that a skeleton
    /// whose sets are those of the kernel's can be had by replacing chains alone (see `setsFingerprint`). It hashes
    /// every property, spelled out here (`setsDescription`, `chainsDescription`), so that a new toolchain does not
    /// change it.
    public var fingerprint: String {
        setsFingerprint + "." + String(Skeleton.digest(chainsDescription.utf8), radix: 16)
    }

    /// The part of `fingerprint` that names the table, its sets and the user chains (everything but epokd's chains).
    public var setsFingerprint: String {
        Skeleton.fingerprintPrefix + String(Skeleton.digest(setsDescription.utf8), radix: 16)
    }

    /// FNV-1a, 64 bits: the same everywhere and in every release (unlike `Hasher`); it tells versions of a text
    /// apart, it is not meant to resist forgery.
    public static func digest(_ bytes: some Sequence<UInt8>) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes { h = (h ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return h
    }

    public func set(named name: String) -> NamedSet? { sets.first { $0.name == name } }

    /// Every property of the table, its sets and the user chains, one line each.
    private var setsDescription: String {
        var lines = ["table \(table.family) \(table.name)"]
        for set in sets { lines.append(set.definitionLine) }
        for chain in userChains { lines.append("user chain \(chain)") }
        return lines.joined(separator: "\n")
    }

    /// Every property of epokd's chains, one line per chain and rule.
    private var chainsDescription: String {
        var lines: [String] = []
        for chain in chains {
            lines.append("chain \(chain.name) \(chain.kind.rawValue) hook \(chain.hook.map { String($0.rawValue) } ?? "none") priority \(chain.priority)")
            for rule in chain.rules {
                lines.append("rule \(rule.comment): " + rule.expressions.map(\.canonicalDescription).joined(separator: "; "))
            }
        }
        return lines.joined(separator: "\n")
    }

    /// How every fingerprint starts: the mark of a table epokd made.
    public static let fingerprintPrefix = "epokd-skeleton-"
}
