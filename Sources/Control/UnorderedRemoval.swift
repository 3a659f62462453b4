import OrderedCollections

/// The tables that hold an entry for each Service are `OrderedDictionary`s: their entries side by side in two
/// arrays, found through a table of small indices, where a `Dictionary` of 50k entries has 131,072 slots of a key
/// and a value each. Their order means nothing here, so an entry is removed by moving the last one into its place.
extension OrderedDictionary {
    /// Removes `key`'s entry in constant time (the last entry takes its place); returns its value.
    @discardableResult
    mutating func removeUnordered(forKey key: Key) -> Value? {
        guard let place = index(forKey: key) else { return nil }
        swapAt(place, count - 1)
        return removeLast().value
    }
}
