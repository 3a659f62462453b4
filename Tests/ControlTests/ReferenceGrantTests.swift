import Control
import Dataplane
import Testing

@Suite("Namespaces are boundaries: an ExternalService names another namespace's Service only where a ReferenceGrant lets it")
struct ReferenceGrantTests {
    func service(_ name: String, in namespace: String) -> Service {
        var s = webService(name)
        s.metadata.namespace = namespace
        return s
    }

    func slice(_ service: String, in namespace: String, ready: [String]) -> EndpointSlice {
        var s = webSlice(service, ready: ready)
        s.metadata.namespace = namespace
        return s
    }

    func bridge(_ name: String, in namespace: String, to service: ServiceRef, sourceIP: String) -> ExternalService {
        ExternalService(metadata: ObjectMeta(name: name, namespace: namespace, creationTimestamp: "2024-01-01T00:00:00Z"),
                        spec: .init(targetIP: "198.51.100.2", sources: [.init(service: .init(namespace: service.namespace, name: service.name), sourceIP: sourceIP)],
                                    ports: [.init(port: 7000)]))
    }

    func grant(in namespace: String, from: String, name: String? = nil, kind: String = "ExternalService") -> ReferenceGrant {
        ReferenceGrant(metadata: ObjectMeta(name: "allow-\(from)", namespace: namespace),
                       spec: .init(from: [.init(group: "submariner.io", kind: kind, namespace: from)], to: [.init(group: "", kind: "Service", name: name)]))
    }

    var bridged: (LiveDesiredState) -> Bool {
        { live in !(live.elements["bridge_out4"] ?? []).isEmpty || !(live.elements["bridge_in4"] ?? []).isEmpty }
    }

    @Test("refused without a grant (a Warning on the ExternalService, nothing bridged or guarded); a grant for that Service or all lets it; a grant for another name or kind does not; its removal unbridges")
    func grants() throws {
        let db = ServiceRef(namespace: "team-b", name: "db")
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [service("db", in: "team-b"), service("app", in: "team-a")],
                                            endpointSlices: [slice("db", in: "team-b", ready: ["10.244.2.5"]), slice("app", in: "team-a", ready: ["10.244.1.5"])],
                                            externalServices: [bridge("steal", in: "team-a", to: db, sourceIP: "198.51.100.9")]))
        let owner = ObjectRef(.externalService, namespace: "team-a", name: "steal")
        #expect(live.problems(of: owner).map(\.reason) == [.referenceNotPermitted])
        #expect(live.problems(of: owner).first?.message.contains("no ReferenceGrant there lets ExternalServices of team-a name it") == true)
        #expect(!bridged(live) && (live.elements["bridge_guard4"] ?? []).isEmpty && live.neededAddresses.isEmpty)

        // Grants that do not fit: another Service's name, another kind, another namespace's.
        _ = live.upsert(grant(in: "team-b", from: "team-a", name: "web"))
        _ = live.upsert(grant(in: "team-b", from: "team-a", kind: "HTTPRoute"))
        _ = live.upsert(grant(in: "team-a", from: "team-a"))
        #expect(!bridged(live) && live.problems(of: owner).map(\.reason) == [.referenceNotPermitted])

        // team-b grants it: bridged.
        let diff = live.upsert(ReferenceGrant(metadata: ObjectMeta(name: "db-for-a", namespace: "team-b"),
                                              spec: .init(from: [.init(group: "submariner.io", kind: "ExternalService", namespace: "team-a")],
                                                          to: [.init(group: "", kind: "Service", name: "db")])))
        #expect(diff.addedCount > 0 && bridged(live) && live.problems(of: owner).isEmpty)
        #expect(live.neededAddresses == [IPAddress("198.51.100.9")!])

        // The grant goes: so does the bridge.
        let gone = live.remove(referenceGrant: "team-b/db-for-a")
        #expect(gone.deletedCount == diff.addedCount && !bridged(live))
        #expect(live.problems(of: owner).map(\.reason) == [.referenceNotPermitted])
    }

    @Test("a Service of the ExternalService's own namespace needs no grant; a whole List with a grant reads from a file")
    func sameNamespaceAndFiles() throws {
        let live = LiveDesiredState(options: options)
        _ = live.replaceAll(ClusterSnapshot(services: [service("app", in: "team-a")], endpointSlices: [slice("app", in: "team-a", ready: ["10.244.1.5"])],
                                            externalServices: [bridge("own", in: "team-a", to: ServiceRef(namespace: "team-a", name: "app"), sourceIP: "198.51.100.9")]))
        #expect(bridged(live) && live.problems(of: ObjectRef(.externalService, namespace: "team-a", name: "own")).isEmpty)

        let yaml = """
            apiVersion: v1
            kind: List
            items:
            - apiVersion: gateway.networking.k8s.io/v1beta1
              kind: ReferenceGrant
              metadata: {name: db-for-a, namespace: team-b}
              spec:
                from: [{group: submariner.io, kind: ExternalService, namespace: team-a}]
                to: [{group: "", kind: Service, name: db}]
            """
        let grants = try #require(try SnapshotFile.decode(yaml).referenceGrants)
        #expect(grants.count == 1 && grants[0].lets(externalServicesOf: "team-a", name: ServiceRef(namespace: "team-b", name: "db")))
        #expect(!grants[0].lets(externalServicesOf: "team-c", name: ServiceRef(namespace: "team-b", name: "db")))
        #expect(try SnapshotFile.decode(Array(#"{"kind": "List", "items": []}"#.utf8)).referenceGrants == [], "a file without grants has none")
    }
}
