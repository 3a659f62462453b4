import Dataplane
import Foundation
import NetnsLab
import Testing

/// `testSkeleton` with the stamp set: a table that can be stamped.
let stampedSkeleton = Skeleton(table: testSkeleton.table, sets: testSkeleton.sets + [Firewall.stampSet], chains: testSkeleton.chains)

/// The kernel, with another writer that commits a table of its own just before the first generation-guarded
/// commit: the race a stamp must not lose.
final class RacingKernel: NftablesKernel {
    let kernel: Nftables
    private(set) var raced = 0
    private(set) var restarts = 0

    init(_ kernel: Nftables) { self.kernel = kernel }

    func commit(_ transaction: Transaction) throws(NetlinkError) { try kernel.commit(transaction) }
    func check(_ transaction: Transaction) throws(NetlinkError) -> [NetlinkError] { try kernel.check(transaction) }
    func read(_ skeleton: Skeleton) throws(NetlinkError) -> KernelTable? { try kernel.read(skeleton) }
    func generation() throws(NetlinkError) -> UInt32 { try kernel.generation() }

    func commit(_ transaction: Transaction, atGeneration generation: UInt32) throws(NetlinkError) {
        if raced == 0 {
            raced += 1
            var other = Transaction()
            other.append(.addTable(Table(name: "racer"), comment: "someone else"))
            try kernel.commit(other)
        }
        do {
            try kernel.commit(transaction, atGeneration: generation)
        } catch {
            if error.code == ERESTART { restarts += 1 }
            throw error
        }
    }
}

@Suite("Stamps: a table known to be what an input makes, while nobody commits")
struct StampTests {
    @Test("a stamped table is known as such until anyone commits anything; an unstamped sync removes the stamp")
    func stampedUntilAnyCommit() throws {
        let ns = try NetworkNamespace("stamp")
        let firewall = Firewall(skeleton: stampedSkeleton, nftables: try Nftables(namespacePath: ns.path))
        let desired: TableElements = ["ports": mappings(0..<100)]
        #expect(try !firewall.stamped("input a"), "no table yet")
        // The stamp (a digest of a whole file, in epokd) is made only when there is one to compare it with.
        var made = 0
        #expect(try !firewall.stamped { made += 1; return "input a" })
        #expect(made == 0, "a stamp was made for a table that has none")
        try firewall.synchronize(desired, stamp: "input a")
        #expect(try firewall.stamped("input a"))
        #expect(try firewall.stamped { made += 1; return "input a" } && made == 1)
        #expect(try !firewall.stamped("input b"))
        #expect(try !firewall.stamped { nil }, "an input that cannot be stamped")
        let kernel = try #require(try Nftables(namespacePath: ns.path).read(stampedSkeleton))
        #expect(kernel.elements["ports"] == desired["ports"])
        let listing = try ns.exec(["nft", "list", "ruleset"])
        #expect(listing.error.isEmpty, "\(listing.error)")
        #expect(listing.output.contains("comment \"input a generation "), "\(listing.output)")

        // Another table's commit moves the generation: the stamp no longer vouches for anything.
        _ = try ns.exec(["nft", "add", "table", "inet", "operator"])
        #expect(try !firewall.stamped("input a"))
        try firewall.synchronize(desired, stamp: "input a")
        #expect(try firewall.stamped("input a"), "stamped again by a sync that changed no element")

        try firewall.synchronize(desired)
        #expect(try !firewall.stamped("input a"))
        #expect(try Nftables(namespacePath: ns.path).read(stampedSkeleton)?.elements[Firewall.stampSet.name] == [])
    }

    @Test("a commit at a stale generation is refused whole (ERESTART); a stamped sync raced by another writer reads again and commits")
    func racedWriter() throws {
        let ns = try NetworkNamespace("stamprace")
        let nft = try Nftables(namespacePath: ns.path)
        let before = try nft.generation()
        try nft.commit(.create(stampedSkeleton, elements: [:], existing: nil))
        #expect(try nft.generation() == Nftables.generation(after: before))
        var stale = Transaction()
        stale.append(.addElements(stampedSkeleton.table, stampedSkeleton.sets[0], [portMapping(1)]))
        let refused = #expect(throws: NetlinkError.self) { try nft.commit(stale, atGeneration: before) }
        #expect(refused?.code == ERESTART, "\(String(describing: refused))")
        #expect(try nft.read(stampedSkeleton)?.elements["ports"] == [], "nothing of the refused batch applied")

        let racing = RacingKernel(nft)
        let firewall = Firewall(skeleton: stampedSkeleton, nftables: racing)
        try firewall.synchronize(["ports": mappings(0..<10)], stamp: "input r")
        #expect(racing.raced == 1)
        #expect(racing.restarts == 1, "the kernel refused the raced commit")
        #expect(try firewall.stamped("input r"))
        #expect(try nft.read(stampedSkeleton)?.elements["ports"] == mappings(0..<10))
        #expect(try ns.nftList("inet", "racer").contains("racer"))
    }
}
