import Control
import Dataplane
import Foundation
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

/// `/metrics` (Prometheus text), `/healthz`, `/readyz`, the status page `/` and its data `/status.json` on
/// `--metrics-address`, over SwiftNIO's HTTP/1 server. Read only: no path changes anything.
///
/// Hardened for a port anyone on the host can reach: NIO's parser caps the request line and headers (80 KiB)
/// and parses in linear time; idle connections are closed after `idleTimeout`; at most `maxConnections` are open
/// at once (keep the unit's `LimitNOFILE` well above it); the listener backs off and carries on when the
/// process runs out of file descriptors. `/metrics` is served from a cache refreshed at most every
/// `refreshInterval` on a thread of its own, so scrapes never wait on a netlink dump and `/healthz` never waits
/// on scrapes.
final class MetricsServer: @unchecked Sendable {
    let address: String
    /// Why epokd is not ready, or nil when it is.
    let notReadyReason: @Sendable () -> String?
    var maxConnections = 256
    var idleTimeout: TimeAmount = .seconds(10)
    var refreshInterval: TimeInterval = 5
    /// `/status.json`'s body, rendered at most every half second; nil: no status page.
    var statusJSON: (@Sendable () -> String)?

    /// The event loop, on a thread of epokd's own that `start` makes (NIO's own threads stop the process when the
    /// system refuses one); a process that serves nothing (`--once`, `--metrics-address off`) starts none.
    private var loop: EventLoop?
    private var thread: OwnThread?
    private var channel: Channel?
    private let cache: RenderCache<MetricsBody>
    private var status: RenderCache<ByteBuffer>?

    /// `restarts`: the feed's restart metric (`epokd_watch_restarts`, or `epokd_source_errors` for a file) and its
    /// value; `firewall` and `namespacePath`: the table whose counters `/metrics` reads, and where.
    init(registry: PrometheusCollectorRegistry, address: String, firewall: Skeleton, namespacePath: String?,
         notReadyReason: @escaping @Sendable () -> String?, restarts: (name: String, value: @Sendable () -> Int)) {
        self.address = address
        self.notReadyReason = notReadyReason
        // The last rendering's count of mappings: the next one makes room for as many at once.
        let lastCount = NIOLockedValueBox(0)
        cache = RenderCache {
            let body = Self.render(registry: registry, restarts: restarts, table: firewall.table, namespacePath: namespacePath,
                                   expecting: lastCount.withLockedValue { $0 })
            lastCount.withLockedValue { $0 = body.mappings?.count ?? 0 }
            return body
        }
        // A large stale text is let go of as its refresh begins (the requests meanwhile wait for the fresh one, as
        // the first does), so that two are never held at once.
        cache.servesStale = { $0.byteCount <= 1 << 20 }
    }

    /// Bootstraps swift-metrics with the Prometheus registry (once per process).
    static func bootstrap() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        // What is running, as Prometheus exporters say it: a constant 1 with the version and commit as labels.
        Gauge(label: "epokd_build_info", dimensions: [("version", epokdVersion), ("commit", buildCommit)]).record(1)
        return registry
    }

    /// Starts listening; a bad address or a port in use is logged, never fatal.
    /// Renders `/metrics` afresh for the next request (the router's role changed).
    func invalidate() { cache.invalidate() }

    func start(logger: Logger) {
        let parts = address.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count >= 2, let port = Int(parts.last!) else {
            logger.error("--metrics-address \(address) is not HOST:PORT; no metrics are served")
            return
        }
        let host = parts.dropLast().joined(separator: ":").trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        cache.refreshInterval = refreshInterval
        let status: RenderCache<ByteBuffer>? = statusJSON.map { json in
            let status = RenderCache { ByteBuffer(string: json()) }
            status.refreshInterval = 0.5
            status.servesStale = { _ in false }
            return status
        }
        self.status = status
        let made = NIOLockedValueBox<EventLoop?>(nil)
        let handedOver = DispatchSemaphore(value: 0)
        do {
            thread = try OwnThread.start("epokd-metrics") {
                MultiThreadedEventLoopGroup.withCurrentThreadAsEventLoop { loop in
                    made.withLockedValue { $0 = loop }
                    handedOver.signal()
                }
            }
        } catch {
            logger.error("--metrics-address \(address): \(error); no metrics are served")
            return
        }
        handedOver.wait()
        guard let loop = made.withLockedValue({ $0 }) else { return }
        self.loop = loop
        let open = NIOLockedValueBox(0)
        let (limit, idle, cache, notReadyReason) = (maxConnections, idleTimeout, cache, notReadyReason)
        let bootstrap = ServerBootstrap(group: loop)
            .serverChannelOption(.backlog, value: 128)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let admitted = open.withLockedValue { count -> Bool in
                    guard count < limit else { return false }
                    count += 1
                    return true
                }
                guard admitted else { return channel.close() }
                channel.closeFuture.whenComplete { _ in open.withLockedValue { $0 -= 1 } }
                return channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.configureHTTPServerPipeline(withErrorHandling: true)
                    try pipeline.addHandlers([IdleStateHandler(allTimeout: idle), RouteHandler(cache: cache, status: status, notReadyReason: notReadyReason)])
                }
            }
            .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // A connection that stops reading holds at most this much of a streamed body (with the piece that
            // crossed it): 256 of them, about 8 MB.
            .childChannelOption(.writeBufferWaterMark, value: ChannelOptions.Types.WriteBufferWaterMark(low: 8 << 10, high: MetricsBody.pieceSize))
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
            logger.info("serving the status page, /metrics, /healthz and /readyz on http://\(address)/")
        } catch {
            logger.error("--metrics-address \(address): \(error); no metrics are served")
        }
    }

    /// Closes the listener and every connection. The requests still waiting for a rendering are failed, and a
    /// rendering under way ends, before the event loop does: nothing is scheduled on a loop that has shut down.
    func stop() {
        try? channel?.close().wait()
        cache.close()
        status?.close()
        guard let loop else { return }
        loop.shutdownGracefully(queue: .global()) { _ in }
        thread?.join()
    }

    /// `/metrics` as read now: the registry's metrics, then those read at render time (the feed's restarts, each
    /// mapping's kernel counters, the LoadBalancer firewall's and the egress rules'). The mappings' counters are
    /// kept as numbers, read from the dump as it arrives; their text is written as each response is sent.
    static func render(registry: PrometheusCollectorRegistry, restarts: (name: String, value: @Sendable () -> Int), table: Table,
                       namespacePath: String?, expecting count: Int) -> MetricsBody {
        var registryText: [UInt8] = []
        registry.emit(into: &registryText)
        var head = ByteBufferAllocator().buffer(capacity: registryText.count + 256)
        head.writeBytes(registryText)
        registryText = []
        head.writeString("# TYPE \(restarts.name) gauge\n\(restarts.name) \(restarts.value())\n")
        guard let nftables = try? Nftables(namespacePath: namespacePath) else { return MetricsBody(head: head, mappings: nil, tail: ByteBuffer()) }
        var mappings: [MetricsBody.Mapping]? = []
        mappings?.reserveCapacity(count)
        do {
            try nftables.forEachCounter(of: ForwardingRuleset.servicesSet, in: table) { key, counter in
                guard case .l4proto(let proto)? = key.key.first, case .port(let port)? = key.key.last else { return }
                mappings?.append(MetricsBody.Mapping(proto: proto, port: port, packets: counter.packets, bytes: counter.bytes))
            }
        } catch {
            mappings = nil
        }
        var tail = ByteBuffer()
        writeFirewall(nftables, table, into: &tail)
        writeEgress(nftables, table, into: &tail)
        return MetricsBody(head: head, mappings: consume mappings, tail: tail)
    }

    /// The LoadBalancer firewall's counters: flows admitted and packets denied (by allow-range) per LB IP . protocol . port,
    /// and what the policy rules counted per interface. Nothing when the firewall is off (its sets are empty).
    static func writeFirewall(_ nftables: Nftables, _ table: Table, into text: inout ByteBuffer) {
        typealias S = EdgeFirewall.Sets
        func read(_ sets: [NamedSet]) -> [(ElementKey, ElementCounter)] {
            sets.flatMap { (try? nftables.counterRows(of: $0, in: table)) ?? [] }.sorted { $0.0.key.lexicographicallyPrecedes($1.0.key) }
        }
        let admitted = read([S.admitted4, S.admitted6]), denied = read([S.restricted4, S.restricted6])
        for (name, help, rows, value) in [
            ("epokd_lb_admitted_flows_total", "Packets the LoadBalancer firewall admitted as new, per LB IP . protocol . port: a connection's packets until its first answer (one for TCP and request-reply UDP; every datagram of one-way UDP); answered connections pass as established, uncounted.", admitted, \ElementCounter.packets),
            ("epokd_lb_denied_packets_total", "Packets dropped because their source is outside the LoadBalancer's allow-range.", denied, \ElementCounter.packets),
        ] as [(String, String, [(ElementKey, ElementCounter)], KeyPath<ElementCounter, UInt64>)] where !rows.isEmpty {
            text.writeString("# HELP \(name) \(help)\n# TYPE \(name) counter\n")
            for (key, counter) in rows {
                guard key.key.count == 3, case .l4proto(let proto) = key.key[1], case .port(let port) = key.key[2] else { continue }
                text.writeString("\(name){address=\"\(key.key[0])\",protocol=\"\(proto)\",port=\"\(port)\"} \(counter[keyPath: value])\n")
            }
        }
        let policy = [("forward", S.denied), ("input", S.inputDenied)].flatMap { hook, set in read([set]).map { (hook, $0.0, $0.1) } }
        if !policy.isEmpty {
            text.writeString("# HELP epokd_firewall_unadmitted_packets_total Packets from a firewall interface that nothing admitted (dropped, or counted with --firewall-policy accept).\n")
            text.writeString("# TYPE epokd_firewall_unadmitted_packets_total counter\n")
            for (hook, key, counter) in policy {
                guard case .ifname(let name)? = key.key.first else { continue }
                text.writeString("epokd_firewall_unadmitted_packets_total{interface=\"\(name)\",hook=\"\(hook)\"} \(counter.packets)\n")
            }
        }
    }
}

extension MetricsServer {
    /// Flows SNATed per egress rule or bridge (its owner, from the elements' comments) and address.
    static func writeEgress(_ nftables: Nftables, _ table: Table, into text: inout ByteBuffer) {
        var flows: [String: UInt64] = [:]
        for set in EgressSNAT.Sets.all + [Bridge.Sets.exits4, Bridge.Sets.exits6] {
            for (element, counter) in (try? nftables.countedElements(of: set, in: table)) ?? [] {
                guard let address = element.value?.first else { continue }
                let rule = (element.comment ?? "-").replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                flows["rule=\"\(rule)\",egress=\"\(address)\"", default: 0] += counter.packets
            }
        }
        guard !flows.isEmpty else { return }
        text.writeString("# HELP epokd_egress_snat_flows_total Flows SNATed to a static source address (their first packets; NAT sees no other), per rule and address.\n")
        text.writeString("# TYPE epokd_egress_snat_flows_total counter\n")
        for (labels, count) in flows.sorted(by: { $0.key < $1.key }) { text.writeString("epokd_egress_snat_flows_total{\(labels)} \(count)\n") }
    }
}

/// The last rendering of `/metrics` (or of `/status.json`), refreshed in the background when older than
/// `refreshInterval`.
final class RenderCache<Body: Sendable>: @unchecked Sendable {
    var render: @Sendable () -> Body
    var refreshInterval: TimeInterval = 5
    /// Whether a stale body is served while it is refreshed, or let go of and the request waits for the fresh one
    /// (`/status.json`, which is quick to render and polled; a large `/metrics`).
    var servesStale: @Sendable (Body) -> Bool = { _ in true }
    private let condition = NSCondition()
    /// Every response reads this same body: never copied per request.
    private var body: Body?
    private var renderedAt = Date.distantPast
    private var refreshing = false
    private var waiting: [EventLoopPromise<Body>] = []
    private var closed = false

    init(render: @escaping @Sendable () -> Body) { self.render = render }

    /// The cached body; a stale one is refreshed in the background (served meanwhile if `servesStale` says so),
    /// an empty cache first.
    /// A refresh is rendered on a thread of its own, or (the process at its tasks limit) on the caller's.
    func current(on loop: EventLoop) -> EventLoopFuture<Body> {
        let (future, refresh) = condition.withLock { () -> (EventLoopFuture<Body>, Bool) in
            if closed { return (loop.makeFailedFuture(ChannelError.ioOnClosedChannel), false) }
            let stale = Date().timeIntervalSince(renderedAt) >= refreshInterval
            let refresh = stale && !refreshing
            if refresh {
                refreshing = true
                if let old = body, !servesStale(old) { body = nil }
            }
            if let body { return (loop.makeSucceededFuture(body), refresh) }
            let promise = loop.makePromise(of: Body.self)
            waiting.append(promise)
            return (promise.futureResult, refresh)
        }
        if refresh {
            do {
                try OwnThread.start("epokd-render") { self.refresh() }
            } catch {
                self.refresh()
            }
        }
        return future
    }

    /// Drops the cached body: the next request waits for a fresh one (after a change that must show at once).
    func invalidate() {
        condition.withLock {
            body = nil
            renderedAt = .distantPast
        }
    }

    /// Fails the requests waiting for a rendering, and waits for one under way to end; the cache serves no more.
    func close() {
        let promises = condition.withLock { () -> [EventLoopPromise<Body>] in
            closed = true
            defer { waiting = [] }
            return waiting
        }
        promises.forEach { $0.fail(ChannelError.ioOnClosedChannel) }
        condition.withLock {
            while refreshing { condition.wait() }
        }
    }

    private func refresh() {
        let fresh = render()
        let promises = condition.withLock { () -> [EventLoopPromise<Body>] in
            body = fresh
            renderedAt = Date()
            refreshing = false
            condition.broadcast()
            defer { waiting = [] }
            return waiting
        }
        promises.forEach { $0.succeed(fresh) }
    }
}

/// Answers the paths; anything else is 404, any method but GET or HEAD 405.
private final class RouteHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let cache: RenderCache<MetricsBody>
    let status: RenderCache<ByteBuffer>?
    let notReadyReason: @Sendable () -> String?
    private var request: HTTPRequestHead?

    init(cache: RenderCache<MetricsBody>, status: RenderCache<ByteBuffer>?, notReadyReason: @escaping @Sendable () -> String?) {
        self.cache = cache
        self.status = status
        self.notReadyReason = notReadyReason
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): request = head
        case .body: break
        case .end:
            guard let head = request else { return }
            request = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            guard head.method == .GET || head.method == .HEAD else {
                return respond(context, head, .methodNotAllowed, "only GET\n")
            }
            switch path {
            case "/healthz": respond(context, head, .ok, "ok\n")
            case "/readyz":
                if let reason = notReadyReason() { respond(context, head, .serviceUnavailable, reason + "\n") }
                else { respond(context, head, .ok, "ready\n") }
            case "/metrics":
                let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                cache.current(on: context.eventLoop).whenSuccess { body in
                    let (handler, context) = loopBound.value
                    handler.respond(context, head, .ok, length: body.byteCount, pieces: body.pieces(of: MetricsBody.pieceSize, allocator: context.channel.allocator),
                                    contentType: "text/plain; version=0.0.4")
                }
            case "/" where status != nil, "/index.html" where status != nil:
                respond(context, head, .ok, StatusPage.html, contentType: "text/html; charset=utf-8",
                        extra: [("Content-Security-Policy", StatusPage.contentSecurityPolicy)])
            case "/status.json":
                guard let status else { fallthrough }
                let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                status.current(on: context.eventLoop).whenSuccess { text in
                    let (handler, context) = loopBound.value
                    handler.respond(context, head, .ok, text, contentType: "application/json")
                }
            default: respond(context, head, .notFound, "not found: /, /status.json, /metrics, /healthz, /readyz\n")
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }

    private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: String,
                         contentType: String = "text/plain; charset=utf-8", extra: [(String, String)] = []) {
        respond(context, head, status, context.channel.allocator.buffer(string: body), contentType: contentType, extra: extra)
    }

    private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: ByteBuffer,
                         contentType: String = "text/plain; charset=utf-8", extra: [(String, String)] = []) {
        respond(context, head, status, length: body.readableBytes, pieces: CollectionOfOne(body).makeIterator(), contentType: contentType, extra: extra)
    }

    /// Sends a body of `length` bytes from `pieces`, each written while the channel is writable and the rest when
    /// it is again: one response holds a piece or two however slowly its client reads. (NIO's pipelining handler
    /// holds any next request on the connection until this response's end is written.)
    private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ status: HTTPResponseStatus, length: Int,
                         pieces: some IteratorProtocol<ByteBuffer>, contentType: String, extra: [(String, String)] = []) {
        var headers = HTTPHeaders([("Content-Type", contentType), ("Content-Length", String(length)),
                                   ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")] + extra)
        let keepAlive = head.isKeepAlive
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        sending = Outgoing(pieces: head.method == .HEAD ? nil : pieces, keepAlive: keepAlive)
        sendPieces(context)
    }

    /// The body being sent: what is left of it, and whether the connection stays open after it.
    private final class Outgoing {
        var pieces: (any IteratorProtocol<ByteBuffer>)?
        let keepAlive: Bool

        init(pieces: (any IteratorProtocol<ByteBuffer>)?, keepAlive: Bool) {
            self.pieces = pieces
            self.keepAlive = keepAlive
        }
    }

    private var sending: Outgoing?

    /// Writes pieces of the body being sent while the channel takes them, then the response's end. A write may
    /// call this again (the channel's writability changes as it flushes), so what is left is read afresh each time.
    private func sendPieces(_ context: ChannelHandlerContext) {
        while context.channel.isWritable, let outgoing = sending {
            guard let piece = outgoing.pieces?.next() else {
                sending = nil
                let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
                if !outgoing.keepAlive { done.whenComplete { [channel = context.channel] _ in channel.close(promise: nil) } }
                return
            }
            context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(piece))), promise: nil)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { sendPieces(context) }
        context.fireChannelWritabilityChanged()
    }
}
