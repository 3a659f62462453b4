/// When a claim was made, and by whom: the older claim holds (see `ClaimPrecedence`, `RequestPrecedence`).
protocol ClaimAge: Comparable {
    associatedtype Owner: Hashable
    var owner: Owner { get }
}

extension ClaimPrecedence: ClaimAge {
    var owner: ServiceRef { service }
}

/// Claims on keys only one of them may hold (a host port, an LB IP . port, a bridge entrance): the oldest claim
/// holds the key, the others wait behind it.
struct ClaimTable<Key: Hashable, Value: Equatable, Age: ClaimAge> {
    private var claims: [Key: [(age: Age, value: Value)]] = [:]

    /// The claim that holds `key`.
    func holder(of key: Key) -> (age: Age, value: Value)? { claims[key]?.first }

    /// The claim holding each key.
    var holders: [(age: Age, value: Value)] { claims.values.compactMap(\.first) }

    /// Owners with a claim that an older one outranks.
    var outranked: [Age.Owner] { claims.values.flatMap { $0.dropFirst().map(\.age.owner) } }
    /// Whether any key has a claim that is not held.
    var hasOutranked: Bool { claims.values.contains { $0.count > 1 } }

    /// Replaces `owner`'s claims on the keys `old` by `new`, each made at its age. With `changes`, returns the
    /// value held before and after for every key whose holder changed (without, nothing: a bulk load compares
    /// nothing).
    mutating func replace(_ owner: Age.Owner, old: some Sequence<Key>, new: some Sequence<(Key, Value, Age)>,
                          changes: Bool = true) -> [(before: Value?, after: Value?)] {
        var before: [Key: Value?] = [:]
        if changes {
            for key in old where before[key] == nil { before[key] = .some(claims[key]?.first?.value) }
            for (key, _, _) in new where before[key] == nil { before[key] = .some(claims[key]?.first?.value) }
        }
        for key in old {
            claims[key]?.removeAll { $0.age.owner == owner }
            if claims[key]?.isEmpty == true { claims[key] = nil }
        }
        for (key, value, age) in new {
            var list = claims[key] ?? []
            list.insert((age, value), at: list.firstIndex { age < $0.age } ?? list.endIndex)
            claims[key] = list
        }
        return before.compactMap { key, was in
            let now = claims[key]?.first?.value
            return was == now ? nil : (was, now)
        }
    }

    /// As `replace(_:old:new:changes:)`, every new claim made at `age` (nil: the owner is gone).
    mutating func replace(_ owner: Age.Owner, old: some Sequence<Key>, new: some Sequence<(Key, Value)>, age: Age?,
                          changes: Bool = true) -> [(before: Value?, after: Value?)] {
        replace(owner, old: old, new: new.lazy.compactMap { key, value in age.map { (key, value, $0) } }, changes: changes)
    }
}
