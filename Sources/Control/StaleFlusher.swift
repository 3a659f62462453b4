import Dataplane
import Foundation
import Logging

/// Deletes stale conntrack entries on a thread of its own while the reconcile loop runs, so that a change never
/// waits behind the kernel's walk of its whole connection table (each flush dumps it: about 11 ms with 262,144
/// buckets, even empty). What a batch made stale is flushed at once when the last flush was `interval` ago or
/// more, and otherwise with what comes until then: under churn, one walk for several batches. A remap's new flows
/// take the new mapping at once; only its old flows wait, at most `interval`.
final class StaleFlusher: @unchecked Sendable {
    private let remover: any StaleFlowRemover
    private let interval: TimeInterval
    private let logger: Logger
    private let condition = NSCondition()
    private var flows: [StaleFlows] = []
    private var egress: [StaleEgress] = []
    private var lastFlush = Date.distantPast
    private var stopped = false
    private var thread: OwnThread?
    /// Signalled by the worker as it ends.
    /// Held while the remover is in use (the worker, or a caller flushing on its own thread).
    private let removing = NSLock()

    init(remover: any StaleFlowRemover, interval: TimeInterval, logger: Logger) {
        self.remover = remover
        self.interval = interval
        self.logger = logger
    }

    /// Queues flows for the worker, which starts with the first (while the reconcile loop runs).
    /// Without a worker (the process at its tasks limit) they are flushed now, on the caller's thread.
    func add(_ flows: [StaleFlows], _ egress: [StaleEgress]) {
        let refused: ThreadRefused? = condition.withLock {
            self.flows += flows
            self.egress += egress
            if thread == nil && !stopped {
                do throws(ThreadRefused) {
                    thread = try OwnThread.start("epokd-conntrack") { [self] in work() }
                } catch {
                    return error
                }
            }
            condition.signal()
            return nil
        }
        if let refused {
            logger.warning("stale flows are flushed by the reconcile loop itself: \(refused)")
            flushNow()
        }
    }

    /// Flushes what is queued, with `flows` and `egress`, now and on the caller's thread (no worker is started).
    func flushNow(_ flows: [StaleFlows] = [], _ egress: [StaleEgress] = []) {
        let (queued, queuedEgress) = take()
        flush(queued + flows, queuedEgress + egress)
    }

    /// Stops the worker, then flushes what is still queued.
    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
            defer { thread = nil }
            return thread
        }?.join()
        flushNow()
    }

    private func take() -> ([StaleFlows], [StaleEgress]) {
        condition.withLock {
            defer { flows = []; egress = [] }
            return (flows, egress)
        }
    }

    private func work() {
        while true {
            let go: Bool = condition.withLock {
                while !stopped && (self.flows.isEmpty && self.egress.isEmpty || Date() < lastFlush.addingTimeInterval(interval)) {
                    if self.flows.isEmpty && self.egress.isEmpty { condition.wait() } else { _ = condition.wait(until: lastFlush.addingTimeInterval(interval)) }
                }
                return !stopped
            }
            guard go else { return }
            let (flows, egress) = take()
            flush(flows, egress)
        }
    }

    private func flush(_ flows: [StaleFlows], _ egress: [StaleEgress]) {
        guard !flows.isEmpty || !egress.isEmpty else { return }
        removing.lock()
        defer { removing.unlock() }
        condition.withLock { lastFlush = Date() }
        do {
            let deleted = try remover.delete(flows) + remover.delete(egress: egress)
            if deleted > 0 { logger.info("flushed \(deleted) stale conntrack entries") }
        } catch {
            logger.warning("could not flush stale conntrack entries, will retry: \(error)")
            // Back in the queue, ahead of what came meanwhile, for the next flush.
            condition.withLock {
                self.flows = flows + self.flows
                self.egress = egress + self.egress
            }
        }
    }
}
