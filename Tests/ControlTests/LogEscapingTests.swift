import Control
import Dataplane
import Foundation
import Testing

@Suite("User text in log lines goes through Escaped.text")
struct LogEscapingTests {
    /// The repository's Sources, found from this file.
    static let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Sources")

    @Test("no log call interpolates a name, namespace, message or reason (or anything of an object's metadata) raw")
    func noRawNamesInLogCalls() throws {
        let logCall = try Regex(#"logger\.(trace|debug|info|notice|warning|error|critical)\("#)
        let raw = try Regex(#"\\\((([A-Za-z_][A-Za-z0-9_]*\.)*(name|namespace|message|reason))\)|\\\([^)]*metadata\."#)
        var files = 0, calls = 0
        var offenders: [String] = []
        let enumerator = try #require(FileManager.default.enumerator(at: Self.sources, includingPropertiesForKeys: nil))
        for case let url as URL in enumerator where url.pathExtension == "swift" {
            files += 1
            for (number, line) in try String(contentsOf: url, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false).enumerated()
            where line.contains(logCall) {
                calls += 1
                if line.contains(raw) { offenders.append("\(url.lastPathComponent):\(number + 1): \(line.trimmingCharacters(in: .whitespaces))") }
            }
        }
        #expect(files > 50 && calls > 50, "the sources were read (\(files) files, \(calls) log calls)")
        #expect(offenders.isEmpty, "raw interpolation in log calls:\n\(offenders.joined(separator: "\n"))")
    }

    @Test("names are escaped wherever a reference is printed: a newline cannot forge a log line or a kernel comment")
    func referencesEscape() {
        #expect(ServiceRef(namespace: "default", name: "web\nforged: applied").description == "default/web\\nforged: applied")
        #expect(ObjectRef(.ingress, namespace: "a\u{0}", name: "b").description == "Ingress a\\u{0}/b")
        #expect(ServiceRef(namespace: "default", name: "web").description == "default/web")
        #expect(Escaped.text("plain-ascii", limit: 5) == "plain…")
    }
}
