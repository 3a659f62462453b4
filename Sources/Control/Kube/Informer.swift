import Foundation
import Logging

/// An API object an informer can keep: it has metadata, and a path to list and watch.
public protocol KubeObject: Codable, Sendable {
    var metadata: ObjectMeta { get }
    /// The collection path across all namespaces (`/api/v1/services`).
    static var collectionPath: String { get }
}

extension Service: KubeObject {
    public static let collectionPath = "/api/v1/services"
}

extension Node: KubeObject {
    public static let collectionPath = "/api/v1/nodes"
}

extension KubeObject {
    /// `namespace/name` for namespaced objects, `name` otherwise.
    var cacheKey: String { metadata.namespace.map { "\($0)/\(metadata.name)" } ?? metadata.name }
}

/// What an informer tells its consumer.
public enum InformerEvent<Object: KubeObject>: Sendable {
    /// A complete list: the whole truth, replacing everything said before.
    case listed([Object])
    case upserted(Object)
    case deleted(Object)
}

/// A flag a thread can check to know it should stop.
public final class StopSignal: @unchecked Sendable {
    private let condition = NSCondition()
    private var stopped = false

    public init() {}

    public var isStopped: Bool { condition.withLock { stopped } }

    public func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    /// Waits up to `seconds`; returns true if stopped meanwhile.
    public func wait(seconds: Double) -> Bool {
        condition.withLock {
            let deadline = Date().addingTimeInterval(seconds)
            while !stopped && condition.wait(until: deadline) {}
            return stopped
        }
    }
}

/// Jittered exponential backoff: 0.5 s doubling to a cap, each delay drawn from [d/2, d].
struct Backoff {
    var initial = 0.5
    var cap = 30.0
    private var current = 0.0

    mutating func next() -> Double {
        current = current == 0 ? initial : min(cap, current * 2)
        return Double.random(in: current / 2...current)
    }

    mutating func reset() { current = 0 }
}

/// List-then-watch of one resource, with pagination, bookmarks, relist on 410 Gone, re-watch from the last
/// resourceVersion after a dropped connection, and backoff while the API server is unreachable.
/// Only complete lists are handed on: an error is never mistaken for an empty cluster.
public final class Informer<Object: KubeObject>: @unchecked Sendable {
    private let client: KubeClient
    private let logger: Logger
    private let pageSize: Int
    private let lock = NSLock()
    private var objects: [String: Object] = [:]
    private var resourceVersion: String?
    private var synced = false
    private var watchRestarts = 0

    public init(client: KubeClient, logger: Logger, pageSize: Int = 500) {
        self.client = client
        self.logger = logger
        self.pageSize = pageSize
    }

    /// Whether a complete list has arrived.
    public var hasSynced: Bool { lock.withLock { synced } }
    /// The objects as last known (complete once `hasSynced`).
    public var cache: [Object] { lock.withLock { Array(objects.values) } }
    /// The resourceVersion the next watch starts from (advanced by events and bookmarks).
    public var currentResourceVersion: String? { lock.withLock { resourceVersion } }
    /// How many times a watch had to be started again (after drops, errors or 410).
    public var restarts: Int { lock.withLock { watchRestarts } }

    /// Runs until `stop`: lists, then watches, handing every change to `deliver` on this thread.
    public func run(until stop: StopSignal, deliver: @escaping (InformerEvent<Object>) -> Void) {
        var backoff = Backoff()
        var needList = true
        while !stop.isStopped {
            do {
                if needList {
                    let (items, version) = try list(stop: stop)
                    lock.withLock {
                        objects = Dictionary(items.map { ($0.cacheKey, $0) }, uniquingKeysWith: { $1 })
                        resourceVersion = version
                        synced = true
                    }
                    deliver(.listed(items))
                    needList = false
                }
                try watch(stop: stop, deliver: deliver)
                backoff.reset()
            } catch {
                if stop.isStopped { return }
                lock.withLock { watchRestarts += 1 }
                if error.isGone {
                    logger.info("\(Object.collectionPath): resourceVersion expired (410 Gone), listing again")
                    needList = true
                    continue
                }
                let delay = backoff.next()
                logger.warning("\(Object.collectionPath): \(error); retrying in \(String(format: "%.1f", delay)) s, keeping what the kernel has")
                if stop.wait(seconds: delay) { return }
            }
        }
    }

    private struct Page: Decodable {
        struct Meta: Decodable { var resourceVersion: String?; var `continue`: String? }
        var metadata: Meta
        var items: [Object]?
    }

    private func list(stop: StopSignal) throws(KubeAPIError) -> ([Object], String) {
        var items: [Object] = []
        var token: String?
        var version = ""
        repeat {
            var query = "?limit=\(pageSize)"
            if let token { query += "&continue=" + (token.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? token) }
            let data = try client.request("GET", Object.collectionPath + query)
            let page: Page
            do {
                page = try JSONDecoder().decode(Page.self, from: data)
            } catch {
                throw KubeAPIError(message: "\(Object.collectionPath): the list answer is not a list: \(error)")
            }
            items += page.items ?? []
            token = page.metadata.continue.flatMap { $0.isEmpty ? nil : $0 }
            version = page.metadata.resourceVersion ?? version
        } while token != nil && !stop.isStopped
        return (items, version)
    }

    private func watch(stop: StopSignal, deliver: @escaping (InformerEvent<Object>) -> Void) throws(KubeAPIError) {
        let since = lock.withLock { resourceVersion } ?? ""
        let timeout = Int.random(in: 300...600)
        let path = Object.collectionPath + "?watch=1&allowWatchBookmarks=true&timeoutSeconds=\(timeout)&resourceVersion=\(since)"
        var splitter = JSONStreamSplitter()
        var failure: KubeAPIError?
        try client.stream(path, isCancelled: { stop.isStopped }) { bytes in
            for value in splitter.feed(bytes) {
                do throws(KubeAPIError) {
                    try self.handle(value, deliver: deliver)
                } catch {
                    failure = error
                    return false
                }
            }
            return true
        }
        if let failure { throw failure }
    }

    private struct Envelope: Decodable { var type: String }
    private struct Typed<T: Decodable>: Decodable { var object: T }
    private struct Bookmark: Decodable {
        struct Meta: Decodable { var resourceVersion: String }
        var metadata: Meta
    }

    private func handle(_ json: [UInt8], deliver: (InformerEvent<Object>) -> Void) throws(KubeAPIError) {
        let data = Data(json)
        let decoder = JSONDecoder()
        do {
            let type = try decoder.decode(Envelope.self, from: data).type
            switch type {
            case "ADDED", "MODIFIED":
                let object = try decoder.decode(Typed<Object>.self, from: data).object
                lock.withLock {
                    objects[object.cacheKey] = object
                    resourceVersion = object.metadata.resourceVersion ?? resourceVersion
                }
                deliver(.upserted(object))
            case "DELETED":
                let object = try decoder.decode(Typed<Object>.self, from: data).object
                lock.withLock {
                    objects[object.cacheKey] = nil
                    resourceVersion = object.metadata.resourceVersion ?? resourceVersion
                }
                deliver(.deleted(object))
            case "BOOKMARK":
                let bookmark = try decoder.decode(Typed<Bookmark>.self, from: data).object
                lock.withLock { resourceVersion = bookmark.metadata.resourceVersion }
            case "ERROR":
                let status = try decoder.decode(Typed<StatusObject>.self, from: data).object
                throw KubeAPIError(status: status.code, message: "\(Object.collectionPath) watch: \(status.code ?? 0) \(status.message ?? "error")")
            default:
                logger.debug("\(Object.collectionPath): ignoring watch event of type \(type)")
            }
        } catch let error as KubeAPIError {
            throw error
        } catch {
            throw KubeAPIError(message: "\(Object.collectionPath): undecodable watch event: \(error)")
        }
    }
}

extension Error {
    var isGone: Bool { (self as? KubeAPIError)?.isGone == true }
}
