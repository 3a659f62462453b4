#if canImport(Glibc)
import Glibc
#endif

/// A failed netlink operation: what was attempted, the errno, and what the kernel said about it.
public struct NetlinkError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The errno the kernel or the socket returned.
    public var code: Int32
    /// What epokd was doing (`commit transaction`, `dump set services`).
    public var operation: String
    /// Which object or element was rejected, when the kernel said so.
    public var subject: String?
    /// The kernel's extended-ack text, if it sent one.
    public var kernelMessage: String?

    /// The elements the kernel refused, when it named them (the first of each refused message).
    public var rejected: [RejectedElement] = []
    /// The set the kernel would not delete, when that was what it refused (EBUSY: a rule still names it).
    public var undeletableSet: String?

    public init(code: Int32, operation: String, subject: String? = nil, kernelMessage: String? = nil) {
        self.code = code
        self.operation = operation
        self.subject = subject
        self.kernelMessage = kernelMessage
    }

    /// The symbolic name and text of the errno (`EPERM (Operation not permitted)`).
    public var errnoDescription: String {
        let names: [Int32: String] = [
            EPERM: "EPERM", ENOENT: "ENOENT", EEXIST: "EEXIST", EINVAL: "EINVAL", ENOBUFS: "ENOBUFS",
            EMSGSIZE: "EMSGSIZE", EBUSY: "EBUSY", ENOSPC: "ENOSPC", EOPNOTSUPP: "EOPNOTSUPP",
            ERANGE: "ERANGE", EACCES: "EACCES", EAFNOSUPPORT: "EAFNOSUPPORT", EPROTONOSUPPORT: "EPROTONOSUPPORT",
            ENOMEM: "ENOMEM", EIO: "EIO", EPROTO: "EPROTO", EINTR: "EINTR", EAGAIN: "EAGAIN", ENFILE: "ENFILE",
            EMFILE: "EMFILE", ESTALE: "ESTALE", EOVERFLOW: "EOVERFLOW", E2BIG: "E2BIG",
        ]
        let text = String(cString: strerror(code))
        return "\(names[code] ?? "errno \(code)") (\(text))"
    }

    public var description: String {
        var s = operation
        if let subject { s += ": \(subject)" }
        s += ": \(errnoDescription)"
        if let kernelMessage, !kernelMessage.isEmpty { s += ": kernel says \"\(kernelMessage)\"" }
        // An element nf_tables refuses with ENFILE is one beyond its set's declared size, which strerror's words
        // hide (ENFILE from anything else, a socket or a namespace, is the system's file table).
        if code == ENFILE && !rejected.isEmpty { s += ": the set is full (it holds at most the size it was made with)" }
        if (code == EPERM || code == EACCES) && subject?.contains("CAP_SYS_ADMIN") != true {
            s += ": epokd needs CAP_NET_ADMIN (run as root or grant the capability)"
        }
        return s
    }
}

/// An element the kernel refused, and the set it was meant for.
public struct RejectedElement: Hashable, Sendable {
    public var set: String
    public var element: Element

    public init(set: String, element: Element) {
        self.set = set
        self.element = element
    }
}
