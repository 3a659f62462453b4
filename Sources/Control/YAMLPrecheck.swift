// Yams's own copy of libyaml (the module Yams is built on): its event parser keeps explicit stacks, so it can
// measure any document without recursion, before Yams builds a tree of it (which recurses once per level).
import CYaml

/// What a YAML document must not do before Yams reads it: nest deeper than `maxDepth` (a Kubernetes object nests
/// about 20 levels; thousands would exhaust the stack), expand aliases beyond a few times its own size (a
/// "billion laughs" document of a few hundred bytes), or give a key twice in one mapping (kubectl refuses that
/// too: "mapping key already defined"; Yams would silently keep the first, the API server's JSON the last).
enum YAMLPrecheck {
    static let maxDepth = 100

    /// Why a document was refused before it was parsed.
    struct Refused: Error, CustomStringConvertible {
        var description: String
    }

    /// Checks `text` with libyaml's events; a document libyaml cannot parse passes, for Yams to report in its words.
    /// Returns the lines (0-based) of each document of the stream that holds anything (`---` separated; a
    /// document that is empty or only comments is left out), or nil when the stream did not parse to its end.
    @discardableResult
    static func check(_ text: String) throws(Refused) -> [Range<Int>]? {
        var bytes = Array(text.utf8)
        guard !bytes.isEmpty else { return [] }
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else { throw Refused(description: "the YAML parser could not be set up (out of memory)") }
        defer { yaml_parser_delete(&parser) }
        var failure: Refused?
        // Each document's first line, and whether it holds a node that is not an empty scalar.
        var documents: [(start: Int, content: Bool)] = []
        var complete = false
        bytes.withUnsafeMutableBufferPointer { buffer in
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            var depth = 0
            // Nodes as written, and as aliases expand them; each anchor's size, and the anchored nodes still open.
            var nodes = 0, expanded = 0
            var anchors: [String: Int] = [:]
            var open: [(anchor: String?, expandedAtStart: Int)] = []
            // The collections open, innermost last: for a mapping, whether its next node is a key, and its keys.
            var collections: [(isMapping: Bool, expectsKey: Bool, keys: Set<String>)] = []
            // A node starts in the innermost collection: a scalar key of a mapping is checked against its others.
            func nodeStarts(key: String?, line: Int) {
                guard var top = collections.popLast() else { return }
                defer { collections.append(top) }
                guard top.isMapping else { return }
                if top.expectsKey, let key, !top.keys.insert(key).inserted {
                    failure = Refused(description: "has the key \"\(key)\" twice in one mapping (line \(line)); kubectl refuses that too: give it once")
                }
                top.expectsKey.toggle()
            }
            var event = yaml_event_t()
            while failure == nil, yaml_parser_parse(&parser, &event) == 1 {
                defer { yaml_event_delete(&event) }
                let line = event.start_mark.line + 1
                switch event.type {
                case YAML_SEQUENCE_START_EVENT, YAML_MAPPING_START_EVENT:
                    if !documents.isEmpty { documents[documents.count - 1].content = true }
                    nodeStarts(key: nil, line: line)
                    collections.append((event.type == YAML_MAPPING_START_EVENT, true, []))
                    depth += 1
                    nodes += 1
                    expanded += 1
                    let anchor = event.type == YAML_SEQUENCE_START_EVENT ? event.data.sequence_start.anchor : event.data.mapping_start.anchor
                    open.append((anchor.map { String(cString: $0) }, expanded - 1))
                    if depth > maxDepth {
                        failure = Refused(description: "nests deeper than \(maxDepth) levels (line \(line)); a Kubernetes object nests far less, so the file is refused before it is parsed")
                    }
                case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                    depth -= 1
                    _ = collections.popLast()
                    if let last = open.popLast(), let anchor = last.anchor { anchors[anchor] = expanded - last.expandedAtStart }
                case YAML_SCALAR_EVENT:
                    let scalar = event.data.scalar
                    if scalar.length > 0 || scalar.tag != nil, !documents.isEmpty { documents[documents.count - 1].content = true }
                    nodeStarts(key: scalar.value.map { String(decoding: UnsafeBufferPointer(start: $0, count: scalar.length), as: UTF8.self) }, line: line)
                    nodes += 1
                    expanded += 1
                    if let anchor = event.data.scalar.anchor { anchors[String(cString: anchor)] = 1 }
                case YAML_ALIAS_EVENT:
                    nodeStarts(key: nil, line: line)
                    nodes += 1
                    expanded += event.data.alias.anchor.flatMap { anchors[String(cString: $0)] } ?? 1
                    if expanded > 10_000 && expanded > 4 * nodes {
                        failure = Refused(description: "its aliases expand it to \(expanded) nodes from \(nodes) written (line \(line)); more than four times its size is refused")
                    }
                case YAML_DOCUMENT_START_EVENT:
                    documents.append((Int(event.start_mark.line), false))
                case YAML_STREAM_END_EVENT:
                    complete = true
                    return
                default:
                    break
                }
            }
        }
        if let failure { throw failure }
        guard complete else { return nil }
        let lines = text.utf8.count { $0 == UInt8(ascii: "\n") } + 1
        return documents.indices.compactMap { i in
            documents[i].content ? documents[i].start..<(i + 1 < documents.count ? documents[i + 1].start : lines) : nil
        }
    }
}
