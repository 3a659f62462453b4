/// Claims of Services on keys only one of them may hold (a host port, an LB IP . port, a pod's source address):
/// the oldest claim holds the key (see `ClaimPrecedence`), the others wait behind it.
struct ClaimTable<Key: Hashable, Value: Equatable> {
    private var claims: [Key: [(age: ClaimPrecedence, value: Value)]] = [:]

    /// The claim that holds `key`.
    func holder(of key: Key) -> (age: ClaimPrecedence, value: Value)? { claims[key]?.first }

    /// The claim holding each key.
    var holders: [(age: ClaimPrecedence, value: Value)] { claims.values.compactMap(\.first) }

    /// Services with a claim that an older one outranks.
    var outranked: [ServiceRef] { claims.values.flatMap { $0.dropFirst().map(\.age.service) } }

    /// Replaces `ref`'s claims on the keys `old` by `new`, made at `age`. With `changes`, returns the value held
    /// before and after for every key whose holder changed (without, nothing: a bulk load compares nothing).
    mutating func replace(_ ref: ServiceRef, old: some Sequence<Key>, new: some Sequence<(Key, Value)>, age: ClaimPrecedence?,
                          changes: Bool = true) -> [(before: Value?, after: Value?)] {
        var before: [Key: Value?] = [:]
        if changes {
            for key in old where before[key] == nil { before[key] = .some(claims[key]?.first?.value) }
            for (key, _) in new where before[key] == nil { before[key] = .some(claims[key]?.first?.value) }
        }
        for key in old {
            claims[key]?.removeAll { $0.age.service == ref }
            if claims[key]?.isEmpty == true { claims[key] = nil }
        }
        if let age {
            for (key, value) in new {
                var list = claims[key] ?? []
                list.insert((age, value), at: list.firstIndex { age < $0.age } ?? list.endIndex)
                claims[key] = list
            }
        }
        return before.compactMap { key, was in
            let now = claims[key]?.first?.value
            return was == now ? nil : (was, now)
        }
    }
}
