import Control
import Dataplane
import Foundation
import Synchronization

/// `/status.json`: what `epokd status --json` prints, and what the daemon knows beyond the table (every Node's
/// state in words, the problems, the last warnings, the last commit, the programming latency) and the traffic
/// history the page draws.
struct LiveStatus: Encodable {
    var report: StatusReport
    var view: LoopView
    var history: TrafficHistory.Samples
    var version = epokdVersion
    var generated = Date()

    private enum Keys: String, CodingKey {
        case nodes, problems, problemCount, warnings, lastCommit, role, history, version, generated
    }

    func encode(to encoder: any Encoder) throws {
        try report.encode(to: encoder)
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(view.nodes, forKey: .nodes)
        try c.encode(view.problems, forKey: .problems)
        try c.encode(view.problemCount, forKey: .problemCount)
        try c.encode(view.warnings, forKey: .warnings)
        try c.encodeIfPresent(view.lastCommit, forKey: .lastCommit)
        try c.encodeIfPresent(view.role, forKey: .role)
        try c.encode(history, forKey: .history)
        try c.encode(version, forKey: .version)
        try c.encode(generated, forKey: .generated)
    }

    /// The JSON `/status.json` serves: times in seconds since 1970.
    func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .secondsSince1970
        return (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

/// Each mapping's packet and byte counters, sampled every `interval` for the last 15 minutes, for the page's
/// graphs. Only the `services` map is read (one dump); at most `maxMappings` mappings are kept (the first by
/// protocol and port), so the history stays small on a large table.
final class TrafficHistory: Sendable {
    struct Samples: Encodable, Sendable {
        var intervalSeconds: Double
        /// `tcp/8080`: [time, packets, bytes] rows, oldest first (cumulative counters).
        var mappings: [String: [[Double]]] = [:]
        /// Mappings beyond `maxMappings`, not kept.
        var omitted = 0
    }

    static let maxMappings = 2_000
    let interval: TimeInterval
    private let kept: Int
    private let samples: Mutex<Samples>

    init(interval: TimeInterval = 10, window: TimeInterval = 15 * 60) {
        self.interval = interval
        kept = Int(window / interval) + 1
        samples = Mutex(Samples(intervalSeconds: interval))
    }

    var current: Samples { samples.withLock { $0 } }

    /// Reads the counters once and appends them.
    func sample(_ nftables: Nftables, _ table: Table) {
        let now = Date().timeIntervalSince1970
        // The first `maxMappings` by protocol and port, cut down as the dump is read: at most twice as many held.
        var rows: [(proto: L4Protocol, port: Dataplane.Port, counter: ElementCounter)] = [], count = 0
        func keepFirst() {
            rows.sort { ($0.proto, $0.port) < ($1.proto, $1.port) }
            rows.removeLast(max(0, rows.count - Self.maxMappings))
        }
        do {
            try nftables.forEachCounter(of: ForwardingRuleset.servicesSet, in: table) { key, counter in
                guard case .l4proto(let proto)? = key.key.first, case .port(let port)? = key.key.last else { return }
                rows.append((proto, port, counter))
                count += 1
                if rows.count == 2 * Self.maxMappings { keepFirst() }
            }
        } catch {
            return
        }
        keepFirst()
        let omitted = count - rows.count
        samples.withLock { held in
            var next: [String: [[Double]]] = [:]
            for (proto, port, counter) in rows {
                let name = "\(proto)/\(port)"
                var series = held.mappings[name] ?? []
                series.append([now, Double(counter.packets), Double(counter.bytes)])
                if series.count > kept { series.removeFirst(series.count - kept) }
                next[name] = series
            }
            held.mappings = next
            held.omitted = omitted
        }
    }

    /// Samples every `interval` until `stop`, on a thread of its own.
    func start(namespacePath: String?, table: Table, until stop: StopSignal) throws(ThreadRefused) {
        try OwnThread.start("epokd-history") { [self] in
            guard let nftables = try? Nftables(namespacePath: namespacePath) else { return }
            repeat { sample(nftables, table) } while !stop.wait(seconds: interval)
        }
    }
}

/// The status page `/`: one HTML document with its style and script inline, nothing fetched from anywhere but
/// `status.json` beside it. Every value from the cluster is set as text (`textContent`), never as markup.
enum StatusPage {
    /// Sent with the page: nothing but this page's own inline script and style, and requests to its own origin.
    static let contentSecurityPolicy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

    static let html = #"""
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>epokd</title>
<link rel="icon" href="data:,">
<style>
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2430; --mute:#6b7484; --line:#e3e6eb; --ok:#1f8a4c; --warn:#b7791f; --bad:#c53030; --info:#2b6cb0; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--ink); }
header { display:flex; flex-wrap:wrap; gap:18px; align-items:baseline; padding:14px 22px; background:#1d2430; color:#fff; }
header h1 { font-size:18px; margin:0; letter-spacing:.5px; }
header .fact { color:#c9d1de; } header .fact b { color:#fff; font-weight:600; }
#conn { margin-left:auto; font-size:12px; } #conn.bad { color:#feb2b2; }
main { padding:12px 22px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; margin:14px 0; padding:10px 14px; }
section h2 { font-size:15px; margin:4px 0 8px; } section h2 .count { color:var(--mute); font-weight:400; }
table { border-collapse:collapse; width:100%; } th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:12px; color:var(--mute); font-weight:600; text-transform:uppercase; letter-spacing:.3px; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.mono { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:13px; }
.chip { display:inline-block; margin:1px 4px 1px 0; padding:0 7px; border-radius:10px; font-size:12px; border:1px solid; white-space:nowrap; }
.s-ready { color:var(--ok); border-color:#9ae6b4; background:#f0fff4; }
.s-not-ready, .s-down, .s-no-address { color:var(--bad); border-color:#feb2b2; background:#fff5f5; }
.s-excluded { color:var(--mute); border-color:var(--line); background:#f7fafc; }
.s-draining { color:var(--warn); border-color:#fbd38d; background:#fffaf0; }
.tag { color:var(--info); } .empty { color:var(--mute); font-style:italic; }
svg.spark { width:140px; height:28px; vertical-align:middle; } svg.spark polyline { fill:none; stroke-width:1.5; }
.rate { color:var(--mute); font-size:12px; white-space:nowrap; }
.problem td:first-child { white-space:nowrap; }
</style>
</head>
<body>
<header>
  <h1>epokd</h1>
  <span class="fact">table <b id="table">-</b></span>
  <span class="fact">last commit <b id="commit">-</b></span>
  <span class="fact">programming p50 <b id="p50">-</b> p99 <b id="p99">-</b></span>
  <span class="fact">problems <b id="problemCount">-</b></span>
  <span class="fact" id="roleFact" hidden>role <b id="role">-</b></span>
  <span id="conn">connecting…</span>
</header>
<main>
  <section><h2>Mappings <span class="count" id="mappingCount"></span></h2><table id="mappings"></table></section>
  <section><h2>Nodes <span class="count" id="nodeCount"></span></h2><table id="nodes"></table></section>
  <section><h2>LoadBalancer IPs <span class="count" id="lbCount"></span></h2><table id="loadBalancers"></table><p id="dropped" class="rate"></p></section>
  <section><h2>Egress and bridges <span class="count" id="egressCount"></span></h2><table id="egress"></table><table id="entrances"></table></section>
  <section><h2>Problems</h2><table id="problems"></table></section>
  <section><h2>Last warnings</h2><table id="warnings"></table></section>
</main>
<script>
'use strict';
const byId = (id) => document.getElementById(id);
function el(tag, props, children) {
  const e = document.createElement(tag);
  if (props) for (const [k, v] of Object.entries(props)) { if (k === 'text') e.textContent = String(v); else e.setAttribute(k, String(v)); }
  for (const c of children || []) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function fill(table, head, rows, none) {
  table.replaceChildren();
  if (rows.length === 0) { table.append(el('tr', null, [el('td', { class: 'empty', text: none })])); return; }
  table.append(el('tr', null, head.map((h) => el('th', { text: h }))));
  for (const r of rows) table.append(r);
}
function chip(text, state) { return el('span', { class: 'chip s-' + state.replace(/ /g, '-'), text: text + ' ' + state }); }
function ago(t) {
  if (!t) return '-';
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? Math.round(s) + ' s ago' : s < 3600 ? Math.round(s / 60) + ' min ago' : new Date(t * 1000).toLocaleString();
}
function ms(s) { return s === undefined || s === null ? '-' : (s * 1000 < 1 ? '<1' : Math.round(s * 1000)) + ' ms'; }
function human(n) { const u = ['', 'k', 'M', 'G', 'T']; let i = 0; while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; } return (i ? n.toFixed(1) : Math.round(n)) + u[i]; }
function rates(series, index) {
  const out = [];
  for (let i = 1; i < series.length; i++) {
    const dt = series[i][0] - series[i - 1][0];
    out.push(dt > 0 ? Math.max(0, series[i][index] - series[i - 1][index]) / dt : 0);
  }
  return out;
}
function spark(values, color) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'spark'); svg.setAttribute('viewBox', '0 0 140 28'); svg.setAttribute('preserveAspectRatio', 'none');
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
    line.setAttribute('points', values.map((v, i) => (i * 140 / (values.length - 1)).toFixed(1) + ',' + (27 - v / max * 25).toFixed(1)).join(' '));
    line.setAttribute('stroke', color);
    svg.append(line);
  }
  return svg;
}
function render(s) {
  byId('table').textContent = s.table;
  byId('commit').textContent = ago(s.lastCommit);
  byId('p50').textContent = ms(s.programming && s.programming.p50Seconds);
  byId('p99').textContent = ms(s.programming && s.programming.p99Seconds);
  byId('problemCount').textContent = String(s.problemCount || 0);
  byId('roleFact').hidden = !s.role;
  if (s.role) {
    byId('role').textContent = (s.role.active ? 'active' : 'standby') + ' (follows ' + s.role.follows.join(', ') + ', ' + ago(s.role.since) + ')'
      + (s.role.alsoActive ? '; split brain with ' + s.role.alsoActive : '');
  }
  const nodes = s.nodes || [];
  const nameOf = new Map();
  for (const n of nodes) for (const a of n.addresses) nameOf.set(a, n.name);
  byId('mappingCount').textContent = '(' + s.mappings.length + ')';
  fill(byId('mappings'), ['Host port', 'Service', 'Node port', 'Nodes', 'Access', 'Limit', 'Traffic (15 min)', 'Total'],
    s.mappings.map((m) => {
      const down = new Set(m.down.map((d) => nameOf.get(d) || d)), draining = new Set(m.draining);
      let chips;
      if (m.ownGroup) {
        chips = m.nodes.map((a) => chip(nameOf.get(a) || a, down.has(nameOf.get(a) || a) ? 'down' : 'ready'))
          .concat([...down].filter((d) => !m.nodes.some((a) => (nameOf.get(a) || a) === d)).map((d) => chip(d, 'down')));
      } else {
        chips = nodes.map((n) => chip(n.name, down.has(n.name) ? 'down' : draining.has(n.name) ? 'draining' : n.state));
      }
      const access = [];
      if (m.internalOnly) access.push(el('span', { class: 'tag', text: 'internal' }));
      if (m.allowedSources) access.push(el('span', { class: 'tag', text: 'allow ' + m.allowedSources.join(', ') }));
      if (access.length === 0) access.push('any');
      const series = (s.history.mappings || {})[m.proto + '/' + m.hostPort] || [];
      const packets = rates(series, 1), bytes = rates(series, 2);
      const traffic = el('td', null, [spark(packets, '#2b6cb0'), el('span', { class: 'rate', text: ' ' + human(packets.length ? packets[packets.length - 1] : 0) + ' pkt/s, ' + human(bytes.length ? bytes[bytes.length - 1] : 0) + 'B/s' })]);
      return el('tr', null, [
        el('td', { class: 'mono', text: m.hostPort + '/' + m.proto }),
        el('td', { text: m.service || '-' }),
        el('td', { class: 'mono', text: String(m.nodePort) }),
        el('td', null, chips.length ? chips : [el('span', { class: 'empty', text: 'no node' })]),
        el('td', null, access),
        el('td', { text: m.limit || '-' }),
        traffic,
        el('td', { class: 'num', text: human(m.packets) + ' pkt, ' + human(m.bytes) + 'B' }),
      ]);
    }), 'No mapping: no Service with epok.getbetter.ro/externalports is forwarded.');
  byId('nodeCount').textContent = '(' + nodes.length + ')';
  fill(byId('nodes'), ['Node', 'InternalIP', 'State'],
    nodes.map((n) => el('tr', null, [el('td', { text: n.name }), el('td', { class: 'mono', text: n.addresses.join(', ') }), el('td', null, [chip('', n.state)])])),
    'No Node known yet.');
  byId('lbCount').textContent = '(' + s.loadBalancers.length + ')';
  fill(byId('loadBalancers'), ['Address', 'Service', 'Access', 'Limit', 'Per source', 'Admitted', 'Denied by range'],
    s.loadBalancers.map((l) => el('tr', null, [
      el('td', { class: 'mono', text: (l.address.includes(':') ? '[' + l.address + ']' : l.address) + ':' + l.port + '/' + l.proto }),
      el('td', { text: l.service || '-' }),
      el('td', { text: l.allowedSources ? 'allow ' + l.allowedSources.join(', ') : 'any' }),
      el('td', { text: l.limit || '-' }), el('td', { text: l.perSourceLimit || '-' }),
      el('td', { class: 'num', text: human(l.admittedFlows) }), el('td', { class: 'num', text: human(l.deniedPackets) }),
    ])), 'No LoadBalancer IP is admitted (no --firewall-interface, or no LoadBalancer Service).');
  const dropped = Object.entries(s.firewallDropped || {}).map(([i, p]) => i + ': ' + human(p) + ' packets not admitted');
  byId('dropped').textContent = dropped.join(' · ');
  byId('egressCount').textContent = '(' + (s.egress.length + s.entrances.length) + ')';
  fill(byId('egress'), ['Pod', 'To', 'Leaves as', 'Rule', 'Flows'],
    s.egress.map((e) => el('tr', null, [el('td', { class: 'mono', text: e.pod }), el('td', { class: 'mono', text: e.destinations.join(', ') }),
      el('td', { class: 'mono', text: e.egress }), el('td', { text: e.rule || '-' }), el('td', { class: 'num', text: human(e.flows) })])),
    'No static egress address or bridge exit.');
  fill(byId('entrances'), ['Entrance', 'From', 'To endpoints', 'Bridge'],
    s.entrances.map((e) => el('tr', null, [el('td', { class: 'mono', text: e.entrance }), el('td', { class: 'mono', text: e.client }),
      el('td', { class: 'mono', text: e.endpoints.join(', ') }), el('td', { text: e.bridge || '-' })])), 'No bridge entrance.');
  fill(byId('problems'), ['Object', 'Reason', 'What is wrong'],
    (s.problems || []).map((p) => el('tr', { class: 'problem' }, [el('td', { text: p.object }), el('td', { text: p.reason }), el('td', { text: p.message })])),
    'No problem: every Service, Node and resource is handled as written.');
  fill(byId('warnings'), ['When', 'Object', 'Reason', 'Message'],
    (s.warnings || []).slice().reverse().map((w) => el('tr', null, [el('td', { text: ago(w.time) }), el('td', { text: w.object }), el('td', { text: w.reason }), el('td', { text: w.message })])),
    'No warning since epokd started.');
}
async function refresh() {
  const conn = byId('conn');
  try {
    const response = await fetch('status.json', { cache: 'no-store' });
    if (!response.ok) throw new Error('HTTP ' + response.status);
    render(await response.json());
    conn.textContent = 'updated ' + new Date().toLocaleTimeString(); conn.className = '';
  } catch (e) {
    conn.textContent = 'epokd unreachable: ' + e.message; conn.className = 'bad';
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""#
}
