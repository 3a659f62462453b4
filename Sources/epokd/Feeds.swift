import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Where cluster updates come from: the API server's watch, or a snapshot file.
protocol ClusterFeed: Sendable {
    func start(_ deliver: @escaping @Sendable (ClusterUpdate) -> Void) throws(ThreadRefused)
    func stop()
    /// Times the feed had to start over (a watch restarted, a file that could not be used).
    var restarts: Int { get }
    /// The metric that counts them.
    var restartsMetric: String { get }
}

/// The API server, through the Services and Nodes informers.
struct APIFeed: ClusterFeed {
    let watch: ClusterWatch
    func start(_ deliver: @escaping @Sendable (ClusterUpdate) -> Void) throws(ThreadRefused) { try watch.start(deliver) }
    func stop() { watch.shutdown() }
    var restarts: Int { watch.services.restarts + watch.nodes.restarts }
    var restartsMetric: String { "epokd_watch_restarts" }
}

/// A snapshot file, read again whenever its content changes (a rename into place, a ConfigMap mount's `..data`
/// swap, an in-place rewrite with the same mtime), once it has been stable for `settle` seconds. A file that
/// cannot be read or is not a complete snapshot leaves the kernel as it is.
final class FileFeed: ClusterFeed, @unchecked Sendable {
    let path: String
    let logger: Logger
    /// How long a changed file must stay unchanged before it is read as a snapshot.
    let settle: TimeInterval
    private let stopSignal = StopSignal()
    private let lock = NSLock()
    private var errors = 0
    private var thread: OwnThread?
    private var lastError: SnapshotFile.ReadError?

    /// The file's snapshot and digest as read already (by `--once`, for its stamp): used for the first read, so
    /// that what is applied is what was stamped.
    private var preloaded: (snapshot: ClusterSnapshot, digest: UInt64)?

    init(path: String, logger: Logger, settle: TimeInterval = 0.5, preloaded: (snapshot: ClusterSnapshot, digest: UInt64)? = nil) {
        self.path = path
        self.logger = logger
        self.settle = settle
        self.preloaded = preloaded
    }

    /// Times the file could not be used.
    var restarts: Int { lock.withLock { errors } }
    var restartsMetric: String { "epokd_source_errors" }
    /// Why the file could not be used, until a later version of it could.
    var failure: SnapshotFile.ReadError? { lock.withLock { lastError } }

    /// What identifies a version of the file without reading it.
    private struct Signature: Equatable {
        var resolved: String
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var modified: timespec
        static func == (a: Signature, b: Signature) -> Bool {
            a.resolved == b.resolved && a.device == b.device && a.inode == b.inode && a.size == b.size
                && a.modified.tv_sec == b.modified.tv_sec && a.modified.tv_nsec == b.modified.tv_nsec
        }
    }

    private func signature() -> Signature? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        let resolved = realpath(path, nil).map { p in defer { free(p) }; return String(cString: p) } ?? path
        return Signature(resolved: resolved, device: UInt64(info.st_dev), inode: UInt64(info.st_ino), size: Int64(info.st_size), modified: info.st_mtim)
    }

    func start(_ deliver: @escaping @Sendable (ClusterUpdate) -> Void) throws(ThreadRefused) {
        let started = try OwnThread.start("epokd-file") { [self] in
            var seen: Signature?
            var lastRead = Date.distantPast
            var applied: UInt64?
            var candidate: (hash: UInt64, since: Date)?
            // The failure last logged (a read error's reason, or the digest of a version that cannot be used): logged once.
            var reported: AnyHashable?
            var waiting = false
            repeat {
                let current = signature()
                // Re-read when anything about the file changed, and every 10 s regardless (same-size, same-mtime rewrites).
                guard current != seen || candidate != nil || Date().timeIntervalSince(lastRead) > 10 else { continue }
                seen = current
                lastRead = Date()
                // Every byte counts: a version is told from the last by its digest, read a piece at a time first.
                var first: ClusterSnapshot?
                let hash: UInt64
                do throws(SnapshotFile.ReadError) {
                    if let preloaded {
                        (first, hash) = preloaded
                        self.preloaded = nil
                    } else {
                        hash = try SnapshotFile.digest(path: path)
                    }
                    waiting = false
                } catch {
                    if error.isMissing {
                        if !waiting { logger.warning("\(error); waiting for it to appear") }
                        waiting = true
                    } else if reported != AnyHashable(error.reason) {
                        logger.error("\(error); the kernel keeps its previous state")
                    }
                    reported = error.reason
                    fail(error)
                    continue
                }
                guard hash != applied else {
                    candidate = nil
                    continue
                }
                // A changed file is used once it has not changed for `settle` seconds.
                let age = current.map { Date().timeIntervalSince1970 - (Double($0.modified.tv_sec) + Double($0.modified.tv_nsec) / 1e9) } ?? 0
                if age < settle {
                    if candidate?.hash != hash { candidate = (hash, Date()) }
                    guard Date().timeIntervalSince(candidate!.since) >= settle else { continue }
                }
                candidate = nil
                do {
                    let snapshot: ClusterSnapshot
                    if let first {
                        snapshot = first
                    } else {
                        let read = try SnapshotFile.loadWithDigest(path)
                        guard read.digest == hash else {
                            // Rewritten between the two reads: the next round reads the version now there.
                            seen = nil
                            continue
                        }
                        snapshot = read.snapshot
                    }
                    applied = hash
                    reported = nil
                    lock.withLock { lastError = nil }
                    deliver(.snapshot(snapshot))
                } catch let error as SnapshotFile.ReadError where error.isMissing {
                    // Removed between the two reads: the next round finds out what became of it.
                    seen = nil
                } catch {
                    let failure = error as? SnapshotFile.ReadError ?? SnapshotFile.ReadError(path: path, reason: "\(error)")
                    if reported != AnyHashable(hash) { logger.error("\(failure); the kernel keeps its previous state") }
                    reported = hash
                    applied = hash
                    fail(failure)
                }
            } while !stopSignal.wait(seconds: 0.2)
        }
        lock.withLock { thread = started }
    }

    private func fail(_ error: SnapshotFile.ReadError) {
        lock.withLock {
            errors += 1
            lastError = error
        }
    }

    func stop() {
        stopSignal.stop()
        lock.withLock { thread }?.join()
    }
}
