import Dataplane
import Foundation
import Logging
import Metrics

/// Listed objects and watch events skipped because their object could not be decoded.
private let watchDecodeErrors = Counter(label: "epokd_watch_decode_errors_total")

/// An API object an informer can keep: it has metadata, and a path to list and watch.
public protocol KubeObject: Codable, Sendable {
    var metadata: ObjectMeta { get }
    /// The collection path across all namespaces (`/api/v1/services`).
    static var collectionPath: String { get }
    /// The object's `kind` and `apiVersion`, for Events about it.
    static var kind: String { get }
    static var apiVersion: String { get }
    /// Reads one object from JSON bytes (Services, Nodes and EndpointSlices keep only what epokd uses).
    init(json reader: inout JSONReader) throws(JSONReadError)
}

extension KubeObject {
    /// Through Foundation's decoder, for objects that are few (custom resources).
    public init(json reader: inout JSONReader) throws(JSONReadError) {
        let start = reader.offset
        let bytes = try reader.valueBytes()
        do {
            self = try JSONDecoder().decode(Self.self, from: Data(bytes))
        } catch {
            throw JSONReadError(offset: start, reason: "\(error)")
        }
    }
}

extension Service: KubeObject {
    public static let collectionPath = "/api/v1/services"
    public static let kind = "Service"
    public static let apiVersion = "v1"
}

extension EndpointSlice: KubeObject {
    public static let collectionPath = "/apis/discovery.k8s.io/v1/endpointslices"
    public static let kind = "EndpointSlice"
    public static let apiVersion = "discovery.k8s.io/v1"
}

extension Node: KubeObject {
    public static let collectionPath = "/api/v1/nodes"
    public static let kind = "Node"
    public static let apiVersion = "v1"
}

extension StaticEgressIP: KubeObject {
    public static let collectionPath = "/apis/staticegressips.nirmata.io/v1alpha1/staticegressips"
    public static let kind = "StaticEgressIP"
}

extension ExternalService: KubeObject {
    public static let collectionPath = "/apis/submariner.io/v1alpha1/externalservices"
    public static let kind = "ExternalService"
}

extension ReferenceGrant: KubeObject {
    public static let collectionPath = "/apis/gateway.networking.k8s.io/v1beta1/referencegrants"
    public static let kind = "ReferenceGrant"
}

extension Ingress: KubeObject {
    public static let collectionPath = "/apis/networking.k8s.io/v1/ingresses"
    public static let kind = "Ingress"
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

    init(initial: Double = 0.5, cap: Double = 30) {
        self.initial = initial
        self.cap = cap
    }

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
    /// The objects by `cacheKey`, each `Held`.
    private var objects: [String: Held<Object>] = [:]
    /// Whether `objects` is kept (see `stopCaching()`).
    private var caching = true
    private var resourceVersion: String?
    private var synced = false
    private var watchRestarts = 0
    /// A resource the cluster may not serve (a custom resource whose CRD is not installed): its 404 is said
    /// once, not warned about, and asked again every few minutes.
    private let optional: Bool

    public init(client: KubeClient, logger: Logger, pageSize: Int = 500, optional: Bool = false) {
        self.client = client
        self.logger = logger
        self.pageSize = pageSize
        self.optional = optional
    }

    /// Whether a complete list has arrived.
    public var hasSynced: Bool { lock.withLock { synced } }
    /// Whether the API server said the resource is not there or not to be read (404, 403) before any list
    /// arrived: nothing is worth waiting for.
    public var isUnavailable: Bool { lock.withLock { unavailable && !synced } }
    private var unavailable = false
    /// Called (on the informer's thread) when the resource turns out to be unavailable; set before `run`.
    public var onUnavailable: (@Sendable () -> Void)?
    /// The objects as last known (complete once `hasSynced`; empty after `stopCaching()`).
    public var cache: [Object] { lock.withLock { objects.values.map(\.value) } }

    /// Forgets the objects and keeps none from now on, for a consumer that keeps its own copy of each (every
    /// change and every list still reaches it): at 50k Services the cache's table alone is about 24 MB.
    public func stopCaching() {
        lock.withLock {
            caching = false
            objects = [:]
        }
    }
    /// The resourceVersion the next watch starts from (advanced by events and bookmarks).
    public var currentResourceVersion: String? { lock.withLock { resourceVersion } }
    /// How many times a watch had to be started again (after drops, errors or 410).
    public var restarts: Int { lock.withLock { watchRestarts } }

    /// Runs until `stop`: lists, then watches, handing every change to `deliver` on this thread.
    public func run(until stop: StopSignal, deliver: @escaping (InformerEvent<Object>) -> Void) {
        var backoff = optional ? Backoff(initial: 5, cap: 300) : Backoff()
        var toldAbsent = false
        var needList = true
        var listed: String?   // the resourceVersion of the last complete list
        while !stop.isStopped {
            do {
                if needList {
                    let (items, version) = try list(stop: stop)
                    lock.withLock {
                        objects = caching ? Dictionary(items.map { ($0.cacheKey, Held($0)) }, uniquingKeysWith: { $1 }) : [:]
                        resourceVersion = version
                        synced = true
                    }
                    listed = version
                    deliver(.listed(items))
                    needList = false
                }
                try watch(stop: stop, deliver: deliver)
                backoff.reset()
            } catch {
                if stop.isStopped { return }
                lock.withLock { watchRestarts += 1 }
                if error.isGone {
                    needList = true
                    // Expired with nothing seen since the last list (no event, no bookmark): the server's watch is
                    // behind its lists, or its history ends at the version it listed. Listing again at once would
                    // ask for the whole collection in a loop; the relists back off instead, as other errors do.
                    guard currentResourceVersion == listed else {
                        backoff.reset()
                        logger.info("\(Object.collectionPath): resourceVersion expired (410 Gone), listing again")
                        continue
                    }
                    let delay = backoff.next()
                    let since = listed.map { "the last list, resourceVersion \($0)" } ?? "start"
                    logger.info("\(Object.collectionPath): 410 Gone with nothing new since \(since); listing again in \(String(format: "%.1f", delay)) s")
                    if stop.wait(seconds: delay) { return }
                    continue
                }
                let delay = backoff.next()
                let absent = error.status == 404 || error.status == 403
                if absent {
                    let first = lock.withLock {
                        defer { unavailable = true }
                        return !unavailable
                    }
                    if first { onUnavailable?() }
                }
                if optional, absent {
                    if !toldAbsent {
                        if error.status == 404 {
                            logger.info("\(Object.collectionPath) is not served (its CustomResourceDefinition is not installed); asking again every few minutes")
                        } else {
                            logger.warning("\(Object.collectionPath): 403 Forbidden (grant epokd list and watch on it, see deploy/rbac.yaml); everything else goes on; asking again every few minutes")
                        }
                    }
                    toldAbsent = true
                    if stop.wait(seconds: delay) { return }
                    continue
                }
                logger.warning("\(Object.collectionPath): \(error); retrying in \(String(format: "%.1f", delay)) s, keeping what the kernel has")
                if stop.wait(seconds: delay) { return }
            }
        }
    }

    /// One page of a list: its items, its resourceVersion and the token for the next page. An item that cannot
    /// be decoded (a custom resource whose CRD validates nothing, say) is skipped and reported on its own
    /// (`skip(listed:error:)`): the rest of the list applies. Bytes that are not JSON fail the whole page.
    private func page(_ data: Data) throws(JSONReadError) -> (items: [Object], version: String?, next: String?) {
        let bytes = Array(data)
        var reader = JSONReader(bytes)
        var items: [Object] = [], version: String?, next: String?
        var undecodable: [(at: Int, error: JSONReadError)] = []
        try reader.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
            if key.is("items") {
                guard !(try r.readNull()) else { return }
                try r.readArray { (item: inout JSONReader) throws(JSONReadError) in
                    _ = item.peek()
                    let start = item
                    do throws(JSONReadError) {
                        items.append(try Object(json: &item))
                    } catch {
                        // Moved past by a skim, which finds the page malformed if the item's bytes are.
                        item = start
                        try item.skimValue()
                        undecodable.append((start.offset, error))
                    }
                }
            } else if key.is("metadata") {
                try r.readObject { (m: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                    if key.is("resourceVersion") { version = try m.readOptionalString() }
                    else if key.is("continue") { next = try m.readOptionalString() }
                    else { try m.skipValue() }
                }
            } else {
                try r.skipValue()
            }
        }
        try reader.readEnd()
        for item in undecodable {
            var r = JSONReader(bytes, offset: item.at)
            skip(listed: (try? r.valueBytes()).map { Data($0) } ?? Data(), error: item.error)
        }
        return (items, version, next)
    }

    private func list(stop: StopSignal) throws(KubeAPIError) -> ([Object], String) {
        var items: [Object] = []
        var token: String?
        var version = ""
        repeat {
            var query = "?limit=\(pageSize)"
            if let token { query += "&continue=" + (token.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? token) }
            let data = try client.request("GET", Object.collectionPath + query)
            let page: (items: [Object], version: String?, next: String?)
            do {
                page = try self.page(data)
            } catch {
                throw KubeAPIError(message: "\(Object.collectionPath): the list answer is not a list: \(error)")
            }
            items += page.items
            token = page.next.flatMap { $0.isEmpty ? nil : $0 }
            version = page.version ?? version
        } while token != nil && !stop.isStopped
        // Stopped between pages: what was read is not the whole truth, and is never handed on as such.
        if token != nil { throw KubeAPIError(message: "\(Object.collectionPath): stopped before the list was complete") }
        return (items, version)
    }

    /// Watches from the last resourceVersion until the server ends the stream. A stream that ends at once,
    /// with nothing on it, is an error (so that it is retried with backoff, not in a busy loop); so is one whose
    /// bytes are not a sequence of JSON objects.
    private func watch(stop: StopSignal, deliver: @escaping (InformerEvent<Object>) -> Void) throws(KubeAPIError) {
        let since = lock.withLock { resourceVersion } ?? ""
        let timeout = Int.random(in: 300...600)
        let path = Object.collectionPath + "?watch=1&allowWatchBookmarks=true&timeoutSeconds=\(timeout)&resourceVersion=\(since)"
        var splitter = JSONStreamSplitter()
        var failure: KubeAPIError?
        var received = 0
        let started = Date()
        try client.stream(path, isCancelled: { stop.isStopped }) { bytes in
            do {
                for value in try splitter.feed(bytes) {
                    received += 1
                    try self.handle(value, deliver: deliver)
                }
            } catch let error as KubeAPIError {
                failure = error
                return false
            } catch {
                failure = KubeAPIError(message: "\(Object.collectionPath) watch: the stream is not a sequence of JSON events (\(error)); watching again from resourceVersion \(self.currentResourceVersion ?? "")")
                return false
            }
            return true
        }
        if let failure { throw failure }
        if received == 0 && Date().timeIntervalSince(started) < 1 && !stop.isStopped {
            throw KubeAPIError(message: "\(Object.collectionPath) watch ended at once with no event")
        }
    }

    private struct Typed<T: Decodable>: Decodable { var object: T }
    private struct Bookmark: Decodable {
        struct Meta: Decodable { var resourceVersion: String }
        var metadata: Meta
    }
    /// As much of an object's metadata as can be read when the object itself cannot be decoded.
    private struct Loose: Decodable {
        struct Meta: Decodable { var name: String?; var namespace: String?; var uid: String?; var resourceVersion: String? }
        var metadata: Meta?
    }

    /// Listed objects and watch events whose object could not be decoded, and were skipped.
    public var decodeErrors: Int { lock.withLock { skipped } }
    private var skipped = 0
    /// Where Warning Events about objects that cannot be decoded go (set before `run`).
    public var events: EventRecorder?

    private func handle(_ json: [UInt8], deliver: (InformerEvent<Object>) -> Void) throws(KubeAPIError) {
        let data = Data(json)
        let decoder = JSONDecoder()
        do {
            // The envelope first: its type, and where its object starts (read once the type is known).
            var envelope = JSONReader(json)
            var type: String?, objectAt: Int?
            try envelope.readObject { (r: inout JSONReader, key: JSONKey) throws(JSONReadError) in
                if key.is("type") { type = try r.readString() }
                else if key.is("object") {
                    _ = r.peek()
                    objectAt = r.offset
                    try r.skipValue()
                } else {
                    try r.skipValue()
                }
            }
            try envelope.readEnd()
            guard let type else { throw JSONReadError(offset: 0, reason: "a watch event without a type") }
            switch type {
            case "ADDED", "MODIFIED", "DELETED":
                let object: Object
                do {
                    var reader = JSONReader(json, offset: objectAt ?? json.count)
                    object = try Object(json: &reader)
                } catch {
                    skip(data, type: type, error: error, decoder: decoder)
                    return
                }
                lock.withLock {
                    if caching { objects[object.cacheKey] = type == "DELETED" ? nil : Held(object) }
                    resourceVersion = object.metadata.resourceVersion ?? resourceVersion
                }
                deliver(type == "DELETED" ? .deleted(object) : .upserted(object))
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

    /// Moves past an event whose object cannot be decoded: reports it (`report(_:_:error:)`) and advances the
    /// resourceVersion so that a re-watch does not receive it again. What the cache (or the consumer, which was
    /// handed the last valid version) held for that object stays until it is valid again (a relist repairs it).
    private func skip(_ data: Data, type: String, error: Error, decoder: JSONDecoder) {
        let meta = (try? decoder.decode(Typed<Loose>.self, from: data))?.object.metadata
        if let version = meta?.resourceVersion { lock.withLock { resourceVersion = version } }
        report(meta, "\(type) event", error: error)
    }

    /// Reports a listed object that cannot be decoded; the list goes on without it.
    private func skip(listed data: Data, error: Error) {
        report((try? JSONDecoder().decode(Loose.self, from: data))?.metadata, "listed object", error: error)
    }

    /// Logs and counts an object that cannot be decoded, naming it when its metadata can be read, and posts a
    /// Warning Event on it (`UndecodableObject`) when there is a recorder and a name.
    private func report(_ meta: Loose.Meta?, _ what: String, error: Error) {
        lock.withLock { skipped += 1 }
        watchDecodeErrors.increment()
        let name = meta.map { [$0.namespace, $0.name].compactMap { $0 }.joined(separator: "/") } ?? ""
        let object = name.isEmpty ? "an object without readable metadata" : Escaped.text(name, limit: 300)
        logger.error("\(Object.collectionPath): skipped \(what) \(object): it cannot be decoded (\(Escaped.text("\(error)", limit: 500))); the rest goes on, and what was known of it is kept until it is valid again")
        if let events, let meta, let name = meta.name {
            events.record(.warning, reason: "UndecodableObject",
                          message: "epokd cannot read this \(Object.kind) (\(Escaped.text("\(error)", limit: 500))) and leaves it out until it is valid; everything else applies",
                          about: .init(kind: Object.kind, apiVersion: Object.apiVersion, namespace: meta.namespace, name: name, uid: meta.uid))
        }
    }
}

extension Error {
    var isGone: Bool { (self as? KubeAPIError)?.isGone == true }
}
