import Dataplane
import Foundation
import NetnsLab
import Testing

/// A small skeleton with the kinds of sets epokd uses: a data map, an interval concatenation and a counted map.
let testSkeleton = Skeleton(
    table: Table(name: "epoktest"),
    sets: [
        NamedSet(name: "ports", key: [.l4proto, .port], value: [.ipv4, .port]),
        NamedSet(name: "allow", key: [.l4proto, .port, .ipv4], interval: true),
        NamedSet(name: "counted", key: [.l4proto, .port], value: [.port, .mark], counters: true),
    ],
    chains: [
        Chain(name: "dnat", kind: .nat, hook: .prerouting, priority: -100, rules: [
            Rule("forward mapped ports", [
                .meta(.nfproto, into: .r(0)),
                .compare(.r(0), equal: true, [2]),
                .meta(.l4proto, into: .r(0)),
                .payload(.transport, offset: 2, length: 2, into: .r(1)),
                .lookup(set: "ports", from: .r(0), into: .r(2)),
                .dnat(family: .ipv4, address: .r(2), port: .r(3)),
            ]),
        ]),
    ])

func portMapping(_ i: Int) -> Element {
    let port = Port(1 + i % 65535)!
    let proto: L4Protocol = i < 65535 ? .tcp : .udp
    return Element(key: [.l4proto(proto), .port(port)],
                   value: [.ipv4(IPv4Address(value: 0x0A00_0000 | UInt32(i % 250 + 1))), .port(Port(30000 + i % 2000)!)])
}

func mappings(_ range: Range<Int>) -> Set<Element> { Set(range.map(portMapping)) }

@Suite("Transactions against the kernel, in a throwaway namespace")
struct TransactionTests {
    @Test("the skeleton and 10,000 elements are created in one transaction and read back exactly")
    func create10k() throws {
        let ns = try NetworkNamespace("tx10k")
        let nft = try Nftables(namespacePath: ns.path)
        let desired: TableElements = ["ports": mappings(0..<10_000)]
        try nft.commit(.create(testSkeleton, elements: desired, existing: nil))
        let kernel = try #require(try nft.read(testSkeleton))
        #expect(kernel.matches(testSkeleton))
        #expect(kernel.sets["ports"]?.elements.count == 10_000)
        let same = kernel.elements["ports"] == desired["ports"]
        #expect(same, "sets differ (\(kernel.elements["ports"]?.count ?? 0) read)")
        #expect(kernel.elements["allow"] == [])
        #expect(try ns.nftList("inet", "epoktest").contains("comment \"\(testSkeleton.fingerprint)\""))
    }

    @Test("50,000 map elements commit with every element present (no silent loss)")
    func create50k() throws {
        let ns = try NetworkNamespace("tx50k")
        let nft = try Nftables(namespacePath: ns.path)
        let desired = mappings(0..<50_000)
        try nft.commit(.create(testSkeleton, elements: ["ports": Set(desired)], existing: nil))
        let kernel = try #require(try nft.read(testSkeleton))
        let read = Set(kernel.sets["ports"]?.elements ?? [])
        let same = read == desired
        #expect(kernel.sets["ports"]?.elements.count == 50_000)
        #expect(same, "missing \(desired.subtracting(read).prefix(3)), unexpected \(read.subtracting(desired).prefix(3))")
    }

    @Test("a diff adds k, removes j, changes values, and leaves every other element as it was")
    func diffChangesExactlyWhatItSays() throws {
        let ns = try NetworkNamespace("diff")
        let nft = try Nftables(namespacePath: ns.path)
        let firewall = Firewall(skeleton: testSkeleton, nftables: nft)
        let before: TableElements = ["ports": mappings(0..<5_000), "allow": []]
        #expect(try firewall.synchronize(before).rebuilt)

        var after = before
        after["ports"]!.subtract(mappings(100..<130))             // remove 30
        after["ports"]!.formUnion(mappings(5_000..<5_040))         // add 40
        let changed = portMapping(7)
        after["ports"]!.remove(changed)                            // change one value
        after["ports"]!.insert(Element(key: changed.key, value: [.ipv4(IPv4Address(192, 0, 2, 7)), .port(Port(31000)!)]))
        let range = Element(key: [.l4proto(.tcp), .port(Port(22)!), .ipv4(IPv4Address(10, 0, 0, 0))],
                            keyEnd: [.l4proto(.tcp), .port(Port(22)!), .ipv4(IPv4Address(10, 255, 255, 255))])
        after["allow"] = [range]

        let outcome = try firewall.apply(after)
        #expect(outcome == Firewall.Outcome(rebuilt: false, added: 42, deleted: 31))
        let kernel = try #require(try nft.read(testSkeleton))
        let same = kernel.elements["ports"] == after["ports"]
        #expect(same, "sets differ (\(kernel.elements["ports"]?.count ?? 0) read)")
        #expect(kernel.elements["allow"] == [range])
        let listing = try ns.nftList("inet", "epoktest")
        #expect(listing.contains("tcp . 22 . 10.0.0.0/8"))
    }

    @Test("one invalid operation in the middle leaves the previous state byte-for-byte and names the element")
    func invalidOperationAbortsEverything() throws {
        let ns = try NetworkNamespace("abort")
        let nft = try Nftables(namespacePath: ns.path)
        let initial = Array(mappings(0..<2_000))
        try nft.commit(.create(testSkeleton, elements: ["ports": Set(initial)], existing: nil))
        let listingBefore = try ns.nftList("inet", "epoktest")

        let ports = testSkeleton.set(named: "ports")!
        let duplicate = portMapping(1_500)   // already present: NLM_F_EXCL makes the kernel refuse it
        var tx = Transaction()
        tx.append(.deleteElements(testSkeleton.table, ports, ElementBatch(Array(mappings(0..<500)))))
        tx.append(.addElements(testSkeleton.table, ports, ElementBatch(Array(mappings(2_000..<4_000)) + [duplicate] + Array(mappings(4_000..<4_100)))))
        tx.append(.addElements(testSkeleton.table, testSkeleton.set(named: "allow")!, [
            Element(key: [.l4proto(.udp), .port(Port(53)!), .ipv4(IPv4Address(192, 168, 0, 0))],
                    keyEnd: [.l4proto(.udp), .port(Port(53)!), .ipv4(IPv4Address(192, 168, 255, 255))]),
        ]))

        let error = try #require(throws: NetlinkError.self) { try nft.commit(tx) }
        #expect(error.code == EEXIST)
        #expect(error.subject == "table epoktest: map ports: add element \(duplicate) rejected")
        #expect(try ns.nftList("inet", "epoktest") == listingBefore)
        let unchanged = try nft.read(testSkeleton)?.elements["ports"] == Set(initial)
        #expect(unchanged)
    }

    @Test("an element for a set that does not exist is refused with the operation named")
    func missingSetIsNamed() throws {
        let ns = try NetworkNamespace("noset")
        let nft = try Nftables(namespacePath: ns.path)
        try nft.commit(.create(testSkeleton, elements: [:], existing: nil))
        var tx = Transaction()
        tx.append(.addElements(testSkeleton.table, NamedSet(name: "nosuchset", key: [.port]), [Element(key: [.port(Port(80)!)])]))
        let error = try #require(throws: NetlinkError.self) { try nft.commit(tx) }
        #expect(error.code == ENOENT)
        #expect(error.description.contains("nosuchset"))
    }

    @Test("a reader on another socket only ever sees the state before or after a commit")
    func readersSeeNoIntermediateState() throws {
        let ns = try NetworkNamespace("atomic")
        let writer = try Nftables(namespacePath: ns.path)
        let stateA = mappings(0..<6_000)
        let stateB = mappings(3_000..<9_000)
        try writer.commit(.create(testSkeleton, elements: ["ports": Set(stateA)], existing: nil))
        let firewall = Firewall(skeleton: testSkeleton, nftables: writer)
        try firewall.synchronize(["ports": stateA])

        // A writer thread commits back and forth 20 times while the reader reads; the reader notes the ruleset
        // generation around each read, to show that commits landed while it was reading.
        let path = ns.path
        let committer = WriterThread(runs: 20) { commits throws in
            try firewall.apply(["ports": commits % 2 == 0 ? stateB : stateA])
        }
        let reader = try Nftables(namespacePath: path)
        var seen: [Set<Element>] = []
        var overlapped = 0
        while seen.count < 25 || !committer.isFinished {
            let before = try reader.generation()
            seen.append(try #require(try reader.read(testSkeleton)).elements["ports"] ?? [])
            if try reader.generation() != before { overlapped += 1 }
        }
        let commits = try committer.stop()
        #expect(commits >= 2 && overlapped > 0, "commits (\(commits)) landed while reads (\(overlapped) of 25) were in flight")
        for state in seen {
            let consistent = state == stateA || state == stateB
            #expect(consistent, "a reader saw \(state.count) elements, neither state")
        }
    }

    @Test("a missing table reads as nil and removing it twice is harmless")
    func absentTable() throws {
        let ns = try NetworkNamespace("absent")
        let nft = try Nftables(namespacePath: ns.path)
        #expect(try nft.read(testSkeleton) == nil)
        let firewall = Firewall(skeleton: testSkeleton, nftables: nft)
        try firewall.synchronize(["ports": mappings(0..<10)])
        try firewall.remove()
        try firewall.remove()
        #expect(try nft.read(testSkeleton) == nil)
    }
}

/// Runs `body` over and over on a thread of its own until stopped (or `runs` times), counting the runs.
final class WriterThread: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    private var stopped = false
    private var failure: Error?
    private let finished = DispatchSemaphore(value: 0)

    /// `body` runs on the writer's thread only, never concurrently with itself, `runs` times at most.
    init(runs: Int, _ body: @escaping (Int) throws -> Void) {
        nonisolated(unsafe) let body = body
        Thread { [self] in
            while !lock.withLock({ stopped || count >= runs }) {
                do {
                    try body(commits)
                    lock.withLock { count += 1 }
                } catch {
                    lock.withLock { failure = error; stopped = true }
                }
            }
            finished.signal()
        }.start()
    }

    var commits: Int { lock.withLock { count } }
    var isFinished: Bool { finished.wait(timeout: .now()) == .success ? { finished.signal(); return true }() : false }

    /// Stops the thread and returns how many runs it made; rethrows the error that stopped it.
    func stop() throws -> Int {
        lock.withLock { stopped = true }
        finished.wait()
        if let failure = lock.withLock({ failure }) { throw failure }
        return commits
    }
}
