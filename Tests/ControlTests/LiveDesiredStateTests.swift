import Control
import Foundation
import Dataplane
import NetnsLab
import Synchronization
import Testing

@Suite("Incremental desired state")
struct LiveDesiredStateTests {
    func reference(_ live: LiveDesiredState) -> TableElements {
        ForwardingRuleset.elements(for: DesiredState(snapshot: live.snapshot, options: live.options).forwarding)
    }

    @Test("property: after any sequence of changes the diffs add up to the full computation")
    func matchesFullComputation() {
        var rng = SeededGenerator()
        for round in 0..<40 {
            let live = LiveDesiredState(options: options)
            var kernel = live.elements
            var present: [ServiceRef: String] = [:]
            var before = DesiredState(snapshot: live.snapshot, options: live.options).forwarding
            for step in 0..<60 {
                let diff: ElementDiff
                switch Int.random(in: 0..<10, using: &rng) {
                case 0..<5:
                    let port = Int.random(in: 20...30, using: &rng)
                    var annotations: StringMap = [EpokAnnotation.externalPorts: Bool.random(using: &rng) ? "\(port):30022" : "\(port):30022,\(port + 100):30053:udp"]
                    if Int.random(in: 0..<4, using: &rng) == 0 { annotations[EpokAnnotation.allowRange] = ["10.0.0.0/8", "2001:db8::/32, 192.168.0.0/16", "bad/99"].randomElement(using: &rng)! }
                    if Int.random(in: 0..<4, using: &rng) == 0 { annotations[EpokAnnotation.internal] = "" }
                    if Int.random(in: 0..<8, using: &rng) == 0 { annotations[EpokAnnotation.externalPorts] = "oops" }
                    let changed = service("s\(Int.random(in: 0..<8, using: &rng))", namespace: "ns\(Int.random(in: 0..<2, using: &rng))",
                                          created: "2024-01-0\(Int.random(in: 1...3, using: &rng))T00:00:00Z", annotations: annotations,
                                          nodePorts: [(30022, "TCP"), (30053, "UDP")])
                    diff = live.upsert(changed)
                    present[changed.ref] = changed.metadata.annotation(EpokAnnotation.externalPorts)
                case 5..<7:
                    let ref = ServiceRef(namespace: "ns\(Int.random(in: 0..<2, using: &rng))", name: "s\(Int.random(in: 0..<8, using: &rng))")
                    diff = live.remove(ref)
                    present[ref] = nil
                case 7..<9:
                    let i = Int.random(in: 1...4, using: &rng)
                    diff = live.upsert(node("n\(i)", ready: Bool.random(using: &rng), addresses: ["10.0.1.\(i)", "fd00::\(i)"].filter { _ in Bool.random(using: &rng) },
                                            labels: Int.random(in: 0..<5, using: &rng) == 0 ? [EpokAnnotation.excludeLabel: ""] : nil))
                default:
                    diff = live.remove(node: "n\(Int.random(in: 1...4, using: &rng))")
                }
                kernel = diff.applied(to: kernel)
                let expected = reference(live)
                // Every Service held is found under its own ref, as last given (records move when others are removed).
                #expect(Set(live.serviceRefs) == Set(present.keys) && live.serviceRefs.count == present.count, "\(rng) round \(round) step \(step)")
                #expect(present.allSatisfy { live.service($0.key)?.metadata.annotation(EpokAnnotation.externalPorts) == $0.value }, "\(rng) round \(round) step \(step)")
                // The flows made stale since the step before, found through the claims, are those the full states give.
                let now = DesiredState(snapshot: live.snapshot, options: live.options).forwarding
                #expect(live.staleFlows(since: before) == StaleFlows.between(before, now), "\(rng) round \(round) step \(step)")
                before = now
                #expect(live.elements == expected, "\(rng) round \(round) step \(step): live state differs from the full computation")
                #expect(kernel == expected, "\(rng) round \(round) step \(step): the diffs do not add up")
                if live.elements != expected || kernel != expected { return }
            }
        }
    }

    @Test("a large first snapshot, whose Services' own parts another thread makes as they are filed, comes to what upserting them one by one does")
    func largeFirstSnapshot() {
        foldFirstSnapshot(refused: false)
    }

    @Test("the same, refused a thread for the own parts (the process at its tasks limit): the filing thread makes them")
    func firstSnapshotWithoutHelper() {
        foldFirstSnapshot(refused: true)
    }

    /// A first snapshot of 7,000 Services folded at once, compared with upserting them one by one; `refused`, with
    /// every thread for the own parts refused.
    func foldFirstSnapshot(refused: Bool) {
        var rng = SeededGenerator()
        // Conflicting ports (older and younger claimants), rate limits, allow-ranges, internal ports and bad annotations.
        let services = (0..<7_000).map { i in
            let port = 1 + Int.random(in: 0..<5_000, using: &rng)
            var annotations: StringMap = [EpokAnnotation.externalPorts: Int.random(in: 0..<20, using: &rng) == 0 ? "\(port):oops" : "\(port):30022,\(port + 5_000):30053:udp"]
            switch Int.random(in: 0..<8, using: &rng) {
            case 0: annotations[EpokAnnotation.rateLimit] = ["100/second", "5 mbytes/second", "fast"].randomElement(using: &rng)!
            case 1: annotations[EpokAnnotation.allowRange] = ["10.0.0.0/8", "2001:db8::/32, 192.168.0.0/16", "bad/99"].randomElement(using: &rng)!
            case 2: annotations[EpokAnnotation.internal] = ""
            default: break
            }
            return service("s\(i)", namespace: "ns\(i % 7)", created: "2024-01-0\(Int.random(in: 1...9, using: &rng))T00:00:00Z",
                           annotations: annotations, nodePorts: [(30022, "TCP"), (30053, "UDP")])
        }
        let nodes = (1...3).map { node("n\($0)", addresses: ["10.0.1.\($0)"]) }
        let folded = LiveDesiredState(options: options)
        let asked = Mutex(0)
        if refused {
            folded.threads = { name, _ throws(ThreadRefused) in
                asked.withLock { $0 += 1 }
                throw ThreadRefused(name: name, code: EAGAIN)
            }
        }
        let diff = folded.replaceAll(ClusterSnapshot(services: services, nodes: nodes))
        #expect(asked.withLock { $0 } == (refused ? 4 : 0), "a thread asked for every piece of 2,048 Services")
        let oneByOne = LiveDesiredState(options: options)
        for node in nodes { _ = oneByOne.upsert(node) }
        for service in services { _ = oneByOne.upsert(service) }
        // Compared apart from the expectations, which would print every element of a difference.
        let same = folded.elements == oneByOne.elements, addsUp = diff.applied(to: LiveDesiredState(options: options).elements) == folded.elements
        #expect(same, "the elements differ")
        #expect(addsUp, "the first snapshot's diff does not add up to its elements")
        #expect(folded.problems.count == oneByOne.problems.count && folded.problems.count > 700)
        #expect(services.allSatisfy { folded.problems(of: $0.ref) == oneByOne.problems(of: $0.ref) }, "the same problems, in the same order, for each Service")
    }

    @Test("a conflict loser takes over the port when the older Service goes, in one diff")
    func loserTakesOver() {
        let live = LiveDesiredState(options: options)
        _ = live.upsert(service("old", created: "2023-01-01T00:00:00Z", annotations: [EpokAnnotation.externalPorts: "22:30022"]))
        let young = service("young", created: "2024-01-01T00:00:00Z", annotations: [EpokAnnotation.externalPorts: "22:30053:udp,22:30022"],
                            nodePorts: [(30022, "TCP"), (30053, "UDP")])
        _ = live.upsert(young)
        #expect(live.problems(of: young.ref).map(\.reason) == [.portConflict])
        let diff = live.remove(ServiceRef(namespace: "default", name: "old"))
        let added = diff.added["services"] ?? []
        #expect(diff.deletedCount == 1 && diff.addedCount == 1, "only the owner's name changes in the kernel")
        #expect(added.first?.comment == "default/young")
        #expect(added.first?.value == diff.deleted["services"]?.first?.value, "the same node port and group: forwarding is unchanged")
        #expect(live.problems(of: young.ref).isEmpty)
    }

    @Test("one Service change among many touches only that Service's elements")
    func changeIsLocal() {
        let live = LiveDesiredState(options: options)
        for i in 0..<500 { _ = live.upsert(service("s\(i)", annotations: [EpokAnnotation.externalPorts: "\(1000 + i):30022"])) }
        let diff = live.upsert(service("s7", annotations: [EpokAnnotation.externalPorts: "1007:30053:udp"], nodePorts: [(30053, "UDP")]))
        #expect(diff.deletedCount == 1 && diff.addedCount == 1)
    }
}

@Suite("What the status page says of each Node")
struct NodeViewTests {
    @Test("each Node's state in words: ready, not ready, excluded (annotation or label), draining, no address")
    func words() {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [], nodes: [
            node("a", addresses: ["10.0.0.1"]),
            node("b", ready: false, addresses: ["10.0.0.2"]),
            node("c", addresses: ["10.0.0.3"], annotations: [EpokAnnotation.exclude: "true"]),
            node("d", addresses: ["10.0.0.4"], labels: [EpokAnnotation.excludeLabel: "yes"]),
            node("e", addresses: ["10.0.0.5"], annotations: [EpokAnnotation.drain: "true"]),
            node("f", addresses: ["not-an-address"]),
        ]))
        #expect(live.nodeViews.map { "\($0.name) \($0.state)" } == ["a ready", "b not ready", "c excluded", "d excluded", "e draining", "f no address"])
        #expect(live.nodeViews.first?.addresses == ["10.0.0.1"])
    }
}
