import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// The system refused a thread: the process is at its tasks limit (systemd's `TasksMax`, its cgroup's `pids.max`,
/// `RLIMIT_NPROC`) or out of memory for a stack.
public struct ThreadRefused: Error, CustomStringConvertible {
    /// The thread's name.
    public let name: String
    /// What `pthread_create` returned (EAGAIN at a tasks limit).
    public let code: Int32

    public init(name: String, code: Int32) {
        self.name = name
        self.code = code
    }

    public var description: String {
        "could not start thread \(name): \(String(cString: strerror(code)))"
            + (code == EAGAIN ? " (the process is at its tasks limit: systemd's TasksMax, or its cgroup's pids.max)" : "")
    }
}

/// Starts a named thread (`OwnThread.start`, or in tests one that is refused).
public typealias ThreadStarter = @Sendable (String, @escaping @Sendable () -> Void) throws(ThreadRefused) -> OwnThread

/// A thread of the process's own. Foundation's `Thread.start()` does not say when the system refuses a thread, and
/// whoever then waits for it waits forever: every thread epokd starts is started here, and each caller decides
/// what to do without it (do the work itself, try again later, or stop with the reason).
public final class OwnThread: Sendable {
    private let name: String
    private let body: @Sendable () -> Void
    private let ended = DispatchSemaphore(value: 0)

    private init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }

    /// Waits until the thread's body has returned (at once if it has).
    public func join() {
        ended.wait()
        ended.signal()
    }

    /// Names the calling thread (what `top -H` and /proc show), through its `comm` file: Swift's Glibc has no
    /// `pthread_setname_np`.
    private static func name(_ name: String) {
        let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let bytes = Array(name.utf8.prefix(15))
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }

    /// Runs `body` on a new detached thread named `name` (the kernel keeps its first 15 bytes).
    @discardableResult
    public static func start(_ name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadRefused) -> OwnThread {
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        let thread = OwnThread(name: name, body: body)
        let context = Unmanaged.passRetained(thread).toOpaque()
        var handle = pthread_t()
        let result = pthread_create(&handle, &attributes, { raw in
            let thread = Unmanaged<OwnThread>.fromOpaque(raw!).takeRetainedValue()
            OwnThread.name(thread.name)
            thread.body()
            thread.ended.signal()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<OwnThread>.fromOpaque(context).release()
            throw ThreadRefused(name: name, code: result)
        }
        return thread
    }
}
