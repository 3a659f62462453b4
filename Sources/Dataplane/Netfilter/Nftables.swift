import CNetfilter
#if canImport(Glibc)
import Glibc
#endif

/// A table as the kernel holds it, read back over netlink.
public struct KernelTable: Sendable {
    /// The table's comment: a skeleton fingerprint when epokd made the table.
    public var owner: String?
    /// The skeleton fingerprint epokd's chains carry, when they all carry the same one.
    public var fingerprint: String?
    /// Rules per chain, every chain of the table.
    public var chains: [String: Int]
    /// The chains epokd made (their comment is a skeleton fingerprint).
    public var ownedChains: Set<String>
    public var sets: [String: KernelSet]
    /// The sets epokd made (their comment is `NamedSet.ownerComment`).
    public var ownedSets: Set<String>

    public init(owner: String?, chains: [String: Int], chainComments: [String: String], sets: [String: KernelSet], ownedSets: Set<String>) {
        self.owner = owner
        self.chains = chains
        let marked = chainComments.filter { $0.value.hasPrefix(Skeleton.fingerprintPrefix) }
        ownedChains = Set(marked.keys)
        fingerprint = Set(marked.values).count == 1 ? marked.values.first : nil
        self.sets = sets
        self.ownedSets = ownedSets
    }

    /// Whether epokd made this table (its comment carries the mark).
    public var isEpokds: Bool { owner?.hasPrefix(Skeleton.fingerprintPrefix) == true }

    /// Whether the kernel holds exactly `skeleton`'s chains and sets, and its user chains.
    public func matches(_ skeleton: Skeleton) -> Bool {
        fingerprint == skeleton.fingerprint && ownedChains == Set(skeleton.chains.map(\.name))
            && skeleton.chains.allSatisfy({ chains[$0.name] == $0.rules.count }) && holdsSets(of: skeleton)
    }

    /// Whether the kernel holds `skeleton`'s sets, made by epokd and all read, and its user chains: only epokd's
    /// chains may differ, so `Transaction.replaceChains` reaches the skeleton with every element and counter kept.
    public func holdsSets(of skeleton: Skeleton) -> Bool {
        guard let fingerprint, fingerprint.hasPrefix(skeleton.setsFingerprint + "."),
              skeleton.userChains.allSatisfy({ chains[$0] != nil }),
              ownedSets == Set(skeleton.sets.map(\.name)) else { return false }
        return skeleton.sets.allSatisfy { sets[$0.name]?.decodable == true }
    }

    /// Whether the kernel holds `set` as epokd made it, with the same definition, and read: a skeleton change keeps it.
    public func keeps(_ set: NamedSet) -> Bool {
        guard ownedSets.contains(set.name), let held = sets[set.name] else { return false }
        return held.decodable && held.comment == set.comment
    }

    /// The elements of every set epokd made, by set name (of a full read).
    public var elements: [String: Set<Element>] {
        precondition(sets.values.allSatisfy { $0.matched == nil }, "the elements of a compared read are those of the expected state")
        return sets.filter { ownedSets.contains($0.key) }.mapValues { Set($0.elements) }
    }

    /// The elements of every set epokd made, by set name, of a read compared with `expected` (what that read was
    /// compared with): the expected elements found, shared with `expected` when all of them were, and the others.
    public func elements(comparedWith expected: TableElements) -> TableElements {
        var result: TableElements = [:]
        for (name, set) in sets where ownedSets.contains(name) {
            guard let matched = set.matched, let wanted = expected[name] else {
                result[name] = Set(set.elements)
                continue
            }
            var found = matched.count == wanted.count ? wanted : Set(matched.map { wanted[$0] })
            found.formUnion(set.elements)
            result[name] = found
        }
        return result
    }

    /// Whether two reads found the same skeleton and elements (counters aside), with no element twice.
    func sameContent(as other: KernelTable?) -> Bool {
        guard let other, fingerprint == other.fingerprint, chains == other.chains, Set(sets.keys) == Set(other.sets.keys),
              ownedSets == other.ownedSets, ownedChains == other.ownedChains else {
            return false
        }
        return sets.allSatisfy { name, set in
            let mine = Set(set.elements), theirs = Set(other.sets[name]!.elements)
            return mine.count == set.elements.count && theirs.count == other.sets[name]!.elements.count && mine == theirs
                && set.matched == other.sets[name]!.matched && !set.repeated && !other.sets[name]!.repeated
        }
    }
}

/// A rule, by its chain and handle (`nft delete rule inet TABLE CHAIN handle N`).
public struct RuleReference: Hashable, Sendable, CustomStringConvertible {
    public var chain: String
    public var handle: UInt64
    public init(chain: String, handle: UInt64) {
        self.chain = chain
        self.handle = handle
    }
    public var description: String { "chain \(Escaped.text(chain, limit: 100)), handle \(handle)" }
}

/// The positions in a set of the elements a read compared with it found, in order, each once: 16 bytes an element
/// (a `Set` of them took 40 at 50k elements, and a read-back holds two dumps at once to see that they agree).
public struct MatchedPositions: Equatable, Sendable, Sequence {
    private let positions: [Set<Element>.Index]
    /// Whether some position was found more than once.
    let repeated: Bool

    /// The positions found, in any order, repeats included (sorted in place).
    init(found: consuming [Set<Element>.Index]) {
        found.sort()
        var write = 0
        for read in found.indices where write == 0 || found[write - 1] != found[read] {
            found[write] = found[read]
            write += 1
        }
        repeated = write < found.count
        found.removeLast(found.count - write)
        positions = found
    }

    public var count: Int { positions.count }

    public func contains(_ position: Set<Element>.Index) -> Bool {
        var low = 0, high = positions.count
        while low < high {
            let middle = (low + high) / 2
            if positions[middle] < position { low = middle + 1 } else { high = middle }
        }
        return low < positions.count && positions[low] == position
    }

    public func makeIterator() -> IndexingIterator<[Set<Element>.Index]> { positions.makeIterator() }
}

/// A set or map as the kernel holds it.
public struct KernelSet: Sendable {
    public var keyLength: Int
    public var valueLength: Int?
    /// The set's comment (for epokd's sets, `NamedSet.comment`: the owner mark and a digest of the definition).
    public var comment: String?
    /// Whether the kernel's key and value layout (and interval flag) is the one expected, so `elements` are complete.
    public var decodable: Bool
    /// Every element; in a read compared with the elements expected, only those that are not among them.
    public var elements: [Element]
    /// In a read compared with the elements expected (`Nftables.read(_:comparedWith:)`), which of them the kernel
    /// holds (kept as positions in the expected set, not as copies); nil in a full read.
    public var matched: MatchedPositions?
    /// Whether a compared read found an expected element twice (a dump that repeated it counts for nothing).
    var repeated = false
    /// Per-element counters, for sets created with `counters` (not in a compared read).
    public var counters: [ElementKey: ElementCounter]

    public init(keyLength: Int, valueLength: Int?, comment: String? = nil, decodable: Bool, elements: [Element],
                counters: [ElementKey: ElementCounter] = [:]) {
        self.keyLength = keyLength
        self.valueLength = valueLength
        self.comment = comment
        self.decodable = decodable
        self.elements = elements
        self.counters = counters
    }
}

/// What `Firewall` needs of the kernel's nftables: commit a transaction, validate one without committing,
/// read a table back. `Nftables` is the kernel; tests may wrap it to inject refusals.
public protocol NftablesKernel: AnyObject {
    func commit(_ transaction: Transaction) throws(NetlinkError)
    func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError]
    func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable?
    /// `read(_:)`, each set's elements compared with `expected` as they are read: those expected are only marked
    /// found (`KernelSet.matched`), so a read-back holds no second copy of a large table. A kernel that cannot
    /// compare reads in full (`matched` nil). At most `attempts` dumps (EAGAIN when no two agreed at one generation).
    func read(_ skeleton: Skeleton, comparedWith expected: TableElements, attempts: Int) throws(NetlinkError) -> KernelTable?
    /// The ruleset generation: it moves with every committed transaction, anyone's.
    func generation() throws(NetlinkError) -> UInt32
    /// The rules of `table` that name the set or map `set`, outside `chains`.
    func rules(naming set: String, in table: Table, outside chains: Set<String>) throws(NetlinkError) -> [RuleReference]
    /// Commits `transaction` only if the ruleset is still at `generation` (ERESTART if anything was committed since).
    func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError)
}

extension NftablesKernel {
    public func read(_ skeleton: Skeleton, comparedWith expected: TableElements, attempts: Int) throws(NetlinkError) -> KernelTable? {
        try read(skeleton)
    }

    /// `read(_:comparedWith:attempts:)` until two dumps agree (1,000 dumps at most).
    public func read(_ skeleton: Skeleton, comparedWith expected: TableElements) throws(NetlinkError) -> KernelTable? {
        try read(skeleton, comparedWith: expected, attempts: 1000)
    }

    /// None, for a kernel that cannot say (a model, a test's wrapper).
    public func rules(naming set: String, in table: Table, outside chains: Set<String>) throws(NetlinkError) -> [RuleReference] { [] }

    /// The generation a commit made at `generation` leaves (the kernel skips 0).
    public static func generation(after generation: UInt32) -> UInt32 { generation == .max ? 1 : generation + 1 }
}

/// The one door to the kernel's nftables: commits transactions and reads tables back.
public final class Nftables: NftablesKernel {
    private let socket: NetlinkSocket

    /// Connects to nftables in the network namespace at `namespacePath`, or in the process's own.
    public init(namespacePath: String? = nil) throws(NetlinkError) {
        socket = try NetlinkSocket(bus: NETLINK_NETFILTER, namespacePath: namespacePath)
        try socket.prepareForReplies()
    }

    /// Commits `transaction` as one batch. Either every operation takes effect or none does;
    /// the error names the operation (and element) the kernel rejected, and lists in `rejected` the
    /// first rejected element of every message the kernel refused.
    public func commit(_ transaction: Transaction) throws(NetlinkError) {
        try commit(transaction, generation: nil)
    }

    public func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError) {
        try commit(transaction, generation: generation)
    }

    private func commit(_ transaction: Transaction, generation: UInt32?) throws(NetlinkError) {
        let failures = try send(transaction, commit: true, generation: generation)
        guard var first = failures.first else { return }
        first.rejected = failures.flatMap(\.rejected)
        throw first
    }

    /// Sends `transaction` for the kernel to validate, then abort: nothing changes. Returns one error per
    /// message the kernel refused (the kernel goes on after a refusal, so this finds every refused
    /// operation; send one element per operation to find every refused element).
    public func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError] {
        try send(transaction, commit: false)
    }

    private func send(_ transaction: Transaction, commit: Bool, generation: UInt32? = nil) throws(NetlinkError) -> [NetlinkError] {
        guard !transaction.isEmpty else { return [] }
        let builder = BatchBuilder(startSequence: socket.nextSequence(count: 0))
        try builder.build(transaction, commit: commit, generation: generation)
        _ = socket.nextSequence(count: builder.sequenceCount)
        try socket.ensureSendBuffer(builder.byteCount)
        let operation = "\(commit ? "commit" : "check") transaction of \(transaction.operations.count) operations (\(builder.byteCount) bytes)"
        let sent = cnf_batch_send(socket.fd, builder.batch)
        guard sent >= 0 else { throw NetlinkError(code: Int32(-sent), operation: operation) }

        // The kernel processes the batch inside sendmsg: its answers are queued by now.
        var acknowledged = false
        var failures: [NetlinkError] = []
        var wait = true
        while let datagram = try socket.receive(wait: wait, operation: operation) {
            wait = false
            try NetlinkMessages.forEach(in: datagram) { (header, pointer) throws(NetlinkError) in
                guard Int32(header.nlmsg_type) == NLMSG_ERROR else { return }
                guard let index = builder.operationOfSequence[header.nlmsg_seq] else {
                    // The batch as a whole refused (ERESTART: the generation moved); nothing in it was applied.
                    let reply = NetlinkMessages.errorReply(pointer)
                    if header.nlmsg_seq == builder.firstSequence, reply.code != 0 {
                        failures.append(NetlinkError(code: reply.code, operation: operation,
                                                     subject: reply.code == ERESTART ? "the ruleset changed since it was read" : "the batch was refused"))
                    }
                    return
                }
                let reply = NetlinkMessages.errorReply(pointer)
                if reply.code == 0 {
                    if header.nlmsg_seq == builder.lastOperationSequence { acknowledged = true }
                    return
                }
                let op = transaction.operations[index]
                let rejected = rejectedElement(op, builder: builder, sequence: header.nlmsg_seq, attributeOffset: reply.attributeOffset)
                var subject = op.summary
                if let rejected {
                    let verb = if case .addElements = op { "add" } else { "delete" }
                    subject = "table \(op.table.name): \(rejected.set.isMap ? "map" : "set") \(rejected.set.name): \(verb) element \(rejected.element) rejected"
                }
                var failure = NetlinkError(code: reply.code, operation: "\(commit ? "commit" : "check") transaction",
                                           subject: subject, kernelMessage: reply.message)
                if let rejected { failure.rejected = [RejectedElement(set: rejected.set.name, element: rejected.element)] }
                if case .deleteSet(_, let name) = op { failure.undeletableSet = name }
                failures.append(failure)
            }
        }
        if !failures.isEmpty { return failures }
        guard acknowledged else {
            throw NetlinkError(code: EPROTO, operation: operation, subject: "the kernel did not acknowledge the last operation")
        }
        return []
    }

    /// The element a refused element message points at (by the extended ack's attribute offset).
    private func rejectedElement(_ op: Transaction.Operation, builder: BatchBuilder, sequence: UInt32,
                                 attributeOffset: Int?) -> (set: NamedSet, element: Element)? {
        switch op {
        case .addElements(_, let set, let elements), .deleteElements(_, let set, let elements):
            var before = 0
            var s = sequence &- 1
            while builder.operationOfSequence[s] == builder.operationOfSequence[sequence], let m = builder.message(withSequence: s) {
                before += ElementMessage.elementRanges(m).count
                s &-= 1
            }
            if let attributeOffset, let m = builder.message(withSequence: sequence),
               let local = ElementMessage.elementRanges(m).firstIndex(where: { $0.contains(attributeOffset) }),
               let element = elements.element(at: before + local) {
                return (set, element)
            }
            // One element per message needs no offset.
            if elements.count == 1, let element = elements.element(at: 0) { return (set, element) }
            return nil
        default:
            return nil
        }
    }

    /// Reads `table` back, decoding elements with the types of the sets in `skeleton`; nil if the table does not exist.
    ///
    /// A dump spans many messages, and neither a commit nor the kernel's own resizing of a hash set
    /// (which runs after large insertions) stops one: a single dump can miss or repeat elements. A read
    /// therefore counts only when two consecutive dumps agree and the ruleset generation did not move.
    public func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable? {
        try read(skeleton, comparedWith: nil)
    }

    public func read(_ skeleton: Skeleton, comparedWith expected: TableElements, attempts: Int) throws(NetlinkError) -> KernelTable? {
        try read(skeleton, comparedWith: .some(expected), attempts: attempts)
    }

    private func read(_ skeleton: Skeleton, comparedWith expected: TableElements?, attempts: Int = 1000) throws(NetlinkError) -> KernelTable? {
        var previous: KernelTable??
        for _ in 0..<attempts {
            let before = try generation()
            let table: KernelTable?
            do {
                table = try readOnce(skeleton, comparedWith: expected)
            } catch where error.code == EINTR {
                previous = nil
                continue
            }
            guard try generation() == before else {
                previous = nil
                continue
            }
            if let previous, previous?.sameContent(as: table) ?? (table == nil) { return table }
            previous = .some(table)
        }
        throw NetlinkError(code: EAGAIN, operation: "read table \(skeleton.table.name)",
                           subject: "no two consecutive dumps agreed in \(attempts) attempts")
    }

    public func rules(naming set: String, in table: Table, outside chains: Set<String>) throws(NetlinkError) -> [RuleReference] {
        var found: [RuleReference] = []
        try forEachRule(of: table) { (rule, chain) throws(NetlinkError) in
            guard !chains.contains(chain), cnf_rule_names_set(rule, set) != 0 else { return }
            found.append(RuleReference(chain: chain, handle: nftnl_rule_get_u64(rule, UInt16(NFTNL_RULE_HANDLE.rawValue))))
        }
        return found
    }

    /// Every rule's comment in `table`, by chain and handle (what a trace event names a rule by).
    public func ruleComments(in table: Table) throws(NetlinkError) -> [String: [UInt64: String]] {
        var result: [String: [UInt64: String]] = [:]
        try forEachRule(of: table) { (rule, chain) throws(NetlinkError) in
            var length: UInt32 = 0
            let comment = nftnl_rule_get_data(rule, UInt16(NFTNL_RULE_USERDATA.rawValue), &length).flatMap {
                Self.comment(UnsafeRawBufferPointer(start: $0, count: Int(length)), type: UInt8(NFTNL_UDATA_RULE_COMMENT.rawValue))
            }
            result[chain, default: [:]][nftnl_rule_get_u64(rule, UInt16(NFTNL_RULE_HANDLE.rawValue))] = comment ?? ""
        }
        return result
    }

    /// Calls `body` with every rule of `table` (valid during the call) and its chain, from one dump.
    private func forEachRule(of table: Table, _ body: (OpaquePointer, String) throws(NetlinkError) -> Void) throws(NetlinkError) {
        try socket.dump(request(NFT_MSG_GETRULE, table, flags: NLM_F_DUMP) { _, header in
            let r = nftnl_rule_alloc()!
            defer { nftnl_rule_free(r) }
            nftnl_rule_set_str(r, UInt16(NFTNL_RULE_TABLE.rawValue), table.name)
            nftnl_rule_nlmsg_build_payload(header, r)
        }, operation: "dump rules of \(table.name)") { message throws(NetlinkError) in
            guard let r = nftnl_rule_alloc() else { throw NetlinkError(code: ENOMEM, operation: "allocate a rule") }
            defer { nftnl_rule_free(r) }
            guard nftnl_rule_nlmsg_parse(message, r) >= 0 else { throw NetlinkError(code: EPROTO, operation: "parse a rule of \(table.name)") }
            guard Self.string(nftnl_rule_get_str(r, UInt16(NFTNL_RULE_TABLE.rawValue))) == table.name,
                  let chain = Self.string(nftnl_rule_get_str(r, UInt16(NFTNL_RULE_CHAIN.rawValue))) else { return }
            try body(r, chain)
        }
    }

    /// The ruleset generation: it changes with every committed transaction.
    public func generation() throws(NetlinkError) -> UInt32 {
        var id: UInt32 = 0
        try socket.dump(request(NFT_MSG_GETGEN, Table(name: ""), flags: NLM_F_ACK) { _, _ in }, operation: "read ruleset generation") { message throws(NetlinkError) in
            let g = nftnl_gen_alloc()!
            defer { nftnl_gen_free(g) }
            guard nftnl_gen_nlmsg_parse(message, g) >= 0 else { throw NetlinkError(code: EPROTO, operation: "parse the ruleset generation") }
            id = nftnl_gen_get_u32(g, UInt16(NFTNL_GEN_ID))
        }
        return id
    }

    private func readOnce(_ skeleton: Skeleton, comparedWith expected: TableElements?) throws(NetlinkError) -> KernelTable? {
        let table = skeleton.table
        var owner: String??
        do {
            try socket.dump(request(NFT_MSG_GETTABLE, table, flags: NLM_F_ACK) { buffer, header in
                let t = nftnl_table_alloc()!
                defer { nftnl_table_free(t) }
                nftnl_table_set_str(t, UInt16(NFTNL_TABLE_NAME.rawValue), table.name)
                nftnl_table_nlmsg_build_payload(header, t)
            }, operation: "read table \(table.family) \(table.name)") { message throws(NetlinkError) in
                let t = nftnl_table_alloc()!
                defer { nftnl_table_free(t) }
                guard nftnl_table_nlmsg_parse(message, t) >= 0 else { throw NetlinkError(code: EPROTO, operation: "parse table \(table.name)") }
                var length: UInt32 = 0
                if let data = nftnl_table_get_data(t, UInt16(NFTNL_TABLE_USERDATA.rawValue), &length) {
                    owner = .some(Self.comment(UnsafeRawBufferPointer(start: data, count: Int(length))))
                } else {
                    owner = .some(nil)
                }
            }
        } catch where error.code == ENOENT {
            return nil
        }
        guard let owner else { return nil }

        var chains: [String: Int] = [:]
        var chainComments: [String: String] = [:]
        try socket.dump(request(NFT_MSG_GETCHAIN, table, flags: NLM_F_DUMP) { _, _ in }, operation: "dump chains of \(table.name)") { message throws(NetlinkError) in
            let c = nftnl_chain_alloc()!
            defer { nftnl_chain_free(c) }
            guard nftnl_chain_nlmsg_parse(message, c) >= 0 else { throw NetlinkError(code: EPROTO, operation: "parse a chain of \(table.name)") }
            guard Self.string(nftnl_chain_get_str(c, UInt16(NFTNL_CHAIN_TABLE.rawValue))) == table.name,
                  let name = Self.string(nftnl_chain_get_str(c, UInt16(NFTNL_CHAIN_NAME.rawValue))) else { return }
            if chains[name] == nil { chains[name] = 0 }
            var length: UInt32 = 0
            if let data = nftnl_chain_get_data(c, UInt16(NFTNL_CHAIN_USERDATA.rawValue), &length),
               let comment = Self.comment(UnsafeRawBufferPointer(start: data, count: Int(length))) {
                chainComments[name] = comment
            }
        }
        try forEachRule(of: table) { (_, chain) throws(NetlinkError) in chains[chain, default: 0] += 1 }

        var sets: [String: KernelSet] = [:]
        var ownedSets = Set<String>()
        try socket.dump(request(NFT_MSG_GETSET, table, flags: NLM_F_DUMP) { buffer, header in
            let s = nftnl_set_alloc()!
            defer { nftnl_set_free(s) }
            nftnl_set_set_str(s, UInt16(NFTNL_SET_TABLE.rawValue), table.name)
            nftnl_set_nlmsg_build_payload(header, s)
        }, operation: "dump sets of \(table.name)") { message throws(NetlinkError) in
            let s = nftnl_set_alloc()!
            defer { nftnl_set_free(s) }
            guard nftnl_set_nlmsg_parse(message, s) >= 0 else { throw NetlinkError(code: EPROTO, operation: "parse a set of \(table.name)") }
            guard Self.string(nftnl_set_get_str(s, UInt16(NFTNL_SET_TABLE.rawValue))) == table.name,
                  let name = Self.string(nftnl_set_get_str(s, UInt16(NFTNL_SET_NAME.rawValue))) else { return }
            let flags = nftnl_set_get_u32(s, UInt16(NFTNL_SET_FLAGS.rawValue))
            let keyLength = Int(nftnl_set_get_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue)))
            let valueLength = flags & UInt32(NFT_SET_MAP.rawValue) != 0 ? Int(nftnl_set_get_u32(s, UInt16(NFTNL_SET_DATA_LEN.rawValue))) : nil
            var length: UInt32 = 0
            let comment = nftnl_set_get_data(s, UInt16(NFTNL_SET_USERDATA.rawValue), &length).flatMap {
                Self.comment(UnsafeRawBufferPointer(start: $0, count: Int(length)), type: UInt8(NFTNL_UDATA_SET_COMMENT.rawValue))
            }
            if comment?.hasPrefix(NamedSet.ownerComment) == true { ownedSets.insert(name) }
            let expected = skeleton.set(named: name)
            let interval = flags & UInt32(NFT_SET_INTERVAL.rawValue) != 0
            let decodable = expected.map { $0.keyLayout.length == keyLength && $0.valueLayout?.length == valueLength && $0.interval == interval } ?? false
            sets[name] = KernelSet(keyLength: keyLength, valueLength: valueLength, comment: comment, decodable: decodable, elements: [], counters: [:])
        }
        for (name, kernelSet) in sets where kernelSet.decodable {
            // A dynamic set's elements are the ruleset's own (per-source buckets), an external one's another
            // program's (trace selectors): never read, so never diffed away.
            guard let definition = skeleton.set(named: name), definition.holdsDesiredElements else { continue }
            var current = kernelSet
            try readElements(table, definition, into: &current, comparedWith: ownedSets.contains(name) ? expected?[name] : nil)
            sets[name] = current
        }
        return KernelTable(owner: owner, chains: chains, chainComments: chainComments, sets: sets, ownedSets: ownedSets)
    }

    /// The per-element counters of one set, from a single dump (counters move all the time, so no re-read).
    public func counters(of set: NamedSet, in table: Table) throws(NetlinkError) -> [ElementKey: ElementCounter] {
        Dictionary(try counterRows(of: set, in: table), uniquingKeysWith: { first, _ in first })
    }

    /// The same as rows in the kernel's order, each element's key and counter only (no value, no comment).
    public func counterRows(of set: NamedSet, in table: Table) throws(NetlinkError) -> [(key: ElementKey, counter: ElementCounter)] {
        var rows: [(key: ElementKey, counter: ElementCounter)] = []
        try forEachCounter(of: set, in: table) { rows.append(($0, $1)) }
        return rows
    }

    /// Each counted element's key and counter, in the kernel's order, handed over as the dump is read and held
    /// nowhere here: what `/metrics` and the status page read every few seconds keep only what they need of it.
    public func forEachCounter(of set: NamedSet, in table: Table, _ body: (ElementKey, ElementCounter) -> Void) throws(NetlinkError) {
        let keyLayout = set.keyLayout
        try dumpElements(table, set) { e in
            guard let key = Self.bytes(e, NFTNL_SET_ELEM_KEY).flatMap(keyLayout.decode),
                  let expression = nftnl_set_elem_get(e, UInt16(NFTNL_SET_ELEM_EXPR), nil) else { return }
            let ex = OpaquePointer(expression)
            guard Self.string(nftnl_expr_get_str(ex, UInt16(NFTNL_EXPR_NAME))) == "counter" else { return }
            body(ElementKey(key: key, keyEnd: Self.bytes(e, NFTNL_SET_ELEM_KEY_END).flatMap(keyLayout.decode)),
                 ElementCounter(packets: nftnl_expr_get_u64(ex, UInt16(NFTNL_EXPR_CTR_PACKETS)),
                                bytes: nftnl_expr_get_u64(ex, UInt16(NFTNL_EXPR_CTR_BYTES))))
        }
    }

    /// Every element of `set` (with its comment) and its counter.
    public func countedElements(of set: NamedSet, in table: Table) throws(NetlinkError) -> [(Element, ElementCounter)] {
        var result = KernelSet(keyLength: 0, valueLength: nil, decodable: true, elements: [], counters: [:])
        try readElements(table, set, into: &result)
        return result.elements.compactMap { element in result.counters[element.identity].map { (element, $0) } }
    }

    /// Every element of `set` as the kernel holds it (with its comment): for the sets epokd does not read back.
    public func elements(of set: NamedSet, in table: Table) throws(NetlinkError) -> [Element] {
        var result = KernelSet(keyLength: 0, valueLength: nil, decodable: true, elements: [], counters: [:])
        try readElements(table, set, into: &result)
        return result.elements
    }

    /// Reads `set`'s elements into `result`; compared with `expected`, only those not expected are kept, and the
    /// positions of the others in `expected` (counters are not read then).
    private func readElements(_ table: Table, _ set: NamedSet, into result: inout KernelSet,
                              comparedWith expected: Set<Element>? = nil) throws(NetlinkError) {
        let keyLayout = set.keyLayout
        let valueLayout = set.valueLayout
        var elements: [Element] = []
        var counters: [ElementKey: ElementCounter] = [:]
        var matched: [Set<Element>.Index] = []
        var undecodable = false
        try dumpElements(table, set) { e in
            guard let key = Self.bytes(e, NFTNL_SET_ELEM_KEY).flatMap(keyLayout.decode) else {
                undecodable = true
                return
            }
            var element = Element(key: key)
            if let end = Self.bytes(e, NFTNL_SET_ELEM_KEY_END) { element.keyEnd = keyLayout.decode(end) }
            if let valueLayout {
                element.value = Self.bytes(e, NFTNL_SET_ELEM_DATA).flatMap(valueLayout.decode)
                if element.value == nil { undecodable = true }
            }
            if let userdata = Self.bytes(e, NFTNL_SET_ELEM_USERDATA) {
                element.comment = userdata.withUnsafeBytes { Self.comment($0) }
            }
            if let expression = nftnl_set_elem_get(e, UInt16(NFTNL_SET_ELEM_EXPR), nil) {
                let ex = OpaquePointer(expression)
                if Self.string(nftnl_expr_get_str(ex, UInt16(NFTNL_EXPR_NAME))) == "counter" {
                    if expected == nil {
                        counters[element.identity] = ElementCounter(
                            packets: nftnl_expr_get_u64(ex, UInt16(NFTNL_EXPR_CTR_PACKETS)),
                            bytes: nftnl_expr_get_u64(ex, UInt16(NFTNL_EXPR_CTR_BYTES)))
                    }
                } else if set.limits != nil {
                    element.limit = RateLimit(expression: ex)
                }
            }
            if let expected, let index = expected.firstIndex(of: element) {
                matched.append(index)
                return
            }
            elements.append(element)
        }
        result.elements = elements
        // Taken out of the variable the dump's closure captured, so that it is sorted in place, not copied.
        var found: [Set<Element>.Index] = []
        swap(&found, &matched)
        let positions = expected == nil ? nil : MatchedPositions(found: found)
        result.matched = positions
        result.repeated = positions?.repeated ?? false
        result.counters = counters
        result.decodable = !undecodable
    }

    /// Dumps `set`'s elements and hands each to `body`, as libnftnl parsed it.
    private func dumpElements(_ table: Table, _ set: NamedSet, _ body: (OpaquePointer) throws(NetlinkError) -> Void) throws(NetlinkError) {
        let operation = "dump elements of \(table.name) \(set.name)"
        try socket.dump(request(NFT_MSG_GETSETELEM, table, flags: NLM_F_DUMP) { buffer, header in
            let s = nftnl_set_alloc()!
            defer { nftnl_set_free(s) }
            nftnl_set_set_str(s, UInt16(NFTNL_SET_TABLE.rawValue), table.name)
            nftnl_set_set_str(s, UInt16(NFTNL_SET_NAME.rawValue), set.name)
            nftnl_set_elems_nlmsg_build_payload(header, s)
        }, operation: operation) { message throws(NetlinkError) in
            let s = nftnl_set_alloc()!
            defer { nftnl_set_free(s) }
            guard nftnl_set_elems_nlmsg_parse(message, s) >= 0 else { throw NetlinkError(code: EPROTO, operation: operation, subject: "an element message did not parse") }
            let iterator = nftnl_set_elems_iter_create(s)!
            defer { nftnl_set_elems_iter_destroy(iterator) }
            while let e = nftnl_set_elems_iter_next(iterator) { try body(e) }
        }
    }

    /// A libnftnl string attribute, nil when absent.
    private static func string(_ pointer: UnsafePointer<CChar>?) -> String? { pointer.map { String(cString: $0) } }

    private static func bytes(_ e: OpaquePointer, _ attribute: Int) -> [UInt8]? {
        var length: UInt32 = 0
        guard let data = nftnl_set_elem_get(e, UInt16(attribute), &length) else { return nil }
        return Array(UnsafeRawBufferPointer(start: data, count: Int(length)))
    }

    /// Reads a comment TLV (NUL-terminated; type 0 for tables, chains and elements) out of nftables userdata.
    private static func comment(_ data: UnsafeRawBufferPointer, type wanted: UInt8 = 0) -> String? {
        var offset = 0
        while offset + 2 <= data.count {
            let type = data[offset], length = Int(data[offset + 1])
            guard offset + 2 + length <= data.count else { return nil }
            if type == wanted {
                return String(decoding: data[(offset + 2)..<(offset + 2 + length)].prefix { $0 != 0 }, as: UTF8.self)
            }
            offset += 2 + length
        }
        return nil
    }

    private func request(_ command: nf_tables_msg_types, _ table: Table, flags: Int32,
                         _ payload: (UnsafeMutablePointer<CChar>, UnsafeMutablePointer<nlmsghdr>) -> Void) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let seq = socket.nextSequence()
        let length = buffer.withUnsafeMutableBytes { raw -> Int in
            let base = raw.baseAddress!.assumingMemoryBound(to: CChar.self)
            let header = nftnl_nlmsg_build_hdr(base, UInt16(command.rawValue), UInt16(table.family.rawValue), UInt16(flags), seq)!
            payload(base, header)
            return Int(header.pointee.nlmsg_len)
        }
        return Array(buffer.prefix(length))
    }
}

/// Reading the element list of an element message (to name the element an error points at).
enum ElementMessage {
    /// Byte ranges (from the start of the message) of each element nest, in order.
    static func elementRanges(_ message: UnsafeMutablePointer<nlmsghdr>) -> [Range<Int>] {
        let raw = UnsafeRawPointer(message)
        let total = Int(message.pointee.nlmsg_len)
        var offset = MemoryLayout<nlmsghdr>.size + 4
        while offset + 4 <= total {
            let length = Int(raw.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            let type = raw.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self) & 0x3fff
            guard length >= 4 else { break }
            if type == UInt16(NFTA_SET_ELEM_LIST_ELEMENTS.rawValue) {
                var ranges: [Range<Int>] = []
                var inner = offset + 4
                while inner + 4 <= offset + length {
                    let l = Int(raw.loadUnaligned(fromByteOffset: inner, as: UInt16.self))
                    guard l >= 4 else { break }
                    ranges.append(inner..<(inner + l))
                    inner += (l + 3) & ~3
                }
                return ranges
            }
            offset += (length + 3) & ~3
        }
        return []
    }
}
