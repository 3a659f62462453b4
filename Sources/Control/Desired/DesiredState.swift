import Dataplane

/// How epokd was told to forward (`--interfaces`, `--external-interface`, `--host-ports`, `--node-cidrs`).
public struct ForwardingOptions: Hashable, Sendable {
    public var interfaces: [String]
    public var externalInterface: String?
    /// Host ports Services may claim; nil allows every port (as Epok does).
    public var hostPorts: [ClosedRange<Port>]?
    /// Prefixes node addresses must lie in to receive traffic; nil allows any usable address.
    public var nodeCIDRs: [CIDR]?
    /// The host's own addresses, never used as a backend (that would loop traffic back to the host).
    public var hostAddresses: Set<IPAddress>
    /// Prefixes egress and bridge source addresses must lie in (`--address-pools`); nil allows any address
    /// that is neither the host's nor a Node's. A host address inside a pool is the operator's gift to tenants.
    public var addressPools: [CIDR]?
    /// The host's gateways (its routes' next hops): no tenant's address either.
    public var gateways: Set<IPAddress> = []
    /// Interfaces whose forwarded traffic passes the LoadBalancer firewall (`--firewall-interface`); none: no firewall.
    public var firewallInterfaces: [String]
    /// Ports of the host itself reachable from the firewall interfaces (`--firewall-input`); nil: input not filtered.
    public var inputPorts: [PortKey]?

    public init(interfaces: [String], externalInterface: String? = nil, hostPorts: [ClosedRange<Port>]? = nil,
                nodeCIDRs: [CIDR]? = nil, hostAddresses: Set<IPAddress> = [], firewallInterfaces: [String] = [],
                inputPorts: [PortKey]? = nil) {
        self.interfaces = interfaces
        self.externalInterface = externalInterface
        self.hostPorts = hostPorts
        self.nodeCIDRs = nodeCIDRs
        self.hostAddresses = hostAddresses
        self.firewallInterfaces = firewallInterfaces
        self.inputPorts = inputPorts
    }

    /// What is forwarded with no Service and no Node: the interfaces, the firewall's interfaces and input ports.
    public var emptyState: ForwardingState {
        ForwardingState(interfaces: interfaces, externalInterfaces: externalInterface.map { [$0] } ?? [],
                        firewallInterfaces: firewallInterfaces,
                        inputInterfaces: inputPorts == nil ? [] : firewallInterfaces, inputPorts: inputPorts ?? [])
    }
}

/// A host port that a Service was granted.
public struct ForwardedPort: Hashable, Sendable {
    public var service: ServiceRef
    public var mapping: Mapping
}

/// What the host should forward, computed from a snapshot: plain values, no I/O.
public struct DesiredState: Hashable, Sendable {
    public var forwarding: ForwardingState
    /// Every granted host port with its Service, sorted by protocol and port.
    public var ports: [ForwardedPort]
    public var problems: [Problem]
    /// Ready, not excluded nodes with an InternalIP.
    public var nodes: [NodeAddress]
    /// The LoadBalancer IPs . protocols . ports the firewall admits, each held by one Service.
    public var loadBalancers: [LoadBalancerEntry] { forwarding.loadBalancers }

    /// Computes the desired forwarding of `snapshot` under `options`.
    ///
    /// Each Service's annotations are parsed strictly: a malformed annotation or allow-range gives that Service
    /// no ports at all (never stale ones, never an open port that was meant to be restricted), an entry whose
    /// node port the Service lacks is dropped alone, and when two Services claim one host port and protocol the
    /// older one (see `ClaimPrecedence`) keeps it. Problems are reported, never thrown. This is the incremental
    /// state (`LiveDesiredState`) fed everything at once: one implementation of the rules for both paths.
    public init(snapshot: ClusterSnapshot, options: ForwardingOptions) {
        let live = LiveDesiredState(claimsOnly: options)
        _ = live.replaceAll(snapshot)
        self = live.state
    }

    init(ports: [ForwardedPort], problems: [Problem], nodes: [NodeAddress], draining: [NodeAddress] = [], loadBalancers: [LoadBalancerEntry],
         options: ForwardingOptions) {
        self.ports = ports
        self.problems = problems
        self.nodes = nodes
        forwarding = options.emptyState
        forwarding.nodes = nodes
        forwarding.mappings = ports.map(\.mapping)
        forwarding.loadBalancers = loadBalancers
        forwarding.draining = draining
    }
}
