import CNetfilter
import Glibc

/// A list of changes to one table, committed to the kernel as one netlink batch: all or nothing.
public struct Transaction: Sendable {
    /// One change.
    public enum Operation: Sendable {
        /// Creates the table (if absent), with `comment` (the mark of a table epokd made).
        case addTable(Table, comment: String)
        case deleteTable(Table)
        case addSet(Table, NamedSet)
        case deleteSet(Table, String)
        /// Creates the chain with `comment` and appends its rules.
        case addChain(Table, Chain, comment: String?)
        /// Deletes the chain's rules, keeping the chain.
        case flushChain(Table, String)
        /// Deletes the chain and its rules.
        case deleteChain(Table, String)
        case addElements(Table, NamedSet, ElementBatch)
        case deleteElements(Table, NamedSet, ElementBatch)

        /// The table the operation changes.
        var table: Table {
            switch self {
            case .addTable(let t, _), .deleteTable(let t), .addSet(let t, _), .deleteSet(let t, _), .addChain(let t, _, _),
                 .flushChain(let t, _), .deleteChain(let t, _), .addElements(let t, _, _), .deleteElements(let t, _, _): t
            }
        }

        var summary: String {
            switch self {
            case .addTable(let t, _): "add table \(t.family) \(t.name)"
            case .deleteTable(let t): "delete table \(t.family) \(t.name)"
            case .addSet(let t, let s): "table \(t.name): add \(s.isMap ? "map" : "set") \(s.name)"
            case .deleteSet(let t, let s): "table \(t.name): delete set \(s)"
            case .addChain(let t, let c, _): "table \(t.name): add chain \(c.name) with \(c.rules.count) rules"
            case .flushChain(let t, let c): "table \(t.name): flush chain \(c)"
            case .deleteChain(let t, let c): "table \(t.name): delete chain \(c)"
            case .addElements(let t, let s, let e): "table \(t.name): add \(e.count) elements to \(s.name)"
            case .deleteElements(let t, let s, let e): "table \(t.name): delete \(e.count) elements from \(s.name)"
            }
        }
    }

    public private(set) var operations: [Operation] = []

    public init() {}

    public var isEmpty: Bool { operations.isEmpty }

    /// How many elements the transaction adds and deletes.
    public var elementCounts: (added: Int, deleted: Int) {
        var counts = (added: 0, deleted: 0)
        for operation in operations {
            switch operation {
            case .addElements(_, _, let elements): counts.added += elements.count
            case .deleteElements(_, _, let elements): counts.deleted += elements.count
            default: break
            }
        }
        return counts
    }

    public mutating func append(_ operation: Operation) {
        switch operation {
        case .addElements(_, _, let e), .deleteElements(_, _, let e):
            if e.isEmpty { return }
        default: break
        }
        operations.append(operation)
    }

    /// Creates the whole skeleton with `elements` in one batch. A table already there (`existing`) is reshaped
    /// in place: epokd's own chains are made anew; each of its sets whose definition is unchanged
    /// (`KernelTable.keeps`) stays, with its elements and counters, and gets only its element diff (so a rule of
    /// the operator's that names it keeps working); the others are deleted and made anew; the user chains and
    /// anything else an operator added stay as they are. A table of an earlier epokd, whose chains carry no mark,
    /// is replaced whole.
    public static func create(_ skeleton: Skeleton, elements: TableElements, existing: KernelTable?) -> Transaction {
        var tx = Transaction()
        let table = skeleton.table
        // Marks the table and each chain; computed once (it digests the whole skeleton's description).
        let fingerprint = skeleton.fingerprint
        var userChainsPresent = Set<String>()
        var kept: [String: KernelSet] = [:]
        if let existing {
            if existing.ownedChains.isEmpty && !existing.chains.isEmpty {
                tx.append(.deleteTable(table))
                tx.append(.addTable(table, comment: existing.owner ?? fingerprint))
            } else {
                tx.deleteChains(existing.ownedChains, of: table)
                for set in skeleton.sets where existing.keeps(set) { kept[set.name] = existing.sets[set.name] }
                for set in existing.ownedSets.sorted() where kept[set] == nil { tx.append(.deleteSet(table, set)) }
                userChainsPresent = Set(existing.chains.keys).intersection(skeleton.userChains)
            }
        } else {
            tx.append(.addTable(table, comment: fingerprint))
        }
        for set in skeleton.sets where kept[set.name] == nil {
            tx.append(.addSet(table, set))
        }
        for chain in skeleton.userChains where !userChainsPresent.contains(chain) {
            tx.append(.addChain(table, Chain(name: chain, hook: nil, rules: []), comment: nil))
        }
        for chain in skeleton.chains {
            tx.append(.addChain(table, chain, comment: fingerprint))
        }
        for set in skeleton.sets {
            let wanted = elements[set.name] ?? []
            guard let held = kept[set.name] else {
                tx.append(.addElements(table, set, ElementBatch(wanted, for: set)))
                continue
            }
            let have = Set(held.elements)
            let gone = have.subtracting(wanted), new = wanted.subtracting(have)
            if !gone.isEmpty { tx.append(.deleteElements(table, set, ElementBatch(gone, for: set))) }
            if !new.isEmpty { tx.append(.addElements(table, set, ElementBatch(new, for: set))) }
        }
        return tx
    }

    /// Replaces epokd's `chains` in a table that holds `skeleton`'s sets (`KernelTable.holdsSets(of:)`) with the
    /// skeleton's: the sets, their elements and counters, and the user chains stay. Append the element diff to the
    /// same transaction.
    public static func replaceChains(_ skeleton: Skeleton, replacing chains: some Collection<String>) -> Transaction {
        var tx = Transaction()
        let fingerprint = skeleton.fingerprint
        tx.deleteChains(chains, of: skeleton.table)
        for chain in skeleton.chains { tx.append(.addChain(skeleton.table, chain, comment: fingerprint)) }
        return tx
    }

    /// Deletes `chains`, the rules of all of them first, so that no jump between them holds one while it is deleted.
    private mutating func deleteChains(_ chains: some Collection<String>, of table: Table) {
        let ordered = chains.sorted()
        for chain in ordered { append(.flushChain(table, chain)) }
        for chain in ordered { append(.deleteChain(table, chain)) }
    }
}

/// Assembles a transaction into a libnftnl batch and remembers which message came from which operation.
final class BatchBuilder {
    /// Pages larger than the largest message (64 KiB of elements), as nft itself uses.
    static let pageSize: UInt32 = 32 * 4096
    static let pageOverrun: UInt32 = 65535 + 4096

    let batch: OpaquePointer
    private(set) var firstSequence: UInt32
    private(set) var lastOperationSequence: UInt32 = 0
    /// For each sequence number, the operation index it belongs to.
    private(set) var operationOfSequence: [UInt32: Int] = [:]
    private var setIDs: [String: UInt32] = [:]
    private var sequence: UInt32

    init(startSequence: UInt32) {
        batch = nftnl_batch_alloc(BatchBuilder.pageSize, BatchBuilder.pageOverrun)
        firstSequence = startSequence
        sequence = startSequence
    }

    deinit { nftnl_batch_free(batch) }

    /// The size of the whole batch, known once `build` has run.
    private(set) var byteCount = 0

    private var buffer: UnsafeMutablePointer<CChar> {
        nftnl_batch_buffer(batch).assumingMemoryBound(to: CChar.self)
    }

    /// Set when libnftnl could not grow the batch (`nftnl_batch_update` failed): `build` then throws.
    private var grew = true

    private func update() {
        if nftnl_batch_update(batch) < 0 { grew = false }
    }

    /// Builds the batch; without `commit` it has no end marker, so the kernel validates it and aborts.
    /// With `generation`, the kernel refuses the whole batch (ERESTART) if the ruleset moved past it.
    func build(_ tx: Transaction, commit: Bool = true, generation: UInt32? = nil) throws(NetlinkError) {
        let begin = nftnl_batch_begin(buffer, nextSequence())
        if let generation, let begin { mnl_attr_put_u32(begin, UInt16(NFNL_BATCH_GENID.rawValue), generation.bigEndian) }
        update()
        for (index, op) in tx.operations.enumerated() {
            let first = sequence
            try add(op)
            for s in first..<sequence { operationOfSequence[s] = index }
            lastOperationSequence = sequence &- 1
        }
        if commit {
            nftnl_batch_end(buffer, nextSequence())
            update()
        }
        guard grew else { throw NetlinkError(code: ENOMEM, operation: "build a batch of \(tx.operations.count) operations", subject: "libnftnl could not grow the batch") }
        byteCount = 0
        forEachMessage { header in
            byteCount += Int(header.pointee.nlmsg_len)
            if header.pointee.nlmsg_seq == lastOperationSequence {
                header.pointee.nlmsg_flags |= UInt16(NLM_F_ACK)
            }
        }
    }

    /// How many sequence numbers the batch used.
    var sequenceCount: UInt32 { sequence &- firstSequence }

    private func nextSequence() -> UInt32 {
        defer { sequence &+= 1 }
        return sequence
    }

    private func header(_ command: nf_tables_msg_types, _ family: Family, _ flags: Int32) -> UnsafeMutablePointer<nlmsghdr> {
        nftnl_nlmsg_build_hdr(buffer, UInt16(command.rawValue), UInt16(family.rawValue), UInt16(flags), nextSequence())
    }

    private func add(_ op: Transaction.Operation) throws(NetlinkError) {
        switch op {
        case .addTable(let table, let comment):
            let t = nftnl_table_alloc()!
            defer { nftnl_table_free(t) }
            nftnl_table_set_str(t, UInt16(NFTNL_TABLE_NAME.rawValue), table.name)
            nftnl_table_set_u32(t, UInt16(NFTNL_TABLE_FAMILY.rawValue), UInt32(table.family.rawValue))
            withComment(comment, type: UInt8(NFTNL_UDATA_TABLE_COMMENT.rawValue)) { data, length in
                nftnl_table_set_data(t, UInt16(NFTNL_TABLE_USERDATA.rawValue), data, length)
            }
            nftnl_table_nlmsg_build_payload(header(NFT_MSG_NEWTABLE, table.family, NLM_F_CREATE), t)
            update()
        case .deleteTable(let table):
            let t = nftnl_table_alloc()!
            defer { nftnl_table_free(t) }
            nftnl_table_set_str(t, UInt16(NFTNL_TABLE_NAME.rawValue), table.name)
            nftnl_table_nlmsg_build_payload(header(NFT_MSG_DELTABLE, table.family, 0), t)
            update()
        case .addSet(let table, let set):
            let s = makeSet(table, set)
            defer { nftnl_set_free(s) }
            let id = UInt32(setIDs.count + 1)
            setIDs[set.name] = id
            nftnl_set_set_u32(s, UInt16(NFTNL_SET_ID.rawValue), id)
            nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_TYPE.rawValue), set.keyLayout.nftType)
            nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue), UInt32(set.keyLayout.length))
            var flags: UInt32 = 0
            if let layout = set.valueLayout {
                flags |= UInt32(NFT_SET_MAP.rawValue)
                nftnl_set_set_u32(s, UInt16(NFTNL_SET_DATA_TYPE.rawValue), layout.nftType)
                nftnl_set_set_u32(s, UInt16(NFTNL_SET_DATA_LEN.rawValue), UInt32(layout.length))
            }
            if set.interval {
                flags |= UInt32(NFT_SET_INTERVAL.rawValue | NFT_SET_CONCAT.rawValue)
                var lengths = [UInt8](repeating: 0, count: 16)
                for (i, t) in set.key.enumerated() { lengths[i] = UInt8(t.length) }
                lengths.withUnsafeBytes {
                    _ = nftnl_set_set_data(s, UInt16(NFTNL_SET_DESC_CONCAT.rawValue), $0.baseAddress, UInt32(set.key.count))
                }
            }
            if let dynamic = set.dynamic {
                flags |= UInt32(NFT_SET_EVAL.rawValue | NFT_SET_TIMEOUT.rawValue)
                nftnl_set_set_u64(s, UInt16(NFTNL_SET_TIMEOUT.rawValue), dynamic.timeout * 1000)
            }
            if let size = set.declaredSize { nftnl_set_set_u32(s, UInt16(NFTNL_SET_DESC_SIZE.rawValue), size) }
            nftnl_set_set_u32(s, UInt16(NFTNL_SET_FLAGS.rawValue), flags)
            let buf = nftnl_udata_buf_alloc(256)!
            defer { nftnl_udata_buf_free(buf) }
            if set.key == [.ifname] || set.typeof != nil {
                // nft prints strings (and the slot numbers numgen writes) only when told their byte order is the
                // host's; a concatenation's byte order is left to its typeof, as nft writes it.
                nftnl_udata_put_u32(buf, UInt8(NFTNL_UDATA_SET_KEYBYTEORDER.rawValue), set.key.count > 1 ? 0 : 1)
                if let typeof = set.typeof { Self.putTypeof(typeof, into: buf) }
            }
            nftnl_udata_put_strz(buf, UInt8(NFTNL_UDATA_SET_COMMENT.rawValue), set.comment)
            nftnl_set_set_data(s, UInt16(NFTNL_SET_USERDATA.rawValue), nftnl_udata_buf_data(buf), nftnl_udata_buf_len(buf))
            if set.counters {
                nftnl_set_set_data(s, UInt16(NFTNL_SET_EXPR.rawValue), UnsafeRawPointer(try allocateExpression("counter")), 0)
            }
            if let unit = set.limits {
                // The template every element's own limit must match in kind (nft needs it to print the elements).
                let template = try RateLimit(rate: 1, unit: unit, per: .second, burst: 0).expression()
                nftnl_set_set_data(s, UInt16(NFTNL_SET_EXPR.rawValue), UnsafeRawPointer(template), 0)
            }
            nftnl_set_nlmsg_build_payload(header(NFT_MSG_NEWSET, table.family, NLM_F_CREATE), s)
            update()
        case .deleteSet(let table, let name):
            let s = nftnl_set_alloc()!
            defer { nftnl_set_free(s) }
            nftnl_set_set_str(s, UInt16(NFTNL_SET_TABLE.rawValue), table.name)
            nftnl_set_set_str(s, UInt16(NFTNL_SET_NAME.rawValue), name)
            nftnl_set_nlmsg_build_payload(header(NFT_MSG_DELSET, table.family, 0), s)
            update()
        case .flushChain(let table, let name):
            let r = nftnl_rule_alloc()!
            defer { nftnl_rule_free(r) }
            nftnl_rule_set_str(r, UInt16(NFTNL_RULE_TABLE.rawValue), table.name)
            nftnl_rule_set_str(r, UInt16(NFTNL_RULE_CHAIN.rawValue), name)
            nftnl_rule_nlmsg_build_payload(header(NFT_MSG_DELRULE, table.family, 0), r)
            update()
        case .deleteChain(let table, let name):
            let c = nftnl_chain_alloc()!
            defer { nftnl_chain_free(c) }
            nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_TABLE.rawValue), table.name)
            nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_NAME.rawValue), name)
            nftnl_chain_nlmsg_build_payload(header(NFT_MSG_DELCHAIN, table.family, 0), c)
            update()
        case .addChain(let table, let chain, let comment):
            let c = nftnl_chain_alloc()!
            defer { nftnl_chain_free(c) }
            nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_TABLE.rawValue), table.name)
            nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_NAME.rawValue), chain.name)
            if let comment {
                withComment(comment, type: UInt8(NFTNL_UDATA_CHAIN_COMMENT.rawValue)) { data, length in
                    nftnl_chain_set_data(c, UInt16(NFTNL_CHAIN_USERDATA.rawValue), data, length)
                }
            }
            if let hook = chain.hook {
                nftnl_chain_set_u32(c, UInt16(NFTNL_CHAIN_HOOKNUM.rawValue), hook.rawValue)
                nftnl_chain_set_s32(c, UInt16(NFTNL_CHAIN_PRIO.rawValue), chain.priority)
                nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_TYPE.rawValue), chain.kind.rawValue)
                nftnl_chain_set_u32(c, UInt16(NFTNL_CHAIN_POLICY.rawValue), UInt32(NF_ACCEPT))
            }
            nftnl_chain_nlmsg_build_payload(header(NFT_MSG_NEWCHAIN, table.family, NLM_F_CREATE), c)
            update()
            for rule in chain.rules {
                let r = nftnl_rule_alloc()!
                defer { nftnl_rule_free(r) }
                nftnl_rule_set_str(r, UInt16(NFTNL_RULE_TABLE.rawValue), table.name)
                nftnl_rule_set_str(r, UInt16(NFTNL_RULE_CHAIN.rawValue), chain.name)
                nftnl_rule_set_u32(r, UInt16(NFTNL_RULE_FAMILY.rawValue), UInt32(table.family.rawValue))
                for e in rule.expressions {
                    nftnl_rule_add_expr(r, try e.build { self.setIDs[$0] })
                }
                withComment(rule.comment, type: UInt8(NFTNL_UDATA_RULE_COMMENT.rawValue)) { data, length in
                    nftnl_rule_set_data(r, UInt16(NFTNL_RULE_USERDATA.rawValue), data, length)
                }
                nftnl_rule_nlmsg_build_payload(header(NFT_MSG_NEWRULE, table.family, NLM_F_CREATE | NLM_F_APPEND), r)
                update()
            }
        case .addElements(let table, let set, let elements):
            try addElements(table, set, elements, command: NFT_MSG_NEWSETELEM, flags: NLM_F_CREATE | NLM_F_EXCL)
        case .deleteElements(let table, let set, let elements):
            try addElements(table, set, elements, command: NFT_MSG_DELSETELEM, flags: 0)
        }
    }

    /// nft's own encoding of `typeof` (as nft 1.0.6 writes it): the data byte order, then the key and the value
    /// each as an expression type with its attributes. The numbers are nft's expression and protocol-template
    /// ids, which nft keeps stable because tables outlive the nft that wrote them.
    private static func putTypeof(_ typeof: SetTypeof, into buf: OpaquePointer) {
        func nest(_ type: Int, _ body: () -> Void) {
            let start = nftnl_udata_nest_start(buf, UInt8(type))
            body()
            nftnl_udata_nest_end(buf, start)
        }
        func u32(_ type: Int, _ value: UInt32) { nftnl_udata_put_u32(buf, UInt8(type), value) }
        func numgen(_ modulus: UInt32) {
            u32(Int(NFTNL_UDATA_SET_TYPEOF_EXPR), 23)                  // numgen
            nest(Int(NFTNL_UDATA_SET_TYPEOF_DATA)) {
                u32(0, UInt32(NFT_NG_INCREMENTAL.rawValue))                      // type
                u32(1, modulus)                                                  // modulus
                u32(2, 0)                                                        // offset
            }
        }
        func daddrExpression(_ family: Family) {
            u32(Int(NFTNL_UDATA_SET_TYPEOF_EXPR), 7)                   // payload
            nest(Int(NFTNL_UDATA_SET_TYPEOF_DATA)) {
                u32(0, family == .ipv6 ? 13 : 12)                                // protocol: ip6 or ip
                u32(1, family == .ipv6 ? 9 : 12)                                 // field: daddr
            }
        }
        func daddr(_ family: Family) {
            nest(Int(NFTNL_UDATA_SET_DATA_TYPEOF.rawValue)) { daddrExpression(family) }
        }
        /// A concatenation key: `prefix` (the daddr of a family, or nothing) . meta l4proto . th dport . numgen.
        func portSlotKey(after address: Family?, modulus: UInt32) {
            nest(Int(NFTNL_UDATA_SET_KEY_TYPEOF.rawValue)) {
                u32(Int(NFTNL_UDATA_SET_TYPEOF_EXPR), 13)              // concat, of:
                nest(Int(NFTNL_UDATA_SET_TYPEOF_DATA)) {
                    var index = 0
                    func next(_ body: () -> Void) {
                        nest(index, body)
                        index += 1
                    }
                    if let address { next { daddrExpression(address) } }
                    next {                                                       // meta l4proto
                        u32(Int(NFTNL_UDATA_SET_TYPEOF_EXPR), 9)
                        nest(Int(NFTNL_UDATA_SET_TYPEOF_DATA)) { u32(0, 16) }
                    }
                    next {                                                       // th dport
                        u32(Int(NFTNL_UDATA_SET_TYPEOF_EXPR), 7)
                        nest(Int(NFTNL_UDATA_SET_TYPEOF_DATA)) {
                            u32(0, 11)
                            u32(1, 2)
                        }
                    }
                    next { numgen(modulus) }                                     // numgen inc mod MODULUS
                }
            }
        }
        u32(Int(NFTNL_UDATA_SET_DATABYTEORDER.rawValue), 2)
        switch typeof {
        case .roundRobinSlot(let modulus, let family):
            nest(Int(NFTNL_UDATA_SET_KEY_TYPEOF.rawValue)) { numgen(modulus) }
            daddr(family)
        case .portSlot(let modulus, let family):
            portSlotKey(after: nil, modulus: modulus)
            daddr(family)
        case .addressPortSlot(let modulus, let family):
            portSlotKey(after: family, modulus: modulus)
            daddr(family)
        }
        u32(Int(NFTNL_UDATA_SET_DATA_INTERVAL.rawValue), 0)
    }

    private func makeSet(_ table: Table, _ set: NamedSet) -> OpaquePointer {
        let s = nftnl_set_alloc()!
        nftnl_set_set_str(s, UInt16(NFTNL_SET_TABLE.rawValue), table.name)
        nftnl_set_set_str(s, UInt16(NFTNL_SET_NAME.rawValue), set.name)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_FAMILY.rawValue), UInt32(table.family.rawValue))
        return s
    }

    /// Elements are handed to libnftnl a chunk at a time (about one message's worth), so that its per-element
    /// objects, 296 bytes each, never all exist at once: 15 MB at 50k elements otherwise.
    static let elementChunk = 1024

    private func addElements(_ table: Table, _ set: NamedSet, _ elements: ElementBatch, command: nf_tables_msg_types, flags: Int32) throws(NetlinkError) {
        var next = elements.makeIterator()
        var left = elements.count
        repeat {
            let count = min(left, Self.elementChunk)
            try addElementChunk(table, set, &next, count: count, command: command, flags: flags)
            left -= count
        } while left > 0
    }

    /// Adds the `count` next elements of `next` as one message.
    private func addElementChunk(_ table: Table, _ set: NamedSet, _ next: inout ElementBatch.Iterator, count: Int,
                                 command: nf_tables_msg_types, flags: Int32) throws(NetlinkError) {
        let s = makeSet(table, set)
        defer { nftnl_set_free(s) }
        if let id = setIDs[set.name] { nftnl_set_set_u32(s, UInt16(NFTNL_SET_ID.rawValue), id) }
        let keyLayout = set.keyLayout
        let valueLayout = set.valueLayout
        for _ in 0..<count {
            let element = next.next()!
            let e = nftnl_set_elem_alloc()!
            keyLayout.withEncoded(element.key) {
                _ = nftnl_set_elem_set(e, UInt16(NFTNL_SET_ELEM_KEY), $0.baseAddress, UInt32($0.count))
            }
            if let end = element.keyEnd {
                keyLayout.withEncoded(end) {
                    _ = nftnl_set_elem_set(e, UInt16(NFTNL_SET_ELEM_KEY_END), $0.baseAddress, UInt32($0.count))
                }
            }
            if let value = element.value, let valueLayout, command == NFT_MSG_NEWSETELEM {
                valueLayout.withEncoded(value) {
                    _ = nftnl_set_elem_set(e, UInt16(NFTNL_SET_ELEM_DATA), $0.baseAddress, UInt32($0.count))
                }
            }
            if let comment = element.comment, command == NFT_MSG_NEWSETELEM {
                withComment(comment, type: UInt8(NFTNL_UDATA_SET_ELEM_COMMENT.rawValue)) { data, length in
                    _ = nftnl_set_elem_set(e, UInt16(NFTNL_SET_ELEM_USERDATA), data, length)
                }
            }
            if let limit = element.limit, command == NFT_MSG_NEWSETELEM {
                nftnl_set_elem_add_expr(e, try limit.expression())
            }
            nftnl_set_elem_add(s, e)
        }
        var seq = sequence
        let messages = cnf_batch_add_set_elements(batch, s, UInt16(command.rawValue), UInt16(table.family.rawValue), UInt16(flags), &seq)
        precondition(messages >= 0, "out of memory while building a netlink batch")
        sequence = seq
    }

    /// Calls `body` with `text` (as the kernel keeps it, see `Element.kernelComment`) as one userdata attribute, in
    /// the layout `nftnl_udata_put_strz` writes (a type byte, a length byte, the text and its NUL), made on the
    /// stack: an element's comment costs no allocation.
    private func withComment(_ text: String, type: UInt8, _ body: (UnsafeRawPointer, UInt32) -> Void) {
        var text = Element.kernelComment(text)
        text.withUTF8 { bytes in
            withUnsafeTemporaryAllocation(byteCount: bytes.count + 3, alignment: 1) { buffer in
                buffer[0] = type
                buffer[1] = UInt8(bytes.count + 1)
                UnsafeMutableRawBufferPointer(rebasing: buffer[2..<2 + bytes.count]).copyMemory(from: UnsafeRawBufferPointer(bytes))
                buffer[2 + bytes.count] = 0
                body(UnsafeRawPointer(buffer.baseAddress!), UInt32(bytes.count + 3))
            }
        }
    }

    /// Calls `body` with each message of the batch, in order.
    func forEachMessage(_ body: (UnsafeMutablePointer<nlmsghdr>) -> Void) {
        let count = Int(nftnl_batch_iovec_len(batch))
        var vectors = [iovec](repeating: iovec(), count: count)
        nftnl_batch_iovec(batch, &vectors, UInt32(count))
        for v in vectors {
            var offset = 0
            while offset + MemoryLayout<nlmsghdr>.size <= v.iov_len {
                let header = (v.iov_base! + offset).assumingMemoryBound(to: nlmsghdr.self)
                let length = Int(header.pointee.nlmsg_len)
                guard length >= MemoryLayout<nlmsghdr>.size else { break }
                body(header)
                offset += (length + 3) & ~3
            }
        }
    }

    /// The message with sequence number `seq`, if the batch holds one.
    func message(withSequence seq: UInt32) -> UnsafeMutablePointer<nlmsghdr>? {
        var found: UnsafeMutablePointer<nlmsghdr>?
        forEachMessage { if $0.pointee.nlmsg_seq == seq { found = $0 } }
        return found
    }
}
