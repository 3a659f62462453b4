import Control
import Dataplane
import FlyingFox
import Foundation
import Logging
import Metrics
import Prometheus

/// `/metrics` (Prometheus text), `/healthz` and `/readyz` on `--metrics-address`.
struct MetricsServer: Sendable {
    let registry: PrometheusCollectorRegistry
    let address: String
    let firewall: Skeleton
    let namespacePath: String?
    /// Why epokd is not ready, or nil when it is.
    let notReadyReason: @Sendable () -> String?
    let watchRestarts: @Sendable () -> Int

    /// Bootstraps swift-metrics with the Prometheus registry (once per process).
    static func bootstrap() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }

    /// Serves until the task is cancelled; a port already in use is logged, never fatal.
    func run(logger: Logger) async {
        let parts = address.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = UInt16(parts[1]) else {
            logger.error("--metrics-address \(address) is not HOST:PORT; no metrics are served")
            return
        }
        let server: HTTPServer
        do {
            server = HTTPServer(address: try .inet(ip4: String(parts[0]), port: port), logger: .disabled)
        } catch {
            logger.error("--metrics-address \(address): \(error); no metrics are served")
            return
        }
        let (registry, notReadyReason) = (registry, notReadyReason)
        await server.appendRoute("GET /healthz") { _ in HTTPResponse(statusCode: .ok, body: Data("ok\n".utf8)) }
        await server.appendRoute("GET /readyz") { _ in
            guard let reason = notReadyReason() else { return HTTPResponse(statusCode: .ok, body: Data("ready\n".utf8)) }
            return HTTPResponse(statusCode: .serviceUnavailable, body: Data((reason + "\n").utf8))
        }
        let render = self.render
        await server.appendRoute("GET /metrics") { _ in
            HTTPResponse(statusCode: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: Data((registry.emitToString() + render()).utf8))
        }
        logger.info("serving /metrics, /healthz and /readyz on http://\(address)")
        do {
            try await server.run()
        } catch {
            if !Task.isCancelled { logger.error("metrics server on \(address) stopped: \(error)") }
        }
    }

    /// The metrics read at scrape time: watch restarts and each mapping's kernel counters.
    @Sendable func render() -> String {
        var lines = ["# TYPE epokd_watch_restarts gauge", "epokd_watch_restarts \(watchRestarts())"]
        guard let counters = try? Nftables(namespacePath: namespacePath).counters(of: ForwardingRuleset.servicesSet, in: firewall.table) else {
            return lines.joined(separator: "\n") + "\n"
        }
        let sorted = counters.sorted { $0.key.key.description < $1.key.key.description }
        for (name, value) in [("packets", \ElementCounter.packets), ("bytes", \ElementCounter.bytes)] as [(String, KeyPath<ElementCounter, UInt64>)] {
            lines.append("# HELP epokd_mapping_\(name)_total Forwarded \(name) per mapping, from nftables counters.")
            lines.append("# TYPE epokd_mapping_\(name)_total counter")
            for (key, counter) in sorted {
                guard case .l4proto(let proto)? = key.key.first, case .port(let port)? = key.key.last else { continue }
                lines.append("epokd_mapping_\(name)_total{protocol=\"\(proto)\",port=\"\(port)\"} \(counter[keyPath: value])")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
