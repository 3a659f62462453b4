import Dataplane
import Foundation
import Logging

/// Reads the kernel's table back beside the reconcile loop, on a thread and a netlink socket of its own, and
/// compares it with what the loop had committed when it asked: the periodic drift check never holds up a change.
/// The loop allows for its own commits made before the read (`ReconcileLoop.judge`); another program's makes the
/// check stale, to be asked again. Only drift found is repaired on the loop's thread, by a full read-back.
final class DriftChecker: @unchecked Sendable {
    /// What a check found.
    enum Finding: Sendable {
        /// The table (nil if there is none) compared with what the loop had committed, as it was at `generation`.
        case read(KernelTable?, generation: UInt32)
        /// The ruleset kept moving while it was read.
        case unsettled
        /// The read failed (the loop repairs, and says why if the repair fails too).
        case failed(String)
    }

    private struct Request {
        var skeleton: Skeleton
        var applied: TableElements
        var done: @Sendable (Finding) -> Void
    }

    private let kernel: any NftablesKernel
    private let condition = NSCondition()
    private var request: Request?
    private var stopped = false
    private var thread: OwnThread?

    init(kernel: any NftablesKernel) {
        self.kernel = kernel
    }

    /// Reads `skeleton`'s table on the checker's thread, compared with `applied`, and calls `done` there with it and
    /// the generation it was read at. One check at a time: the caller waits for `done` to ask again. Throws when the
    /// thread could not be started (`done` is then never called; the next check tries again).
    func check(_ skeleton: Skeleton, applied: TableElements, done: @escaping @Sendable (Finding) -> Void) throws(ThreadRefused) {
        condition.lock()
        defer { condition.unlock() }
        if thread == nil && !stopped {
            thread = try OwnThread.start("epokd-drift") { [self] in
                Self.lowerOwnPriority()
                work()
            }
        }
        request = Request(skeleton: skeleton, applied: applied, done: done)
        condition.signal()
    }

    /// Below the loop (nice 10): on a busy router a check waits for the CPU, a change does not. The thread's id
    /// is read from /proc (Swift's Glibc has no gettid).
    private static func lowerOwnPriority() {
        var link = [CChar](repeating: 0, count: 64)
        let length = readlink("/proc/thread-self", &link, link.count - 1)
        guard length > 0, let tid = String(decoding: link[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            .split(separator: "/").last.flatMap({ id_t($0) }) else { return }
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, 10)
    }

    /// Stops the thread (after the check it is making, if any).
    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
            return thread
        }?.join()
    }

    private func work() {
        while true {
            let next: Request? = condition.withLock {
                while request == nil && !stopped { condition.wait() }
                defer { request = nil }
                return stopped ? nil : request
            }
            guard let next else { return }
            next.done(find(next))
        }
    }

    private func find(_ request: Request) -> Finding {
        do {
            // Three dumps at most: two must agree at one generation. A table that keeps changing meanwhile is left
            // for a quieter moment, not dumped again and again.
            let before = try kernel.generation()
            let table = try kernel.read(request.skeleton, comparedWith: request.applied, attempts: 3)
            guard try kernel.generation() == before else { return .unsettled }
            return .read(table, generation: before)
        } catch where error.code == EAGAIN {
            return .unsettled
        } catch {
            return .failed("\(error)")
        }
    }
}
