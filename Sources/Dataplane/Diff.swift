/// Elements of every set of a table, by set name: the state a transaction moves the kernel to.
public typealias TableElements = [String: Set<Element>]

/// The element changes that turn one table state into another.
public struct ElementDiff: Sendable, Equatable {
    /// Elements to delete, by set name; applied before `added`.
    public var deleted: [String: [Element]] = [:]
    /// Elements to add, by set name.
    public var added: [String: [Element]] = [:]

    public init() {}

    /// The minimal changes from `current` to `desired`. Elements are matched by key (and key range):
    /// a map element whose value changed is deleted and added again, in the same transaction.
    public init(from current: TableElements, to desired: TableElements) {
        for name in Set(current.keys).union(desired.keys) {
            let have = current[name] ?? []
            let want = desired[name] ?? []
            let removed = have.subtracting(want)
            let new = want.subtracting(have)
            if !removed.isEmpty { deleted[name] = Array(removed) }
            if !new.isEmpty { added[name] = Array(new) }
        }
    }

    public var isEmpty: Bool { deleted.isEmpty && added.isEmpty }
    public var addedCount: Int { added.values.reduce(0) { $0 + $1.count } }
    public var deletedCount: Int { deleted.values.reduce(0) { $0 + $1.count } }

    /// The diff as operations on `skeleton`'s table: all deletions first, then all additions.
    public func transaction(for skeleton: Skeleton) -> Transaction {
        var tx = Transaction()
        for set in skeleton.sets {
            if let e = deleted[set.name] { tx.append(.deleteElements(skeleton.table, set, e)) }
        }
        for set in skeleton.sets {
            if let e = added[set.name] { tx.append(.addElements(skeleton.table, set, e)) }
        }
        return tx
    }
}
