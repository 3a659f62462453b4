import Dataplane

/// An active health check of a Service's nodes, as `epok.getbetter.ro/health-check` asks for it:
/// `tcp` or `http:/path`, then optional `interval=2s timeout=2s fall=3 rise=2` (HAProxy's meanings and
/// defaults: a node goes down after `fall` consecutive failures and comes back after `rise` successes).
public struct HealthCheck: Hashable, Sendable {
    public enum Kind: Hashable, Sendable, CustomStringConvertible {
        /// The node port accepts a TCP connection.
        case tcp
        /// `GET path` on the node port answers 2xx or 3xx.
        case http(path: String)

        public var description: String {
            switch self {
            case .tcp: "tcp"
            case .http(let path): "http:\(path)"
            }
        }
    }

    public var kind: Kind
    /// Milliseconds between probes of one node.
    public var interval: Int
    /// Milliseconds a probe may take.
    public var timeout: Int
    public var fall: Int
    public var rise: Int
    /// The node port probed; nil: the Service's first TCP node port that is forwarded.
    public var port: Port?

    public init(kind: Kind, interval: Int = 2000, timeout: Int? = nil, fall: Int = 3, rise: Int = 2, port: Port? = nil) {
        self.kind = kind
        self.interval = interval
        self.timeout = timeout ?? min(interval, 2000)
        self.fall = fall
        self.rise = rise
        self.port = port
    }

    /// What kube-proxy serves for `externalTrafficPolicy: Local` Services on `healthCheckNodePort`.
    public static func kubeProxy(port: Port) -> HealthCheck {
        HealthCheck(kind: .http(path: "/healthz"), port: port)
    }
}

extension EpokAnnotation {
    /// `tcp` or `http:/path`, then optional `interval= timeout= fall= rise= port=` settings.
    public static let healthCheck = "epok.getbetter.ro/health-check"
}

extension AnnotationParser {
    /// Parses `epok.getbetter.ro/health-check`, e.g. `tcp interval=1s timeout=500ms fall=2 rise=2` or
    /// `http:/healthz`. Durations are `500ms`, `2s` or `1m`, from 100 ms to 1 hour; the timeout is at most the
    /// interval; fall and rise are 1 to 100. The error names the offending token.
    public static func healthCheck(_ text: String) throws(AnnotationError) -> HealthCheck {
        func fail(_ message: String) -> AnnotationError {
            AnnotationError(annotation: EpokAnnotation.healthCheck,
                            message: "\"\(text)\": \(message) (expected e.g. \"tcp\", \"http:/healthz\" or \"tcp interval=1s timeout=500ms fall=2 rise=2\")")
        }
        let words = text.split(whereSeparator: \.isWhitespace)
        guard let first = words.first else { throw fail("is empty") }
        var check: HealthCheck
        if first == "tcp" {
            check = HealthCheck(kind: .tcp)
        } else if first.hasPrefix("http:") {
            let path = first.dropFirst(5)
            guard path.hasPrefix("/"), path.utf8.count <= 1024, path.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f }) else {
                throw fail("\"\(first)\": the path must start with / and hold no spaces or control characters")
            }
            check = HealthCheck(kind: .http(path: String(path)))
        } else {
            throw fail("\"\(first)\" is not tcp or http:/path")
        }
        var timeout: Int?
        var seen = Set<Substring>()
        for word in words.dropFirst() {
            let pair = word.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard pair.count == 2, seen.insert(pair[0]).inserted else {
                throw fail(pair.count == 2 ? "\"\(pair[0])\" is given twice" : "\"\(word)\" is not name=value")
            }
            switch pair[0] {
            case "interval": check.interval = try duration(pair[1], fail)
            case "timeout": timeout = try duration(pair[1], fail)
            case "fall", "rise":
                guard let n = Int(pair[1]), (1...100).contains(n) else { throw fail("\(pair[0]) \"\(pair[1])\" is not a count from 1 to 100") }
                if pair[0] == "fall" { check.fall = n } else { check.rise = n }
            case "port":
                guard let port = Port(pair[1]) else { throw fail("port \"\(pair[1])\" is not a port (1-65535)") }
                check.port = port
            default:
                throw fail("\"\(pair[0])\" is not interval, timeout, fall, rise or port")
            }
        }
        check.timeout = timeout ?? min(check.interval, 2000)
        guard check.timeout <= check.interval else { throw fail("the timeout (\(check.timeout) ms) is longer than the interval (\(check.interval) ms)") }
        return check
    }

    private static func duration(_ text: Substring, _ fail: (String) -> AnnotationError) throws(AnnotationError) -> Int {
        let digits = text.prefix { $0.isASCII && $0.isNumber }
        let unit = text.dropFirst(digits.count)
        guard !digits.isEmpty, digits.count <= 7, let value = Int(digits) else { throw fail("\"\(text)\" is not a duration like 500ms, 2s or 1m") }
        let scale: Int
        switch unit {
        case "ms": scale = 1
        case "s": scale = 1000
        case "m": scale = 60_000
        default: throw fail("\"\(text)\" is not a duration like 500ms, 2s or 1m")
        }
        let milliseconds = value * scale
        guard (100...3_600_000).contains(milliseconds) else { throw fail("\"\(text)\" is not from 100ms to 1 hour") }
        return milliseconds
    }
}
