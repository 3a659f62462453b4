#if canImport(Glibc)
import Glibc
#endif

/// Why JSON bytes could not be read: what was wrong, and at which byte.
public struct JSONReadError: Error, CustomStringConvertible, Equatable {
    public var offset: Int
    public var reason: String

    public var description: String { "\(reason) at byte \(offset)" }
}

/// An object key as it stands in the bytes; compared without making a String. It points into the reader's bytes:
/// it is valid only while the callback it is given to runs.
public struct JSONKey {
    fileprivate let bytes: UnsafeBufferPointer<UInt8>
    /// The key with its escapes resolved, when it has any (made only when asked for: most keys an object reader
    /// skips past are never compared, and a `managedFields` key is full of escapes).
    private var unescaped: String? {
        guard let base = bytes.baseAddress, memchr(base, Int32(UInt8(ascii: "\\")), bytes.count) != nil else { return nil }
        var quoted = [UInt8(ascii: "\"")]
        quoted += bytes
        quoted.append(UInt8(ascii: "\""))
        var reader = JSONReader(quoted)
        return try? reader.readString()
    }

    fileprivate init(bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    /// Whether the key is `name`. An escape is longer than what it stands for: a key of `name`'s length or
    /// shorter is compared as it stands, and only a longer one is looked at for escapes.
    public func `is`(_ name: StaticString) -> Bool {
        if bytes.count > name.utf8CodeUnitCount, let unescaped { return unescaped == name.description }
        return name.withUTF8Buffer { matches($0, whole: true) }
    }

    /// Whether the key is `name` (a name kept in a String).
    public func equals(_ name: String) -> Bool {
        if bytes.count > name.utf8.count, let unescaped { return unescaped == name }
        var name = name
        return name.withUTF8 { matches($0, whole: true) }
    }

    /// Whether the key begins with `prefix`.
    public func hasPrefix(_ prefix: String) -> Bool {
        var prefix = prefix
        if prefix.withUTF8({ matches($0, whole: false) }) { return true }
        return unescaped?.hasPrefix(prefix) ?? false
    }

    /// Whether the key's bytes begin with `text` (and, `whole`, are no more than it). Most keys a reader asks about
    /// differ in length: they are compared byte by byte only when they do not.
    private func matches(_ text: UnsafeBufferPointer<UInt8>, whole: Bool) -> Bool {
        (whole ? text.count == bytes.count : text.count <= bytes.count)
            && (text.isEmpty || memcmp(bytes.baseAddress!, text.baseAddress!, text.count) == 0)
    }

    public var string: String { unescaped ?? String(decoding: bytes, as: UTF8.self) }
}

/// A strict pull parser over UTF-8 JSON (RFC 8259): the caller reads the values it wants in order and skips the
/// rest, which is checked but never built. Malformed input is an error naming the byte offset, never a crash;
/// nesting deeper than 256 is refused, so hostile input cannot exhaust the stack.
public struct JSONReader {
    private let bytes: [UInt8]
    /// The next byte to read.
    public private(set) var offset: Int
    private var depth = 0
    static let maxDepth = 256
    /// Keys made into Strings by `intern(_:)`, at most `internLimit`; a reader of one item of many is given the
    /// ones the items before it made, so that a List's objects share them.
    public private(set) var interned: [String]
    public static let internLimit = 16
    /// The value of the last `kind` key that a typed reader (Service, Node, EndpointSlice) met at the top of its
    /// object: of duplicate `kind` keys the last counts, as the API server reads them.
    public var kindRead: String?

    public init(_ bytes: [UInt8], offset: Int = 0, interned: [String] = []) {
        self.bytes = bytes
        self.offset = offset
        self.interned = interned
    }

    private func fail(_ reason: String, at position: Int? = nil) -> JSONReadError {
        JSONReadError(offset: position ?? offset, reason: reason)
    }

    private mutating func skipWhitespace() {
        guard offset < bytes.count, bytes[offset] <= 0x20 else { return }
        offset = bytes.withUnsafeBytes { raw in
            var i = offset
            while i < raw.count {
                switch raw[i] {
                case 0x0a, 0x0d, 0x09: i += 1
                case 0x20:
                    // Indentation: eight bytes a step, to the first that is not a space (spaces become zero bytes;
                    // the first byte left is the lowest set one, the words being read little-endian).
                    i += 1
                    while i + 8 <= raw.count {
                        let others = raw.loadUnaligned(fromByteOffset: i, as: UInt64.self) ^ 0x2020_2020_2020_2020
                        if others != 0 {
                            i += others.littleEndian.trailingZeroBitCount / 8
                            break
                        }
                        i += 8
                    }
                default: return i
                }
            }
            return i
        }
    }

    /// The first byte of the next value (whitespace skipped); nil at the end.
    public mutating func peek() -> UInt8? {
        skipWhitespace()
        return offset < bytes.count ? bytes[offset] : nil
    }

    private mutating func expect(_ byte: UInt8, _ what: String) throws(JSONReadError) {
        guard peek() == byte else { throw fail(offset < bytes.count ? "expected \(what)" : "unexpected end of input, expected \(what)") }
        offset += 1
    }

    private mutating func enter() throws(JSONReadError) {
        depth += 1
        guard depth <= Self.maxDepth else { throw fail("nested deeper than \(Self.maxDepth)") }
    }

    /// `key` as a String: for the first `internLimit` keys asked for, the same String each time (the annotation
    /// names epokd keeps are one copy, not one per object).
    public mutating func intern(_ key: JSONKey) -> String {
        if let known = interned.first(where: key.equals) { return known }
        let string = key.string
        if interned.count < Self.internLimit { interned.append(string) }
        return string
    }

    /// Reads an object, calling `field` with each key; `field` must read or skip that key's value.
    public mutating func readObject(_ field: (inout JSONReader, JSONKey) throws(JSONReadError) -> Void) throws(JSONReadError) {
        try readObjectPrefix { (reader: inout JSONReader, key: JSONKey) throws(JSONReadError) -> Bool in
            try field(&reader, key)
            return true
        }
    }

    /// Reads an object's keys in order while `field` reads or skips each key's value and returns true; once it
    /// returns false, stops there, inside the object (a look ahead, on a copy of the reader).
    public mutating func readObjectPrefix(_ field: (inout JSONReader, JSONKey) throws(JSONReadError) -> Bool) throws(JSONReadError) {
        try expect(UInt8(ascii: "{"), "an object")
        try enter()
        defer { depth -= 1 }
        if peek() == UInt8(ascii: "}") {
            offset += 1
            return
        }
        // One reference to the bytes, held through the object: each key points into them, with no reference of
        // its own to take and give back.
        let held = bytes
        while true {
            guard peek() == UInt8(ascii: "\"") else { throw fail("expected a key in quotes") }
            // `scanString` has checked the key's UTF-8 and escapes.
            let (range, _) = try scanString(skipping: true)
            try expect(UInt8(ascii: ":"), "':' after a key")
            let more = try held.withUnsafeBufferPointer { (b: UnsafeBufferPointer<UInt8>) throws(JSONReadError) -> Bool in
                try field(&self, JSONKey(bytes: UnsafeBufferPointer(rebasing: b[range])))
            }
            guard more else { return }
            switch peek() {
            case UInt8(ascii: ","): offset += 1
            case UInt8(ascii: "}"):
                offset += 1
                return
            default: throw fail("expected ',' or '}' in an object")
            }
        }
    }

    /// Reads an array, calling `element` for each value; `element` must read or skip it.
    public mutating func readArray(_ element: (inout JSONReader) throws(JSONReadError) -> Void) throws(JSONReadError) {
        try expect(UInt8(ascii: "["), "an array")
        try enter()
        defer { depth -= 1 }
        if peek() == UInt8(ascii: "]") {
            offset += 1
            return
        }
        while true {
            try element(&self)
            switch peek() {
            case UInt8(ascii: ","): offset += 1
            case UInt8(ascii: "]"):
                offset += 1
                return
            default: throw fail("expected ',' or ']' in an array")
            }
        }
    }

    /// Consumes `null` if it comes next; returns whether it did.
    public mutating func readNull() throws(JSONReadError) -> Bool {
        guard peek() == UInt8(ascii: "n") else { return false }
        try literal("null")
        return true
    }

    public mutating func readBool() throws(JSONReadError) -> Bool {
        switch peek() {
        case UInt8(ascii: "t"):
            try literal("true")
            return true
        case UInt8(ascii: "f"):
            try literal("false")
            return false
        default: throw fail("expected true or false")
        }
    }

    private mutating func literal(_ word: StaticString) throws(JSONReadError) {
        let start = offset
        let matched = word.withUTF8Buffer { word in
            offset + word.count <= bytes.count && bytes[offset..<offset + word.count].elementsEqual(word)
        }
        guard matched else { throw fail("expected \(word)", at: start) }
        offset += word.utf8CodeUnitCount
    }

    /// An integer (no fraction, no exponent) that fits an Int.
    public mutating func readInt() throws(JSONReadError) -> Int {
        guard let first = peek(), first == UInt8(ascii: "-") || (0x30...0x39).contains(first) else { throw fail("expected an integer") }
        let start = offset
        let range = try scanNumber()
        var value = 0
        var index = range.lowerBound
        let negative = bytes[index] == UInt8(ascii: "-")
        if negative { index += 1 }
        while index < range.upperBound {
            let digit = bytes[index]
            guard digit >= 0x30 && digit <= 0x39 else { throw fail("expected an integer", at: start) }
            let (times, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = negative ? times.subtractingReportingOverflow(Int(digit - 0x30)) : times.addingReportingOverflow(Int(digit - 0x30))
            guard !o1 && !o2 else { throw fail("integer out of range", at: start) }
            value = sum
            index += 1
        }
        return value
    }

    /// Checks a number's grammar and returns its bytes.
    private mutating func scanNumber() throws(JSONReadError) -> Range<Int> {
        let start = offset
        func digits() -> Int {
            let from = offset
            while offset < bytes.count, bytes[offset] >= 0x30, bytes[offset] <= 0x39 { offset += 1 }
            return offset - from
        }
        if offset < bytes.count, bytes[offset] == UInt8(ascii: "-") { offset += 1 }
        guard offset < bytes.count, bytes[offset] >= 0x30, bytes[offset] <= 0x39 else { throw fail("expected a value", at: start) }
        if bytes[offset] == 0x30 { offset += 1 } else { _ = digits() }
        if offset < bytes.count, bytes[offset] == UInt8(ascii: ".") {
            offset += 1
            guard digits() > 0 else { throw fail("expected digits after '.'") }
        }
        if offset < bytes.count, bytes[offset] | 0x20 == UInt8(ascii: "e") {
            offset += 1
            if offset < bytes.count, bytes[offset] == UInt8(ascii: "+") || bytes[offset] == UInt8(ascii: "-") { offset += 1 }
            guard digits() > 0 else { throw fail("expected digits in an exponent") }
        }
        return start..<offset
    }

    public mutating func readString() throws(JSONReadError) -> String {
        guard peek() == UInt8(ascii: "\"") else { throw fail("expected a string") }
        let (range, escaped) = try scanString()
        if let escaped { return escaped }
        // `scanString` has checked the UTF-8: decoded from contiguous memory, it is only copied.
        return bytes[range].withUnsafeBufferPointer { String(decoding: $0, as: UTF8.self) }
    }

    /// Reads a string or null as `PackedText` (no String is built for one in a packed shape).
    mutating func readOptionalPackedText() throws(JSONReadError) -> PackedText? {
        if try readNull() { return nil }
        guard peek() == UInt8(ascii: "\"") else { throw fail("expected a string") }
        let (range, escaped) = try scanString()
        if let escaped { return PackedText(escaped) }
        return bytes.withUnsafeBufferPointer { PackedText(utf8: UnsafeBufferPointer(rebasing: $0[range])) }
    }

    /// Moves past a string, checking that it is one (its escapes and UTF-8 included), without building it.
    public mutating func skipString() throws(JSONReadError) {
        guard peek() == UInt8(ascii: "\"") else { throw fail("expected a string") }
        _ = try scanString(skipping: true)
    }

    /// Checks a string (at `offset`, on its quote) and returns the range of its contents, and its value when it
    /// had escapes to resolve (unless it is only `skipping`: then escapes are checked, nothing is built).
    private mutating func scanString(skipping: Bool = false) throws(JSONReadError) -> (Range<Int>, String?) {
        offset += 1
        let start = offset
        // Most strings are plain ASCII: their end is found in one tight pass, eight bytes a step; anything else
        // stops it and is handled below, from where it stopped.
        offset = bytes.withUnsafeBufferPointer { b in
            var i = start
            if let base = b.baseAddress.map(UnsafeRawPointer.init) {
                while i + 8 <= b.count {
                    let stop = Self.firstStop(in: base.loadUnaligned(fromByteOffset: i, as: UInt64.self))
                    if stop < 8 { return i + stop }
                    i += 8
                }
            }
            while i < b.count {
                let byte = b[i]
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") || byte < 0x20 || byte >= 0x80 { break }
                i += 1
            }
            return i
        }
        if offset < bytes.count, bytes[offset] == UInt8(ascii: "\"") {
            offset += 1
            return (start..<offset - 1, nil)
        }
        var ascii = true
        while offset < bytes.count {
            let byte = bytes[offset]
            if byte == UInt8(ascii: "\"") {
                offset += 1
                guard ascii || Self.isValidUTF8(bytes[start..<offset - 1]) else { throw fail("invalid UTF-8 in a string", at: start) }
                return (start..<offset - 1, nil)
            }
            if byte >= 0x80 { ascii = false }
            if byte == UInt8(ascii: "\\") { return try unescape(from: start, building: !skipping) }
            guard byte >= 0x20 else { throw fail("control character in a string") }
            offset += 1
        }
        throw fail("unterminated string", at: start - 1)
    }

    /// The index of the first byte of `word` (read little-endian, in memory order) that ends a plain ASCII run in a
    /// string: `"`, a backslash, a control character or a byte of 0x80 and above; 8 when there is none. Each test
    /// marks its bytes in bit 7; a borrow can only mark bytes above a marked one, so the lowest mark is exact.
    static func firstStop(in word: UInt64) -> Int {
        let ones: UInt64 = 0x0101_0101_0101_0101, highs: UInt64 = 0x8080_8080_8080_8080
        func zeroBytes(_ x: UInt64) -> UInt64 { (x &- ones) & ~x & highs }
        let control = (word &- 0x2020_2020_2020_2020) & ~word & highs
        let marks = word & highs | control | zeroBytes(word ^ 0x2222_2222_2222_2222) | zeroBytes(word ^ 0x5C5C_5C5C_5C5C_5C5C)
        return marks.trailingZeroBitCount / 8
    }

    private mutating func unescape(from start: Int, building: Bool) throws(JSONReadError) -> (Range<Int>, String?) {
        var built: [UInt8] = []
        var plain = start
        // The run of bytes since the last escape, checked, and added to the value when one is built.
        func flush(_ to: Int) throws(JSONReadError) {
            guard Self.isValidUTF8(bytes[plain..<to]) else { throw fail("invalid UTF-8 in a string", at: plain) }
            if building { built += bytes[plain..<to] }
        }
        while offset < bytes.count {
            let byte = bytes[offset]
            if byte == UInt8(ascii: "\"") {
                try flush(offset)
                offset += 1
                return (start..<offset - 1, building ? String(decoding: built, as: UTF8.self) : nil)
            }
            guard byte >= 0x20 else { throw fail("control character in a string") }
            guard byte == UInt8(ascii: "\\") else {
                offset += 1
                continue
            }
            try flush(offset)
            guard offset + 1 < bytes.count else { break }
            let escape = bytes[offset + 1]
            offset += 2
            let scalar: Unicode.Scalar
            switch escape {
            case UInt8(ascii: "\""): scalar = "\""
            case UInt8(ascii: "\\"): scalar = "\\"
            case UInt8(ascii: "/"): scalar = "/"
            case UInt8(ascii: "b"): scalar = "\u{8}"
            case UInt8(ascii: "f"): scalar = "\u{c}"
            case UInt8(ascii: "n"): scalar = "\n"
            case UInt8(ascii: "r"): scalar = "\r"
            case UInt8(ascii: "t"): scalar = "\t"
            case UInt8(ascii: "u"):
                var unit = try hex4()
                if (0xD800..<0xDC00).contains(unit) {
                    guard offset + 1 < bytes.count, bytes[offset] == UInt8(ascii: "\\"), bytes[offset + 1] == UInt8(ascii: "u") else {
                        throw fail("a lone surrogate in a string")
                    }
                    offset += 2
                    let low = try hex4()
                    guard (0xDC00..<0xE000).contains(low) else { throw fail("a lone surrogate in a string") }
                    unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                } else if (0xDC00..<0xE000).contains(unit) {
                    throw fail("a lone surrogate in a string")
                }
                guard let valid = Unicode.Scalar(unit) else { throw fail("an invalid \\u escape") }
                scalar = valid
            default:
                throw fail("an invalid escape \\\(Character(Unicode.Scalar(escape)))", at: offset - 2)
            }
            if building { UTF8.encode(scalar) { built.append($0) } }
            plain = offset
        }
        throw fail("unterminated string", at: start - 1)
    }

    /// Whether `bytes` are well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
    static func isValidUTF8(_ bytes: ArraySlice<UInt8>) -> Bool {
        var i = bytes.startIndex
        while i < bytes.endIndex {
            let lead = bytes[i]
            let (count, low, high): (Int, UInt8, UInt8)
            switch lead {
            case 0x00...0x7f:
                i += 1
                continue
            case 0xc2...0xdf: (count, low, high) = (1, 0x80, 0xbf)
            case 0xe0: (count, low, high) = (2, 0xa0, 0xbf)
            case 0xed: (count, low, high) = (2, 0x80, 0x9f)
            case 0xe1...0xef: (count, low, high) = (2, 0x80, 0xbf)
            case 0xf0: (count, low, high) = (3, 0x90, 0xbf)
            case 0xf4: (count, low, high) = (3, 0x80, 0x8f)
            case 0xf1...0xf3: (count, low, high) = (3, 0x80, 0xbf)
            default: return false
            }
            guard i + count < bytes.endIndex else { return false }
            guard (low...high).contains(bytes[i + 1]) else { return false }
            for k in 2..<(count + 1) where !(0x80...0xbf).contains(bytes[i + k]) { return false }
            i += count + 1
        }
        return true
    }

    private mutating func hex4() throws(JSONReadError) -> UInt32 {
        guard offset + 4 <= bytes.count else { throw fail("a short \\u escape") }
        var value: UInt32 = 0
        for byte in bytes[offset..<offset + 4] {
            let digit: UInt8
            switch byte {
            case 0x30...0x39: digit = byte - 0x30
            case 0x41...0x46: digit = byte - 0x37
            case 0x61...0x66: digit = byte - 0x57
            default: throw fail("a \\u escape that is not 4 hex digits")
            }
            value = value << 4 | UInt32(digit)
        }
        offset += 4
        return value
    }

    /// Skips one value of any kind, checking its grammar.
    public mutating func skipValue() throws(JSONReadError) {
        switch peek() {
        case UInt8(ascii: "{")?: try skipObject()
        case UInt8(ascii: "[")?: try readArray { (reader: inout JSONReader) throws(JSONReadError) in try reader.skipValue() }
        case UInt8(ascii: "\"")?: _ = try scanString(skipping: true)
        case UInt8(ascii: "t")?, UInt8(ascii: "f")?: _ = try readBool()
        case UInt8(ascii: "n")?: try literal("null")
        case nil: throw fail("unexpected end of input, expected a value")
        default: _ = try scanNumber()
        }
    }

    /// Skips an object, checking its grammar, building nothing (not even its keys).
    private mutating func skipObject() throws(JSONReadError) {
        offset += 1
        try enter()
        defer { depth -= 1 }
        if peek() == UInt8(ascii: "}") {
            offset += 1
            return
        }
        while true {
            guard peek() == UInt8(ascii: "\"") else { throw fail("expected a key in quotes") }
            _ = try scanString(skipping: true)
            try expect(UInt8(ascii: ":"), "':' after a key")
            try skipValue()
            switch peek() {
            case UInt8(ascii: ","): offset += 1
            case UInt8(ascii: "}"):
                offset += 1
                return
            default: throw fail("expected ',' or '}' in an object")
            }
        }
    }

    /// Moves past one value matching only its brackets and strings, without checking the grammar within: a first
    /// look at a document whose values are each read, and so checked, afterwards.
    public mutating func skimValue() throws(JSONReadError) {
        guard let first = peek() else { throw fail("unexpected end of input, expected a value") }
        guard first == UInt8(ascii: "{") || first == UInt8(ascii: "[") else { return try skipValue() }
        let start = offset
        var depth = 0
        while offset < bytes.count {
            let byte = bytes[offset]
            offset += 1
            switch byte {
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 { return }
            case UInt8(ascii: "\""):
                while offset < bytes.count, bytes[offset] != UInt8(ascii: "\"") { offset += bytes[offset] == UInt8(ascii: "\\") ? 2 : 1 }
                offset += 1
            default:
                break
            }
        }
        offset = bytes.count
        throw fail("unterminated value", at: start)
    }

    /// The bytes of the next value, skipped (for a type read another way).
    public mutating func valueBytes() throws(JSONReadError) -> ArraySlice<UInt8> {
        _ = peek()
        let start = offset
        try skipValue()
        return bytes[start..<offset]
    }

    /// Checks that nothing but whitespace follows.
    /// Consumes `byte` if it comes next (after white space); returns whether it did.
    mutating func take(_ byte: UInt8) -> Bool {
        guard peek() == byte else { return false }
        offset += 1
        return true
    }

    public mutating func readEnd() throws(JSONReadError) {
        guard peek() == nil else { throw fail("unexpected data after the value") }
    }

    // Typed conveniences: `null` reads as nil, as Foundation's decoder reads an absent optional.

    public mutating func readOptionalString() throws(JSONReadError) -> String? { try readNull() ? nil : readString() }
    public mutating func readOptionalInt() throws(JSONReadError) -> Int? { try readNull() ? nil : readInt() }
    public mutating func readOptionalBool() throws(JSONReadError) -> Bool? { try readNull() ? nil : readBool() }

    /// An array of strings (nil for `null`).
    public mutating func readStrings() throws(JSONReadError) -> [String]? {
        if try readNull() { return nil }
        var result: [String] = []
        try readArray { (reader: inout JSONReader) throws(JSONReadError) in result.append(try reader.readString()) }
        return result
    }

    /// An array of values each read by `element` (nil for `null`).
    public mutating func readList<T>(_ element: (inout JSONReader) throws(JSONReadError) -> T) throws(JSONReadError) -> [T]? {
        if try readNull() { return nil }
        var result: [T] = []
        try readArray { (reader: inout JSONReader) throws(JSONReadError) in result.append(try element(&reader)) }
        return result
    }
}
