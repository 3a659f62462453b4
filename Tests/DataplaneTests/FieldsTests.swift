import Dataplane
import NetnsLab
import Testing

/// A random field of `type`.
private func randomField(_ type: FieldType, using rng: inout some RandomNumberGenerator) -> Field {
    switch type {
    case .l4proto: .l4proto(L4Protocol(rawValue: .random(in: 0...255, using: &rng)))
    case .port: .port(Port(rawValue: .random(in: 1...65535, using: &rng))!)
    case .ipv4: .ipv4(IPv4Address(value: .random(in: 0...UInt32.max, using: &rng)))
    case .ipv6: .ipv6(IPv6Address(bytes: (0..<16).map { _ in .random(in: 0...255, using: &rng) }))
    case .ifname: .ifname(["eth0", "wg0", "veth-a1", "lan.10"].randomElement(using: &rng)!)
    case .mark: .mark(.random(in: 0...UInt32.max, using: &rng))
    case .integer: .integer(.random(in: 0...UInt32.max, using: &rng))
    }
}

private let allTypes: [FieldType] = [.l4proto, .port, .ipv4, .ipv6, .ifname, .mark, .integer]

@Suite("Element fields held without arrays where they are small")
struct FieldListTests {
    @Test("any list of up to six fields reads back as given, however it is built; lists are equal and hash alike exactly when their fields are")
    func roundTrip() {
        var rng = SystemRandomNumberGenerator()
        var seen: [Fields: [Field]] = [:]
        for _ in 0..<20_000 {
            // Mostly the small types, so that lists on both sides of the 8-byte, 4-field limit come up often.
            let types = (0..<Int.random(in: 0...6, using: &rng)).map { _ in
                Bool.random(using: &rng) ? [.l4proto, .port, .ipv4, .integer].randomElement(using: &rng)! : allTypes.randomElement(using: &rng)!
            }
            // Few distinct values, so that equal lists made apart come up too.
            let fields = types.map { type -> Field in
                var small = SplitMix(seed: UInt64.random(in: 0...3, using: &rng))
                return randomField(type, using: &small)
            }
            let held = Fields(fields)
            #expect(Array(held) == fields)
            #expect(held.count == fields.count)
            #expect(held.map(\.type) == types)
            if let earlier = seen[held] {
                #expect(earlier == fields, "\(earlier) and \(fields) held alike")
            } else {
                seen[held] = fields
            }
            #expect(Fields(fields) == held && Fields(fields).hashValue == held.hashValue)
            // Built field by field, the list has the same one representation.
            let appended = fields.reduce(Fields([])) { $0.appending($1) }
            #expect(appended == held && appended.hashValue == held.hashValue && Array(appended) == fields)
            if fields.count == 1 { #expect(Fields(fields[0]) == held) }
            if fields.count == 2 { #expect(Fields(fields[0], fields[1]) == held) }
        }
        #expect(seen.count > 1_000)
    }

    @Test("a concatenation is the fields of both, in order, and prints as nft writes it")
    func concatenation() {
        let key: Fields = [.l4proto(.tcp), .port(Port(443)!)]
        let address = Field.ipv4(IPv4Address(10, 0, 0, 1))
        #expect(Array(key + [address]) == [.l4proto(.tcp), .port(Port(443)!), address])
        #expect(key + [address] == [.l4proto(.tcp), .port(Port(443)!), address])
        let v6 = Field.ipv6(IPv6Address("fd00::1")!)
        #expect(Array([v6] + key) == [v6, .l4proto(.tcp), .port(Port(443)!)])
        #expect((key + [address]).description == "tcp . 443 . 10.0.0.1")
        #expect(Fields([]).isEmpty && Fields([]) == [])
    }
}

/// A small seeded generator, for repeatable values.
private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("Element fields of every layout, through the kernel")
struct FieldsKernelTests {
    @Test("elements of every key and value layout epokd uses come back from the kernel as sent, and nft prints them")
    func everyLayout() throws {
        let layouts: [(key: [FieldType], value: [FieldType]?)] = [
            ([.l4proto, .port], [.port]), ([.integer], [.ipv4]), ([.integer], [.ipv6]), ([.l4proto, .port, .integer], [.ipv4]),
            ([.l4proto, .port, .ipv4], nil), ([.l4proto, .port, .ipv6], nil), ([.ipv4], [.ipv4]), ([.ipv4, .ipv4], [.ipv4]),
            ([.ipv6, .ipv6], [.ipv6]), ([.ipv4, .l4proto, .port], [.port]), ([.ipv4, .l4proto, .port, .integer], [.ipv4]),
            ([.ipv6, .l4proto, .port, .integer], [.ipv6]), ([.ipv4, .ipv4, .l4proto, .port], [.ipv4]),
            ([.ipv6, .ipv6, .l4proto, .port], nil), ([.ifname], nil), ([.mark], nil),
        ]
        // A key with a slot number is described as epokd describes it (`typeof`), which nft needs to print it.
        let sets = layouts.enumerated().map { index, layout in
            let to: Family = layout.value == [.ipv6] ? .ipv6 : .ipv4
            let typeof: SetTypeof? = switch layout.key {
            case [.integer]: .roundRobinSlot(modulus: 16, to: to)
            case [.l4proto, .port, .integer]: .portSlot(modulus: 16, to: to)
            case [.ipv4, .l4proto, .port, .integer], [.ipv6, .l4proto, .port, .integer]: .addressPortSlot(modulus: 16, to: to)
            default: nil
            }
            return NamedSet(name: "s\(index)", key: layout.key, value: layout.value, typeof: typeof)
        }
        let skeleton = Skeleton(table: Table(name: "fields"), sets: sets, chains: [])
        var rng = SplitMix(seed: 13)
        var desired: TableElements = [:]
        for set in sets {
            desired[set.name] = Set((0..<200).map { _ in
                Element(key: Fields(set.key.map { randomField($0, using: &rng) }),
                        value: set.value.map { Fields($0.map { randomField($0, using: &rng) }) })
            })
        }
        let ns = try NetworkNamespace("fields")
        let nft = try Nftables(namespacePath: ns.path)
        try nft.commit(.create(skeleton, elements: desired, existing: nil))
        let kernel = try #require(try nft.read(skeleton))
        for set in sets {
            let read = kernel.elements[set.name] ?? [], sent = desired[set.name] ?? []
            #expect(read == sent, "set \(set.name) (\(set.key)): missing \(sent.subtracting(read).prefix(2)), unexpected \(read.subtracting(sent).prefix(2))")
        }
        // What nft makes of the bytes: one packed key and value, one held in an array.
        let packed = Element(key: [.ipv4(IPv4Address(10, 1, 2, 3)), .l4proto(.tcp), .port(Port(8080)!)], value: [.port(Port(30080)!)])
        let listed = Element(key: [.ipv6(IPv6Address("fd00::7")!), .l4proto(.udp), .port(Port(53)!), .integer(5)], value: [.ipv6(IPv6Address("fd00::9")!)])
        var diff = ElementDiff()
        diff.insert(packed, into: "s9")
        diff.insert(listed, into: "s11")
        try nft.commit(diff.transaction(for: skeleton))
        let listing = try ns.nftList("inet", "fields")
        #expect(listing.contains("10.1.2.3 . tcp . 8080 : 30080"), "\(listing.prefix(2000))")
        #expect(listing.contains("fd00::7 . udp . 53 . 5 : fd00::9"), "\(listing.prefix(2000))")
    }
}
