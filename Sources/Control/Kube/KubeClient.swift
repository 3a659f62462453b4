import CCurl
import Foundation

/// A failed API call, said so that the operator knows what to do about it.
public struct KubeAPIError: Error, CustomStringConvertible, Sendable {
    /// The HTTP status, when the server answered.
    public var status: Int?
    /// The libcurl error code, when it did not.
    public var transportCode: Int32?
    public var message: String

    /// `410 Gone`: the resourceVersion or continue token is too old; list again.
    public var isGone: Bool { status == 410 }
    public var description: String { message }
}

/// A `metav1.Status` as the API server sends with errors.
struct StatusObject: Decodable {
    var kind: String?
    var message: String?
    var reason: String?
    var code: Int?
}

/// HTTP to the API server over libcurl: TLS with the cluster's CA, bearer tokens or client certificates.
public final class KubeClient: @unchecked Sendable {
    public let connection: ClusterConnection

    /// Why libcurl could not be loaded; nil once it is ready. It is loaded when the first client is made.
    private static let unavailable: String? = ccurl_load().map { String(cString: $0) }

    public init(connection: ClusterConnection) {
        _ = Self.unavailable
        self.connection = connection
    }

    /// One request; the body of a 2xx answer, or an error naming what went wrong.
    public func request(_ method: String, _ path: String, body: Data? = nil,
                        contentType: String = "application/json") throws(KubeAPIError) -> Data {
        let transfer = Transfer()
        try perform(method, path, body: body, contentType: contentType, transfer: transfer, stream: false)
        return Data(transfer.body)
    }

    /// A streaming GET (a watch): `onBytes` receives the body as it arrives and returns false to stop.
    /// Returns when the server ends the stream; throws on errors and when `isCancelled` turns true.
    public func stream(_ path: String, isCancelled: @escaping @Sendable () -> Bool,
                       onBytes: @escaping (UnsafeRawBufferPointer) -> Bool) throws(KubeAPIError) {
        let transfer = Transfer()
        transfer.onBytes = onBytes
        transfer.isCancelled = isCancelled
        try perform("GET", path, body: nil, contentType: "application/json", transfer: transfer, stream: true)
    }

    private final class Transfer {
        var handle: UnsafeMutableRawPointer?
        var status = 0
        var body: [UInt8] = []
        var onBytes: ((UnsafeRawBufferPointer) -> Bool)?
        var isCancelled: (() -> Bool)?
        var stoppedByReceiver = false
    }

    private func perform(_ method: String, _ path: String, body: Data?, contentType: String, transfer: Transfer, stream: Bool) throws(KubeAPIError) {
        if let reason = Self.unavailable { throw KubeAPIError(message: "libcurl could not be loaded (\(reason)): install libcurl4") }
        guard let curl = ccurl_easy_init() else { throw KubeAPIError(message: "libcurl could not start a transfer") }
        defer { ccurl_easy_cleanup(curl) }
        transfer.handle = curl
        let url = connection.server + path
        var headers: UnsafeMutablePointer<curl_slist>?
        defer { ccurl_slist_free_all(headers) }
        headers = ccurl_slist_append(headers, "Accept: application/json")
        headers = ccurl_slist_append(headers, "User-Agent: epokd")
        if let token = connection.currentToken(), !token.isEmpty { headers = ccurl_slist_append(headers, "Authorization: Bearer \(token)") }
        if body != nil { headers = ccurl_slist_append(headers, "Content-Type: \(contentType)") }
        var errorBuffer = [CChar](repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)

        // An option libcurl refuses fails the request (closed): a CA pin or a client certificate that did not take
        // must never fall back to the system trust store or to no certificate.
        var refused: (option: String, code: CURLcode)?
        func set(_ option: String, _ result: CURLcode) {
            if result != CURLE_OK, refused == nil { refused = (option, result) }
        }
        let code: CURLcode = errorBuffer.withUnsafeMutableBufferPointer { errorPointer in
            set("URL", ccurl_set_string(curl, CURLOPT_URL, url))
            set("HTTPHEADER", ccurl_set_pointer(curl, CURLOPT_HTTPHEADER, headers))
            ccurl_set_pointer(curl, CURLOPT_ERRORBUFFER, errorPointer.baseAddress)
            ccurl_set_long(curl, CURLOPT_NOSIGNAL, 1)
            ccurl_set_long(curl, CURLOPT_CONNECTTIMEOUT, 10)
            if stream {
                ccurl_set_long(curl, CURLOPT_TCP_KEEPALIVE, 1)
                // A watch that carries nothing, not even a bookmark, for three minutes is dead.
                ccurl_set_long(curl, CURLOPT_LOW_SPEED_LIMIT, 1)
                ccurl_set_long(curl, CURLOPT_LOW_SPEED_TIME, 180)
            } else {
                ccurl_set_long(curl, CURLOPT_TIMEOUT, 30)
            }
            if method != "GET" { set("CUSTOMREQUEST", ccurl_set_string(curl, CURLOPT_CUSTOMREQUEST, method)) }
            if let body {
                set("POSTFIELDSIZE", ccurl_set_long(curl, CURLOPT_POSTFIELDSIZE, body.count))
                body.withUnsafeBytes { set("COPYPOSTFIELDS", ccurl_set_pointer(curl, CURLOPT_COPYPOSTFIELDS, UnsafeMutableRawPointer(mutating: $0.baseAddress))) }
            }
            if connection.insecureSkipTLSVerify {
                set("SSL_VERIFYPEER", ccurl_set_long(curl, CURLOPT_SSL_VERIFYPEER, 0))
                set("SSL_VERIFYHOST", ccurl_set_long(curl, CURLOPT_SSL_VERIFYHOST, 0))
            } else if let ca = connection.caPEM {
                ca.withUnsafeBytes { set("CAINFO_BLOB (the kubeconfig's certificate-authority)", ccurl_set_blob(curl, CURLOPT_CAINFO_BLOB, $0.baseAddress, $0.count)) }
            }
            if let cert = connection.clientCertificatePEM, let key = connection.clientKeyPEM {
                cert.withUnsafeBytes { set("SSLCERT_BLOB (the client certificate)", ccurl_set_blob(curl, CURLOPT_SSLCERT_BLOB, $0.baseAddress, $0.count)) }
                key.withUnsafeBytes { set("SSLKEY_BLOB (the client key)", ccurl_set_blob(curl, CURLOPT_SSLKEY_BLOB, $0.baseAddress, $0.count)) }
                set("SSLCERTTYPE", ccurl_set_string(curl, CURLOPT_SSLCERTTYPE, "PEM"))
                set("SSLKEYTYPE", ccurl_set_string(curl, CURLOPT_SSLKEYTYPE, "PEM"))
            }
            if refused != nil { return CURLE_OK }
            let context = Unmanaged.passUnretained(transfer).toOpaque()
            ccurl_set_pointer(curl, CURLOPT_WRITEDATA, context)
            ccurl_set_write_callback(curl) { data, size, count, context in
                let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
                let n = size * count
                if transfer.status == 0 { transfer.status = ccurl_response_code(transfer.handle) }
                let bytes = UnsafeRawBufferPointer(start: data, count: n)
                if transfer.status / 100 == 2, let onBytes = transfer.onBytes {
                    guard onBytes(bytes) else {
                        transfer.stoppedByReceiver = true
                        return 0
                    }
                } else if transfer.body.count < 1 << 26 {
                    transfer.body.append(contentsOf: bytes)
                }
                return n
            }
            if transfer.isCancelled != nil {
                ccurl_set_long(curl, CURLOPT_NOPROGRESS, 0)
                ccurl_set_pointer(curl, CURLOPT_XFERINFODATA, context)
                ccurl_set_progress_callback(curl) { context, _, _, _, _ in
                    let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
                    return transfer.isCancelled?() == true ? 1 : 0
                }
            }
            return ccurl_easy_perform(curl)
        }
        if let refused {
            throw KubeAPIError(message: "libcurl refused option \(refused.option) (\(String(cString: ccurl_easy_strerror(refused.code)))); nothing was sent to \(url)")
        }
        if transfer.status == 0 { transfer.status = ccurl_response_code(curl) }
        if transfer.stoppedByReceiver { return }
        guard code == CURLE_OK else {
            if code == CURLE_ABORTED_BY_CALLBACK { throw KubeAPIError(transportCode: Int32(code.rawValue), message: "cancelled") }
            let detail = String(decoding: errorBuffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw KubeAPIError(transportCode: Int32(code.rawValue), message: transportMessage(code, detail: detail, url: url))
        }
        guard transfer.status / 100 == 2 else {
            throw httpError(transfer.status, body: transfer.body, method: method, url: url)
        }
    }

    private func transportMessage(_ code: CURLcode, detail: String, url: String) -> String {
        let text = detail.isEmpty ? String(cString: ccurl_easy_strerror(code)) : detail
        switch code {
        case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST:
            return "cannot connect to \(connection.server): \(text) (is the API server up and reachable from this host?)"
        case CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CACERT_BADFILE:
            return "x509: certificate signed by unknown authority or not valid for \(connection.server): \(text) (check certificate-authority in \(connection.origin))"
        case CURLE_SSL_CONNECT_ERROR, CURLE_SSL_CERTPROBLEM:
            return "TLS with \(connection.server) failed: \(text) (check the client certificate and key in \(connection.origin))"
        case CURLE_OPERATION_TIMEDOUT:
            return "timed out talking to \(connection.server): \(text)"
        default:
            return "\(url): \(text)"
        }
    }

    private func httpError(_ status: Int, body: [UInt8], method: String, url: String) -> KubeAPIError {
        let statusObject = try? JSONDecoder().decode(StatusObject.self, from: Data(body))
        let said = statusObject?.message ?? String(decoding: body.prefix(300), as: UTF8.self)
        let message: String
        switch status {
        case 401:
            message = "401 Unauthorized from \(connection.server): credentials rejected (check the token, tokenFile or client certificate of \(connection.origin))"
        case 403:
            message = "403: \(said): grant epokd list/watch on services, nodes and endpointslices and create on events (apply deploy/rbac.yaml)"
        case 410:
            message = "410 Gone from \(url): \(said)"
        default:
            message = "\(status) from \(method) \(url): \(said)"
        }
        return KubeAPIError(status: status, message: message)
    }
}
