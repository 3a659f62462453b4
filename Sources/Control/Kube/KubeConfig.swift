import Foundation
import Yams

/// How to reach and authenticate to the API server, resolved the way kubectl resolves it.
public struct ClusterConnection: Sendable {
    /// `https://host:port`, without a trailing slash.
    public var server: String
    public var caPEM: Data?
    public var insecureSkipTLSVerify = false
    public var clientCertificatePEM: Data?
    public var clientKeyPEM: Data?
    public var token: String?
    /// Read again before every request, so a rotated token is picked up.
    public var tokenFile: String?
    /// Where this came from, for error messages (`kubeconfig /etc/epokd/kubeconfig, user epokd`).
    public var origin: String
    /// The namespace of the context (or of the service account), for events about cluster-scoped objects.
    public var namespace: String
    /// What the operator should hear about at start-up (an unverified server, for one).
    public var warnings: [String] = []

    public init(server: String, origin: String, namespace: String = "default") {
        self.server = server.hasSuffix("/") ? String(server.dropLast()) : server
        self.origin = origin
        self.namespace = namespace
    }

    /// The bearer token to send now, if any.
    func currentToken() -> String? {
        if let tokenFile, let text = try? String(contentsOfFile: tokenFile, encoding: .utf8) {
            return text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return token
    }
}

/// A problem with the configuration, said so that the operator knows what to change.
public struct KubeConfigError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Resolves the API connection: `--kubeconfig`, then `$KUBECONFIG`, then in-cluster, then `~/.kube/config`.
public enum KubeConfigResolver {
    /// Where a pod's service-account token, CA and namespace are mounted.
    public static let serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount"

    public static func resolve(explicitPath: String?, environment: [String: String] = ProcessInfo.processInfo.environment,
                               serviceAccountDirectory: String = serviceAccount) throws(KubeConfigError) -> ClusterConnection {
        if let explicitPath { return try load(explicitPath) }
        if let list = environment["KUBECONFIG"], !list.isEmpty {
            let paths = list.split(separator: ":").map(String.init)
            guard let path = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
                throw KubeConfigError(message: "KUBECONFIG names \(list), but none of those files exists")
            }
            return try load(path)
        }
        if let host = environment["KUBERNETES_SERVICE_HOST"], let port = environment["KUBERNETES_SERVICE_PORT"],
           FileManager.default.fileExists(atPath: serviceAccountDirectory + "/token") {
            let bracketed = host.contains(":") ? "[\(host)]" : host
            let namespace = (try? String(contentsOfFile: serviceAccountDirectory + "/namespace", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) ?? "default"
            var c = ClusterConnection(server: "https://\(bracketed):\(port)", origin: "in-cluster service account", namespace: namespace)
            c.tokenFile = serviceAccountDirectory + "/token"
            c.caPEM = FileManager.default.contents(atPath: serviceAccountDirectory + "/ca.crt")
            return c
        }
        let home = environment["HOME"] ?? NSHomeDirectory()
        let fallback = home + "/.kube/config"
        guard FileManager.default.fileExists(atPath: fallback) else {
            throw KubeConfigError(message: "no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, run in a pod with a service account, or create \(fallback)")
        }
        return try load(fallback)
    }

    private struct File: Decodable {
        struct NamedCluster: Decodable { var name: String; var cluster: Cluster }
        struct Cluster: Decodable {
            var server: String
            var certificateAuthority: String?
            var certificateAuthorityData: String?
            var insecureSkipTLSVerify: Bool?
            enum CodingKeys: String, CodingKey {
                case server, certificateAuthority = "certificate-authority", certificateAuthorityData = "certificate-authority-data"
                case insecureSkipTLSVerify = "insecure-skip-tls-verify"
            }
        }
        struct NamedUser: Decodable { var name: String; var user: User }
        struct User: Decodable {
            var clientCertificate: String?
            var clientCertificateData: String?
            var clientKey: String?
            var clientKeyData: String?
            var token: String?
            var tokenFile: String?
            var exec: Exec?
            var authProvider: Exec?
            struct Exec: Decodable { var command: String?; var name: String? }
            enum CodingKeys: String, CodingKey {
                case clientCertificate = "client-certificate", clientCertificateData = "client-certificate-data"
                case clientKey = "client-key", clientKeyData = "client-key-data", token, tokenFile, exec
                case authProvider = "auth-provider"
            }
        }
        struct NamedContext: Decodable { var name: String; var context: Context }
        struct Context: Decodable { var cluster: String; var user: String; var namespace: String? }

        var clusters: [NamedCluster]?
        var users: [NamedUser]?
        var contexts: [NamedContext]?
        var currentContext: String?
        enum CodingKeys: String, CodingKey { case clusters, users, contexts, currentContext = "current-context" }
    }

    /// Loads one kubeconfig file (YAML or JSON); relative paths inside it are relative to its folder.
    public static func load(_ path: String) throws(KubeConfigError) -> ClusterConnection {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw KubeConfigError(message: "kubeconfig \(path) cannot be read")
        }
        let file: File
        do {
            file = try YAMLDecoder().decode(File.self, from: text)
        } catch {
            throw KubeConfigError(message: "kubeconfig \(path) is not a valid kubeconfig: \(error)")
        }
        let directory = (path as NSString).deletingLastPathComponent
        func resolvePath(_ p: String) -> String { p.hasPrefix("/") ? p : directory + "/" + p }
        func readFile(_ p: String, _ what: String) throws(KubeConfigError) -> Data {
            guard let data = FileManager.default.contents(atPath: resolvePath(p)) else {
                throw KubeConfigError(message: "kubeconfig \(path): \(what) \(resolvePath(p)) cannot be read")
            }
            return data
        }
        func decode(_ b64: String, _ what: String) throws(KubeConfigError) -> Data {
            guard let data = Data(base64Encoded: b64, options: .ignoreUnknownCharacters) else {
                throw KubeConfigError(message: "kubeconfig \(path): \(what) is not base64")
            }
            return data
        }
        guard let contextName = file.currentContext, !contextName.isEmpty else {
            throw KubeConfigError(message: "kubeconfig \(path) has no current-context")
        }
        guard let context = file.contexts?.first(where: { $0.name == contextName })?.context else {
            throw KubeConfigError(message: "kubeconfig \(path): current-context \(contextName) is not among its contexts")
        }
        guard let cluster = file.clusters?.first(where: { $0.name == context.cluster })?.cluster else {
            throw KubeConfigError(message: "kubeconfig \(path): context \(contextName) names cluster \(context.cluster), which it does not define")
        }
        guard let user = file.users?.first(where: { $0.name == context.user })?.user else {
            throw KubeConfigError(message: "kubeconfig \(path): context \(contextName) names user \(context.user), which it does not define")
        }
        if user.exec != nil || user.authProvider != nil {
            throw KubeConfigError(message: "kubeconfig \(path): user \(context.user) authenticates with an exec or auth-provider plugin, which epokd does not run; give it a token, tokenFile or client certificate (for example a service account token)")
        }
        var c = ClusterConnection(server: cluster.server, origin: "kubeconfig \(path), context \(contextName), user \(context.user)",
                                  namespace: context.namespace ?? "default")
        if let data = cluster.certificateAuthorityData { c.caPEM = try decode(data, "certificate-authority-data") }
        else if let file = cluster.certificateAuthority { c.caPEM = try readFile(file, "certificate-authority") }
        c.insecureSkipTLSVerify = cluster.insecureSkipTLSVerify ?? false
        if c.insecureSkipTLSVerify {
            c.warnings.append("INSECURE: cluster \(context.cluster) in \(path) sets insecure-skip-tls-verify: the API server's certificate is NOT checked, so anyone on the path can feed epokd a cluster state and steer this host's firewall")
        }
        if let data = user.clientCertificateData { c.clientCertificatePEM = try decode(data, "client-certificate-data") }
        else if let file = user.clientCertificate { c.clientCertificatePEM = try readFile(file, "client-certificate") }
        if let data = user.clientKeyData { c.clientKeyPEM = try decode(data, "client-key-data") }
        else if let file = user.clientKey { c.clientKeyPEM = try readFile(file, "client-key") }
        if (c.clientCertificatePEM == nil) != (c.clientKeyPEM == nil) {
            throw KubeConfigError(message: "kubeconfig \(path): user \(context.user) has a client certificate without its key, or a key without its certificate")
        }
        c.token = user.token
        c.tokenFile = user.tokenFile.map(resolvePath)
        return c
    }
}
