import Dataplane
import Foundation
#if canImport(Glibc)
import Glibc
#endif

extension SnapshotFile {
    /// `digest(_:)` computed a piece at a time: the digest of the pieces joined, whatever their sizes. Each word
    /// is mixed with its place in the file and the results summed, so that the digests of two parts of a file,
    /// taken at once on two threads, join into the digest of the whole (`joined(with:)`).
    public struct Digest {
        private var sum: UInt64 = 0
        /// Where in the file this digest begins (a multiple of eight), and where the next byte is.
        private var start: Int
        private var offset: Int
        /// The bytes of a word not yet whole (fewer than eight), the last of those before `offset`.
        private var carry: [UInt8] = []

        /// The digest of the bytes of a file from `offset` (a multiple of eight) on.
        public init(at offset: Int = 0) {
            precondition(offset % 8 == 0, "a digest begins at a word")
            start = offset
            self.offset = offset
        }

        /// `word`, the `index`th of the file, mixed with its place and spread over every bit: the two halves of its
        /// full product with an odd constant, folded (one multiply a word; a bit changed anywhere, or two words
        /// swapped, changes the sum).
        private static func mixed(_ word: UInt64, at index: Int) -> UInt64 {
            let product = (word ^ UInt64(truncatingIfNeeded: index) &* 0x9E37_79B9_7F4A_7C15).multipliedFullWidth(by: 0xBF58_476D_1CE4_E5B9)
            return product.high ^ product.low
        }

        /// The sum, its length and its last bytes folded in, spread over every bit (splitmix64's finalizer).
        private static func finished(_ sum: UInt64, length: Int) -> UInt64 {
            var x = sum ^ UInt64(truncatingIfNeeded: length) &* 0x94D0_49BB_1331_11EB
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }

        public mutating func update(_ bytes: UnsafeRawBufferPointer) {
            var from = 0
            if !carry.isEmpty {
                from = min(8 - carry.count, bytes.count)
                carry += bytes[..<from]
                offset += from
                guard carry.count == 8 else { return }
                sum &+= Self.mixed(carry.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }, at: offset / 8 - 1)
                carry.removeAll(keepingCapacity: true)
            }
            let words = (bytes.count - from) / 8
            var total = sum
            for i in 0..<words {
                total &+= Self.mixed(bytes.loadUnaligned(fromByteOffset: from + i * 8, as: UInt64.self), at: offset / 8 + i)
            }
            sum = total
            carry += bytes[(from + words * 8)...]
            offset += bytes.count - from
        }

        /// This digest followed by `later`, the digest of the bytes after this one's; nil if `later` does not
        /// begin where this one ends (a file that changed size while it was read).
        public func joined(with later: Digest) -> Digest? {
            guard carry.isEmpty, later.start == offset else { return nil }
            var joined = later
            joined.sum &+= sum
            joined.start = start
            return joined
        }

        public func finish() -> UInt64 {
            var total = sum
            if !carry.isEmpty {
                var word: UInt64 = 0
                for (i, byte) in carry.enumerated() { word |= UInt64(byte) << (8 * i) }
                total &+= Self.mixed(word, at: offset / 8)
            }
            return Self.finished(total, length: offset - start)
        }
    }

    /// The size of the pieces a file is read in.
    static let pieceSize = 1 << 20

    /// A regular file opened for reading, after the checks `read(_:)` makes; the caller closes it.
    static func openRegular(_ path: String) throws(ReadError) -> Int32 {
        var info = stat()
        guard stat(path, &info) == 0 else { throw failure(errno, path) }
        switch info.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR: throw ReadError(path: path, reason: "is a directory, not a file (give the path of the snapshot file)")
        case S_IFIFO: throw ReadError(path: path, reason: "is a FIFO, not a regular file (write the snapshot to a file and rename it into place)")
        default: throw ReadError(path: path, reason: "is not a regular file")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure(errno, path) }
        return fd
    }

    static func failure(_ code: Int32, _ path: String) -> ReadError {
        ReadError(path: path, reason: code == ENOENT ? "does not exist" : "cannot be read: \(String(cString: strerror(code)))",
                  isMissing: code == ENOENT)
    }

    /// Reads from `fd` into `buffer` until it is full or the file ends; returns how many bytes it read. From
    /// `offset` when it is given (leaving the file's own offset as it was), from the file's offset otherwise.
    static func fill(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, path: String, at offset: Int? = nil) throws(ReadError) -> Int {
        var filled = 0
        while filled < buffer.count {
            let n = offset.map { pread(fd, buffer.baseAddress! + filled, buffer.count - filled, off_t($0 + filled)) }
                ?? Glibc.read(fd, buffer.baseAddress! + filled, buffer.count - filled)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw failure(errno, path) }
            if n == 0 { break }
            filled += n
        }
        return filled
    }

    /// The digest of the file at `path` (see `digest(_:)`), read a piece at a time: the file is never held whole.
    public static func digest(path: String) throws(ReadError) -> UInt64 {
        let fd = try openRegular(path)
        defer { close(fd) }
        let piece = UnsafeMutableRawBufferPointer.allocate(byteCount: pieceSize, alignment: 8)
        defer { piece.deallocate() }
        var digest = Digest()
        while true {
            let count = try fill(fd, piece, path: path)
            digest.update(UnsafeRawBufferPointer(rebasing: piece[..<count]))
            if count < piece.count { return digest.finish() }
        }
    }

    /// Reads and decodes the file at `path` (as `load(_:)`), with the digest of exactly the bytes decoded.
    ///
    /// A JSON List, what kubectl and the API server write, is read a piece at a time: each item is read from a
    /// window of the file as it passes, so the file is never held whole (a List of 50k Services as kubectl prints
    /// them is 200 MB). A large one is read in two parts at once (see `Window.readItems`). Anything else (YAML, a
    /// single object, a document with a key given twice, any error) is read whole by `decode(_:)`, which says what
    /// is wrong in the same words whichever way it came.
    public static func loadWithDigest(_ path: String) throws(ReadError) -> (snapshot: ClusterSnapshot, digest: UInt64) {
        let read = try loadWithDigest(path, pieceSize: pieceSize, split: .automatic)
        return (read.snapshot, read.digest)
    }

    /// Whether the items of a List are read in two parts at once.
    enum Split {
        /// Not: one thread reads them all.
        case never
        /// When the List is large (`splitSize`) and the process may run on more than one CPU.
        case automatic
        /// The second part from the first item that starts after this offset (tests: any file, any offset).
        case at(Int)
    }

    /// The size of a file from which its List is read in two parts, when the process may use two CPUs.
    static let splitSize = 4 << 20

    /// `loadWithDigest(_:)` reading pieces of `pieceSize` bytes, and how: a piece at a time (`streamed`), and
    /// with the items from a second part read at once (`split`).
    /// `threads` starts the second part's; refused, one thread reads them all.
    static func loadWithDigest(_ path: String, pieceSize: Int, split: Split, threads: @escaping ThreadStarter = OwnThread.start) throws(ReadError)
        -> (snapshot: ClusterSnapshot, digest: UInt64, streamed: Bool, split: Bool) {
        let fd = try openRegular(path)
        var info = stat()
        let size = fstat(fd, &info) == 0 ? Int(info.st_size) : 0
        var window = Window(fd: fd, path: path, size: size, pieceSize: pieceSize, threads: threads)
        let streamed: (snapshot: ClusterSnapshot, digest: Digest, split: Bool)?
        do {
            defer { close(fd) }
            let splitting: (Int) -> Int? = switch split {
            case .never: { _ in nil }
            case .automatic: size >= splitSize && ProcessInfo.processInfo.activeProcessorCount > 1 ? { from in from + (size - from) / 2 } : { _ in nil }
            case .at(let offset): { _ in offset }
            }
            streamed = try window.readList(splittingAt: splitting)
        }
        if let streamed { return (streamed.snapshot, streamed.digest.finish(), true, streamed.split) }
        let bytes = try read(path)
        do {
            return (try decode(bytes), digest(bytes), false, false)
        } catch {
            throw ReadError(path: path, reason: "\(error)")
        }
    }

    /// What a List's members said: its kind, whether it had items, and the items read.
    private struct ListMembers {
        var kind: String??
        var hasItems: Bool?
        var items = ItemCollector()
        /// The rest of the document was read by a second part, from one of the items on.
        var handedOver = false

        /// These members followed by `later`, those a second part read from an item on; nil if a key is in both.
        mutating func join(_ later: ListMembers) -> Bool {
            guard later.hasItems == nil, kind == nil || later.kind == nil else { return false }
            if kind == nil { kind = later.kind }
            items.append(later.items)
            handedOver = true
            return true
        }

        func snapshot() -> ClusterSnapshot? {
            guard case let listKind?? = kind, listKind.hasSuffix("List"), hasItems == true else { return nil }
            return try? items.finished()
        }
    }

    /// The part of a file being read: `bytes` from `position` on are not read yet; more are read when a step of
    /// the reader runs out of them.
    private struct Window {
        let fd: Int32
        let path: String
        var bytes: [UInt8] = []
        var position = 0
        /// Where in the file `bytes` begin, and where the next piece does.
        private(set) var base: Int
        private var next: Int
        var atEnd = false
        /// The digest of the bytes read, up to `digestEnd`: those after it are another window's.
        var digest: Digest
        var digestEnd = Int.max
        private var piece: [UInt8]
        /// The keys the readers made into Strings so far (`JSONReader.intern`), handed to the next reader: one
        /// String for an annotation's name, not one per object.
        private var interned: [String] = []

        /// The file's size when it was opened.
        let size: Int
        /// Starts a second part's thread.
        private let threads: ThreadStarter

        /// A window from `start` (a multiple of eight) on, of a file of `size` bytes; `fd` is read at offsets,
        /// never moved.
        init(fd: Int32, path: String, size: Int, pieceSize: Int, from start: Int = 0, threads: @escaping ThreadStarter = OwnThread.start) {
            self.fd = fd
            self.path = path
            self.size = size
            self.threads = threads
            base = start
            next = start
            digest = Digest(at: start)
            piece = [UInt8](repeating: 0, count: pieceSize)
        }

        /// Where in the file the next byte to read is.
        var offset: Int { base + position }

        /// Drops what was read and reads the next piece; false at the end of the file.
        private mutating func more() throws(ReadError) -> Bool {
            guard !atEnd else { return false }
            bytes.removeFirst(position)
            base += position
            position = 0
            let fd = fd, path = path, at = next
            let count = try piece.withUnsafeMutableBytes { buffer in
                Result { () throws(ReadError) in try SnapshotFile.fill(fd, buffer, path: path, at: at) }
            }.get()
            let digested = max(0, min(count, digestEnd - next))
            piece.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[..<digested])) }
            next += count
            bytes += piece[..<count]
            if count < piece.count { atEnd = true }
            return true
        }

        /// Reads on to the end of the file for the digest alone, a piece at a time (each let go of once digested).
        mutating func digestRest() throws(ReadError) {
            repeat { position = bytes.count } while try more()
        }

        /// Runs `step` on a reader at `position` and moves past what it read. A step that fails is run again with
        /// more of the file, and so is one that ends at the end of the bytes read so far unless it read an object
        /// (a number, say, may go on); nil if it still fails at the end of the file.
        private mutating func step<T>(endsClosed: Bool = false, _ step: (inout JSONReader) throws -> T) throws(ReadError) -> T? {
            // The reader is gone before `more()` changes the bytes, which are then not copied.
            func attempt() -> (T, Int, [String])? {
                var reader = JSONReader(bytes, offset: position, interned: interned)
                guard let value = try? step(&reader), endsClosed || reader.offset < bytes.count || atEnd else { return nil }
                return (value, reader.offset, reader.interned)
            }
            while true {
                if let (value, end, names) = attempt() {
                    position = end
                    interned = names
                    return value
                }
                // No value is that long (the watch's own limit): the step fails on what is there, not for want of
                // more, and the file is read whole instead of pulled into the window up to its end.
                guard bytes.count - position <= JSONStreamSplitter.defaultLimit, try more() else { return nil }
            }
        }

        /// Moves to just past the first `pattern` at or after `position`, looking no further than `limit` bytes;
        /// false if there is none.
        private mutating func seek(_ pattern: [UInt8], limit: Int) throws(ReadError) -> Bool {
            var searched = 0
            while true {
                let found: Int? = bytes.withUnsafeBytes { raw in
                    // Each candidate found by its first byte, then compared whole.
                    var at = position
                    while raw.count - at >= pattern.count {
                        guard let hit = memchr(raw.baseAddress! + at, Int32(pattern[0]), raw.count - at - pattern.count + 1) else { return nil }
                        at = raw.baseAddress!.distance(to: UnsafeRawPointer(hit))
                        if pattern.withUnsafeBytes({ memcmp(raw.baseAddress! + at, $0.baseAddress!, pattern.count) == 0 }) { return at }
                        at += 1
                    }
                    return nil
                }
                if let found {
                    position = found + pattern.count
                    return true
                }
                // Keep the bytes a match may yet begin with.
                let kept = max(position, bytes.count - pattern.count + 1)
                searched += kept - position
                position = kept
                guard searched <= limit, try more() else { return false }
            }
        }

        /// The snapshot of a JSON List read a piece at a time, its digest, and whether a second part read some of
        /// its items; nil if the file is anything else, or has anything wrong with it (for `decode(_:)` to read
        /// whole and say what). `splittingAt` says, from where the items begin, where a second part is to begin.
        mutating func readList(splittingAt: (Int) -> Int?) throws(ReadError) -> (snapshot: ClusterSnapshot, digest: Digest, split: Bool)? {
            guard try step({ $0.take(UInt8(ascii: "{")) }) == true else { return nil }
            var list = ListMembers()
            if try step({ $0.take(UInt8(ascii: "}")) }) != false { return nil }
            var second: SecondPart?
            defer { second?.finish() }
            guard try readMembers(into: &list, second: &second, splittingAt: splittingAt) else { return nil }
            if !list.handedOver { guard try step({ try $0.readEnd() }) != nil else { return nil } }
            guard let snapshot = list.snapshot() else { return nil }
            if let part = second {
                second = nil
                // The second part's items were not taken: its digest of the rest of the file still counts.
                guard let rest = part.finish().digest, let joined = digest.joined(with: rest) else { return nil }
                digest = joined
            }
            return (snapshot, digest, list.handedOver)
        }

        /// Reads an object's members, from the first key to the closing brace (or to where a second part took
        /// over the rest of the document); false if anything is amiss.
        private mutating func readMembers(into list: inout ListMembers, second: inout SecondPart?, splittingAt: (Int) -> Int?) throws(ReadError) -> Bool {
            repeat {
                guard let key = try step({ (r: inout JSONReader) throws -> String in
                    let key = try r.readString()
                    guard r.take(UInt8(ascii: ":")) else { throw JSONReadError(offset: r.offset, reason: "expected ':'") }
                    return key
                }) else { return false }
                switch key {
                case "kind":
                    guard list.kind == nil, let value = try step({ try $0.readOptionalString() }) else { return false }
                    list.kind = .some(value)
                case "items":
                    guard list.hasItems == nil, let null = try step({ try $0.readNull() }) else { return false }
                    list.hasItems = !null
                    if !null {
                        guard try step({ $0.take(UInt8(ascii: "[")) }) == true else { return false }
                        if second == nil, let start = splittingAt(offset) {
                            guard let separator = try itemSeparator() else { return false }
                            // Where the second part's digest begins: a word, past every byte this one digested, and
                            // before the end of the file.
                            let from = (max(start, next) + 7) & ~7
                            // Without a thread for it (the process at its tasks limit), this part reads them all.
                            if from < size, let part = SecondPart(fd: fd, path: path, size: size, pieceSize: piece.count, from: from,
                                                                  separator: separator, threads: threads) {
                                second = part
                                digestEnd = from
                            }
                        }
                        guard let later = try readItems(into: &list.items, second: &second) else { return false }
                        if let later { return list.join(later) }
                    }
                default:
                    guard try step({ try $0.skipValue() }) != nil else { return false }
                }
                guard let next = try afterMember() else { return false }
                guard next else { return true }
            } while true
        }

        /// After an object's member: true at a comma (another member follows), false at its closing brace; nil if
        /// neither follows.
        private mutating func afterMember() throws(ReadError) -> Bool? {
            try step({ (r: inout JSONReader) throws -> Bool in
                if r.take(UInt8(ascii: ",")) { return true }
                if r.take(UInt8(ascii: "}")) { return false }
                throw JSONReadError(offset: r.offset, reason: "expected ',' or '}'")
            })
        }

        /// What stands between two items as the first item is written: a comma, the whitespace before the first
        /// item (kubectl's newline and indentation, or nothing) and its brace. Inside a string a newline is always
        /// escaped, so with the newline the separator is seldom found elsewhere; wherever it is found, the second
        /// part's start is taken only if the first part's items arrive at it.
        /// Reads it from the whitespace before the first item, whole however the pieces fall; nil at the end.
        private mutating func itemSeparator() throws(ReadError) -> [UInt8]? {
            let before = offset
            guard try step({ _ = $0.peek() }) != nil else { return nil }
            return [UInt8(ascii: ",")] + bytes[(position - (offset - before))..<position] + [UInt8(ascii: "{")]
        }

        /// Reads the items array after its `[` into `items`, one item a step: nil if anything in it is amiss,
        /// .some(nil) at its `]`, and what a second part read if the items arrived where it began.
        private mutating func readItems(into items: inout ItemCollector, second: inout SecondPart?) throws(ReadError) -> ListMembers?? {
            if try step({ $0.take(UInt8(ascii: "]")) }) != false { return .some(nil) }
            var index = 0
            // Whether the items may yet arrive where the second part begins.
            var handing = second != nil
            while true {
                if handing, let part = second {
                    guard try step({ _ = $0.peek() }) != nil else { return nil }
                    switch part.itemStart() {
                    case nil:
                        handing = false
                    case let start? where offset == start:
                        // The items arrived where the second part began: it read the rest, if it could.
                        handing = false
                        let read = part.finish()
                        if let later = read.members, let rest = read.digest {
                            second = nil
                            guard let joined = digest.joined(with: rest) else { return nil }
                            digest = joined
                            return .some(later)
                        }
                    case let start? where offset > start:
                        // Passed by: the second part finishes on its own; its digest is joined at the end.
                        handing = false
                    default:
                        break
                    }
                }
                // An item that cannot be read leaves `items` as it was: it is read again with more of the file.
                guard try step(endsClosed: true, { (r: inout JSONReader) throws -> Void in
                    let kind = try ItemCollector.leadingKind(r) ?? ItemCollector.lastKind(of: r)
                    try items.read(kind, index: index, &r)
                }) != nil else { return nil }
                index += 1
                guard let next = try step({ (r: inout JSONReader) throws -> Bool in
                    if r.take(UInt8(ascii: ",")) { return true }
                    if r.take(UInt8(ascii: "]")) { return false }
                    throw JSONReadError(offset: r.offset, reason: "expected ',' or ']'")
                }) else { return nil }
                if !next { return .some(nil) }
            }
        }

        /// The second part's work: from `start`, the first item after `separator`, the items up to the array's
        /// end, the rest of the List and its end; the digest from `start` on in any case.
        fileprivate static func readSecondPart(fd: Int32, path: String, size: Int, pieceSize: Int, from start: Int, separator: [UInt8],
                                               found: (Int?) -> Void) -> (members: ListMembers?, digest: Digest?) {
            var window = Window(fd: fd, path: path, size: size, pieceSize: pieceSize, from: start)
            var members: ListMembers?
            do {
                if try window.seek(separator, limit: JSONStreamSplitter.defaultLimit) {
                    window.position -= 1
                    found(window.offset)
                    var list = ListMembers()
                    var none: SecondPart?
                    if case .some(.none) = try window.readItems(into: &list.items, second: &none), let next = try window.afterMember() {
                        let rest = try next ? window.readMembers(into: &list, second: &none, splittingAt: { _ in nil }) : true
                        if rest, try window.step({ try $0.readEnd() }) != nil { members = list }
                    }
                } else {
                    found(nil)
                }
                try window.digestRest()
                return (members, window.digest)
            } catch {
                found(nil)
                return (nil, nil)
            }
        }
    }

    /// The second part of a List's items, read on a thread of its own while the first part is read: it finds
    /// the first item start after its offset, says where that is, and reads from there to the end of the file.
    /// The first part hands over to it only if its own items arrive exactly there, so whatever the second part
    /// guessed, the items are those one thread reads; and if not, its digest of the rest of the file still counts.
    private final class SecondPart: @unchecked Sendable {
        private let condition = NSCondition()
        private var start: Int??
        private var result: (members: ListMembers?, digest: Digest?)?

        /// Nil if its thread could not be started.
        init?(fd: Int32, path: String, size: Int, pieceSize: Int, from offset: Int, separator: [UInt8], threads: ThreadStarter) {
            do {
                _ = try threads("epokd-read") { [self] in read(fd: fd, path: path, size: size, pieceSize: pieceSize, from: offset, separator: separator) }
            } catch {
                return nil
            }
        }

        private func read(fd: Int32, path: String, size: Int, pieceSize: Int, from offset: Int, separator: [UInt8]) {
            let read = Window.readSecondPart(fd: fd, path: path, size: size, pieceSize: pieceSize, from: offset, separator: separator) { found in
                condition.withLock {
                    if start == nil { start = .some(found) }
                    condition.broadcast()
                }
            }
            condition.withLock {
                result = read
                condition.broadcast()
            }
        }

        /// The offset of the item the second part begins with (waiting until it is known); nil if it found none.
        func itemStart() -> Int? {
            condition.withLock {
                while start == nil { condition.wait() }
                return start!
            }
        }

        /// The second part's items and digest, once it is done (waiting for it); the digest is nil if the file
        /// could not be read.
        @discardableResult
        func finish() -> (members: ListMembers?, digest: Digest?) {
            condition.withLock {
                while result == nil { condition.wait() }
                return result!
            }
        }
    }
}
