/// An object's annotations or labels: the few that epokd keeps, as key-value pairs in key order in one small
/// array, looked up by a scan. No hash table: an object's one annotation costs one allocation of 64 bytes, not a
/// table of 136 and the hashing of its key.
///
/// Each map has one representation (pairs in key order, keys unique), so maps with the same pairs are equal.
public struct StringMap: Hashable, Sendable, RandomAccessCollection, ExpressibleByDictionaryLiteral, Codable {
    public typealias Element = (key: String, value: String)

    private var pairs: [Pair] = []

    private struct Pair: Hashable, Sendable {
        var key: String
        var value: String
    }

    public init() {}

    /// The pairs of `dictionary`.
    public init(_ dictionary: [String: String]) {
        pairs = dictionary.map { Pair(key: $0.key, value: $0.value) }.sorted { $0.key < $1.key }
    }

    /// A key given twice keeps its last value, as a JSON object's key does.
    public init(dictionaryLiteral elements: (String, String)...) {
        for (key, value) in elements { self[key] = value }
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { pairs.count }
    public subscript(position: Int) -> Element { (pairs[position].key, pairs[position].value) }

    /// The keys, in order.
    public var keys: [String] { pairs.map(\.key) }

    /// The value of `key`; setting nil removes it.
    public subscript(key: String) -> String? {
        get { pairs.first { $0.key == key }?.value }
        set {
            let place = pairs.firstIndex { $0.key >= key } ?? pairs.endIndex
            let present = place < pairs.endIndex && pairs[place].key == key
            switch (newValue, present) {
            case (let value?, true): pairs[place].value = value
            case (let value?, false): pairs.insert(Pair(key: key, value: value), at: place)
            case (nil, true): pairs.remove(at: place)
            case (nil, false): break
            }
        }
    }

    /// The pairs `isIncluded` keeps.
    public func filter(_ isIncluded: (Element) throws -> Bool) rethrows -> StringMap {
        var result = StringMap()
        result.pairs = try pairs.filter { try isIncluded(($0.key, $0.value)) }
        return result
    }

    /// As a JSON object.
    public init(from decoder: any Decoder) throws {
        self.init(try [String: String](from: decoder))
    }

    public func encode(to encoder: any Encoder) throws {
        try Dictionary(uniqueKeysWithValues: pairs.map { ($0.key, $0.value) }).encode(to: encoder)
    }
}
