import Control
import Dataplane
import NetnsLab
import Testing

@Suite("Parsing Epok's annotations")
struct AnnotationParserTests {
    @Test("externalports accepts Epok's forms, white space and protocol in any case")
    func acceptsEpokForms() throws {
        #expect(try AnnotationParser.externalPorts("22:2022,25:2025") == [
            PortRequest(hostPort: .p(22), nodePort: .p(2022)), PortRequest(hostPort: .p(25), nodePort: .p(2025)),
        ])
        #expect(try AnnotationParser.externalPorts("53:8053:udp") == [PortRequest(hostPort: .p(53), nodePort: .p(8053), proto: .udp)])
        #expect(try AnnotationParser.externalPorts(" 53:8053:UDP , 53:8053:Tcp ") == [
            PortRequest(hostPort: .p(53), nodePort: .p(8053), proto: .udp), PortRequest(hostPort: .p(53), nodePort: .p(8053), proto: .tcp),
        ])
        #expect(try AnnotationParser.externalPorts("65535:1") == [PortRequest(hostPort: .p(65535), nodePort: .p(1))])
    }

    @Test("externalports rejects malformed entries with a message naming the entry", arguments: [
        ("0:2022", "host port \"0\""),
        ("22:65536", "node port \"65536\""),
        ("22:2022:sctp", "protocol \"sctp\""),
        ("22:2022,,25:2025", "entry 2"),
        ("22:2022,", "entry 2"),
        ("", "entry 1"),
        ("22", "not HOSTPORT:NODEPORT"),
        ("22:2022:tcp:x", "not HOSTPORT:NODEPORT"),
        ("22:2022,22:3033", "22/tcp appears twice"),
        ("-1:2022", "host port \"-1\""),
        ("+22:2022", "host port \"+22\""),
        ("2 2:2022", "host port \"2 2\""),
        ("22:2022;rm -rf /", "node port \"2022;rm -rf /\""),
        ("99999999999999999999:1", "host port"),
    ])
    func rejectsMalformed(text: String, mention: String) {
        let error = #expect(throws: AnnotationError.self) { try AnnotationParser.externalPorts(text) }
        #expect(error?.annotation == EpokAnnotation.externalPorts)
        #expect(error?.message.contains(mention) == true, "\(error?.message ?? "-")")
    }

    @Test("allow-range accepts IPv4 and IPv6 CIDRs and bare addresses")
    func allowRangeAccepts() throws {
        let parsed = try AnnotationParser.cidrs("10.0.0.0/8, 192.168.1.7 ,2001:db8::/32,::1")
        #expect(parsed.map(\.description).sorted() == ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32", "::1/128"].sorted())
    }

    @Test("allow-range rejects anything that is not exactly a CIDR", arguments: [
        "10.0.0.0/33", "10.0.0.1/8", "10.0.0/8", "010.0.0.0/8", "10.0.0.0/", "10.0.0.0/08", "2001:db8::/129",
        "10.0.0.0/8;reboot", "$(reboot)", "10.0.0.0/8,", "any", "0x0a.0.0.0/8", "2001:db8::g/32", " ",
    ])
    func allowRangeRejects(text: String) {
        #expect(throws: AnnotationError.self) { try AnnotationParser.cidrs(text) }
    }

    @Test("a host-bits error suggests the prefix that was probably meant")
    func hostBitsSuggestion() {
        let error = #expect(throws: AnnotationError.self) { try AnnotationParser.cidrs("10.1.2.3/8") }
        #expect(error?.message == "\"10.1.2.3/8\" has host bits set (did you mean 10.0.0.0/8?)")
    }

    @Test("property: every well-formed externalports text parses back to what was written")
    func roundTrip() throws {
        var rng = SeededGenerator()
        for _ in 0..<500 {
            var seen = Set<String>()
            var requests: [PortRequest] = []
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                let r = PortRequest(hostPort: Port(Int.random(in: 1...65535, using: &rng))!,
                                    nodePort: Port(Int.random(in: 1...65535, using: &rng))!,
                                    proto: Bool.random(using: &rng) ? .tcp : .udp)
                if seen.insert("\(r.hostPort)/\(r.proto)").inserted { requests.append(r) }
            }
            let text = requests.map { r in
                let proto = r.proto == .tcp && Bool.random(using: &rng) ? "" : ":" + (Bool.random(using: &rng) ? "\(r.proto)".uppercased() : "\(r.proto)")
                return String(repeating: " ", count: Int.random(in: 0...2, using: &rng)) + "\(r.hostPort):\(r.nodePort)\(proto)"
            }.joined(separator: ",")
            #expect(try AnnotationParser.externalPorts(text) == requests, "\(rng): \(text)")
        }
    }

    @Test("property: random junk never crashes the parsers and is never half-accepted")
    func junkIsRejectedOrWellFormed() {
        let alphabet = Array("0123456789:,/. tcpudTCPUD-x;")
        var rng = SeededGenerator()
        for _ in 0..<2000 {
            let text = String((0..<Int.random(in: 0...20, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! })
            if let parsed = try? AnnotationParser.externalPorts(text) {
                #expect(parsed.count == text.split(separator: ",", omittingEmptySubsequences: false).count, "\(rng): \(text)")
            }
            if let parsed = try? AnnotationParser.cidrs(text) {
                #expect(!parsed.isEmpty)
            }
        }
    }
}
