import CNetfilter
import Glibc

/// A 32-bit nftables register (`NFT_REG32_00` ... `NFT_REG32_15`).
public struct Register: Hashable, Sendable {
    public let index: UInt32
    public static func r(_ n: UInt32) -> Register {
        precondition(n < 16, "registers are r0...r15")
        return Register(index: n)
    }
    /// The register following this one by `n` 32-bit words.
    public func advanced(by n: UInt32) -> Register { .r(index + n) }
    var raw: UInt32 { UInt32(NFT_REG32_00.rawValue) + index }
}

/// A packet or connection property loaded by `meta`.
public enum MetaKey: UInt32, Sendable {
    case iifname = 6, oifname = 7, nftrace = 12, nfproto = 15, l4proto = 16
}

/// A conntrack property loaded by `ct`.
public enum ConntrackKey: UInt32, Sendable {
    case state = 0, direction = 1, status = 2, mark = 3, l3protocol = 7, l4protocol = 10, protoSource = 11, protoDestination = 12
}

/// Where a payload load starts.
public enum PayloadBase: UInt32, Sendable {
    case network = 1, transport = 2
}

/// A rule's final decision.
public enum Verdict: Hashable, Sendable {
    case accept, drop, `return`
    case jump(String)
}

/// One nftables expression; a rule is a list of them, evaluated until one does not match.
public enum Expression: Hashable, Sendable {
    case meta(MetaKey, into: Register)
    case payload(PayloadBase, offset: UInt32, length: UInt32, into: Register)
    case ct(ConntrackKey, original: Bool? = nil, into: Register)
    /// Matches when `register` equals (or, negated, differs from) `bytes`.
    case compare(Register, equal: Bool, [UInt8])
    /// `register = (register & mask) ^ 0` over `mask.count` bytes, in place.
    case mask(Register, [UInt8])
    /// Matches when the key at `register` is (or, inverted, is not) in `set`; a map lookup stores the value `into`.
    case lookup(set: String, from: Register, into: Register? = nil, inverted: Bool = false)
    /// `fib daddr type`: the route type of the destination address (2 = local).
    case fibDestinationType(into: Register)
    /// An incrementing counter modulo `modulus`, for spreading new connections.
    case roundRobin(modulus: UInt32, into: Register)
    /// The Jenkins hash of `length` bytes from `from` on, with `seed`, modulo `modulus` (`jhash … mod N seed S`).
    case hash(from: Register, length: UInt32, modulus: UInt32, seed: UInt32, into: Register)
    case dnat(family: Family, address: Register, port: Register)
    /// Source NAT to the address in `address` (the port left as it is).
    case snat(family: Family, address: Register)
    /// Finds or adds the key at `register` in the dynamic `set` and matches when that element's traffic is over
    /// `limit` (a per-key rate limit: `update @set { key limit rate over … }`).
    case limitedUpdate(set: String, from: Register, limit: RateLimit)
    case counter
    case reject
    case verdict(Verdict)
    /// Loads `bytes` into `register`.
    case immediate([UInt8], into: Register)
    /// Sets the packet's `key` (`meta nftrace set 1`) from `register`.
    case metaSet(MetaKey, from: Register)
}

extension Expression {
    /// The expression with every parameter, spelled out (for the skeleton's fingerprint).
    var canonicalDescription: String {
        func r(_ register: Register) -> String { "r\(register.index)" }
        func hex(_ bytes: [UInt8]) -> String { bytes.map { String($0, radix: 16) }.joined(separator: ":") }
        switch self {
        case .meta(let key, let into): return "meta \(key.rawValue) > \(r(into))"
        case .payload(let base, let offset, let length, let into): return "payload \(base.rawValue) \(offset)+\(length) > \(r(into))"
        case .ct(let key, let original, let into):
            return "ct \(key.rawValue) \(original.map { $0 ? "original" : "reply" } ?? "any") > \(r(into))"
        case .compare(let reg, let equal, let bytes): return "cmp \(r(reg)) \(equal ? "==" : "!=") \(hex(bytes))"
        case .mask(let reg, let mask): return "mask \(r(reg)) \(hex(mask))"
        case .lookup(let set, let from, let into, let inverted):
            return "lookup \(inverted ? "!" : "")@\(set) \(r(from))" + (into.map { " > \(r($0))" } ?? "")
        case .fibDestinationType(let into): return "fib daddr type > \(r(into))"
        case .roundRobin(let modulus, let into): return "numgen inc mod \(modulus) > \(r(into))"
        case .hash(let from, let length, let modulus, let seed, let into): return "jhash \(r(from))+\(length) mod \(modulus) seed \(seed) > \(r(into))"
        case .dnat(let family, let address, let port): return "dnat \(family) \(r(address)):\(r(port))"
        case .snat(let family, let address): return "snat \(family) \(r(address))"
        case .limitedUpdate(let set, let from, let limit): return "update @\(set) \(r(from)) limit over \(limit)"
        case .counter: return "counter"
        case .reject: return "reject"
        case .immediate(let bytes, let into): return "immediate \(hex(bytes)) > \(r(into))"
        case .metaSet(let key, let from): return "meta set \(key.rawValue) < \(r(from))"
        case .verdict(let verdict):
            switch verdict {
            case .accept: return "accept"
            case .drop: return "drop"
            case .return: return "return"
            case .jump(let chain): return "jump \(chain)"
            }
        }
    }

    /// Builds the libnftnl expression; `setID` gives the transaction-local id of a set added in the same batch.
    /// An expression libnftnl cannot allocate is an error (ENOMEM), never a null pointer in a rule.
    func build(setID: (String) -> UInt32?) throws(NetlinkError) -> OpaquePointer {
        func alloc(_ name: String) throws(NetlinkError) -> OpaquePointer { try allocateExpression(name) }
        func u32(_ e: OpaquePointer, _ attr: Int, _ v: UInt32) { nftnl_expr_set_u32(e, UInt16(attr), v) }
        switch self {
        case .meta(let key, let reg):
            let e = try alloc("meta")
            u32(e, NFTNL_EXPR_META_KEY, key.rawValue)
            u32(e, NFTNL_EXPR_META_DREG, reg.raw)
            return e
        case .payload(let base, let offset, let length, let reg):
            let e = try alloc("payload")
            u32(e, NFTNL_EXPR_PAYLOAD_BASE, base.rawValue)
            u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset)
            u32(e, NFTNL_EXPR_PAYLOAD_LEN, length)
            u32(e, NFTNL_EXPR_PAYLOAD_DREG, reg.raw)
            return e
        case .ct(let key, let original, let reg):
            let e = try alloc("ct")
            u32(e, NFTNL_EXPR_CT_KEY, key.rawValue)
            if let original { nftnl_expr_set_u8(e, UInt16(NFTNL_EXPR_CT_DIR), original ? 0 : 1) }
            u32(e, NFTNL_EXPR_CT_DREG, reg.raw)
            return e
        case .compare(let reg, let equal, let bytes):
            let e = try alloc("cmp")
            u32(e, NFTNL_EXPR_CMP_SREG, reg.raw)
            u32(e, NFTNL_EXPR_CMP_OP, equal ? UInt32(NFT_CMP_EQ.rawValue) : UInt32(NFT_CMP_NEQ.rawValue))
            bytes.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_CMP_DATA), $0.baseAddress, UInt32($0.count)) }
            return e
        case .mask(let reg, let mask):
            let e = try alloc("bitwise")
            u32(e, NFTNL_EXPR_BITWISE_SREG, reg.raw)
            u32(e, NFTNL_EXPR_BITWISE_DREG, reg.raw)
            u32(e, NFTNL_EXPR_BITWISE_LEN, UInt32(mask.count))
            mask.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_BITWISE_MASK), $0.baseAddress, UInt32($0.count)) }
            let zero = [UInt8](repeating: 0, count: mask.count)
            zero.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_BITWISE_XOR), $0.baseAddress, UInt32($0.count)) }
            return e
        case .lookup(let set, let from, let into, let inverted):
            let e = try alloc("lookup")
            nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_LOOKUP_SET), set)
            if let id = setID(set) { u32(e, NFTNL_EXPR_LOOKUP_SET_ID, id) }
            u32(e, NFTNL_EXPR_LOOKUP_SREG, from.raw)
            if let into { u32(e, NFTNL_EXPR_LOOKUP_DREG, into.raw) }
            if inverted { u32(e, NFTNL_EXPR_LOOKUP_FLAGS, UInt32(NFT_LOOKUP_F_INV.rawValue)) }
            return e
        case .fibDestinationType(let reg):
            let e = try alloc("fib")
            u32(e, NFTNL_EXPR_FIB_FLAGS, UInt32(NFTA_FIB_F_DADDR.rawValue))
            u32(e, NFTNL_EXPR_FIB_RESULT, UInt32(NFT_FIB_RESULT_ADDRTYPE.rawValue))
            u32(e, NFTNL_EXPR_FIB_DREG, reg.raw)
            return e
        case .hash(let from, let length, let modulus, let seed, let reg):
            let e = try alloc("hash")
            u32(e, NFTNL_EXPR_HASH_SREG, from.raw)
            u32(e, NFTNL_EXPR_HASH_LEN, length)
            u32(e, NFTNL_EXPR_HASH_MODULUS, modulus)
            u32(e, NFTNL_EXPR_HASH_SEED, seed)
            u32(e, NFTNL_EXPR_HASH_TYPE, UInt32(NFT_HASH_JENKINS.rawValue))
            u32(e, NFTNL_EXPR_HASH_DREG, reg.raw)
            return e
        case .roundRobin(let modulus, let reg):
            let e = try alloc("numgen")
            u32(e, NFTNL_EXPR_NG_TYPE, UInt32(NFT_NG_INCREMENTAL.rawValue))
            u32(e, NFTNL_EXPR_NG_MODULUS, modulus)
            u32(e, NFTNL_EXPR_NG_DREG, reg.raw)
            return e
        case .dnat(let family, let address, let port):
            let e = try alloc("nat")
            u32(e, NFTNL_EXPR_NAT_TYPE, UInt32(NFT_NAT_DNAT.rawValue))
            u32(e, NFTNL_EXPR_NAT_FAMILY, UInt32(family.rawValue))
            u32(e, NFTNL_EXPR_NAT_REG_ADDR_MIN, address.raw)
            u32(e, NFTNL_EXPR_NAT_REG_PROTO_MIN, port.raw)
            return e
        case .snat(let family, let address):
            let e = try alloc("nat")
            u32(e, NFTNL_EXPR_NAT_TYPE, UInt32(NFT_NAT_SNAT.rawValue))
            u32(e, NFTNL_EXPR_NAT_FAMILY, UInt32(family.rawValue))
            u32(e, NFTNL_EXPR_NAT_REG_ADDR_MIN, address.raw)
            return e
        case .limitedUpdate(let set, let from, let limit):
            let e = try alloc("dynset")
            nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_DYNSET_SET_NAME), set)
            if let id = setID(set) { u32(e, NFTNL_EXPR_DYNSET_SET_ID, id) }
            u32(e, NFTNL_EXPR_DYNSET_SREG_KEY, from.raw)
            u32(e, NFTNL_EXPR_DYNSET_OP, UInt32(NFT_DYNSET_OP_UPDATE.rawValue))
            nftnl_expr_set(e, UInt16(NFTNL_EXPR_DYNSET_EXPR), UnsafeRawPointer(try limit.expression()), 0)
            return e
        case .counter:
            return try alloc("counter")
        case .reject:
            let e = try alloc("reject")
            u32(e, NFTNL_EXPR_REJECT_TYPE, UInt32(NFT_REJECT_ICMPX_UNREACH.rawValue))
            nftnl_expr_set_u8(e, UInt16(NFTNL_EXPR_REJECT_CODE), UInt8(NFT_REJECT_ICMPX_PORT_UNREACH.rawValue))
            return e
        case .immediate(let bytes, let reg):
            let e = try alloc("immediate")
            u32(e, NFTNL_EXPR_IMM_DREG, reg.raw)
            bytes.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_IMM_DATA), $0.baseAddress, UInt32($0.count)) }
            return e
        case .metaSet(let key, let reg):
            let e = try alloc("meta")
            u32(e, NFTNL_EXPR_META_KEY, key.rawValue)
            u32(e, NFTNL_EXPR_META_SREG, reg.raw)
            return e
        case .verdict(let v):
            let e = try alloc("immediate")
            u32(e, NFTNL_EXPR_IMM_DREG, UInt32(NFT_REG_VERDICT.rawValue))
            switch v {
            case .accept: u32(e, NFTNL_EXPR_IMM_VERDICT, UInt32(NF_ACCEPT))
            case .drop: u32(e, NFTNL_EXPR_IMM_VERDICT, UInt32(NF_DROP))
            case .return: u32(e, NFTNL_EXPR_IMM_VERDICT, UInt32(bitPattern: NFT_RETURN.rawValue))
            case .jump(let chain):
                u32(e, NFTNL_EXPR_IMM_VERDICT, UInt32(bitPattern: NFT_JUMP.rawValue))
                nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_IMM_CHAIN), chain)
            }
            return e
        }
    }
}

/// A libnftnl expression of kind `name`; ENOMEM if it cannot be allocated.
func allocateExpression(_ name: String) throws(NetlinkError) -> OpaquePointer {
    guard let e = nftnl_expr_alloc(name) else { throw NetlinkError(code: ENOMEM, operation: "allocate a libnftnl \(name) expression") }
    return e
}
