@testable import Control
import Dataplane
import Foundation
import NetnsLab
import Synchronization
import Testing

@Suite("Snapshot files read a piece at a time: the same snapshot, error and digest as the file read whole")
struct SnapshotStreamTests {
    /// What reading `bytes` whole gives: the snapshot, or the error's words.
    func whole(_ bytes: [UInt8], path: String) -> Result<ClusterSnapshot, SnapshotFile.ReadError> {
        Result { () throws(SnapshotFile.ReadError) in
            do {
                return try SnapshotFile.decode(bytes)
            } catch {
                throw SnapshotFile.ReadError(path: path, reason: "\(error)")
            }
        }
    }

    /// Checks that `document`, read in pieces of each size, in one part and in two with the second beginning at
    /// each of `splits`, gives what it gives read whole; returns whether it was read a piece at a time (with the
    /// largest pieces, in one part). `handedOver` counts the reads whose second part's items were taken.
    @discardableResult
    func check(_ document: [UInt8], in scratch: ScratchDirectory, pieces: [Int] = [1, 2, 3, 5, 8, 13, 64, 1 << 20],
               splits: [Int] = [], handedOver: inout Int, _ comment: Comment? = nil) throws -> Bool {
        let path = scratch.path + "/snapshot.json"
        try Data(document).write(to: URL(fileURLWithPath: path))
        let expected = whole(document, path: path)
        var streamed = false
        for size in pieces {
            for split in [SnapshotFile.Split.never] + splits.map(SnapshotFile.Split.at) {
                let read = Result { () throws(SnapshotFile.ReadError) in try SnapshotFile.loadWithDigest(path, pieceSize: size, split: split) }
                switch (read, expected) {
                case (.success(let got), .success(let want)):
                    #expect(got.snapshot == want, "pieces of \(size), \(split): \(comment ?? "")")
                    #expect(got.digest == SnapshotFile.digest(document), "pieces of \(size), \(split): \(comment ?? "")")
                    if case .never = split { streamed = got.streamed } else { #expect(got.streamed == streamed) }
                    if got.split { handedOver += 1 }
                case (.failure(let got), .failure(let want)):
                    #expect(got.description == want.description, "pieces of \(size), \(split): \(comment ?? "")")
                default:
                    Issue.record("pieces of \(size), \(split): \(read) where the whole file gives \(expected): \(comment ?? "")")
                }
            }
        }
        return streamed
    }

    @discardableResult
    func check(_ document: [UInt8], in scratch: ScratchDirectory, pieces: [Int] = [1, 2, 3, 5, 8, 13, 64, 1 << 20],
               splits: [Int] = [], _ comment: Comment? = nil) throws -> Bool {
        var handedOver = 0
        return try check(document, in: scratch, pieces: pieces, splits: splits, handedOver: &handedOver, comment)
    }

    @Test("kubectl Lists, pretty or not, in any key order, are read a piece at a time, whatever the piece size")
    func lists() throws {
        let scratch = try ScratchDirectory("stream")
        var generator = ObjectGenerator(rng: SeededGenerator())
        for options: JSONSerialization.WritingOptions in [[], [.prettyPrinted], [.prettyPrinted, .sortedKeys]] {
            let items = (0..<12).flatMap { [generator.service($0), generator.node($0), generator.slice($0)] }
                + [["apiVersion": "v1", "kind": "Pod", "metadata": ["name": "skipped"], "spec": ["containers": [[:]]]] as [String: Any]]
            let list: [String: Any] = ["apiVersion": "v1", "kind": "List", "items": items, "metadata": ["resourceVersion": "", "count": 12345]]
            let document = [UInt8](try JSONSerialization.data(withJSONObject: list, options: options))
            #expect(try check(document, in: scratch, "\(options)"), "a List read whole, not a piece at a time")
        }
        // Kinds that come after the rest of an item, an empty List, and a number ending the top-level object.
        let late = "{\"items\": [{\"metadata\": {\"name\": \"b\"}, \"spec\": {\"ports\": [{\"port\": 80, \"nodePort\": 30080}]}, \"kind\": \"Service\"}], \"kind\": \"List\", \"n\": 1234567}"
        #expect(try check(Array(late.utf8), in: scratch))
        #expect(try check(Array("  {\"kind\":\"List\",\"items\":[]}\n\n".utf8), in: scratch))
    }

    @Test("anything else is read whole: YAML, a single object, a key given twice, errors of every kind, truncations")
    func everythingElse() throws {
        let scratch = try ScratchDirectory("stream")
        let service = "{\"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [{\"port\": 80, \"nodePort\": 30080}]}}"
        let others = [
            "kind: List\nitems: []\n", service, "{\"kind\": \"List\", \"kind\": \"ServiceList\", \"items\": []}",
            "{\"kind\": \"List\", \"items\": [\(service)], \"items\": []}", "{\"kind\": \"List\", \"items\": null}", "{\"kind\": \"Pod\", \"items\": []}",
            "{\"items\": [\(service)]}", "{\"kind\": \"List\", \"items\": [\(service), {]}", "{\"kind\": \"List\", \"items\": [{\"kind\": \"Service\", \"metadata\": {}}]}",
            "{\"kind\": \"List\", \"items\": [\(service)]} x", "{\"kind\": \"List\", \"items\": [\(service),]}", "{\"kind\": \"List\", \"items\": [1]}", "", "{}",
            "\u{FEFF}{\"kind\": \"List\", \"items\": []}", "{\"kind\": \"List\", \"items\": [{\"kind\": \"Service\", \"metadata\": {\"name\": \"Bad_Name\"}}]}",
        ]
        for text in others { #expect(try !check(Array(text.utf8), in: scratch, pieces: [1, 3, 1 << 20], "\(text)")) }
        // A List cut off anywhere is never a smaller cluster.
        let list = Array("{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\(service), \(service.replacingOccurrences(of: "\"a\"", with: "\"b\""))], \"metadata\": {\"resourceVersion\": \"\"}}".utf8)
        for end in stride(from: 0, to: list.count, by: 7) {
            try check(Array(list[..<end]), in: scratch, pieces: [4, 1 << 20], splits: [0, end / 2, end / 2 + 40], "cut at \(end)")
        }
    }

    @Test("fuzz: mutated Lists give the same snapshot or the same error in pieces as whole")
    func fuzz() throws {
        let scratch = try ScratchDirectory("stream")
        var generator = ObjectGenerator(rng: SeededGenerator())
        let alphabet = Array("{}[]\",:\\0123456789-+.eEtrufalsn \n\u{1}x".utf8)
        for i in 0..<150 {
            let list: [String: Any] = ["kind": "List", "items": [generator.service(i), generator.node(i)]]
            var bytes = [UInt8](try JSONSerialization.data(withJSONObject: list))
            for _ in 0..<Int.random(in: 1...3, using: &generator.rng) {
                let at = Int.random(in: 0..<bytes.count, using: &generator.rng)
                switch Int.random(in: 0..<3, using: &generator.rng) {
                case 0: bytes[at] = generator.pick(alphabet)
                case 1: bytes.insert(generator.pick(alphabet), at: at)
                default: bytes.removeSubrange(at..<min(bytes.count, at + Int.random(in: 1...8, using: &generator.rng)))
                }
            }
            try check(bytes, in: scratch, pieces: [Int.random(in: 1...40, using: &generator.rng), 1 << 20],
                      splits: [bytes.count / 2, Int.random(in: 0..<bytes.count, using: &generator.rng)], "\(generator.rng)")
        }
    }

    @Test("a digest taken a piece at a time is the digest of the whole, whatever the pieces")
    func digestInPieces() throws {
        let scratch = try ScratchDirectory("digest")
        for size in [0, 1, 7, 8, 9, 17, 1_000, (1 << 20) + 3] {
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
            var pieces = SnapshotFile.Digest()
            var from = 0, step = 1
            while from < size {
                let to = min(size, from + step)
                bytes[from..<to].withUnsafeBytes { pieces.update($0) }
                (from, step) = (to, step % 11 + 2)
            }
            #expect(pieces.finish() == SnapshotFile.digest(bytes), "size \(size)")
            let path = scratch.path + "/f\(size)"
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            #expect(try SnapshotFile.digest(path: path) == SnapshotFile.digest(bytes), "size \(size)")
        }
    }

    @Test("a List read in two parts at once gives what one part gives, wherever the second begins")
    func twoParts() throws {
        let scratch = try ScratchDirectory("stream")
        var generator = ObjectGenerator(rng: SeededGenerator())
        for options: JSONSerialization.WritingOptions in [[], [.prettyPrinted], [.prettyPrinted, .sortedKeys]] {
            let items = (0..<30).flatMap { [generator.service($0), generator.node($0), generator.slice($0)] }
            // `kind` after the items (as kubectl writes it), before them, and given on both sides of the split.
            for list: [String: Any] in [["apiVersion": "v1", "kind": "List", "items": items, "metadata": ["resourceVersion": ""]],
                                        ["kind": "List", "items": items]] {
                let document = [UInt8](try JSONSerialization.data(withJSONObject: list, options: options))
                let splits = Array(stride(from: 0, to: document.count + 9, by: max(1, document.count / 23)))
                // Pretty, the separator is found only between items: wherever the second part begins among them, the
                // first part's items arrive there, in pieces of 61 bytes and in pieces that end one byte after the
                // items' `[` (the rest of the whitespace before the first item comes with the next piece). Compact,
                // it is found within items too (`[{...},{...}]`).
                let bracket = document.firstIndex(of: UInt8(ascii: "["))!
                for size in [61, bracket + 2] {
                    var handedOver = 0
                    try check(document, in: scratch, pieces: [size], splits: splits, handedOver: &handedOver, "\(options), pieces of \(size)")
                    #expect(handedOver >= (options.isEmpty ? 1 : splits.count - 2), "\(options), pieces of \(size): \(handedOver) of \(splits.count) reads handed over")
                }
                // In one piece of 1 MiB the first part has the whole file before its items begin: no second part.
                try check(document, in: scratch, pieces: [1 << 20], splits: splits, "\(options)")
            }
        }
        // A separator inside a string (a compact List), an item the second part cannot read, a key in both parts.
        let service = { (name: String, note: String) in
            "{\"kind\":\"Service\",\"metadata\":{\"name\":\"\(name)\",\"annotations\":{\"note\":\"\(note)\"}},\"spec\":{\"ports\":[{\"port\":80,\"nodePort\":30080}]}}"
        }
        let tricky = [
            "{\"kind\":\"List\",\"items\":[\(service("a", ",{")),\(service("b", "},{\\\"x\\\":1")),\(service("c", "x"))]}",
            "{\"kind\":\"List\",\"items\":[\(service("a", "x")),\(service("b", "x")),{\"kind\":\"Service\",\"metadata\":{\"name\":\"c\"}}]}",
            "{\"kind\":\"List\",\"items\":[\(service("a", "x")),\(service("b", "x"))],\"kind\":\"List\"}",
            "{\"kind\":\"List\",\"items\":[\(service("a", "x")),\(service("b", "x"))],\"items\":[]}",
            "{\"kind\":\"List\",\"items\":[\(service("a", "x")),\(service("b", "x"))]}]",
        ]
        for text in tricky {
            let bytes = Array(text.utf8)
            try check(bytes, in: scratch, pieces: [5, 1 << 20], splits: Array(stride(from: 0, to: bytes.count, by: 3)), "\(text)")
        }
    }

    @Test("a large List is read in two parts when the process may use two CPUs")
    func largeListInTwoParts() throws {
        let scratch = try ScratchDirectory("stream")
        var generator = ObjectGenerator(rng: SeededGenerator())
        let sample = try JSONSerialization.data(withJSONObject: (0..<100).map { generator.service($0) }, options: [.prettyPrinted])
        let items = (0..<(SnapshotFile.splitSize / sample.count * 100 * 5 / 4)).map { generator.service($0) }
        let document = [UInt8](try JSONSerialization.data(withJSONObject: ["kind": "List", "items": items], options: [.prettyPrinted]))
        #expect(document.count > SnapshotFile.splitSize)
        let path = scratch.path + "/large.json"
        try Data(document).write(to: URL(fileURLWithPath: path))
        let read = try SnapshotFile.loadWithDigest(path, pieceSize: SnapshotFile.pieceSize, split: .automatic)
        #expect(read.snapshot == (try SnapshotFile.decode(document)))
        #expect(read.digest == SnapshotFile.digest(document))
        #expect(read.split == (ProcessInfo.processInfo.activeProcessorCount > 1))
        #expect(try SnapshotFile.loadWithDigest(path) == (read.snapshot, read.digest))
    }

    @Test("a List whose second part gets no thread (the process at its tasks limit) is read whole by the first")
    func secondPartRefused() throws {
        let scratch = try ScratchDirectory("stream")
        var generator = ObjectGenerator(rng: SeededGenerator())
        let items = (0..<60).flatMap { [generator.service($0), generator.node($0)] }
        let document = [UInt8](try JSONSerialization.data(withJSONObject: ["kind": "List", "items": items], options: [.prettyPrinted]))
        let path = scratch.path + "/list.json"
        try Data(document).write(to: URL(fileURLWithPath: path))
        let asked = Mutex(0)
        let refused: ThreadStarter = { name, _ throws(ThreadRefused) in
            asked.withLock { $0 += 1 }
            throw ThreadRefused(name: name, code: EAGAIN)
        }
        // Each in the first half of the file: every read asks for a second part.
        let offsets = Array(stride(from: 0, to: document.count / 2, by: document.count / 14))
        for offset in offsets {
            let read = try SnapshotFile.loadWithDigest(path, pieceSize: 97, split: .at(offset), threads: refused)
            #expect(read.snapshot == (try SnapshotFile.decode(document)), "second part from \(offset)")
            #expect(read.digest == SnapshotFile.digest(document), "second part from \(offset)")
            #expect(!read.split, "second part from \(offset)")
        }
        #expect(asked.withLock { $0 } == offsets.count, "every read asked for the second part's thread")
    }

    @Test("the Services of a List read a piece at a time share one String for each annotation name they keep")
    func sharedNames() throws {
        let scratch = try ScratchDirectory("stream-names")
        let name = EpokAnnotation.externalPorts
        let items = (0..<40).map { i in
            "{\"kind\": \"Service\", \"metadata\": {\"name\": \"s\(i)\", \"annotations\": {\"\(name)\": \"\(1000 + i):\(30000 + i)\"}}, \"spec\": {}}"
        }
        let path = scratch.path + "/snapshot.json"
        try Data("{\"kind\": \"List\", \"items\": [\(items.joined(separator: ",\n"))]}".utf8).write(to: URL(fileURLWithPath: path))
        for size in [64, 1 << 20] {
            let read = try SnapshotFile.loadWithDigest(path, pieceSize: size, split: .never)
            #expect(read.streamed, "pieces of \(size)")
            let keys = read.snapshot.services.compactMap { $0.metadata.annotations?.keys.first }
            #expect(keys.count == 40 && keys.allSatisfy { $0 == name }, "pieces of \(size)")
            // One storage for all: the name is longer than a String holds inline, so each copy would have its own.
            let storages = Set(keys.map { key in key.utf8.withContiguousStorageIfAvailable { Int(bitPattern: $0.baseAddress) } ?? nil })
            #expect(storages.count == 1, "pieces of \(size): \(storages.count) copies of the name")
        }
    }

    @Test("the digests of a file's two parts, joined, are the digest of the whole")
    func digestJoined() {
        let bytes = (0..<1_000).map { UInt8(truncatingIfNeeded: $0 &* 151 &+ 3) }
        for cut in stride(from: 0, through: bytes.count, by: 8) {
            var first = SnapshotFile.Digest(), second = SnapshotFile.Digest(at: cut)
            bytes[..<cut].withUnsafeBytes { first.update($0) }
            bytes[cut...].withUnsafeBytes { second.update($0) }
            #expect(first.joined(with: second)?.finish() == SnapshotFile.digest(bytes), "cut at \(cut)")
        }
    }
}
