/// The fields of an element's key, key end or value, in order: a list of `Field` that costs no allocation when
/// the fields are small (up to four protocols, ports, IPv4 addresses, marks or integers, 8 bytes together at
/// their natural widths), as every mapping's, LoadBalancer entry's and slot's are. Other lists (with an IPv6
/// address or an interface name) are held in an array.
///
/// Each list has exactly one representation, so two lists are equal (and hash alike) when their fields are.
public struct Fields: Hashable, Sendable, RandomAccessCollection, ExpressibleByArrayLiteral, CustomStringConvertible {
    fileprivate enum Storage: Hashable, Sendable {
        /// The values at their natural widths, the last field in the lowest bytes; the type of field `i` in bits
        /// `3i..<3i+3` of `types` (`FieldType.code`), the count in bits 12...14.
        case packed(values: UInt64, types: UInt16)
        case list([Field])
    }

    private let storage: Storage

    private static let packedFields = 4, packedBytes = 8

    public init(_ fields: some Collection<Field>) {
        var values: UInt64 = 0, types: UInt16 = 0, bytes = 0, count = 0
        for field in fields {
            guard count < Fields.packedFields, let value = field.packedValue,
                  bytes + field.type.length <= Fields.packedBytes else {
                storage = .list(Array(fields))
                return
            }
            values = values << (8 * field.type.length) | value
            types |= UInt16(field.type.code) << (3 * count)
            bytes += field.type.length
            count += 1
        }
        storage = .packed(values: values, types: types | UInt16(count) << 12)
    }

    public init(arrayLiteral fields: Field...) { self.init(fields) }

    /// One field, or two: the lists of the hot paths (a mapping's key and value), built with no array.
    public init(_ field: Field) { self = Fields(storage: .packed(values: 0, types: 0)).appending(field) }
    public init(_ first: Field, _ second: Field) { self = Fields(first).appending(second) }

    private init(storage: Storage) { self.storage = storage }

    /// These fields, then `field` (no array while they pack).
    public func appending(_ field: Field) -> Fields {
        if case .packed(let values, let types) = storage, let value = field.packedValue {
            let count = Int(types >> 12)
            let bytes = (0..<count).reduce(0) { $0 + Fields.type($1, of: types).length }
            if count < Fields.packedFields, bytes + field.type.length <= Fields.packedBytes {
                return Fields(storage: .packed(values: values << (8 * field.type.length) | value,
                                               types: types & 0xFFF | UInt16(field.type.code) << (3 * count) | UInt16(count + 1) << 12))
            }
        }
        return Fields(Array(self) + [field])
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int {
        switch storage {
        case .packed(_, let types): Int(types >> 12)
        case .list(let fields): fields.count
        }
    }

    public subscript(position: Int) -> Field {
        switch storage {
        case .list(let fields):
            return fields[position]
        case .packed(let values, let types):
            precondition(position >= 0 && position < Int(types >> 12), "field \(position) of \(Int(types >> 12))")
            // The fields after `position` sit below it.
            let below = (position + 1..<Int(types >> 12)).reduce(0) { $0 + 8 * Fields.type($1, of: types).length }
            return Field(packed: values >> below, Fields.type(position, of: types))
        }
    }

    public var description: String { map(\.description).joined(separator: " . ") }

    /// Walks the fields first to last, each taken from the packed value in one step.
    public struct Iterator: IteratorProtocol {
        private let storage: Storage
        private var index = 0
        /// Packed: how many bits of `values` lie below the next field.
        private var below: Int

        fileprivate init(_ storage: Storage) {
            self.storage = storage
            guard case .packed(_, let types) = storage else {
                below = 0
                return
            }
            below = (0..<Int(types >> 12)).reduce(0) { $0 + 8 * Fields.type($1, of: types).length }
        }

        public mutating func next() -> Field? {
            switch storage {
            case .list(let fields):
                guard index < fields.count else { return nil }
                defer { index += 1 }
                return fields[index]
            case .packed(let values, let types):
                guard index < Int(types >> 12) else { return nil }
                let type = Fields.type(index, of: types)
                below -= 8 * type.length
                index += 1
                return Field(packed: values >> below, type)
            }
        }
    }

    public func makeIterator() -> Iterator { Iterator(storage) }

    /// The type of packed field `index`.
    private static func type(_ index: Int, of types: UInt16) -> FieldType { FieldType(code: types >> (3 * index) & 7) }
}

extension FieldType {
    /// The type of `code` (see `FieldType.code`), for the types `Fields` packs.
    fileprivate init(code: UInt16) {
        switch code {
        case 0: self = .l4proto
        case 1: self = .port
        case 2: self = .ipv4
        case 5: self = .mark
        default: self = .integer
        }
    }
}

extension Field {
    /// The value as a number of its natural width, for the types `Fields` packs.
    fileprivate var packedValue: UInt64? {
        switch self {
        case .l4proto(let p): UInt64(p.rawValue)
        case .port(let p): UInt64(p.rawValue)
        case .ipv4(let a): UInt64(a.value)
        case .mark(let v), .integer(let v): UInt64(v)
        case .ipv6, .ifname: nil
        }
    }

    /// The field of `type` in the low bytes of `bits` (the bytes above it are ignored).
    fileprivate init(packed bits: UInt64, _ type: FieldType) {
        let value = bits & (1 << (8 * type.length) &- 1)
        switch type {
        case .l4proto: self = .l4proto(L4Protocol(rawValue: UInt8(value)))
        // Only a port `Port` accepts was packed.
        case .port: self = .port(Port(rawValue: UInt16(value))!)
        case .ipv4: self = .ipv4(IPv4Address(value: UInt32(value)))
        case .mark: self = .mark(UInt32(value))
        default: self = .integer(UInt32(value))
        }
    }
}

extension Fields {
    /// The fields of `a`, then those of `b` (appended one by one: no array while they pack).
    public static func + (a: Fields, b: Fields) -> Fields { b.reduce(a) { $0.appending($1) } }
}

/// A value held behind a reference, compared and hashed by value: what few instances of a type have, kept out of
/// line so that the many instances kept at scale (elements, mappings) stay small.
final class Boxed<Value: Hashable & Sendable>: Hashable, Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
    static func == (a: Boxed, b: Boxed) -> Bool { a.value == b.value }
    func hash(into hasher: inout Hasher) { hasher.combine(value) }
}

extension Optional {
    /// `value` in a box; nil when it is `empty`.
    init<Value>(boxing value: Value, unlessEqualTo empty: Value) where Wrapped == Boxed<Value> {
        self = value == empty ? nil : Boxed(value)
    }
}
