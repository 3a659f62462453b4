#if canImport(Glibc)
import Glibc
#endif

extension SnapshotFile {
    /// `digest(_:)` computed a piece at a time: the digest of the pieces joined, whatever their sizes.
    public struct Digest {
        private var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        private var count = 0
        /// The bytes of a word not yet whole (fewer than eight).
        private var carry: [UInt8] = []

        public init() {}

        private mutating func mix(_ word: UInt64) {
            hash = (hash ^ word) &* 0x9E37_79B9_7F4A_7C15
            hash ^= hash >> 32
        }

        public mutating func update(_ bytes: UnsafeRawBufferPointer) {
            count += bytes.count
            var from = 0
            if !carry.isEmpty {
                let taken = min(8 - carry.count, bytes.count)
                carry += bytes[..<taken]
                from = taken
                guard carry.count == 8 else { return }
                mix(carry.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
                carry.removeAll(keepingCapacity: true)
            }
            let words = (bytes.count - from) / 8
            for i in 0..<words { mix(bytes.loadUnaligned(fromByteOffset: from + i * 8, as: UInt64.self)) }
            carry += bytes[(from + words * 8)...]
        }

        public func finish() -> UInt64 {
            var h = hash
            for byte in carry { h = (h ^ UInt64(byte)) &* 0x100_0000_01b3 }
            return h ^ UInt64(count)
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

    /// Reads from `fd` into `buffer` until it is full or the file ends; returns how many bytes it read.
    static func fill(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, path: String) throws(ReadError) -> Int {
        var filled = 0
        while filled < buffer.count {
            let n = Glibc.read(fd, buffer.baseAddress! + filled, buffer.count - filled)
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
    /// them is 200 MB). Anything else (YAML, a single object, a document with a key given twice, any error) is
    /// read whole by `decode(_:)`, which says what is wrong in the same words whichever way it came.
    public static func loadWithDigest(_ path: String) throws(ReadError) -> (snapshot: ClusterSnapshot, digest: UInt64) {
        let read = try loadWithDigest(path, pieceSize: pieceSize)
        return (read.snapshot, read.digest)
    }

    /// `loadWithDigest(_:)` reading pieces of `pieceSize` bytes, and whether it read the file a piece at a time.
    static func loadWithDigest(_ path: String, pieceSize: Int) throws(ReadError) -> (snapshot: ClusterSnapshot, digest: UInt64, streamed: Bool) {
        let fd = try openRegular(path)
        var window = Window(fd: fd, path: path, pieceSize: pieceSize)
        let streamed: ClusterSnapshot?
        do {
            defer { close(fd) }
            streamed = try window.readList()
        }
        if let streamed { return (streamed, window.digest.finish(), true) }
        let bytes = try read(path)
        do {
            return (try decode(bytes), digest(bytes), false)
        } catch {
            throw ReadError(path: path, reason: "\(error)")
        }
    }

    /// The part of a file being read: `bytes` from `position` on are not read yet; more are read when a step of
    /// the reader runs out of them.
    private struct Window {
        let fd: Int32
        let path: String
        var bytes: [UInt8] = []
        var position = 0
        var atEnd = false
        var digest = Digest()
        private var piece: [UInt8]

        init(fd: Int32, path: String, pieceSize: Int) {
            self.fd = fd
            self.path = path
            piece = [UInt8](repeating: 0, count: pieceSize)
        }

        /// Drops what was read and reads the next piece; false at the end of the file.
        private mutating func more() throws(ReadError) -> Bool {
            guard !atEnd else { return false }
            bytes.removeFirst(position)
            position = 0
            let fd = fd, path = path
            let count = try piece.withUnsafeMutableBytes { buffer in
                Result { () throws(ReadError) in try SnapshotFile.fill(fd, buffer, path: path) }
            }.get()
            piece.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[..<count])) }
            bytes += piece[..<count]
            if count < piece.count { atEnd = true }
            return true
        }

        /// Runs `step` on a reader at `position` and moves past what it read. A step that fails is run again with
        /// more of the file, and so is one that ends at the end of the bytes read so far unless it read an object
        /// (a number, say, may go on); nil if it still fails at the end of the file.
        private mutating func step<T>(endsClosed: Bool = false, _ step: (inout JSONReader) throws -> T) throws(ReadError) -> T? {
            // The reader is gone before `more()` changes the bytes, which are then not copied.
            func attempt() -> (T, Int)? {
                var reader = JSONReader(bytes, offset: position)
                guard let value = try? step(&reader), endsClosed || reader.offset < bytes.count || atEnd else { return nil }
                return (value, reader.offset)
            }
            while true {
                if let (value, end) = attempt() {
                    position = end
                    return value
                }
                // No value is that long (the watch's own limit): the step fails on what is there, not for want of
                // more, and the file is read whole instead of pulled into the window up to its end.
                guard bytes.count - position <= JSONStreamSplitter.defaultLimit, try more() else { return nil }
            }
        }

        /// The snapshot of a JSON List read a piece at a time; nil if the file is anything else, or has anything
        /// wrong with it (for `decode(_:)` to read whole and say what).
        mutating func readList() throws(ReadError) -> ClusterSnapshot? {
            guard try step({ $0.take(UInt8(ascii: "{")) }) == true else { return nil }
            var kind: String??
            var hasItems: Bool?
            var items = ItemCollector()
            if try step({ $0.take(UInt8(ascii: "}")) }) != false { return nil }
            repeat {
                guard let key = try step({ (r: inout JSONReader) throws -> String in
                    let key = try r.readString()
                    guard r.take(UInt8(ascii: ":")) else { throw JSONReadError(offset: r.offset, reason: "expected ':'") }
                    return key
                }) else { return nil }
                switch key {
                case "kind":
                    guard kind == nil, let value = try step({ try $0.readOptionalString() }) else { return nil }
                    kind = .some(value)
                case "items":
                    guard hasItems == nil, let null = try step({ try $0.readNull() }) else { return nil }
                    hasItems = !null
                    if !null, try !readItems(into: &items) { return nil }
                default:
                    guard try step({ try $0.skipValue() }) != nil else { return nil }
                }
                guard let next = try step({ (r: inout JSONReader) throws -> Bool in
                    if r.take(UInt8(ascii: ",")) { return true }
                    if r.take(UInt8(ascii: "}")) { return false }
                    throw JSONReadError(offset: r.offset, reason: "expected ',' or '}'")
                }) else { return nil }
                guard next else { break }
            } while true
            guard try step({ try $0.readEnd() }) != nil, case let listKind?? = kind, listKind.hasSuffix("List"), hasItems == true else { return nil }
            return try? items.finished()
        }

        /// Reads the items array into `items`, one item a step; false if anything in it is amiss.
        private mutating func readItems(into items: inout ItemCollector) throws(ReadError) -> Bool {
            guard try step({ $0.take(UInt8(ascii: "[")) }) == true else { return false }
            if try step({ $0.take(UInt8(ascii: "]")) }) != false { return true }
            var index = 0
            while true {
                // An item that cannot be read leaves `items` as it was: it is read again with more of the file.
                guard try step(endsClosed: true, { (r: inout JSONReader) throws -> Void in
                    let kind = try ItemCollector.leadingKind(r) ?? ItemCollector.lastKind(of: r)
                    try items.read(kind, index: index, &r)
                }) != nil else { return false }
                index += 1
                guard let next = try step({ (r: inout JSONReader) throws -> Bool in
                    if r.take(UInt8(ascii: ",")) { return true }
                    if r.take(UInt8(ascii: "]")) { return false }
                    throw JSONReadError(offset: r.offset, reason: "expected ',' or ']'")
                }) else { return false }
                if !next { return true }
            }
        }
    }
}
