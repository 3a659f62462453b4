/// When a claim was made, and by whom: the older claim holds (see `ClaimPrecedence`, `RequestPrecedence`).
protocol ClaimAge: Comparable {
    associatedtype Owner: Hashable
    var owner: Owner { get }
}

extension ClaimPrecedence: ClaimAge {
    var owner: ServiceRef { service }
}

/// A claim that ranks first by when it was made (`since`, a count of the changes seen), then by `precedence` among
/// the claims made at once: an old object that asks later waits behind the one that asked first.
struct FirstClaim<Precedence: ClaimAge>: ClaimAge {
    var since: Int
    var precedence: Precedence
    var owner: Precedence.Owner { precedence.owner }
    static func < (a: Self, b: Self) -> Bool { (a.since, a.precedence) < (b.since, b.precedence) }
}

/// Claims on keys only one of them may hold (a host port, an LB IP . port, a bridge entrance): the oldest claim
/// holds the key, the others wait behind it.
struct ClaimTable<Key: Hashable, Value: Equatable, Age: ClaimAge> {
    typealias Claim = (age: Age, value: Value)

    /// Where the claim holding each key is in `holding`: the table keeps a key and a number per entry (its empty
    /// buckets cost little), the claims, which are large, are stored once, side by side.
    fileprivate var held: [Key: Int] = [:]
    /// The holding claims; a place that a withdrawn claim left is nil until a new holder takes it.
    fileprivate var holding: [Claim?] = []
    private var free: [Int] = []
    /// The claims waiting behind each key's holder, oldest first; most keys have none, and no entry.
    private var waiting: [Key: [Claim]] = [:]

    /// Makes room for `count` keys.
    mutating func reserveCapacity(_ count: Int) {
        held.reserveCapacity(count)
        holding.reserveCapacity(count)
    }

    /// The claim that holds `key`.
    func holder(of key: Key) -> Claim? { held[key].map { holding[$0]! } }

    /// The claim holding each key.
    var holders: [Claim] { held.values.map { holding[$0]! } }

    /// Owners with a claim that an older one outranks.
    var outranked: [Age.Owner] {
        var result: [Age.Owner] = []
        for list in waiting.values { for claim in list { result.append(claim.age.owner) } }
        return result
    }
    /// Whether any key has a claim that is not held.
    var hasOutranked: Bool { !waiting.isEmpty }

    /// Replaces `owner`'s claims on the keys `old` by `new`, each made at its age. With `changes`, returns the
    /// value held before and after for every key whose holder changed (without, nothing: a bulk load compares
    /// nothing).
    mutating func replace(_ owner: Age.Owner, old: some Sequence<Key>, new: some Sequence<(Key, Value, Age)>,
                          changes: Bool = true) -> [(before: Value?, after: Value?)] {
        replaceNamingKeys(owner, old: old, new: new, changes: changes).map { ($0.before, $0.after) }
    }

    /// As `replace(_:old:new:changes:)`, with the key of each change.
    mutating func replaceNamingKeys(_ owner: Age.Owner, old: some Sequence<Key>, new: some Sequence<(Key, Value, Age)>,
                                    changes: Bool = true) -> [(key: Key, before: Value?, after: Value?)] {
        var before: [Key: Value?] = [:]
        if changes {
            for key in old where before[key] == nil { before[key] = .some(holder(of: key)?.value) }
            for (key, _, _) in new where before[key] == nil { before[key] = .some(holder(of: key)?.value) }
        }
        for key in old { withdraw(owner, from: key) }
        for (key, value, age) in new { claim(key, (age, value)) }
        return before.compactMap { key, was in
            let now = holder(of: key)?.value
            return was == now ? nil : (key, was, now)
        }
    }

    /// Every claim on `key`, its holder first.
    func claims(on key: Key) -> [Claim] { (holder(of: key).map { [$0] } ?? []) + (waiting[key] ?? []) }

    /// As `replace(_:old:new:changes:)`, every new claim made at `age` (nil: the owner is gone).
    mutating func replace(_ owner: Age.Owner, old: some Sequence<Key>, new: some Sequence<(Key, Value)>, age: Age?,
                          changes: Bool = true) -> [(before: Value?, after: Value?)] {
        replace(owner, old: old, new: new.lazy.compactMap { key, value in age.map { (key, value, $0) } }, changes: changes)
    }

    /// Takes every claim of `owner` on `key` away; the oldest waiting claim, if any, then holds the key.
    private mutating func withdraw(_ owner: Age.Owner, from key: Key) {
        if waiting[key] != nil {
            waiting[key]!.removeAll { $0.age.owner == owner }
            if waiting[key]!.isEmpty { waiting[key] = nil }
        }
        guard let place = held[key], holding[place]!.age.owner == owner else { return }
        if var queue = waiting.removeValue(forKey: key) {
            holding[place] = queue.removeFirst()
            if !queue.isEmpty { waiting[key] = queue }
        } else {
            held[key] = nil
            holding[place] = nil
            free.append(place)
        }
    }

    /// Adds a claim on `key`: it holds the key if it is older than the holder, and waits in order otherwise.
    private mutating func claim(_ key: Key, _ claim: Claim) {
        guard let place = held[key] else {
            if let place = free.popLast() {
                holding[place] = claim
                held[key] = place
            } else {
                held[key] = holding.count
                holding.append(claim)
            }
            return
        }
        let holder = holding[place]!
        if claim.age < holder.age {
            holding[place] = claim
            waiting[key, default: []].insert(holder, at: 0)
        } else {
            waiting[key, default: []].insertOrdered(claim)
        }
    }
}

extension ClaimTable where Key: Comparable {
    /// The claim holding each key, in the order of the keys.
    var holdersByKey: [Claim] {
        // Keys with their places are sorted, which move and compare cheaply, rather than the claims.
        var order = held.map { (key: $0.key, place: $0.value) }
        order.sort { $0.key < $1.key }
        return order.map { holding[$0.place]! }
    }
}

private extension Array {
    /// Inserts `claim` before the first younger one.
    mutating func insertOrdered<Age: Comparable, Value>(_ claim: (age: Age, value: Value)) where Element == (age: Age, value: Value) {
        insert(claim, at: firstIndex { claim.age < $0.age } ?? endIndex)
    }
}
