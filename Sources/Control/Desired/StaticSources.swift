import Dataplane

/// When an object asked, and for which of its rules: the older object (then the earlier rule) wins a pod's
/// destinations, a pod's way to a server, or an entrance.
struct RequestPrecedence: ClaimAge {
    var created: Int64
    var owner: ObjectRef
    var index: Int

    static func < (a: RequestPrecedence, b: RequestPrecedence) -> Bool {
        (a.created, a.owner, a.index) < (b.created, b.owner, b.index)
    }
}

/// One rule asked for one pod, with its place in the object that asks (for precedence within an object).
struct EgressAsk: Hashable {
    var rule: EgressRule
    var index: Int
}

/// What one object asks of static source addresses: a Service by its annotations, a StaticEgressIP, an
/// ExternalService.
struct StaticSourceRequest: Equatable {
    /// The egress rules asked for each pod.
    var egress: [IPAddress: [EgressAsk]] = [:]
    var exits: [BridgeExit] = []
    var entrances: [BridgeEntrance] = []
    /// Entrance addresses of bridges to Services that exist, guarded whether or not an entrance is held on them.
    var guarded: Set<IPAddress> = []
    var problems: [Problem] = []
}

/// The egress rules asked for each pod, oldest first. A pod follows every rule whose destinations overlap no
/// older rule's it follows; an overlapping one is outranked. Every change is one pod's.
struct EgressTable {
    private var asks: [IPAddress: [(age: RequestPrecedence, rule: EgressRule)]] = [:]
    /// Pods with an outranked ask, and how many held rules use each egress address: kept as pods change, so
    /// that neither is a walk over every pod.
    private(set) var conflicted: Set<IPAddress> = []
    private(set) var addressUse: [IPAddress: Int] = [:]

    /// The rules `pod` follows, with their ages.
    func held(_ pod: IPAddress) -> [(age: RequestPrecedence, rule: EgressRule)] {
        var result: [(age: RequestPrecedence, rule: EgressRule)] = []
        for ask in asks[pod] ?? [] where !result.contains(where: { Self.overlap($0.rule, ask.rule) }) { result.append(ask) }
        return result
    }

    /// Every rule followed.
    var heldRules: [EgressRule] { asks.keys.flatMap { held($0).map(\.rule) } }

    /// The asks an older one outranks, each with that older owner.
    func outranked(_ pod: IPAddress) -> [(owner: ObjectRef, rule: EgressRule, by: ObjectRef)] {
        let held = self.held(pod)
        return (asks[pod] ?? []).filter { ask in !held.contains { $0.age == ask.age } }.map { ask in
            (ask.age.owner, ask.rule, held.first { Self.overlap($0.rule, ask.rule) }?.age.owner ?? ask.age.owner)
        }
    }

    /// Replaces `owner`'s asks for `pod`; returns the rules the pod followed before and follows now.
    mutating func replace(_ owner: ObjectRef, pod: IPAddress, with new: [(RequestPrecedence, EgressRule)]) -> (before: [EgressRule], after: [EgressRule]) {
        let before = held(pod).map(\.rule)
        var list = asks[pod] ?? []
        list.removeAll { $0.age.owner == owner }
        for (age, rule) in new { list.insert((age, rule), at: list.firstIndex { age < $0.age } ?? list.endIndex) }
        asks[pod] = list.isEmpty ? nil : list
        let after = held(pod).map(\.rule)
        if after.count < list.count { conflicted.insert(pod) } else { conflicted.remove(pod) }
        for rule in before {
            addressUse[rule.egress, default: 0] -= 1
            if addressUse[rule.egress] == 0 { addressUse[rule.egress] = nil }
        }
        for rule in after { addressUse[rule.egress, default: 0] += 1 }
        return (before, after)
    }

    /// The owner of the rule `pod` follows to `destination`.
    func owner(of pod: IPAddress, to destination: IPAddress) -> ObjectRef? {
        held(pod).first { $0.rule.destinations.contains { $0.contains(destination) } }?.age.owner
    }

    static func overlap(_ a: EgressRule, _ b: EgressRule) -> Bool {
        a.destinations.contains { x in b.destinations.contains { y in x.contains(y.address) || y.contains(x.address) } }
    }
}

/// Who holds each pod's static source addresses and each bridge entrance, from every object's request; each
/// change of a request yields the element changes and the flows it made stale.
struct StaticSources {
    private(set) var requests: [ObjectRef: StaticSourceRequest] = [:]
    /// When each object that asks was made: an object made again under the same name (a relist after a missed
    /// delete and create) asks the same with a new age, and every claim of its moves to that age.
    private var created: [ObjectRef: Int64] = [:]
    private var egress = EgressTable()
    private var exits = ClaimTable<BridgeExitKey, BridgeExit, RequestPrecedence>()
    private var entrances = ClaimTable<BridgeEntranceKey, BridgeEntrance, RequestPrecedence>()
    private var guarded: [IPAddress: Int] = [:]
    /// Each entrance changed since `takeStaleFlows`, as it was before (nil: there was none).
    private var entrancesBefore: [BridgeEntranceKey: BridgeEntrance?] = [:]

    struct Changes {
        var removed: [(String, Element)] = []
        var added: [(String, Element)] = []
        var staleEgress: [StaleEgress] = []
    }

    /// Replaces `owner`'s request (nil: the object is gone), made at `created`. With `track`, returns the
    /// changes; without (a bulk load), only the claims are settled.
    mutating func replace(_ owner: ObjectRef, created: Int64, with request: StaticSourceRequest?, track: Bool) -> Changes {
        var changes = Changes()
        let old = requests[owner]
        let aged = old != nil && request != nil && self.created[owner] != created
        guard old != request || aged else { return changes }
        requests[owner] = request
        self.created[owner] = request == nil ? nil : created
        let age = { (index: Int) in RequestPrecedence(created: created, owner: owner, index: index) }

        let oldEgress = old?.egress ?? [:], newEgress = request?.egress ?? [:]
        for pod in Set(oldEgress.keys).union(newEgress.keys) where aged || oldEgress[pod] != newEgress[pod] {
            changeEgress(owner, created: created, pod: pod, asks: newEgress[pod] ?? [], track: track, &changes)
        }
        let exitChanges = exits.replace(owner, old: (old?.exits ?? []).lazy.map(\.key),
                                        new: (request?.exits ?? []).enumerated().lazy.map { ($0.element.key, $0.element, age($0.offset)) },
                                        changes: track)
        for (gone, now) in exitChanges {
            if let gone {
                changes.removed += ForwardingRuleset.bridgeExitElements(gone)
                if let stale = StaleEgress.between(gone, now) { changes.staleEgress.append(stale) }
            }
            if let now { changes.added += ForwardingRuleset.bridgeExitElements(now) }
        }
        let entranceChanges = entrances.replace(owner, old: (old?.entrances ?? []).lazy.map(\.key),
                                                new: (request?.entrances ?? []).enumerated().lazy.map { ($0.element.key, $0.element, age($0.offset)) },
                                                changes: track)
        for (gone, now) in entranceChanges {
            if let gone {
                changes.removed += ForwardingRuleset.bridgeEntranceElements(gone)
                // The entrance as it was before the first change since the stale flows were last taken: they are
                // judged against it then, once, not against each step between (an entrance that moves to another
                // bridge and back within one batch made nothing stale).
                if entrancesBefore[gone.key] == nil { entrancesBefore[gone.key] = .some(gone) }
            }
            if let now {
                changes.added += ForwardingRuleset.bridgeEntranceElements(now)
                if entrancesBefore[now.key] == nil { entrancesBefore[now.key] = .some(nil) }
            }
        }
        for address in old?.guarded ?? [] {
            guarded[address, default: 0] -= 1
            if guarded[address] == 0 {
                guarded[address] = nil
                if track { changes.removed.append(ForwardingRuleset.bridgeGuardElement(address)) }
            }
        }
        for address in request?.guarded ?? [] {
            guarded[address, default: 0] += 1
            if guarded[address] == 1, track { changes.added.append(ForwardingRuleset.bridgeGuardElement(address)) }
        }
        return changes
    }

    /// The flows the entrance changes since the last call made stale: those to endpoints that left (or to every
    /// endpoint, when the entrance went, moved its endpoint port or admits another client now).
    mutating func takeStaleFlows() -> [StaleFlows] {
        defer { entrancesBefore = [:] }
        return entrancesBefore.sorted { "\($0.key)" < "\($1.key)" }.compactMap { key, before in
            guard let gone = before else { return nil }
            let now = entrances.holder(of: key)?.value
            let left = now?.endpointPort == gone.endpointPort && now?.client == gone.client
                ? Set(gone.endpoints).subtracting(now?.endpoints ?? []) : nil
            guard left?.isEmpty != true else { return nil }
            return StaleFlows(proto: gone.proto, hostPort: gone.port, nodePort: gone.endpointPort,
                              reasons: [left.map { .backendsRemoved($0) } ?? .remapped], entrance: gone.address)
        }
    }

    /// Replaces `owner`'s egress asks for some pods only (their endpoints came or went); the rest of its request
    /// stands. The cost follows the pods given, not the owner's.
    mutating func updateEgress(_ owner: ObjectRef, created: Int64, pods: [IPAddress: [EgressAsk]], track: Bool) -> Changes {
        var changes = Changes()
        guard requests[owner] != nil else { return changes }
        for (pod, asks) in pods where (requests[owner]!.egress[pod] ?? []) != asks {
            requests[owner]!.egress[pod] = asks.isEmpty ? nil : asks
            changeEgress(owner, created: created, pod: pod, asks: asks, track: track, &changes)
        }
        return changes
    }

    private mutating func changeEgress(_ owner: ObjectRef, created: Int64, pod: IPAddress, asks: [EgressAsk], track: Bool, _ changes: inout Changes) {
        let (before, after) = egress.replace(owner, pod: pod, with: asks.map { (RequestPrecedence(created: created, owner: owner, index: $0.index), $0.rule) })
        guard track, before != after else { return }
        changes.removed += before.flatMap(ForwardingRuleset.egressElements)
        changes.added += after.flatMap(ForwardingRuleset.egressElements)
        for rule in before where !after.contains(rule) {
            let covered = after.filter { $0.egress == rule.egress }.flatMap(\.destinations)
            if let stale = StaleEgress.between(rule, EgressRule(source: pod, destinations: covered, egress: rule.egress)) {
                changes.staleEgress.append(stale)
            }
        }
    }

    /// Every pod's rules, the exits and entrances held, and the guarded addresses, in order.
    func fill(_ state: inout ForwardingState) {
        state.egress = egress.heldRules.sorted { $0.source != $1.source ? $0.source < $1.source : "\($0.destinations)" < "\($1.destinations)" }
        state.bridgeExits = exits.holders.map(\.value).sorted { ($0.pod, $0.server, $0.port) < ($1.pod, $1.server, $1.port) }
        state.bridgeEntrances = entrances.holders.map(\.value).sorted { ($0.address, $0.port) < ($1.address, $1.port) }
        state.bridgeGuarded = guarded.keys.sorted()
    }

    /// The objects with a problem or an outranked claim.
    var troubled: Set<ObjectRef> {
        var result = Set(requests.compactMap { $0.value.problems.isEmpty ? nil : $0.key })
        result.formUnion(exits.outranked)
        result.formUnion(entrances.outranked)
        for pod in egress.conflicted { result.formUnion(egress.outranked(pod).map(\.owner)) }
        return result
    }

    /// The problems of `owner`'s request, and of each of its claims an older one outranks.
    func problems(of owner: ObjectRef) -> [Problem] {
        guard let request = requests[owner] else { return [] }
        var result = request.problems
        func conflict(_ message: String) {
            result.append(Problem(object: owner.description, reason: .portConflict, message: message, service: owner.service, owner: owner))
        }
        for (_, rule, older) in request.egress.keys.sorted().filter(egress.conflicted.contains).flatMap(egress.outranked).filter({ $0.owner == owner }) {
            conflict("pod \(rule.source) already leaves for some of \(rule.destinations.map(\.description).joined(separator: ", ")) with a static source for \(older), which is older; not for this one")
        }
        for exit in request.exits {
            guard let holder = exits.holder(of: exit.key), holder.age.owner != owner else { continue }
            conflict("pod \(exit.pod) already reaches \(exit.server) \(exit.port)/\(exit.proto) through \(holder.age.owner), which is older; not through this one")
        }
        for entrance in request.entrances {
            guard let holder = entrances.holder(of: entrance.key), holder.age.owner != owner else { continue }
            conflict("entrance \(entrance.key) is already held by \(holder.age.owner), which is older; not opened for this one")
        }
        return result
    }

    /// The object a refused element of these sets belongs to.
    func owner(of rejected: RejectedElement) -> ObjectRef? {
        let key = rejected.element.key
        switch rejected.set {
        case EgressSNAT.Sets.egressAll4.name, EgressSNAT.Sets.egressAll6.name:
            guard key.count == 1, let pod = IPAddress(key[0]) else { return nil }
            return egress.owner(of: pod, to: pod.isV4 ? .v4(IPv4Address(value: 0)) : .v6(IPv6Address(bytes: Array(repeating: 0, count: 16))))
        case EgressSNAT.Sets.egressHosts4.name, EgressSNAT.Sets.egressHosts6.name, EgressSNAT.Sets.egress4.name, EgressSNAT.Sets.egress6.name:
            guard key.count == 2, let pod = IPAddress(key[0]), let destination = IPAddress(key[1]) else { return nil }
            return egress.owner(of: pod, to: destination)
        case Bridge.Sets.exits4.name, Bridge.Sets.exits6.name:
            guard key.count == 4, let pod = IPAddress(key[0]), let server = IPAddress(key[1]),
                  case .l4proto(let proto) = key[2], case .port(let port) = key[3] else { return nil }
            return exits.holder(of: BridgeExitKey(pod: pod, server: server, proto: proto, port: port))?.age.owner
        case Bridge.Sets.clients4.name, Bridge.Sets.clients6.name, Bridge.Sets.entrances4.name, Bridge.Sets.entrances6.name,
             Bridge.Sets.ports4.name, Bridge.Sets.ports6.name:
            let offset = rejected.set.hasPrefix("bridge_clients") ? 1 : 0
            guard key.count >= offset + 3, let address = IPAddress(key[offset]), case .l4proto(let proto) = key[offset + 1],
                  case .port(let port) = key[offset + 2] else { return nil }
            return entrances.holder(of: BridgeEntranceKey(address: address, proto: proto, port: port))?.age.owner
        case Bridge.Sets.guard4.name, Bridge.Sets.guard6.name:
            guard let field = key.first, let address = IPAddress(field) else { return nil }
            return requests.filter { $0.value.guarded.contains(address) }.keys.min()
        default:
            return nil
        }
    }

    /// The guarded entrance addresses: flows to them belong to their bridges.
    var entranceAddresses: Set<IPAddress> { Set(guarded.keys) }

    /// The addresses the held rules and bridges need on the host: egress addresses and bridge source addresses
    /// (every exit's source is a guarded entrance address).
    var neededAddresses: Set<IPAddress> {
        Set(egress.addressUse.keys).union(guarded.keys)
    }
}
