/// Elements of every set of a table, by set name: the state a transaction moves the kernel to.
public typealias TableElements = [String: Set<Element>]

/// The element changes that turn one table state into another.
public struct ElementDiff: Sendable, Equatable {
    /// Elements to delete, by set name; applied before `added`.
    public var deleted: [String: Set<Element>] = [:]
    /// Elements to add, by set name.
    public var added: [String: Set<Element>] = [:]

    public init() {}

    /// The minimal changes from `current` to `desired`. Elements are matched by key (and key range):
    /// a map element whose value changed is deleted and added again, in the same transaction.
    public init(from current: TableElements, to desired: TableElements) {
        for name in Set(current.keys).union(desired.keys) {
            let have = current[name] ?? []
            let want = desired[name] ?? []
            // Against an empty side the other side is the answer, shared rather than copied (a first sync).
            let removed = want.isEmpty ? have : have.subtracting(want)
            let new = have.isEmpty ? want : want.subtracting(have)
            if !removed.isEmpty { deleted[name] = removed }
            if !new.isEmpty { added[name] = new }
        }
    }

    public var isEmpty: Bool { deleted.isEmpty && added.isEmpty }
    public var addedCount: Int { added.values.reduce(0) { $0 + $1.count } }
    public var deletedCount: Int { deleted.values.reduce(0) { $0 + $1.count } }

    /// Records that `element` leaves `set`; cancels a pending addition of the same element.
    public mutating func remove(_ element: Element, from set: String) {
        if added[set]?.remove(element) != nil {
            if added[set]!.isEmpty { added[set] = nil }
        } else {
            deleted[set, default: []].insert(element)
        }
    }

    /// Records that `element` joins `set`; cancels a pending deletion of the same element.
    public mutating func insert(_ element: Element, into set: String) {
        if deleted[set]?.remove(element) != nil {
            if deleted[set]!.isEmpty { deleted[set] = nil }
        } else {
            added[set, default: []].insert(element)
        }
    }

    /// Adds the changes of `other`, made after this diff's (they cancel where they undo each other).
    public mutating func merge(_ other: ElementDiff) {
        // Where nothing is pending in the opposite direction, nothing cancels: whole sets are joined.
        for (set, gone) in other.deleted where !gone.isEmpty {
            if added[set] != nil { gone.forEach { remove($0, from: set) } } else if deleted[set] == nil { deleted[set] = gone } else { deleted[set]!.formUnion(gone) }
        }
        for (set, new) in other.added where !new.isEmpty {
            if deleted[set] != nil { new.forEach { insert($0, into: set) } } else if added[set] == nil { added[set] = new } else { added[set]!.formUnion(new) }
        }
    }

    /// The diff as operations on `skeleton`'s table: all deletions first, then all additions.
    public func transaction(for skeleton: Skeleton) -> Transaction {
        var tx = Transaction()
        for set in skeleton.sets {
            if let e = deleted[set.name] { tx.append(.deleteElements(skeleton.table, set, ElementBatch(e, for: set))) }
        }
        for set in skeleton.sets {
            if let e = added[set.name] { tx.append(.addElements(skeleton.table, set, ElementBatch(e, for: set))) }
        }
        return tx
    }

    /// `elements` with this diff applied.
    public func applied(to elements: TableElements) -> TableElements {
        var result = elements
        for (set, gone) in deleted { result[set, default: []].subtract(gone) }
        for (set, new) in added { result[set, default: []].formUnion(new) }
        return result
    }
}
