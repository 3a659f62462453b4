@testable import Dataplane
import Foundation
import NetnsLab
import Testing

@Suite("Read-backs compared as they are read: the same table as a full read, without a second copy of it")
struct ComparedReadTests {
    @Test("a table as expected is all matched, nothing kept; drift of every kind is found exactly as a full read finds it")
    func comparedWithExpected() throws {
        let ns = try NetworkNamespace("compared")
        let nft = try Nftables(namespacePath: ns.path)
        func countedElement(_ i: Int) -> Element {
            Element(key: [.l4proto(.tcp), .port(Port(2000 + i)!)], value: [.port(Port(80)!), .mark(UInt32(i))])
        }
        let counted = Set((0..<50).map(countedElement))
        let expected: TableElements = ["ports": mappings(0..<1_000), "counted": counted, "allow": []]
        try nft.commit(.create(testSkeleton, elements: expected, existing: nil))

        let same = try #require(try nft.read(testSkeleton, comparedWith: expected))
        #expect(same.sets["ports"]?.matched?.count == 1_000 && same.sets["ports"]?.elements.isEmpty == true)
        #expect(same.sets["counted"]?.matched?.count == 50 && same.sets["counted"]?.elements.isEmpty == true)
        let whole = same.elements(comparedWith: expected) == expected
        #expect(whole, "the elements of a compared read are not the table's")

        // Drift: an element gone, one changed (another value), one added by hand.
        var drift = Transaction()
        let gone = portMapping(3), changed = portMapping(7)
        var moved = changed
        moved.value = [.ipv4(IPv4Address(value: 0x0a00_0063)), .port(Port(9999)!)]
        drift.append(.deleteElements(testSkeleton.table, testSkeleton.sets[0], [gone, changed]))
        drift.append(.addElements(testSkeleton.table, testSkeleton.sets[0], [moved, portMapping(5_000)]))
        try nft.commit(drift)

        let full = try #require(try nft.read(testSkeleton))
        let compared = try #require(try nft.read(testSkeleton, comparedWith: expected))
        #expect(compared.sets["ports"]?.matched?.count == 998)
        #expect(Set(compared.sets["ports"]?.elements ?? []) == [moved, portMapping(5_000)])
        let agree = compared.elements(comparedWith: expected) == full.elements
        #expect(agree, "a compared read and a full read of the same table disagree")
        #expect(compared.sets["counted"]?.counters.isEmpty == true, "a compared read reads no counters")
        #expect(full.sets["counted"]?.counters.count == 50)
    }

    @Test("synchronize repairs drift through a compared read: the kernel ends as desired, and what it held before is known")
    func synchronizeRepairs() throws {
        let ns = try NetworkNamespace("compared")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: testSkeleton, nftables: nft)
        let desired: TableElements = ["ports": mappings(0..<500)]
        try firewall.synchronize(desired)
        var drift = Transaction()
        drift.append(.deleteElements(testSkeleton.table, testSkeleton.sets[0], [portMapping(10)]))
        drift.append(.addElements(testSkeleton.table, testSkeleton.sets[0], [portMapping(900)]))
        try nft.commit(drift)

        let repaired = Firewall(skeleton: testSkeleton, nftables: nft)
        let outcome = try repaired.synchronize(desired)
        #expect(outcome.added == 1 && outcome.deleted == 1)
        let found = repaired.foundInKernel?["ports"] == mappings(0..<500).subtracting([portMapping(10)]).union([portMapping(900)])
        #expect(found, "what the kernel held before the repair")
        let repairedToDesired = try nft.read(testSkeleton)?.elements["ports"] == desired["ports"]
        #expect(repairedToDesired, "the kernel after the repair")
    }

    @Test("the positions a compared read found: each once, in order, any repeat noticed, each found by contains")
    func matchedPositions() {
        var rng = SeededGenerator()
        let set = Set((0..<3_000).map { portMapping($0) })
        let all = Array(set.indices)
        for round in 0..<50 {
            let taken = all.filter { _ in Bool.random(using: &rng) }
            let repeats = round % 2 == 0 ? [] : (0..<Int.random(in: 1...5, using: &rng)).compactMap { _ in taken.randomElement(using: &rng) }
            let positions = MatchedPositions(found: (taken + repeats).shuffled(using: &rng))
            #expect(positions.count == taken.count && Array(positions) == taken.sorted(), "round \(round)")
            #expect(positions.repeated == !repeats.isEmpty, "round \(round)")
            let inside = Set(taken)
            #expect(all.allSatisfy { positions.contains($0) == inside.contains($0) }, "round \(round)")
        }
        #expect(MatchedPositions(found: []).count == 0 && !MatchedPositions(found: []).contains(all[0]))
    }
}
