import Control
import Dataplane
import Foundation
import NetnsLab
import Testing

@Suite("Hostile input, before the kernel")
struct HostileInputTests {
    let nodes = [node("n1", addresses: ["10.0.1.1"])]

    @Test("node addresses that cannot be backends are refused, with a problem naming the Node")
    func nodeAddresses() {
        let bad = ["127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.251", "255.255.255.255", "::1", "::", "fe80::1", "ff02::1", "::ffff:10.0.0.1"]
        let all = nodes + bad.enumerated().map { node("bad\($0.offset)", addresses: [$0.element]) }
        let state = DesiredState(snapshot: ClusterSnapshot(nodes: all), options: options)
        #expect(state.nodes.map(\.node) == ["n1"])
        for (i, address) in bad.enumerated() {
            let mine = state.problems.filter { $0.object == "Node bad\(i)" }
            #expect(mine.map(\.reason) == [.invalidNodeAddress, .nodeWithoutAddress], "\(address): \(mine)")
            #expect(mine.first?.message.contains("never used as a backend") == true)
        }
        // A node with one bad and one good address keeps the good one, and the bad one is still reported.
        let mixed = DesiredState(snapshot: ClusterSnapshot(nodes: [node("m", addresses: ["127.0.0.1", "10.0.1.5"])]), options: options)
        #expect(mixed.nodes.first?.ipv4?.description == "10.0.1.5")
        #expect(mixed.problems.map(\.reason) == [.invalidNodeAddress])
    }

    @Test("the host's own addresses and addresses outside --node-cidrs are refused as backends")
    func hostAndNodeCIDRs() throws {
        var restricted = options
        restricted.hostAddresses = [IPAddress("10.0.1.1")!]
        restricted.nodeCIDRs = [try CIDR(parsing: "10.0.0.0/16")]
        let all = [node("self", addresses: ["10.0.1.1"]), node("in", addresses: ["10.0.9.9"]), node("out", addresses: ["192.168.1.1"])]
        let state = DesiredState(snapshot: ClusterSnapshot(nodes: all), options: restricted)
        #expect(state.nodes.map(\.node) == ["in"])
        #expect(state.problems.contains { $0.object == "Node self" && $0.message.contains("an address of this host") })
        #expect(state.problems.contains { $0.object == "Node out" && $0.message.contains("outside --node-cidrs 10.0.0.0/16") })
    }

    @Test("creation timestamps are compared as times; an unparsable one loses a conflict")
    func timestamps() {
        #expect(Timestamp.seconds("1970-01-01T00:00:00Z") == 0)
        #expect(Timestamp.seconds("2024-02-29T12:34:56Z") == 1_709_210_096)
        #expect(Timestamp.seconds("2024-02-29T14:34:56+02:00") == 1_709_210_096, "offsets are applied")
        #expect(Timestamp.seconds("2024-02-29T12:34:56.999Z") == 1_709_210_096)
        for junk in ["0", "", "2024-13-01T00:00:00Z", "2024-01-01 00:00:00Z", "2024-01-01T00:00:00", "2024-01-01T00:00:00Zjunk", "９９９９-01-01T00:00:00Z"] {
            #expect(Timestamp.seconds(junk) == nil, "\(junk)")
        }
        let zero = service("zero", created: "0", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let offset = service("offset", created: "2024-01-01T09:00:00+10:00", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let older = service("older", created: "2024-01-01T00:00:00Z", annotations: [EpokAnnotation.externalPorts: "22:30022"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [zero, older, offset], nodes: nodes), options: options)
        #expect(state.ports.map(\.service.name) == ["offset"], "23:00 the day before (UTC) is older than 00:00; \"0\" is no time at all")
        let live = LiveDesiredState(options: options)
        _ = live.upsert(zero)
        _ = live.upsert(older)
        #expect(live.mappings(of: older.ref).count == 1 && live.mappings(of: zero.ref).isEmpty)
    }

    @Test("times are written in RFC 3339 as the API server writes them, and read back to the microsecond")
    func timesWritten() {
        #expect(Timestamp.text(0) == "1970-01-01T00:00:00Z")
        #expect(Timestamp.text(1_709_210_096) == "2024-02-29T12:34:56Z")
        #expect(Timestamp.text(1_709_210_096.25, microseconds: true) == "2024-02-29T12:34:56.250000Z")
        #expect(Timestamp.text(951_868_799.999_999_5, microseconds: true) == "2000-02-29T23:59:59.999999Z", "a fraction is cut, never rounded into the next second")
        #expect(Timestamp.text(-1) == "1969-12-31T23:59:59Z")
        #expect(Timestamp.text(253_402_300_799) == "9999-12-31T23:59:59Z")
        // Against Foundation's formatter over four centuries (every leap rule), and back through the reader.
        let formatter = ISO8601DateFormatter()
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<5_000 {
            let seconds = Double(Int64.random(in: -2_208_988_800...10_413_792_000, using: &generator))
            let micros = Double(Int.random(in: 0..<1_000_000, using: &generator))
            let time = seconds + micros / 1_000_000
            #expect(Timestamp.text(time) == formatter.string(from: Date(timeIntervalSince1970: seconds)), "\(time)")
            let written = Timestamp.text(time, microseconds: true)
            #expect(abs((Timestamp.unixTime(written) ?? .nan) - time) < 2e-6, "\(written) for \(time)")
            #expect(Timestamp.seconds(written) == Int64(seconds), "\(written)")
        }
    }

    @Test("limits per Service: more than 1,000 mappings or too many ranges are refused as a whole, with one problem")
    func limits() {
        let huge = service("huge", annotations: [EpokAnnotation.externalPorts: (1...1001).map { "\($0):30022" }.joined(separator: ",")])
        var cidrs = (0..<1001).map { "10.\($0 / 256).\($0 % 256).0/24" }
        let ranged = service("ranged", annotations: [EpokAnnotation.externalPorts: "22:30022", EpokAnnotation.allowRange: cidrs.joined(separator: ",")])
        cidrs = (0..<20).map { "10.\($0 * 2).0.0/16" }
        let product = service("product", annotations: [EpokAnnotation.externalPorts: (1...600).map { "\($0):30022" }.joined(separator: ","),
                                                       EpokAnnotation.allowRange: cidrs.joined(separator: ",")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [huge, ranged, product], nodes: nodes), options: options)
        #expect(state.ports.isEmpty)
        #expect(state.problems.map(\.reason) == [.tooManyEntries, .tooManyEntries, .tooManyEntries], "\(state.problems)")
    }

    @Test("a long annotation whose entries name unknown node ports gives one short problem, not one per entry")
    func unknownNodePortsSummarised() {
        let s = service("many", annotations: [EpokAnnotation.externalPorts: (1...900).map { "\($0):\(31000 + $0)" }.joined(separator: ",")])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: options)
        #expect(state.problems.count == 1)
        #expect(state.problems[0].message.contains("and 895 more"))
        #expect(state.problems[0].message.utf8.count < 1100)
    }

    @Test("--host-ports: a claim outside the allowed ports is refused; the others of the Service stay")
    func hostPorts() throws {
        var limited = options
        limited.hostPorts = try AnnotationParser.portRanges("80,443,1024-65535")
        let s = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022,443:30022,2222:30022"])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: limited)
        #expect(state.ports.map(\.mapping.hostPort) == [.p(443), .p(2222)])
        #expect(state.problems.map(\.reason) == [.hostPortNotAllowed])
        #expect(state.problems[0].message.contains("22:30022:tcp outside --host-ports 80,443,1024-65535"))
        #expect(throws: AnnotationError.self) { try AnnotationParser.portRanges("80,,90") }
        #expect(throws: AnnotationError.self) { try AnnotationParser.portRanges("90-80") }
    }

    @Test("user text in problems is escaped (no forged log lines) and cut")
    func escaping() {
        let s = service("web", annotations: [EpokAnnotation.externalPorts: "22:30022\nlevel=error msg=\"forged\"" + String(repeating: "x", count: 5000)])
        let state = DesiredState(snapshot: ClusterSnapshot(services: [s], nodes: nodes), options: options)
        let message = state.problems[0].description
        #expect(!message.contains("\n"))
        #expect(message.contains("\\nlevel=error"))
        #expect(message.count < 1400)
        #expect(Escaped.text("a\u{0}b\u{1b}[31mc\u{2028}", limit: 100) == "a\\u{0}b\\u{1b}[31mc\\u{2028}")
    }

    @Test("snapshot files: anything but a complete List, a Service or a Node is an error, never an empty cluster")
    func strictSnapshots() {
        let cut = """
        apiVersion: v1
        items:
        - apiVersion: v1
          kind: Node
          metadata: {name: n1}
        """
        let cases: [(String, String)] = [
            ("hello: world", "has no kind"), ("{}", "has no kind"), (cut, "has no kind"), ("", "is empty"), ("  \n", "is empty"),
            ("kind: ConfigMap\nmetadata: {name: x}", "is a ConfigMap, not a List"), ("kind: List", "is a List without items"),
            ("{\"kind\": \"List\", \"items\": [", "is malformed"), ("kind: List\nitems:\n- kind: Service\n  metadata: {}\n  spec: {}", "has no name"),
            ("kind: List\nitems:\n- metadata: {name: a}", "an item has no kind"),
            ("kind: List\nitems:\n- kind: Service\n  metadata: {name: a}\n  spec: {ports: [{port: 80, nodePort: \"30100\"}]}", "wrong type"),
        ]
        for (text, expected) in cases {
            do {
                let snapshot = try SnapshotFile.decode(text)
                Issue.record("\(text.debugDescription) decoded as \(snapshot)")
            } catch {
                #expect("\(error)".contains(expected), "\(text.debugDescription): \(error)")
            }
        }
        #expect((try? SnapshotFile.decode("kind: Node\nmetadata: {name: n1}"))?.nodes.count == 1)
        #expect((try? SnapshotFile.decode("{\"kind\": \"List\", \"items\": []}")) == ClusterSnapshot(referenceGrants: []), "an empty List is an empty cluster (with no ReferenceGrant)")
    }

    @Test("snapshot paths: a directory, a FIFO, a missing file and an unreadable one are explained in words")
    func snapshotPaths() throws {
        let scratch = try ScratchDirectory("paths")
        let dir = scratch.path
        mkfifo(dir + "/fifo", 0o600)
        func reason(_ path: String) -> String {
            do {
                _ = try SnapshotFile.load(path)
                return "loaded"
            } catch {
                return error.reason
            }
        }
        #expect(reason(dir) == "is a directory, not a file (give the path of the snapshot file)")
        #expect(reason(dir + "/fifo").hasPrefix("is a FIFO"))
        #expect(reason(dir + "/missing") == "does not exist")
    }

    @Test("a snapshot file is read whole: larger than its reported size (a file that grew, or /proc's), or of any size")
    func snapshotBytes() throws {
        // /proc reports a size of 0 for a file that has content: what a file that grew after stat looks like.
        let version = try SnapshotFile.read("/proc/self/cmdline")
        let expected = Array(try Data(contentsOf: URL(fileURLWithPath: "/proc/self/cmdline")))
        #expect(!version.isEmpty && version == expected)
        let scratch = try ScratchDirectory("bytes")
        for size in [0, 1, 65_535, 65_536, 200_001] {
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            let path = scratch.path + "/f\(size)"
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            let read = try SnapshotFile.read(path)
            #expect(read == bytes, "size \(size)")
        }
    }
}
