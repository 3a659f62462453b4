import Dataplane
import Foundation
import Logging

/// Reads the kernel's table back beside the reconcile loop, on a thread and a netlink socket of its own, and
/// compares it with what the loop last committed: the periodic drift check never holds up a change. A check is
/// made for the ruleset generation the loop saw when it asked; a commit in between (the loop's own, or anyone's)
/// makes it stale, to be asked again. Only drift found is repaired on the loop's thread, by a full read-back.
final class DriftChecker: @unchecked Sendable {
    /// What a check found.
    enum Finding: Equatable, Sendable {
        /// The kernel held exactly what the loop committed, at the generation asked about.
        case clean
        /// The table differs (elements, chains, or it is gone).
        case drifted
        /// Something was committed since the loop asked: the read says nothing.
        case stale
        /// The read failed (the loop repairs, and says why if the repair fails too).
        case failed(String)
    }

    private struct Request {
        var skeleton: Skeleton
        var applied: TableElements
        var generation: UInt32
        var done: @Sendable (Finding) -> Void
    }

    private let kernel: any NftablesKernel
    private let condition = NSCondition()
    private var request: Request?
    private var stopped = false
    private var started = false
    private let finished = DispatchSemaphore(value: 0)

    init(kernel: any NftablesKernel) {
        self.kernel = kernel
    }

    /// Checks, on the checker's thread, that the kernel holds `applied` (in `skeleton`'s table) at `generation`,
    /// and calls `done` there with what it found. One check at a time: the caller waits for `done` to ask again.
    func check(_ skeleton: Skeleton, applied: TableElements, generation: UInt32, done: @escaping @Sendable (Finding) -> Void) {
        condition.withLock {
            request = Request(skeleton: skeleton, applied: applied, generation: generation, done: done)
            if !started && !stopped {
                started = true
                let t = Thread { [self] in
                    work()
                    finished.signal()
                }
                t.name = "epokd-drift"
                t.start()
            }
            condition.signal()
        }
    }

    /// Stops the thread (after the check it is making, if any).
    func stop() {
        let running = condition.withLock {
            stopped = true
            condition.broadcast()
            return started
        }
        if running { finished.wait() }
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
            guard try kernel.generation() == request.generation else { return .stale }
            let table = try kernel.read(request.skeleton, comparedWith: request.applied)
            guard try kernel.generation() == request.generation else { return .stale }
            return Firewall.holds(table, request.applied, skeleton: request.skeleton) ? .clean : .drifted
        } catch {
            return .failed("\(error)")
        }
    }
}
