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
public typealias ThreadStarter = @Sendable (String, @escaping @Sendable () -> Void) throws(ThreadRefused) -> Void

/// Threads of the process's own. Foundation's `Thread.start()` does not say when the system refuses a thread, and
/// whoever then waits for it waits forever: every thread epokd starts is started here, and each caller decides
/// what to do without it (do the work itself, try again later, or stop with the reason).
public enum OwnThread {
    private final class Start {
        let name: String
        let body: () -> Void
        init(name: String, body: @escaping () -> Void) {
            self.name = name
            self.body = body
        }
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
    public static func start(_ name: String, _ body: @escaping @Sendable () -> Void) throws(ThreadRefused) {
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        let context = Unmanaged.passRetained(Start(name: name, body: body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, &attributes, { raw in
            let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
            OwnThread.name(start.name)
            start.body()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<Start>.fromOpaque(context).release()
            throw ThreadRefused(name: name, code: result)
        }
    }
}
