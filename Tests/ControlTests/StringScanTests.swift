@testable import Control
import Foundation
import Testing

/// The JSON reader's word-at-a-time scan of plain ASCII in strings.
struct StringScanTests {
    @Test("eight bytes at a time, the scan stops at the first quote, backslash, control character or byte of 0x80 and above, as a byte-wise scan does")
    func firstStop() {
        var rng = SystemRandomNumberGenerator()
        // Bytes next to each kind of stop (where a borrow or a carry would go wrong), and plain ones, so that words
        // with no stop at all come up often.
        let edges: [UInt8] = [0x00, 0x01, 0x1F, 0x20, 0x21, 0x22, 0x23, 0x5B, 0x5C, 0x5D, 0x7E, 0x7F, 0x80, 0x81, 0xC3, 0xFE, 0xFF]
        var wrong: [[UInt8]] = []
        for _ in 0..<200_000 {
            let bytes: [UInt8] = (0..<8).map { _ in
                switch Int.random(in: 0..<10, using: &rng) {
                case 0..<6: UInt8(ascii: "a") + UInt8.random(in: 0..<26, using: &rng)
                case 6..<9: edges.randomElement(using: &rng)!
                default: UInt8.random(in: 0...255, using: &rng)
                }
            }
            let word = bytes.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let expected = bytes.firstIndex { $0 == 0x22 || $0 == 0x5C || $0 < 0x20 || $0 >= 0x80 } ?? 8
            if JSONReader.firstStop(in: word) != expected { wrong.append(bytes) }
        }
        #expect(wrong.isEmpty, "first of \(wrong.count): \(wrong.first ?? [])")
    }

    @Test("a string with a stop at any place of its first words reads as JSONSerialization reads it")
    func stopAtEveryPlace() throws {
        // An escape, a two-byte character, a control character and the end, at every offset of strings of up to 24 bytes.
        let stops: [[UInt8]] = [Array(#"\n"#.utf8), [0xC3, 0xA9], [0x01], []]
        for length in 0..<24 {
            for place in 0...length {
                for stop in stops {
                    var body = Array(repeating: UInt8(ascii: "x"), count: length)
                    body.insert(contentsOf: stop, at: place)
                    let json = [UInt8(ascii: "["), UInt8(ascii: "\"")] + body + [UInt8(ascii: "\""), UInt8(ascii: "]")]
                    let expected = try? JSONSerialization.jsonObject(with: Data(json)) as? [String]
                    var reader = JSONReader(json)
                    let read = try? reader.readStrings()
                    #expect(read == expected, "\(json)")
                }
            }
        }
    }
}
