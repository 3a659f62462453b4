import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// SIGTERM and SIGINT, taken by the main thread when it asks for them. They are blocked in the calling thread
/// and so in every thread it starts after, and no thread is needed to catch them: a process at its tasks limit
/// still stops when told to (a dispatch source waits for a thread of libdispatch's own, forever, at that limit).
struct StopSignals {
    private var set = sigset_t()

    /// Blocks them; call it before the threads that should not take them start.
    init() {
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// The next of them, waiting up to `seconds` for it (0: only one already sent); nil if none came.
    func next(waiting seconds: Double) -> Int32? {
        var pending = set
        var timeout = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
        while true {
            let number = sigtimedwait(&pending, nil, &timeout)
            if number > 0 { return number }
            guard errno == EINTR else { return nil }
        }
    }
}
