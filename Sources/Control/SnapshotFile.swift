import Foundation
import Yams

/// Reads a cluster snapshot from the output of `kubectl get services,nodes -A -o yaml` (or `-o json`).
public enum SnapshotFile {
    /// Why a snapshot file could not be read.
    public struct ReadError: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        public var description: String { "\(path): \(reason)" }
    }

    private struct Kind: Decodable { var kind: String? }

    private enum Item: Decodable {
        case service(Service)
        case node(Node)
        case other

        init(from decoder: Decoder) throws {
            switch try Kind(from: decoder).kind {
            case "Service": self = .service(try Service(from: decoder))
            case "Node": self = .node(try Node(from: decoder))
            default: self = .other
            }
        }
    }

    private struct List: Decodable {
        var kind: String?
        var items: [Item]?
    }

    /// Decodes a `List` (or a single Service or Node) in YAML or JSON; other kinds are skipped.
    public static func decode(_ text: String) throws -> ClusterSnapshot {
        let items: [Item]
        if text.utf8.first(where: { $0 != 0x20 && $0 != 0x0a && $0 != 0x0d && $0 != 0x09 }) == UInt8(ascii: "{") {
            let data = Data(text.utf8)
            let list = try JSONDecoder().decode(List.self, from: data)
            items = list.kind?.hasSuffix("List") == true ? (list.items ?? []) : [try JSONDecoder().decode(Item.self, from: data)]
        } else {
            let list = try YAMLDecoder().decode(List.self, from: text)
            items = list.kind?.hasSuffix("List") == true ? (list.items ?? []) : [try YAMLDecoder().decode(Item.self, from: text)]
        }
        var snapshot = ClusterSnapshot()
        for item in items {
            switch item {
            case .service(let s): snapshot.services.append(s)
            case .node(let n): snapshot.nodes.append(n)
            case .other: break
            }
        }
        return snapshot
    }

    /// Reads and decodes the file at `path`.
    public static func load(_ path: String) throws(ReadError) -> ClusterSnapshot {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ReadError(path: path, reason: "cannot be read (\(error.localizedDescription))")
        }
        do {
            return try decode(text)
        } catch {
            throw ReadError(path: path, reason: "is not a Kubernetes List of Services and Nodes (\(error))")
        }
    }
}
