/// Splits a byte stream into complete top-level JSON values, whatever the chunk boundaries:
/// a value may arrive in several pieces, and several values may arrive in one.
struct JSONStreamSplitter {
    private var buffer: [UInt8] = []
    private var scanned = 0
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var start: Int?

    /// Adds bytes and returns the values they complete.
    mutating func feed(_ bytes: some Sequence<UInt8>) -> [[UInt8]] {
        buffer.append(contentsOf: bytes)
        var values: [[UInt8]] = []
        var i = scanned
        while i < buffer.count {
            let b = buffer[i]
            if inString {
                if escaped { escaped = false }
                else if b == UInt8(ascii: "\\") { escaped = true }
                else if b == UInt8(ascii: "\"") { inString = false }
            } else if b == UInt8(ascii: "\"") {
                inString = true
            } else if b == UInt8(ascii: "{") || b == UInt8(ascii: "[") {
                if depth == 0 { start = i }
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
            buffer.removeSubrange(0..<s)
            scanned = buffer.count
            start = 0
        } else {
            buffer.removeAll(keepingCapacity: true)
            scanned = 0
        }
        return values
    }
}
