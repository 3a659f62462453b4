/// Who may reach a mapped port: internal Services are dropped on the external interface, and sources outside a
/// Service's allow-range are dropped, in the `guard` chain, before NAT, for every packet of the original direction
/// (so a narrowed range cuts established flows at once).
public enum AccessControl: RulesetFeature {
    public enum Sets {
        public static let internalPorts = NamedSet(name: "internal", key: [.l4proto, .port])
        public static let restricted = NamedSet(name: "restricted", key: [.l4proto, .port])
        public static let allow4 = NamedSet(name: "allow4", key: [.l4proto, .port, .ipv4], interval: true)
        public static let allow6 = NamedSet(name: "allow6", key: [.l4proto, .port, .ipv6], interval: true)
    }

    static func sets(_ p: ForwardingRuleset.Parameters) -> [NamedSet] {
        [Sets.internalPorts, Sets.restricted, Sets.allow4, Sets.allow6]
    }

    static var optionalChains: [String: [String]] { ["guard": [Sets.internalPorts.name, Sets.restricted.name]] }

    static func chains(_ p: ForwardingRuleset.Parameters) -> [Chain] {
        typealias R = ForwardingRuleset
        func sourceNotAllowed(_ set: NamedSet, offset: UInt32, length: UInt32) -> [Expression] {
            [.meta(.l4proto, into: .r(0)), .payload(.transport, offset: 2, length: 2, into: .r(1)),
             .payload(.network, offset: offset, length: length, into: .r(2)), .lookup(set: set.name, from: .r(0), inverted: true)]
        }
        // The port's lookup first in every rule: most packets are not for a guarded port, and it is what tells.
        return [
            Chain(name: "guard", hook: .prerouting, priority: -110, rules: [
                Rule("internal services are unreachable from the external interface",
                     R.mappedPort(Sets.internalPorts) + [.meta(.iifname, into: .r(0)), .lookup(set: R.Sets.external.name, from: .r(0))]
                         + R.originalDirection + R.addressedToHost + [.counter, .verdict(.drop)]),
                Rule("IPv4 sources outside the allow-range are dropped",
                     R.mappedPort(Sets.restricted) + R.family(.ipv4) + R.managedInterface + R.originalDirection + R.addressedToHost
                         + sourceNotAllowed(Sets.allow4, offset: 12, length: 4) + [.counter, .verdict(.drop)]),
                Rule("IPv6 sources outside the allow-range are dropped",
                     R.mappedPort(Sets.restricted) + R.family(.ipv6) + R.managedInterface + R.originalDirection + R.addressedToHost
                         + sourceNotAllowed(Sets.allow6, offset: 8, length: 16) + [.counter, .verdict(.drop)]),
            ]),
        ]
    }

    static func mappingElements(_ m: Mapping, into result: inout [(String, Element)]) {
        let key = Fields(.l4proto(m.proto), .port(m.hostPort))
        if m.internalOnly { result.append((Sets.internalPorts.name, Element(key: key))) }
        if let sources = m.allowedSources {
            result.append((Sets.restricted.name, Element(key: key)))
            for range in AddressRange.union(of: sources) {
                result.append((range.first.isV4 ? Sets.allow4.name : Sets.allow6.name,
                               Element(key: key.appending(Field(range.first)), keyEnd: key.appending(Field(range.last)))))
            }
        }
    }

}
