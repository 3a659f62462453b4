@testable import Control
import Foundation
import Testing

/// `PackedText`: `metadata.uid` and `creationTimestamp` without heap storage in the API server's shapes.
struct PackedTextTests {
    @Test("UUIDs and UTC times in the API server's shapes are packed, any other text is kept; every text reads back as given, equal and hashing alike exactly when the texts are")
    func readsBackAsGiven() {
        var rng = SystemRandomNumberGenerator()
        let iso = ISO8601DateFormatter()
        iso.timeZone = TimeZone(identifier: "UTC")
        var samples: [(text: String, packed: Bool)] = []
        for _ in 0..<2_000 {
            samples.append((UUID().uuidString.lowercased(), true))
            samples.append((UUID().uuidString, false))
            // Foundation formats the time: the packed form must agree with an implementation that is not its own.
            let seconds = Int64.random(in: 0...253_402_300_799, using: &rng)
            samples.append((iso.string(from: Date(timeIntervalSince1970: TimeInterval(seconds))), true))
        }
        samples += [("1970-01-01T00:00:00Z", true), ("9999-12-31T23:59:59Z", true), ("2024-02-29T12:34:56Z", true),
                    ("2023-02-29T12:34:56Z", false), ("2024-02-30T00:00:00Z", false), ("2016-12-31T23:59:60Z", false),
                    ("2024-02-29t12:34:56Z", false), ("2024-02-29T12:34:56z", false), ("2024-02-29T12:34:56.5Z", false),
                    ("2024-02-29T14:34:56+02:00", false), ("", false), ("x", false)]
        // One byte changed in a packed shape: mostly text that is not in it, sometimes another packed value.
        for _ in 0..<4_000 {
            var bytes = Array(samples.randomElement(using: &rng)!.text.utf8)
            guard !bytes.isEmpty else { continue }
            bytes[Int.random(in: 0..<bytes.count, using: &rng)] = "0-:TZaAfgz9".utf8.randomElement(using: &rng)!
            let text = String(decoding: bytes, as: UTF8.self)
            samples.append((text, PackedText(text).isPacked))
        }
        for (text, packed) in samples {
            let value = PackedText(text)
            #expect(value.text == text)
            #expect(value.isPacked == packed, "\(text)")
            #expect(text.utf8.withContiguousStorageIfAvailable { PackedText(utf8: $0) } == value)
            var meta = ObjectMeta(name: "n", creationTimestamp: text)
            #expect(ClaimPrecedence(Service(metadata: meta, spec: .init())).created == Timestamp.seconds(text) ?? .max, "\(text)")
            meta.uid = text
            #expect(meta.uid == text && meta.creationTimestamp == text)
        }
        for _ in 0..<20_000 {
            let a = samples.randomElement(using: &rng)!.text
            let b = Bool.random(using: &rng) ? a : samples.randomElement(using: &rng)!.text
            #expect((PackedText(a) == PackedText(b)) == (a == b), "\(a) \(b)")
            if a == b { #expect(PackedText(a).hashValue == PackedText(b).hashValue) }
        }
    }

    @Test("ObjectMeta reads uid and creationTimestamp from JSON as Foundation does, and writes them back as read")
    func throughJSON() throws {
        for (uid, created) in [("0b6a1f4e-3c1d-4a8e-9f7a-2d5e8c9b1a00", "2024-05-01T10:00:00Z"), ("Not-A-UUID", "2024-05-01T12:00:00+02:00"),
                               ("0B6A1F4E-3C1D-4A8E-9F7A-2D5E8C9B1A00", "2024-05-01T10:00:00.123456Z")] {
            let json = #"{"name":"a","namespace":"ns","uid":"\#(uid)","resourceVersion":"7","creationTimestamp":"\#(created)"}"#
            var reader = JSONReader(Array(json.utf8))
            let fast = try ObjectMeta(json: &reader)
            let foundation = try JSONDecoder().decode(ObjectMeta.self, from: Data(json.utf8))
            #expect(fast == foundation && fast.uid == uid && fast.creationTimestamp == created)
            let written = try JSONSerialization.jsonObject(with: JSONEncoder().encode(fast)) as? [String: String]
            #expect(written == ["name": "a", "namespace": "ns", "uid": uid, "resourceVersion": "7", "creationTimestamp": created])
        }
        let bare = try JSONSerialization.jsonObject(with: JSONEncoder().encode(ObjectMeta(name: "a"))) as? [String: String]
        #expect(bare == ["name": "a"], "absent fields are not written")
    }
}
