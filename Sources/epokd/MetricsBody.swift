import Dataplane
import NIOCore

/// `/metrics` as read at one time, its largest part kept as numbers: a mapping's two counters take 24 bytes here,
/// where their two lines of text take about 120 (at 50k mappings, 1.2 MB held between scrapes instead of 6 MB).
/// Each response writes the text a piece at a time, the next piece once the client has taken the last.
struct MetricsBody: Sendable {
    /// One mapping's kernel counters.
    struct Mapping: Sendable {
        var proto: L4Protocol
        var port: Port
        var packets: UInt64
        var bytes: UInt64
    }

    /// The registry's metrics and the feed's restarts.
    let head: ByteBuffer
    /// How much of the text a response writes at a time (also the most a connection's pending writes hold before
    /// the next piece waits for its client to read).
    static let pieceSize = 16 << 10

    /// Every mapping's counters, by protocol then port; nil when they could not be read (no family is written).
    let mappings: [Mapping]?
    /// The LoadBalancer firewall's and the egress rules' counters.
    let tail: ByteBuffer
    /// The whole text's length in bytes (its `Content-Length`).
    let byteCount: Int

    /// `mappings` as read; they are sorted here, in place.
    init(head: ByteBuffer, mappings: consuming [Mapping]?, tail: ByteBuffer) {
        mappings?.sort { ($0.proto, $0.port) < ($1.proto, $1.port) }
        self.head = head
        self.mappings = mappings
        self.tail = tail
        var count = head.readableBytes + tail.readableBytes
        if let mappings {
            for family in Self.families {
                count += family.header.utf8.count
                for mapping in mappings {
                    count += family.prefix.utf8.count + mapping.proto.description.utf8.count + Self.portLabel.utf8.count
                        + Self.digits(UInt64(mapping.port.rawValue)) + Self.close.utf8.count + Self.digits(family.value(mapping)) + 1
                }
            }
        }
        byteCount = count
    }

    /// The text in order, in pieces of about `size` bytes (the head and tail whole, as they are).
    func pieces(of size: Int, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Pieces {
        Pieces(body: self, size: size, allocator: allocator)
    }

    /// The pieces of one response.
    struct Pieces: IteratorProtocol {
        private enum Stage { case head, family(Int), tail, done }
        fileprivate let body: MetricsBody
        fileprivate let size: Int
        fileprivate let allocator: ByteBufferAllocator
        private var stage = Stage.head
        /// The next mapping to write in the current family.
        private var index = 0

        fileprivate init(body: MetricsBody, size: Int, allocator: ByteBufferAllocator) {
            self.body = body
            self.size = size
            self.allocator = allocator
        }

        mutating func next() -> ByteBuffer? {
            while true {
                switch stage {
                case .head:
                    stage = body.mappings == nil ? .tail : .family(0)
                    if body.head.readableBytes > 0 { return body.head }
                case .family(let number):
                    let mappings = body.mappings ?? [], family = MetricsBody.families[number]
                    // Room for the piece and its last line (at most 79 bytes), so the buffer never grows.
                    var piece = allocator.buffer(capacity: size + 128)
                    if index == 0 { piece.writeString(family.header) }
                    while index < mappings.count, piece.readableBytes < size {
                        let mapping = mappings[index]
                        piece.writeString(family.prefix)
                        piece.writeString(mapping.proto.description)
                        piece.writeString(MetricsBody.portLabel)
                        piece.writeString(String(mapping.port.rawValue))
                        piece.writeString(MetricsBody.close)
                        piece.writeString(String(family.value(mapping)))
                        piece.writeInteger(UInt8(ascii: "\n"))
                        index += 1
                    }
                    if index == mappings.count {
                        index = 0
                        stage = number + 1 < MetricsBody.families.count ? .family(number + 1) : .tail
                    }
                    return piece
                case .tail:
                    stage = .done
                    if body.tail.readableBytes > 0 { return body.tail }
                case .done:
                    return nil
                }
            }
        }
    }

    /// One metric family of the mappings': its header and each line's start.
    private struct Family: Sendable {
        let header: String
        let prefix: String
        let value: @Sendable (Mapping) -> UInt64

        init(_ name: String, _ value: @escaping @Sendable (Mapping) -> UInt64) {
            header = "# HELP epokd_mapping_\(name)_total Forwarded \(name) per mapping, from nftables counters.\n# TYPE epokd_mapping_\(name)_total counter\n"
            prefix = "epokd_mapping_\(name)_total{protocol=\""
            self.value = value
        }
    }

    private static let families = [Family("packets") { $0.packets }, Family("bytes") { $0.bytes }]
    private static let portLabel = "\",port=\""
    private static let close = "\"} "

    private static func digits(_ value: UInt64) -> Int {
        var (count, rest) = (1, value)
        while rest >= 10 { rest /= 10; count += 1 }
        return count
    }
}
