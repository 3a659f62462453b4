import Control
import Dataplane
import Foundation
import NetnsLab
import Testing

private func ingress(_ name: String, namespace: String = "default", hosts: [String], ips: [String],
                     created: String = "2024-01-01T00:00:00Z") -> Ingress {
    Ingress(metadata: ObjectMeta(name: name, namespace: namespace, creationTimestamp: created),
            spec: .init(rules: hosts.map { .init(host: $0) }),
            status: .init(loadBalancer: .init(ingress: ips.map { .init(ip: $0) })))
}

private func named(_ name: String, ips: [String], hostnames: String, created: String = "2024-01-01T00:00:00Z") -> Service {
    loadBalancer(name, ips: ips, ports: [(443, "TCP")], annotations: [ExternalDNS.hostnameAnnotation: hostnames], created: created)
}

private func name(_ text: String) -> DNSName { try! DNSName(text) }
private func ip(_ text: String) -> IPAddress { IPAddress(text)! }

@Suite("DNS names: what a hosts file may hold")
struct DNSNameTests {
    @Test("valid names are kept in lower case, without a trailing dot")
    func valid() throws {
        #expect(try DNSName("App1.K8s.Example.COM.").text == "app1.k8s.example.com")
        #expect(try DNSName("localhost").text == "localhost")
        #expect(try DNSName("xn--caf-dma.example").text == "xn--caf-dma.example")
        #expect(try DNSName(String(repeating: "a", count: 63) + ".example").text.count == 71)
        // 253 bytes exactly: four labels of 63 and one of 1.
        let longest = [String](repeating: String(repeating: "b", count: 63), count: 3).joined(separator: ".") + "." + String(repeating: "c", count: 61)
        #expect(longest.utf8.count == 253)
        #expect(try DNSName(longest).text == longest)
    }

    @Test("wildcards, bad bytes, empty and long labels and names are refused, each saying why", arguments: [
        ("*.k8s.example.com", "wildcard"), ("*", "wildcard"), ("", "empty"), (".", "empty"), ("a..b", "empty label"),
        (".a", "empty label"), ("-a.example", "hyphen"), ("a-.example", "hyphen"), ("under_score.example", "\"_\""),
        ("café.example", "not ASCII"), ("sp ace.example", "\" \""), ("a\nb.example", "\"\n\""), ("a/b", "\"/\""),
        (String(repeating: "a", count: 64) + ".example", "label of 64 bytes"),
        ([String](repeating: String(repeating: "d", count: 63), count: 4).joined(separator: "."), "255 bytes long"),
    ])
    func invalid(text: String, reason: String) {
        #expect(throws: DNSName.Invalid.self) { try DNSName(text) }
        do {
            _ = try DNSName(text)
        } catch {
            #expect(error.description.contains(reason), "\(error)")
        }
    }
}

@Suite("DNS records: names from Services and Ingresses, the older holder keeps a name")
struct DNSRecordsTests {
    @Test("a LoadBalancer Service's comma-separated names go to its ingress IPs of both families; an Ingress's hosts to its")
    func services() {
        let records = DNSNames.records(services: [named("web", ips: ["192.0.2.10", "2001:db8::10"], hostnames: " web.k8s.test,www.K8S.test ,")],
                                       ingresses: [ingress("shop", hosts: ["shop.k8s.test", "api.k8s.test"], ips: ["192.0.2.20"])],
                                       hasHostPorts: { _ in false }, address: nil)
        #expect(records.problems.isEmpty)
        #expect(records.names == [name("web.k8s.test"): [ip("192.0.2.10"), ip("2001:db8::10")],
                                  name("www.k8s.test"): [ip("192.0.2.10"), ip("2001:db8::10")],
                                  name("shop.k8s.test"): [ip("192.0.2.20")], name("api.k8s.test"): [ip("192.0.2.20")]])
    }

    @Test("a Service holding host ports resolves to --dns-address; without it, or without host ports, to nothing")
    func hostPorts() {
        let game = service("game", annotations: [ExternalDNS.hostnameAnnotation: "game.k8s.test"])
        let router = ip("192.168.1.1")
        #expect(DNSNames.records(services: [game], ingresses: [], hasHostPorts: { $0.name == "game" }, address: router).names
                == [name("game.k8s.test"): [router]])
        #expect(DNSNames.records(services: [game], ingresses: [], hasHostPorts: { $0.name == "game" }, address: nil).names.isEmpty)
        #expect(DNSNames.records(services: [game], ingresses: [], hasHostPorts: { _ in false }, address: router).names.isEmpty)
        // A LoadBalancer that also holds host ports: both addresses answer.
        let both = named("both", ips: ["192.0.2.30"], hostnames: "both.k8s.test")
        #expect(DNSNames.records(services: [both], ingresses: [], hasHostPorts: { _ in true }, address: router).names
                == [name("both.k8s.test"): [router, ip("192.0.2.30")]])
    }

    @Test("invalid names are reported on their object and left out; the object's valid names and everyone else's stay")
    func invalidNames() throws {
        let records = DNSNames.records(services: [named("bad", ips: ["192.0.2.40"], hostnames: "*.k8s.test,fine.k8s.test,a_b.k8s.test")],
                                       ingresses: [ingress("wild", hosts: ["*.shop.test", "shop.test"], ips: ["192.0.2.41"])],
                                       hasHostPorts: { _ in false }, address: nil)
        #expect(records.names == [name("fine.k8s.test"): [ip("192.0.2.40")], name("shop.test"): [ip("192.0.2.41")]])
        let onService = try #require(records.problems[ObjectRef(.service, namespace: "default", name: "bad")])
        #expect(onService.map(\.reason) == [.invalidHostname, .invalidHostname])
        #expect(onService[0].message.contains("wildcard") && onService[1].message.contains("\"_\""))
        let onIngress = try #require(records.problems[ObjectRef(.ingress, namespace: "default", name: "wild")])
        #expect(onIngress.count == 1 && onIngress[0].message.contains("*.shop.test"))
    }

    @Test("two objects asking one name with different addresses: the older keeps it, the younger is told; the same addresses are shared")
    func conflicts() throws {
        let old = named("old", ips: ["192.0.2.1"], hostnames: "app.k8s.test", created: "2024-01-01T00:00:00Z")
        let young = named("young", ips: ["192.0.2.2"], hostnames: "app.k8s.test,young.k8s.test", created: "2024-06-01T00:00:00Z")
        let twin = named("twin", ips: ["192.0.2.1"], hostnames: "app.k8s.test", created: "2024-07-01T00:00:00Z")
        let foreign = ingress("other", namespace: "team-b", hosts: ["app.k8s.test"], ips: ["192.0.2.3"], created: "2025-01-01T00:00:00Z")
        // Whatever order they are given in.
        for services in [[old, young, twin], [twin, young, old]] {
            let records = DNSNames.records(services: services, ingresses: [foreign], hasHostPorts: { _ in false }, address: nil)
            #expect(records.names == [name("app.k8s.test"): [ip("192.0.2.1")], name("young.k8s.test"): [ip("192.0.2.2")]])
            #expect(records.problems.keys.sorted() == [ObjectRef(.ingress, namespace: "team-b", name: "other"),
                                                        ObjectRef(.service, namespace: "default", name: "young")])
            let told = try #require(records.problems[ObjectRef(.service, namespace: "default", name: "young")]?.first)
            #expect(told.reason == .hostnameConflict && told.message.contains("Service default/old"))
            // Another namespace's holder is named by its kind only.
            let toldForeign = try #require(records.problems[ObjectRef(.ingress, namespace: "team-b", name: "other")]?.first)
            #expect(toldForeign.message.contains("a Service of another namespace") && !toldForeign.message.contains("old"))
        }
        // A younger claim that is withdrawn leaves nothing behind; the older one withdrawn hands the name on.
        let live = DNSNames()
        live.replaceAll(services: [old, young], ingresses: [])
        live.remove(ServiceRef(namespace: "default", name: "old"))
        #expect(live.records(hasHostPorts: { _ in false }, address: nil).names[name("app.k8s.test")] == [ip("192.0.2.2")])
    }

    @Test("objects held change as they are upserted and removed; a Service that drops its annotation is forgotten")
    func live() {
        let state = DNSNames()
        state.upsert(named("web", ips: ["192.0.2.10"], hostnames: "web.k8s.test"))
        state.upsert(service("plain", annotations: [:]))
        state.upsert(ingress("shop", hosts: ["shop.k8s.test"], ips: ["192.0.2.20"]))
        #expect(state.records(hasHostPorts: { _ in false }, address: nil).names.keys.sorted() == [name("shop.k8s.test"), name("web.k8s.test")])
        // The LoadBalancer's address moves.
        state.upsert(named("web", ips: ["192.0.2.11"], hostnames: "web.k8s.test"))
        #expect(state.records(hasHostPorts: { _ in false }, address: nil).names[name("web.k8s.test")] == [ip("192.0.2.11")])
        // Not yet assigned: nothing asked.
        state.upsert(named("web", ips: [], hostnames: "web.k8s.test"))
        #expect(state.records(hasHostPorts: { _ in false }, address: nil).names[name("web.k8s.test")] == nil)
        state.upsert(service("web", annotations: [:]))
        state.remove(ObjectRef(.ingress, namespace: "default", name: "shop"))
        #expect(state.records(hasHostPorts: { _ in false }, address: nil).names.isEmpty)
    }

    @Test("the annotation survives the JSON reader, which keeps only the annotations epokd reads")
    func annotationKept() throws {
        let json = #"{"kind":"List","items":[{"kind":"Service","metadata":{"name":"web","namespace":"default","annotations":{"other":"x","external-dns.alpha.kubernetes.io/hostname":"web.k8s.test"}},"spec":{"type":"LoadBalancer","ports":[{"port":443,"nodePort":31000}]},"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.10"}]}}},{"apiVersion":"networking.k8s.io/v1","kind":"Ingress","metadata":{"name":"shop","namespace":"default"},"spec":{"rules":[{"host":"shop.k8s.test","http":{"paths":[]}}]},"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.20"}]}}}]}"#
        do {
            let snapshot = try SnapshotFile.decode(Array(json.utf8))
            #expect(snapshot.services.first?.metadata.annotations == [ExternalDNS.hostnameAnnotation: "web.k8s.test"])
            #expect(snapshot.ingresses.map(\.metadata.name) == ["shop"])
            let records = DNSNames.records(services: snapshot.services, ingresses: snapshot.ingresses, hasHostPorts: { _ in false }, address: nil)
            #expect(records.names == [name("web.k8s.test"): [ip("192.0.2.10")], name("shop.k8s.test"): [ip("192.0.2.20")]])
        }
        // YAML, as kubectl get -o yaml writes it.
        let yaml = """
            apiVersion: v1
            kind: List
            items:
            - apiVersion: networking.k8s.io/v1
              kind: Ingress
              metadata: {name: shop, namespace: default}
              spec:
                rules:
                - host: shop.k8s.test
              status:
                loadBalancer:
                  ingress:
                  - ip: 192.0.2.20
            """
        #expect(try SnapshotFile.decode(yaml).ingresses.first?.status?.loadBalancer?.ingress?.first?.ip == "192.0.2.20")
    }
}

@Suite("The hosts file: sorted, atomic, written only when it changes")
struct HostsFileTests {
    @Test("one line per address, IPv4 before IPv6, names sorted, under epokd's header")
    func render() {
        let text = HostsFile.render([name("b.k8s.test"): [ip("192.0.2.10"), ip("2001:db8::10")], name("a.k8s.test"): [ip("192.0.2.10")],
                                     name("c.k8s.test"): [ip("192.0.2.9")]])
        #expect(text == HostsFile.header + "192.0.2.9 c.k8s.test\n192.0.2.10 a.k8s.test b.k8s.test\n2001:db8::10 b.k8s.test\n")
        #expect(HostsFile.render([:]) == HostsFile.header)
    }

    @Test("replaced by a rename, only when the content changes; what it holds reads back by name; no temporary file is left")
    func write() throws {
        let scratch = try ScratchDirectory("hosts")
        let path = scratch.path + "/epokd.hosts"
        let file = try HostsFile(path: path, address: nil)
        #expect(try file.update([name("web.k8s.test"): [ip("192.0.2.10")]]))
        var first = stat()
        #expect(stat(path, &first) == 0 && first.st_mode & 0o777 == 0o644)
        #expect(try !file.update([name("web.k8s.test"): [ip("192.0.2.10")]]), "the same names: not written again")
        var same = stat()
        #expect(stat(path, &same) == 0 && same.st_ino == first.st_ino)
        #expect(try file.update([name("web.k8s.test"): [ip("192.0.2.11")], name("api.k8s.test"): [ip("2001:db8::1")]]))
        var second = stat()
        #expect(stat(path, &second) == 0 && second.st_ino != first.st_ino, "a new file renamed over the old one")
        let read = try #require(HostsFile.read(path))
        #expect(read.map(\.name) == ["api.k8s.test", "web.k8s.test"] && read.map(\.addresses) == [["2001:db8::1"], ["192.0.2.11"]])
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.path) == ["epokd.hosts"])
        // A restart that finds the same content does not write it again.
        #expect(try !HostsFile(path: path, address: nil).update([name("web.k8s.test"): [ip("192.0.2.11")], name("api.k8s.test"): [ip("2001:db8::1")]]))
        #expect(HostsFile.read(scratch.path + "/absent") == nil)
    }

    @Test("a missing directory or a directory given as the file is an error naming it")
    func badPaths() throws {
        let scratch = try ScratchDirectory("hostsbad")
        #expect { try HostsFile(path: scratch.path + "/no/such/dir/epokd.hosts", address: nil) } throws: {
            "\($0)".contains("the directory \(scratch.path)/no/such/dir does not exist")
        }
        #expect { try HostsFile(path: scratch.path, address: nil) } throws: { "\($0)".contains("is a directory") }
    }
}
