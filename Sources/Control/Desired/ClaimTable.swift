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
    fileprivate var claims: [Key: [(age: Age, value: Value)]] = [:]

    /// The claim that holds `key`.
    func holder(of key: Key) -> (age: Age, value: Value)? { claims[key]?.first }

    /// The claim holding each key.
    var holders: [(age: Age, value: Value)] {
        var result: [(age: Age, value: Value)] = []
        result.reserveCapacity(claims.count)
        for list in claims.values { result.append(list[0]) }
        return result
    }


    /// Owners with a claim that an older one outranks.
    var outranked: [Age.Owner] {
        var result: [Age.Owner] = []
        for list in claims.values where list.count > 1 { for claim in list.dropFirst() { result.append(claim.age.owner) } }
        return result
    }
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
            // In place: the list is neither copied nor its key hashed twice.
            claims[key, default: []].insertOrdered((age, value))
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

extension ClaimTable where Key: Comparable {
    /// The claim holding each key, in the order of the keys.
    var holdersByKey: [(age: Age, value: Value)] {
        var result: [(key: Key, age: Age, value: Value)] = []
        result.reserveCapacity(claims.count)
        for (key, list) in claims { result.append((key, list[0].age, list[0].value)) }
        result.sort { $0.key < $1.key }
        return result.map { ($0.age, $0.value) }
    }
}

private extension Array {
    /// Inserts `claim` before the first younger one.
    mutating func insertOrdered<Age: Comparable, Value>(_ claim: (age: Age, value: Value)) where Element == (age: Age, value: Value) {
        insert(claim, at: firstIndex { claim.age < $0.age } ?? endIndex)
    }
}
