/// Splits a byte stream into complete top-level JSON objects or arrays, whatever the chunk boundaries: a value
/// may arrive in several pieces, and several values may arrive in one. Only white space may stand between
/// values, and no value may exceed `limit` bytes: anything else is an error, after which the stream is unusable.
public struct JSONStreamSplitter {
    /// Why the stream cannot be split.
    public struct Malformed: Error, CustomStringConvertible {
        public var description: String
    }

    /// The largest value accepted (a watch event carries one object; etcd's own limit is 1.5 MiB).
    public static let defaultLimit = 16 << 20

    public let limit: Int
    private var buffer: [UInt8] = []
    private var scanned = 0
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var start: Int?
    /// Bytes consumed before `buffer[0]`, for error offsets.
    private var consumed = 0

    public init(limit: Int = JSONStreamSplitter.defaultLimit) {
        self.limit = limit
    }

    /// Adds bytes and returns the values they complete.
    public mutating func feed(_ bytes: some Sequence<UInt8>) throws(Malformed) -> [[UInt8]] {
        buffer.append(contentsOf: bytes)
        var values: [[UInt8]] = []
        var i = scanned
        while i < buffer.count {
            let b = buffer[i]
            if inString {
                if escaped { escaped = false }
                else if b == UInt8(ascii: "\\") { escaped = true }
                else if b == UInt8(ascii: "\"") { inString = false }
            } else if depth == 0 {
                switch b {
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    start = i
                    depth = 1
                case 0x20, 0x0a, 0x0d, 0x09:
                    break
                default:
                    throw Malformed(description: "unexpected byte 0x\(String(b, radix: 16)) between values at offset \(consumed + i)")
                }
            } else if b == UInt8(ascii: "\"") {
                inString = true
            } else if b == UInt8(ascii: "{") || b == UInt8(ascii: "[") {
                depth += 1
            } else if b == UInt8(ascii: "}") || b == UInt8(ascii: "]") {
                depth -= 1
                if depth == 0, let s = start {
                    values.append(Array(buffer[s...i]))
                    start = nil
                }
            }
            i += 1
        }
        // Keep only the unfinished value.
        if let s = start {
            guard buffer.count - s <= limit else {
                throw Malformed(description: "a value starting at offset \(consumed + s) exceeds \(limit >> 20) MiB")
            }
            consumed += s
            buffer.removeSubrange(0..<s)
            scanned = buffer.count
            start = 0
        } else {
            consumed += buffer.count
            buffer.removeAll(keepingCapacity: true)
            scanned = 0
        }
        return values
    }
}
