/// User-supplied text (an object's name, a kernel comment, a chain an operator named) made safe for logs, Events
/// and the terminal.
public enum Escaped {
    /// `text` with control characters written as `\n`, `\t`, `\u{..}`, cut to `limit` characters (with `…`).
    public static func text(_ text: String, limit: Int) -> String {
        // Most text (every name the API server accepts) is printable ASCII within the limit: kept as it is.
        if text.utf8.count <= limit, text.utf8.allSatisfy({ (0x20..<0x7f).contains($0) }) { return text }
        var result = ""
        var count = 0
        for scalar in text.unicodeScalars {
            if count >= limit {
                result += "…"
                break
            }
            switch scalar {
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case _ where scalar.value < 0x20 || (0x7f...0x9f).contains(scalar.value) || scalar == "\u{2028}" || scalar == "\u{2029}":
                result += "\\u{" + String(scalar.value, radix: 16) + "}"
            default: result.unicodeScalars.append(scalar)
            }
            count += 1
        }
        return result
    }
}
