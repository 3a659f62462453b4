import Dataplane
#if canImport(Glibc)
import Glibc
#endif

/// nftables in memory, for tests of what talks to the kernel without needing root: applies a `Transaction` to a
/// model of the table, all or nothing, and answers reads from it. It refuses what the kernel refuses in the
/// cases epokd meets: an element added twice or overlapping an interval (EEXIST), an element or set or table
/// that is not there (ENOENT), and any element `refuse` picks (EEXIST), naming the element as the kernel does.
public final class ModelKernel: NftablesKernel, @unchecked Sendable {
    private struct Table {
        var owner: String?
        var chains: [String: Int] = [:]
        var chainComments: [String: String] = [:]
        var sets: [String: (definition: NamedSet, elements: [ElementKey: Element])] = [:]
    }

    private var tables: [String: Table] = [:]
    /// Elements to refuse as if the kernel did, by set name and element.
    public var refuse: (String, Element) -> Bool = { _, _ in false }
    /// An error the next commit fails with, whatever it holds (then cleared).
    public var failNextCommit: NetlinkError?
    /// Transactions committed, and refused.
    public private(set) var commits = 0
    /// Reads of a table (each a dump of every set, in the kernel).
    public private(set) var reads = 0
    public private(set) var refusals = 0

    public init() {}

    public func commit(_ transaction: Transaction) throws(NetlinkError) {
        if let failure = failNextCommit {
            failNextCommit = nil
            refusals += 1
            throw failure
        }
        var model = tables
        let failures = apply(transaction, to: &model, stopAtFirst: true)
        if var first = failures.first {
            refusals += 1
            first.rejected = failures.flatMap(\.rejected)
            throw first
        }
        tables = model
        commits += 1
        ruleset = Self.generation(after: ruleset)
    }

    /// Moves with every commit, as the kernel's ruleset generation does.
    private var ruleset: UInt32 = 1

    public func generation() throws(NetlinkError) -> UInt32 { ruleset }

    public func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError) {
        guard generation == ruleset else { throw NetlinkError(code: ERESTART, operation: "commit transaction", subject: "the ruleset changed since it was read") }
        try commit(transaction)
    }

    public func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError] {
        var scratch = tables
        return apply(transaction, to: &scratch, stopAtFirst: false)
    }

    public func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable? {
        reads += 1
        guard let table = tables[skeleton.table.name] else { return nil }
        var sets: [String: KernelSet] = [:]
        for (name, set) in table.sets {
            let expected = skeleton.set(named: name)
            sets[name] = KernelSet(keyLength: set.definition.key.count, valueLength: set.definition.value?.count, comment: set.definition.comment,
                                   decodable: expected.map { $0.key == set.definition.key && $0.value == set.definition.value } ?? false,
                                   elements: Array(set.elements.values))
        }
        return KernelTable(owner: table.owner, chains: table.chains, chainComments: table.chainComments, sets: sets,
                           ownedSets: Set(table.sets.keys))
    }

    /// Removes an element behind epokd's back, as an operator's `nft delete element` would.
    public func removeByHand(_ element: Element, from set: String, table: String = "epok") {
        tables[table]?.sets[set]?.elements[element.identity] = nil
    }

    private func apply(_ transaction: Transaction, to model: inout [String: Table], stopAtFirst: Bool) -> [NetlinkError] {
        var failures: [NetlinkError] = []
        func fail(_ code: Int32, _ what: String, _ rejected: RejectedElement? = nil) {
            var error = NetlinkError(code: code, operation: "commit transaction", subject: what)
            if let rejected { error.rejected = [rejected] }
            failures.append(error)
        }
        for operation in transaction.operations {
            if stopAtFirst && !failures.isEmpty { break }
            switch operation {
            case .addTable(let t, let comment):
                if model[t.name] == nil { model[t.name] = Table(owner: comment) }
            case .deleteTable(let t):
                if model.removeValue(forKey: t.name) == nil { fail(ENOENT, "delete table \(t.name)") }
            case .addSet(let t, let set):
                guard model[t.name] != nil else { fail(ENOENT, "add set \(set.name): no table \(t.name)"); continue }
                if model[t.name]!.sets[set.name] == nil { model[t.name]!.sets[set.name] = (set, [:]) }
            case .deleteSet(let t, let name):
                if model[t.name]?.sets.removeValue(forKey: name) == nil { fail(ENOENT, "delete set \(name)") }
            case .addChain(let t, let chain, let comment):
                guard model[t.name] != nil else { fail(ENOENT, "add chain \(chain.name): no table \(t.name)"); continue }
                model[t.name]!.chains[chain.name, default: 0] += chain.rules.count
                if let comment { model[t.name]!.chainComments[chain.name] = comment }
            case .flushChain(let t, let name):
                if model[t.name]?.chains[name] == nil { fail(ENOENT, "flush chain \(name)") } else { model[t.name]!.chains[name] = 0 }
            case .deleteChain(let t, let name):
                if model[t.name]?.chains.removeValue(forKey: name) == nil { fail(ENOENT, "delete chain \(name)") }
                model[t.name]?.chainComments[name] = nil
            case .addElements(let t, let set, let elements):
                guard var target = model[t.name]?.sets[set.name] else { fail(ENOENT, "add elements: no set \(set.name)"); continue }
                for element in elements {
                    let overlapping = target.definition.interval && target.elements.values.contains { overlaps($0, element) }
                    if target.elements[element.identity] != nil || overlapping || refuse(set.name, element) {
                        fail(EEXIST, "set \(set.name): add element \(element) rejected", RejectedElement(set: set.name, element: element))
                        break
                    }
                    target.elements[element.identity] = element
                }
                model[t.name]!.sets[set.name] = target
            case .deleteElements(let t, let set, let elements):
                guard var target = model[t.name]?.sets[set.name] else { fail(ENOENT, "delete elements: no set \(set.name)"); continue }
                for element in elements {
                    guard target.elements.removeValue(forKey: element.identity) != nil else {
                        fail(ENOENT, "set \(set.name): delete element \(element) rejected", RejectedElement(set: set.name, element: element))
                        break
                    }
                }
                model[t.name]!.sets[set.name] = target
            }
        }
        return failures
    }

    /// Whether two interval elements with the same fixed fields cover a common key.
    private func overlaps(_ a: Element, _ b: Element) -> Bool {
        guard let aEnd = a.keyEnd, let bEnd = b.keyEnd, a.key.dropLast() == b.key.dropLast(),
              let aFirst = a.key.last, let bFirst = b.key.last, let aLast = aEnd.last, let bLast = bEnd.last else { return false }
        return !(aLast < bFirst || bLast < aFirst)
    }
}

/// Conntrack in memory: records what it was asked to delete.
public final class RecordingFlowRemover: StaleFlowRemover, @unchecked Sendable {
    public private(set) var deletions: [[StaleFlows]] = []
    public private(set) var egressDeletions: [[StaleEgress]] = []
    public init() {}
    public func delete(_ stale: [StaleFlows]) throws(NetlinkError) -> Int {
        deletions.append(stale)
        return 0
    }
    public func delete(egress stale: [StaleEgress]) throws(NetlinkError) -> Int {
        egressDeletions.append(stale)
        return 0
    }
}
