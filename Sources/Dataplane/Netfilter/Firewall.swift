#if canImport(Glibc)
import Glibc
#endif

/// Keeps one table in the kernel equal to a skeleton plus desired elements,
/// sending only element diffs, each as one transaction.
public final class Firewall {
    /// What a call changed in the kernel.
    public struct Outcome: Sendable, Equatable {
        /// The skeleton was (re)created, with every element, in one transaction.
        public var rebuilt: Bool
        /// Of a rebuilt skeleton, the sets that were kept in place with their elements and counters (unchanged
        /// definitions), which got only their element diff.
        public var keptSets: Int
        /// epokd's chains were replaced around the sets, which kept their elements (`added` and `deleted` are the
        /// element diff of the same transaction).
        public var chainsReplaced: Bool
        public var added: Int
        public var deleted: Int
        /// The skeleton change the kernel refused (EBUSY: a rule outside epokd's chains names a set that must be
        /// made anew), naming that rule; the element diff was committed to the sets in place instead.
        public var skeletonBlocked: NetlinkError?
        public var changed: Bool { rebuilt || chainsReplaced || added > 0 || deleted > 0 }

        public init(rebuilt: Bool, keptSets: Int = 0, chainsReplaced: Bool = false, added: Int, deleted: Int,
                    skeletonBlocked: NetlinkError? = nil) {
            self.rebuilt = rebuilt
            self.keptSets = keptSets
            self.chainsReplaced = chainsReplaced
            self.added = added
            self.deleted = deleted
            self.skeletonBlocked = skeletonBlocked
        }
    }

    public private(set) var skeleton: Skeleton
    private let nftables: any NftablesKernel
    /// What the kernel holds, as of the last successful commit or read; nil when unknown.
    public private(set) var applied: TableElements? {
        get {
            switch state {
            case .unknown: nil
            case .held(let elements): elements
            case .keptByCaller(let current): current()
            }
        }
        set { state = newValue.map(AppliedState.held) ?? .unknown }
    }

    /// Where the applied state is: nowhere (unknown), here, or with the caller of `apply(diff:leadingTo:)`.
    private enum AppliedState {
        case unknown
        case held(TableElements)
        case keptByCaller(() -> TableElements)
    }

    private var state = AppliedState.unknown
    /// What the last `synchronize` found in a table of this skeleton, before changing it; nil if there was none.
    public private(set) var foundInKernel: TableElements?
    /// epokd's chains in the kernel, when a switch to a skeleton with the same sets left them for the next commit
    /// to replace (see `use(_:)`).
    private var chainsToReplace: [String]?

    public init(skeleton: Skeleton, nftables: any NftablesKernel) {
        self.skeleton = skeleton
        self.nftables = nftables
    }

    /// Switches to another skeleton of the same table. When only epokd's chains differ and the kernel's state is
    /// known, the next commit (`apply`) replaces them in the transaction of its element diff, reading nothing
    /// back; otherwise the next `synchronize` replaces the kernel's table with it, every element included, in one
    /// transaction (its chains alone when the sets are the same).
    public func use(_ newSkeleton: Skeleton) {
        precondition(newSkeleton.table == skeleton.table, "a firewall keeps one table")
        guard newSkeleton != skeleton else { return }
        if applied != nil, newSkeleton.setsFingerprint == skeleton.setsFingerprint {
            // The kernel still holds the chains it held before any switch not yet committed.
            chainsToReplace = chainsToReplace ?? skeleton.chains.map(\.name)
        } else {
            applied = nil
            chainsToReplace = nil
        }
        skeleton = newSkeleton
    }

    /// The set that holds a stamp (see `synchronize(_:stamp:)`): one element, whose comment says what the table
    /// was made from and at which ruleset generation. A skeleton that has it can be stamped.
    public static let stampSet = NamedSet(name: "stamp", key: [.mark])

    /// Reads the kernel's table and moves it to `desired`: recreates the skeleton atomically if it differs (or is
    /// missing), otherwise commits only the element diff, with epokd's chains replaced when only they differ.
    /// Repairs any drift. When the kernel refuses the skeleton change because an operator's rule names a set that
    /// must be made anew, the element diff goes into the sets in place and `Outcome.skeletonBlocked` says why;
    /// every later commit tries the skeleton again.
    ///
    /// With `stamp` (a digest of everything `desired` was computed from), the transaction also records the stamp
    /// and the generation the commit leaves, and is committed only if nothing else was committed since the read;
    /// `stamped(_:)` then tells, until anyone commits anything, that the kernel holds exactly what that input makes.
    @discardableResult
    public func synchronize(_ desired: TableElements, stamp: String? = nil) throws(NetlinkError) -> Outcome {
        guard let stamp, skeleton.set(named: Self.stampSet.name) != nil else { return try synchronize(desired, generation: nil) }
        var attempt = 0
        while true {
            let generation = try nftables.generation()
            var withStamp = desired
            let next = Nftables.generation(after: generation)
            withStamp[Self.stampSet.name] = [Element(key: [.mark(0)], comment: "\(stamp) generation \(next)")]
            do {
                return try synchronize(withStamp, generation: generation)
            } catch where error.code == ERESTART && attempt < 10 {
                // Someone committed between the read and the commit: read again.
                attempt += 1
            }
        }
    }

    /// The ruleset generation (it moves with every commit, anyone's).
    public func generation() throws(NetlinkError) -> UInt32 { try nftables.generation() }

    /// Whether `kernel` (a read of `skeleton`'s table, compared with `applied`, or full) is `skeleton` holding
    /// exactly `applied` with `diff` applied (the commits made since `applied`, before the read): no drift. The
    /// sets the ruleset fills itself (per-source buckets) and other programs' (trace selectors) are not compared.
    public static func holds(_ kernel: KernelTable?, _ applied: TableElements, after diff: ElementDiff = ElementDiff(),
                             skeleton: Skeleton) -> Bool {
        guard let kernel, kernel.isEpokds, kernel.matches(skeleton) else { return false }
        for set in skeleton.sets where set.holdsDesiredElements {
            guard let found = kernel.sets[set.name] else { return false }
            let expected = applied[set.name] ?? []
            let added = diff.added[set.name] ?? [], deleted = diff.deleted[set.name] ?? []
            guard let matched = found.matched else {
                let wanted = diff.applied(to: [set.name: expected])[set.name] ?? []
                guard Set(found.elements) == wanted, found.elements.count == wanted.count else { return false }
                continue
            }
            // Compared with `applied`: the others are what the diff added, and of `applied` all but what it deleted.
            let new = added.subtracting(expected)
            guard found.elements.count == new.count, Set(found.elements) == new else { return false }
            var gone = 0
            for element in deleted {
                guard let index = expected.firstIndex(of: element) else { continue }
                if matched.contains(index) { return false }
                gone += 1
            }
            guard matched.count == expected.count - gone else { return false }
        }
        return true
    }

    /// Whether the kernel's table was last made by a `synchronize` stamped `stamp`, and nothing was committed since.
    public func stamped(_ stamp: String) throws(NetlinkError) -> Bool {
        try stamped { stamp }
    }

    /// `stamped(_:)` of the stamp `make` returns, asked for only when the table has a stamp to compare it with
    /// (nil: the input cannot be stamped, so the table is not what it makes).
    public func stamped(_ make: () -> String?) throws(NetlinkError) -> Bool {
        guard skeleton.set(named: Self.stampSet.name) != nil else { return false }
        let before = try nftables.generation()
        let only = Skeleton(table: skeleton.table, sets: [Self.stampSet], chains: [])
        guard let kernel = try nftables.read(only), kernel.isEpokds,
              let comment = kernel.sets[Self.stampSet.name]?.elements.first?.comment,
              try nftables.generation() == before, let stamp = make() else { return false }
        return comment == "\(stamp) generation \(before)"
    }

    private func synchronize(_ desired: TableElements, generation: UInt32?) throws(NetlinkError) -> Outcome {
        applied = nil
        chainsToReplace = nil
        // Compared as it is read: no second copy of a large table is held beside `desired`. A table to reshape
        // (rare: another skeleton's) is read again in full, for the sets it keeps.
        var kernel = try readOwned(comparedWith: desired)
        let held = kernel.flatMap { $0.holdsSets(of: skeleton) ? $0.elements(comparedWith: desired) : nil }
        if kernel != nil && held == nil { kernel = try readOwned() }
        foundInKernel = held
        guard let kernel, let held else {
            let transaction = Transaction.create(skeleton, elements: desired, existing: kernel)
            do {
                try commit(transaction, at: generation)
            } catch where error.code == EBUSY {
                let refusal = blocked(error, owned: kernel?.ownedChains ?? [])
                guard let kernel, refusal.undeletableSet != nil else { throw refusal }
                return try inPlace(kernel, desired, at: generation, blocked: refusal)
            }
            applied = desired
            let made = transaction.operations.count { if case .addSet = $0 { true } else { false } }
            let counts = transaction.elementCounts
            return Outcome(rebuilt: true, keptSets: skeleton.sets.count - made, added: counts.added, deleted: counts.deleted)
        }
        // When only epokd's chains differ (a feature's chain comes or goes), they are replaced around the sets,
        // whose elements and counters stay, in the transaction that commits the element diff.
        if !kernel.matches(skeleton) { chainsToReplace = Array(kernel.ownedChains) }
        applied = held
        return try move(from: held, to: desired, at: generation)
    }

    /// Commits the element diff of every set the kernel holds as epokd made it, in a layout `desired`'s elements
    /// fit, leaving the kernel's skeleton (its chains and the other sets) as it is: what a blocked skeleton change
    /// still lets through. The per-source buckets and the stamp are left alone (the table is not what the input makes).
    private func inPlace(_ kernel: KernelTable, _ desired: TableElements, at generation: UInt32?,
                         blocked: NetlinkError) throws(NetlinkError) -> Outcome {
        var current: TableElements = [:], wanted: TableElements = [:]
        for set in skeleton.sets where set.holdsDesiredElements && set.name != Self.stampSet.name && kernel.ownedSets.contains(set.name) {
            guard let held = kernel.sets[set.name], held.decodable else { continue }
            current[set.name] = Set(held.elements)
            wanted[set.name] = desired[set.name] ?? []
        }
        let diff = ElementDiff(from: current, to: wanted)
        if !diff.isEmpty { try commit(diff.transaction(for: skeleton), at: generation) }
        return Outcome(rebuilt: false, added: diff.addedCount, deleted: diff.deletedCount, skeletonBlocked: blocked)
    }

    /// Commits the element diff from `current` (what the kernel holds) to `desired`.
    private func move(from current: TableElements, to desired: TableElements, at generation: UInt32?) throws(NetlinkError) -> Outcome {
        let outcome = try commit(ElementDiff(from: current, to: desired), at: generation)
        applied = desired
        return outcome
    }

    /// Commits `diff`, after the replacement of epokd's chains `use(_:)` left to the next commit, if any; nothing
    /// when there is nothing to do. On failure nothing of the kernel is known any more.
    private func commit(_ diff: ElementDiff, at generation: UInt32?) throws(NetlinkError) -> Outcome {
        guard !diff.isEmpty || chainsToReplace != nil else { return Outcome(rebuilt: false, added: 0, deleted: 0) }
        let replaced = chainsToReplace != nil
        do {
            try commit(withChains(diff.transaction(for: skeleton)), at: generation)
        } catch {
            // The kernel is unchanged, but our picture of it may have been wrong: re-read next time.
            applied = nil
            chainsToReplace = nil
            throw error
        }
        return Outcome(rebuilt: false, chainsReplaced: replaced, added: diff.addedCount, deleted: diff.deletedCount)
    }

    /// `elementChanges` after the replacement of epokd's chains `use(_:)` left to the next commit, if any (which
    /// is then done, once committed).
    private func withChains(_ elementChanges: Transaction) -> Transaction {
        guard let chains = chainsToReplace else { return elementChanges }
        var transaction = Transaction.replaceChains(skeleton, replacing: chains)
        for operation in elementChanges.operations { transaction.append(operation) }
        chainsToReplace = nil
        return transaction
    }

    private func commit(_ transaction: Transaction, at generation: UInt32?) throws(NetlinkError) {
        if let generation { try nftables.commit(transaction, atGeneration: generation) } else { try nftables.commit(transaction) }
    }

    /// Moves the kernel from the last applied state to `desired` with one element-diff transaction
    /// (reading the kernel first if the applied state is unknown). On failure the kernel keeps its previous state.
    @discardableResult
    public func apply(_ desired: TableElements) throws(NetlinkError) -> Outcome {
        guard let applied else { return try synchronize(desired) }
        return try move(from: applied, to: desired, at: nil)
    }

    /// Commits a diff computed by the caller against the applied state (see `LiveDesiredState`), without
    /// comparing whole states: the cost follows the size of the change, not of the table.
    ///
    /// A caller that holds the state the diff leads to passes it as `current`, which from then on is the applied
    /// state: it must give the state as committed until the next commit. The firewall then keeps no table of its
    /// own, which would otherwise be a second copy of a large one (at 50k mappings, 7 MB more from the caller's
    /// first change on, both kept up to date change by change).
    @discardableResult
    public func apply(diff: ElementDiff, leadingTo current: (() -> TableElements)? = nil) throws(NetlinkError) -> Outcome {
        if case .unknown = state {
            throw NetlinkError(code: ESTALE, operation: "apply element diff", subject: "the kernel's state is unknown; synchronize first")
        }
        let outcome = try commit(diff, at: nil)
        if let current {
            state = .keptByCaller(current)
        } else if case .held(var elements) = state {
            state = .unknown
            for (set, gone) in diff.deleted { elements[set, default: []].subtract(gone) }
            for (set, new) in diff.added { elements[set, default: []].formUnion(new) }
            state = .held(elements)
        }
        return outcome
    }

    /// What `synchronize(desired)` would change, read from the kernel without touching it (the stamp aside: it
    /// is bookkeeping); nil when the skeleton would be (re)created whole (not when only epokd's chains would be
    /// replaced: the sets keep their elements).
    public func plan(_ desired: TableElements) throws(NetlinkError) -> ElementDiff? {
        guard let kernel = try readOwned(), kernel.holdsSets(of: skeleton) else { return nil }
        var desired = desired
        desired[Self.stampSet.name] = kernel.elements[Self.stampSet.name]
        return ElementDiff(from: kernel.elements, to: desired)
    }

    /// The refusals, each naming its element, that moving the kernel to `desired` would meet, found without changing anything: the
    /// transaction that would move the kernel there is sent for validation only, one element per message,
    /// so the kernel names every element it refuses (it goes on after a refusal).
    public func rejectedElements(_ desired: TableElements) throws(NetlinkError) -> [NetlinkError] {
        let kernel = try readOwned()
        var check = Transaction()
        let additions: TableElements
        // When only epokd's chains differ, the sets stay (the commit replaces the chains around them): the element
        // diff is what the kernel would meet, not every element again.
        if let kernel, kernel.holdsSets(of: skeleton) {
            let diff = ElementDiff(from: kernel.elements, to: desired)
            for set in skeleton.sets {
                if let gone = diff.deleted[set.name] { check.append(.deleteElements(skeleton.table, set, ElementBatch(gone, for: set))) }
            }
            additions = diff.added
        } else {
            check = Transaction.create(skeleton, elements: [:], existing: kernel)
            additions = desired
        }
        for set in skeleton.sets {
            for element in ElementBatch(additions[set.name] ?? [], for: set) {
                check.append(.addElements(skeleton.table, set, [element]))
            }
        }
        return try nftables.check(check).filter { !$0.rejected.isEmpty }
    }

    /// `error` (EBUSY), saying which rules outside epokd's `owned` chains name the set it had to make anew.
    private func blocked(_ error: NetlinkError, owned: Set<String>) -> NetlinkError {
        guard let set = error.undeletableSet else { return error }
        var blocked = error
        let rules = (try? nftables.rules(naming: set, in: skeleton.table, outside: owned)) ?? []
        let table = "\(skeleton.table.family) \(skeleton.table.name)"
        blocked.subject = "the skeleton changed and set \(set) must be made anew, but "
            + (rules.isEmpty ? "something outside epokd's chains still uses it"
                : rules.map(\.description).joined(separator: "; ") + " names it (nft delete rule \(table) \(Escaped.text(rules[0].chain, limit: 100)) handle \(rules[0].handle), or point it elsewhere)")
            + "; epokd keeps the table's rules and sets as they are, changes their elements, and retries with every commit"
        return blocked
    }

    /// Deletes the table (no-op if absent); refuses to delete a table of that name that is not epokd's.
    public func remove() throws(NetlinkError) {
        applied = nil
        // The table's comment says whose it is: its sets and chains need not be read.
        guard try readOwned(Skeleton(table: skeleton.table, sets: [], chains: [])) != nil else { return }
        var tx = Transaction()
        tx.append(.deleteTable(skeleton.table))
        do {
            try nftables.commit(tx)
        } catch where error.code == ENOENT {
            return
        }
    }

    /// The elements the kernel's table holds in the sets named (those of the skeleton's that it has), or nil when
    /// there is no such table of epokd's: what the table says before epokd changes it (who held what at start).
    public func held(_ names: Set<String>) throws(NetlinkError) -> TableElements? {
        let parts = Skeleton(table: skeleton.table, sets: skeleton.sets.filter { names.contains($0.name) }, chains: [])
        return try readOwned(parts)?.elements.filter { names.contains($0.key) }
    }

    /// The kernel's table of this name (with `parts` of it, or all of the skeleton), if there is one and epokd
    /// made it (its comment is a skeleton fingerprint); a table of that name made by anyone else is an error,
    /// never replaced or deleted.
    private func readOwned(_ parts: Skeleton? = nil, comparedWith expected: TableElements? = nil) throws(NetlinkError) -> KernelTable? {
        let read: KernelTable?
        if let expected { read = try nftables.read(parts ?? skeleton, comparedWith: expected) } else { read = try nftables.read(parts ?? skeleton) }
        guard let kernel = read else { return nil }
        guard kernel.isEpokds else {
            let table = skeleton.table
            throw NetlinkError(code: EEXIST, operation: "table \(table.family) \(table.name) exists and is not epokd's",
                               subject: "choose another --table (epokd changes and deletes only tables it made; this one has no epokd skeleton comment)")
        }
        return kernel
    }
}
