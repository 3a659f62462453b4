import Control
import Dataplane
import Foundation
import Testing

@Suite("The --once stamp covers everything a table is made from")
struct SnapshotStampTests {
    let file = Array(#"{"apiVersion":"v1","kind":"List","items":[]}"#.utf8)
    let skeleton = ForwardingRuleset.skeleton(counters: true)
    let base = ForwardingOptions(interfaces: ["eth0", "wg0"], externalInterface: "eth0")

    /// One change of each option. Its keys must be every stored property of `ForwardingOptions`: an option the stamp
    /// left out would let a `--once` run with only that option changed find the stamp and change nothing.
    var variants: [String: ForwardingOptions] {
        func with(_ change: (inout ForwardingOptions) -> Void) -> ForwardingOptions {
            var options = base
            change(&options)
            return options
        }
        return [
            "interfaces": with { $0.interfaces = ["eth0"] },
            "externalInterface": with { $0.externalInterface = nil },
            "hostPorts": with { $0.hostPorts = [Port(1024)!...Port(65535)!] },
            "nodeCIDRs": with { $0.nodeCIDRs = [try! CIDR(parsing: "10.0.1.0/24")] },
            "hostAddresses": with { $0.hostAddresses = [IPAddress("10.0.0.1")!] },
            "firewallInterfaces": with { $0.firewallInterfaces = ["eth0"] },
            "inputPorts": with { $0.inputPorts = [PortKey(proto: .tcp, port: Port(22)!)] },
            "addressPools": with { $0.addressPools = [try! CIDR(parsing: "198.51.100.0/28")] },
            "gateways": with { $0.gateways = [IPAddress("192.0.2.254")!] },
        ]
    }

    @Test("each option, the file's bytes and the skeleton change the stamp; the same input gives the same stamp")
    func everyInputCounts() {
        #expect(Set(Mirror(reflecting: base).children.compactMap(\.label)) == Set(variants.keys),
                "ForwardingOptions has an option SnapshotFile.stamp(digest:options:skeleton:) does not name")
        let stamp = SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: base, skeleton: skeleton)
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: base, skeleton: skeleton) == stamp)
        for (option, options) in variants {
            #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: options, skeleton: skeleton) != stamp, "changing \(option) left the stamp as it was")
        }
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file + Array(" ".utf8)), options: base, skeleton: skeleton) != stamp)
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: base, skeleton: ForwardingRuleset.skeleton(counters: false)) != stamp)
    }

    @Test("any one bit changed anywhere in a file, or a byte more or less, changes its digest")
    func digestSeesEveryBit() {
        var rng = SystemRandomNumberGenerator()
        for size in [0, 1, 7, 8, 9, 63, 64, 65, 1_000] {
            let bytes = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let digest = SnapshotFile.digest(bytes)
            #expect(SnapshotFile.digest(bytes) == digest)
            #expect(SnapshotFile.digest(bytes + [0]) != digest, "a zero byte added to \(size)")
            if size > 0 { #expect(SnapshotFile.digest(Array(bytes.dropLast())) != digest, "the last of \(size) dropped") }
            for position in 0..<size {
                for bit in 0..<8 {
                    var changed = bytes
                    changed[position] ^= 1 << bit
                    #expect(SnapshotFile.digest(changed) != digest, "bit \(bit) of byte \(position) of \(size)")
                }
            }
        }
        // The same high bit changed in two words does not cancel out (a multiply alone carries a change only upwards).
        let bytes = (0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) }
        for i in 0..<8 {
            for j in (i + 1)..<8 {
                var changed = bytes
                changed[8 * i + 7] ^= 0x80
                changed[8 * j + 7] ^= 0x80
                #expect(SnapshotFile.digest(changed) != SnapshotFile.digest(bytes), "the top bit of words \(i) and \(j)")
            }
        }
    }

    @Test("an empty option is not an absent one: no interface named \"\" passes for no external interface")
    func emptyIsNotAbsent() {
        var empty = base
        empty.externalInterface = ""
        var absent = base
        absent.externalInterface = nil
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: empty, skeleton: skeleton) != SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: absent, skeleton: skeleton))
        empty.nodeCIDRs = []
        absent.nodeCIDRs = nil
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: empty, skeleton: skeleton) != SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: absent, skeleton: skeleton))
    }

    @Test("the host's addresses count as a set: the order they were found in does not change the stamp")
    func addressOrder() {
        let addresses = (1...64).map { IPAddress("10.0.\($0 / 8).\($0)")! }
        var forward = base, backward = base
        for a in addresses { forward.hostAddresses.insert(a) }
        backward.hostAddresses.reserveCapacity(1000)
        for a in addresses.reversed() { backward.hostAddresses.insert(a) }
        #expect(SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: forward, skeleton: skeleton) == SnapshotFile.stamp(digest: SnapshotFile.digest(file), options: backward, skeleton: skeleton))
    }
}
