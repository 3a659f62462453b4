#!/usr/bin/env python3
"""A fake Kubernetes API server for epokd's tests and demo, written from the API conventions
(https://kubernetes.io/docs/reference/using-api/api-concepts/), not from epokd's client.

Serves core/v1 Services, Nodes, Namespaces and Events over HTTPS on loopback:
  - list with resourceVersion, limit/continue pagination (expired continue tokens answer 410 Gone);
  - watch (?watch=1) as a chunked stream of JSON events: ADDED, MODIFIED, DELETED, BOOKMARK
    (with allowWatchBookmarks) and ERROR (410 "too old resource version" after a compaction);
  - create (POST), replace (PUT), merge and strategic-merge patch (treated as JSON merge patch),
    delete, with resourceVersion, uid and creationTimestamp kept as the API server keeps them;
  - discovery (/api, /api/v1, /apis, /version) so that real kubectl works against it;
  - authentication by bearer token or by a client certificate signed by the test CA; 401/403 as
    metav1.Status objects;
  - ServiceAccounts with the TokenRequest subresource (`kubectl create token`: a token then accepted as
    system:serviceaccount:NAMESPACE:NAME), and ClusterRoles and ClusterRoleBindings, stored (RBAC is not enforced;
    `forbid` below answers 403). No OpenAPI schema is served: kubectl apply needs --validate=false.
Test hooks under /fake/ (POST): compact, drop-watches, fail (answer N requests with a status),
split-chunks (cut every event across chunk boundaries), coalesce (several events per chunk),
forbid (403 for a resource), bookmark-interval, slow-writes (delay POSTs to a resource), slow-lists (delay each list page
of a resource), inject (raw bytes into watch streams),
empty-watches (watches that end at once). Stdlib only.
"""
import argparse
import bisect
import copy
import datetime
import json
import os
import random
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESOURCES = {
    # plural: (kind, namespaced)
    "services": ("Service", True),
    "nodes": ("Node", False),
    "namespaces": ("Namespace", False),
    "events": ("Event", True),
    "endpointslices": ("EndpointSlice", True),
    "staticegressips": ("StaticEgressIP", True),
    "externalservices": ("ExternalService", True),
    "ingresses": ("Ingress", True),
    "referencegrants": ("ReferenceGrant", True),
    "serviceaccounts": ("ServiceAccount", True),
    "clusterroles": ("ClusterRole", False),
    "clusterrolebindings": ("ClusterRoleBinding", False),
    "leases": ("Lease", True),
    "roles": ("Role", True),
    "rolebindings": ("RoleBinding", True),
}
# The API group/version of each resource outside the core group (served under /apis/GROUP/VERSION).
# The two custom resources are served as if their CRDs were installed (kube-static-egress-ip's and
# k8s-ext-connector's), so that kubectl can apply them.
GROUP_VERSIONS = {"endpointslices": "discovery.k8s.io/v1", "staticegressips": "staticegressips.nirmata.io/v1alpha1",
                  "externalservices": "submariner.io/v1alpha1", "ingresses": "networking.k8s.io/v1",
                  "referencegrants": "gateway.networking.k8s.io/v1beta1", "clusterroles": "rbac.authorization.k8s.io/v1",
                  "clusterrolebindings": "rbac.authorization.k8s.io/v1", "leases": "coordination.k8s.io/v1",
                  "roles": "rbac.authorization.k8s.io/v1", "rolebindings": "rbac.authorization.k8s.io/v1"}
SHORT_NAMES = {"services": ["svc"], "nodes": ["no"], "namespaces": ["ns"], "events": ["ev"], "endpointslices": [],
               "staticegressips": [], "externalservices": [], "ingresses": ["ing"], "referencegrants": ["refgrant"],
               "serviceaccounts": ["sa"], "clusterroles": [], "clusterrolebindings": [], "leases": [], "roles": [], "rolebindings": []}


def group_version(plural):
    return GROUP_VERSIONS.get(plural, "v1")


class Store:
    def __init__(self):
        self.lock = threading.Condition()
        self.rv = 1000
        self.objects = {plural: {} for plural in RESOURCES}   # plural -> key -> object
        self.history = []                                      # (rv, plural, type, object)
        self.compacted = 0                                      # watches from rv < compacted get 410
        self.continues = {}                                     # token -> (rv, remaining keys)
        self.watch_generation = 0                               # bumped to drop every watch

    def now(self):
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def key(self, namespace, name):
        return f"{namespace}/{name}" if namespace else name

    def record(self, plural, event_type, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, plural, event_type, copy.deepcopy(obj)))
        self.lock.notify_all()

    def create(self, plural, namespace, obj):
        kind, namespaced = RESOURCES[plural]
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            return 422, status(422, "Invalid", "metadata.name: Required value")
        if namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        key = self.key(meta.get("namespace") if namespaced else None, meta["name"])
        with self.lock:
            if key in self.objects[plural]:
                return 409, status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            obj["apiVersion"], obj["kind"] = group_version(plural), kind
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = meta.get("creationTimestamp") or self.now()
            if plural == "services":
                assign_node_ports(obj, self.objects["services"].values())
            self.objects[plural][key] = obj
            self.record(plural, "ADDED", obj)
            return 201, copy.deepcopy(obj)

    def replace(self, plural, key, obj, merge):
        with self.lock:
            current = self.objects[plural].get(key)
            if current is None:
                return 404, status(404, "NotFound", f'{plural} "{key.split("/")[-1]}" not found')
            expected = obj.get("metadata", {}).get("resourceVersion")
            if not merge and expected and expected != current["metadata"]["resourceVersion"]:
                return 409, status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
            if merge:
                updated = merge_patch(copy.deepcopy(current), obj)
            else:
                updated = obj
                for field in ("uid", "creationTimestamp", "namespace", "name"):
                    if field in current["metadata"]:
                        updated.setdefault("metadata", {})[field] = current["metadata"][field]
                updated["apiVersion"], updated["kind"] = current["apiVersion"], current["kind"]
            if updated == current:
                return 200, copy.deepcopy(current)
            self.objects[plural][key] = updated
            self.record(plural, "MODIFIED", updated)
            return 200, copy.deepcopy(updated)

    def delete(self, plural, key):
        with self.lock:
            current = self.objects[plural].pop(key, None)
            if current is None:
                return 404, status(404, "NotFound", f'{plural} "{key.split("/")[-1]}" not found')
            self.record(plural, "DELETED", current)
            return 200, copy.deepcopy(current)


def assign_node_ports(service, existing):
    if service.get("spec", {}).get("type") not in ("NodePort", "LoadBalancer"):
        return
    ports = service["spec"].get("ports", [])
    for port in ports:
        port.setdefault("protocol", "TCP")
    if all(port.get("nodePort") for port in ports):
        return  # nothing to assign: no walk over every Service (a seed of 50k stays linear)
    used = {p.get("nodePort") for s in existing for p in s.get("spec", {}).get("ports", [])}
    for port in ports:
        if not port.get("nodePort"):
            port["nodePort"] = next(n for n in range(30000, 32768) if n not in used)
            used.add(port["nodePort"])


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge_patch(target.get(k), v)
    return target


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.fail = []            # [(status, remaining)]
        self.split_chunks = False
        self.coalesce = False
        self.forbidden = set()    # resource plurals answered with 403
        self.empty_watches = 0     # watches answered 200 and ended at once, with no event
        self.empty_watches_served = 0
        self.slow_writes = {}     # resource plural -> seconds each POST to it waits before it is answered
        self.slow_lists = {}      # resource plural -> seconds each list page of it waits before it is answered
        self.list_pages_served = {}  # resource plural -> list pages answered
        self.bookmark_interval = 1.0
        self.list_expired_continue = False


class Sends:
    """When the watch events that remap host ports (control `remap`) were written to a watch's socket: the server's
    send, for the latency benchmark. Ports are tracked only while a remap asks for them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}   # port -> the time its event was first written, or None until it is

    def track(self, ports):
        with self.lock:
            for port in ports:
                self.sent[port] = None

    def record(self, events):
        if not self.sent:
            return
        now = time.time()
        with self.lock:
            for e in events:
                o = e.get("object") if isinstance(e, dict) else None
                text = ((o or {}).get("metadata", {}).get("annotations") or {}).get("epok.getbetter.ro/externalports", "")
                port = text.split(":")[0]
                if port.isdigit() and self.sent.get(int(port), 0) is None:
                    self.sent[int(port)] = now

    def take(self, ports, timeout):
        """The send times of `ports` (waiting up to `timeout` seconds for them), no longer tracked; None if not sent."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if all(self.sent.get(p) is not None for p in ports):
                    break
            time.sleep(0.05)
        with self.lock:
            return [self.sent.pop(p, None) for p in ports]


STORE = Store()
FAULTS = Faults()
SENDS = Sends()
CONFIG = {}
# Tokens minted by TokenRequest: token -> the ServiceAccount's user name.
ISSUED_TOKENS = {}


class QuietServer(ThreadingHTTPServer):
    """A client that goes away mid-request (a killed daemon, a test's timeout) is no error worth a traceback."""

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-apiserver"

    def log_message(self, fmt, *args):
        if CONFIG.get("verbose"):
            sys.stderr.write("fake-apiserver: " + (fmt % args) + "\n")

    # -- plumbing ------------------------------------------------------------------------
    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def authenticated_user(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):]
            with open(CONFIG["token_file"]) as f:
                if token == f.read().strip():
                    return "system:serviceaccount:epok:epokd"
            return ISSUED_TOKENS.get(token)
        cert = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
        if cert:
            for rdn in cert.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        return v
        return None

    def dispatch(self, method):
        url = urllib.parse.urlparse(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if parts[:1] == ["fake"]:
            return self.fake_control(parts[1:], query)
        user = self.authenticated_user()
        if user is None:
            return self.send_json(401, status(401, "Unauthorized", "Unauthorized"))
        with FAULTS.lock:
            if FAULTS.fail:
                code, remaining = FAULTS.fail[0]
                FAULTS.fail = [(code, remaining - 1)] + FAULTS.fail[1:] if remaining > 1 else FAULTS.fail[1:]
                return self.send_json(code, status(code, "InternalError", f"injected failure {code}"))
        with FAULTS.lock:
            slow = FAULTS.slow_writes.get(parts[-1] if parts else "", 0) if method == "POST" else 0
        if slow:
            time.sleep(slow)
        if url.path in ("/version", "/version/"):
            return self.send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake", "platform": "linux/amd64"})
        if parts == ["api"]:
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        groups = sorted(set(GROUP_VERSIONS.values()))
        if parts == ["apis"]:
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in groups]})
        if len(parts) == 2 and parts[0] == "apis" and any(gv.split("/")[0] == parts[1] for gv in groups):
            gv = next(gv for gv in groups if gv.split("/")[0] == parts[1])
            return self.send_json(200, {"kind": "APIGroup", "apiVersion": "v1", "name": parts[1],
                                        "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                                        "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}})
        if parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis" and "/".join(parts[1:]) in groups):
            gv = "v1" if parts[0] == "api" else "/".join(parts[1:])
            return self.send_json(200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": SHORT_NAMES[plural]}
                for plural, (kind, namespaced) in RESOURCES.items() if group_version(plural) == gv]
                + ([{"name": "serviceaccounts/token", "singularName": "", "namespaced": True, "group": "authentication.k8s.io",
                     "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}] if gv == "v1" else [])})
        if parts[:2] == ["api", "v1"]:
            rest, gv = parts[2:], "v1"
        elif len(parts) >= 3 and parts[0] == "apis" and "/".join(parts[1:3]) in groups:
            rest, gv = parts[3:], "/".join(parts[1:3])
        else:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces" and rest[1] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in RESOURCES or group_version(rest[0]) != gv:
            return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        kind, namespaced = RESOURCES[plural]
        if plural == "serviceaccounts" and rest[2:] == ["token"] and method == "POST":
            return self.token_request(namespace, name)
        verb = {"GET": "watch" if query.get("watch") in ("1", "true") else ("get" if name else "list"),
                "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        if plural in FAULTS.forbidden:
            scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            return self.send_json(403, status(403, "Forbidden",
                f'{plural} is forbidden: User "{user}" cannot {verb} resource "{plural}" in API group "{gv.split("/")[0] if "/" in gv else ""}"{scope}'))
        key = STORE.key(namespace if namespaced else None, name) if name else None
        if verb == "watch":
            return self.watch(plural, namespace, query)
        if verb == "list":
            return self.list(plural, kind, namespace, query)
        if verb == "get":
            with STORE.lock:
                obj = STORE.objects[plural].get(key)
            return self.send_json(200, obj) if obj else self.send_json(404, status(404, "NotFound", f'{plural} "{name}" not found'))
        if verb == "create":
            return self.send_json(*STORE.create(plural, namespace, self.body()))
        if verb == "update":
            return self.send_json(*STORE.replace(plural, key, self.body(), merge=False))
        if verb == "patch":
            ctype = self.headers.get("Content-Type", "")
            if "json-patch+json" in ctype:
                return self.send_json(415, status(415, "UnsupportedMediaType", "json-patch is not supported by the fake"))
            return self.send_json(*STORE.replace(plural, key, self.body(), merge=True))
        if verb == "delete":
            self.body()   # DeleteOptions (propagationPolicy...) are accepted and ignored
            return self.send_json(*STORE.delete(plural, key))

    def token_request(self, namespace, name):
        """POST serviceaccounts/NAME/token (authentication.k8s.io/v1 TokenRequest), as `kubectl create token` sends it."""
        request = self.body()
        with STORE.lock:
            if STORE.key(namespace, name) not in STORE.objects["serviceaccounts"]:
                return self.send_json(404, status(404, "NotFound", f'serviceaccounts "{name}" not found'))
        token = "fake-sa-" + uuid.uuid4().hex
        ISSUED_TOKENS[token] = f"system:serviceaccount:{namespace}:{name}"
        seconds = (request.get("spec") or {}).get("expirationSeconds") or 3600
        expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self.send_json(201, {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                                    "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
                                    "spec": dict(request.get("spec") or {}, expirationSeconds=seconds),
                                    "status": {"token": token, "expirationTimestamp": expires}})

    def list(self, plural, kind, namespace, query):
        with FAULTS.lock:
            slow = FAULTS.slow_lists.get(plural, 0)
        if slow:
            time.sleep(slow)
        with FAULTS.lock:
            FAULTS.list_pages_served[plural] = FAULTS.list_pages_served.get(plural, 0) + 1
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with STORE.lock:
            if token:
                if FAULTS.list_expired_continue or token not in STORE.continues:
                    FAULTS.list_expired_continue = False
                    return self.send_json(410, status(410, "Expired", "The provided continue parameter is too old to display a consistent list result."))
                rv, keys = STORE.continues.pop(token)
            else:
                rv = STORE.rv
                keys = sorted(k for k in STORE.objects[plural] if not namespace or k.startswith(namespace + "/"))
                snapshot = {k: copy.deepcopy(STORE.objects[plural][k]) for k in keys}
                STORE.continues["snap-" + str(rv) + "-" + plural] = snapshot
            snap = STORE.continues.get("snap-" + str(rv) + "-" + plural, {})
            page, remaining = (keys[:limit], keys[limit:]) if limit else (keys, [])
            items = [snap[k] for k in page if k in snap]
            meta = {"resourceVersion": str(rv)}
            if remaining:
                next_token = uuid.uuid4().hex
                STORE.continues[next_token] = (rv, remaining)
                meta["continue"] = next_token
                meta["remainingItemCount"] = len(remaining)
        self.send_json(200, {"kind": kind + "List", "apiVersion": group_version(plural), "metadata": meta, "items": items})

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, plural, namespace, query):
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.time() + timeout
        # The generation first, then the faults: a test sets a fault and then drops the watches, so a watch that
        # missed the fault is one the drop ends (and the next one meets the fault).
        with STORE.lock:
            generation = STORE.watch_generation
        with FAULTS.lock:
            empty = FAULTS.empty_watches > 0
            if empty:
                FAULTS.empty_watches -= 1
                FAULTS.empty_watches_served += 1
        if empty:
            return self.finish_stream()
        with STORE.lock:
            if since and since < STORE.compacted:
                self.send_event({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since} ({STORE.compacted})")})
                return self.finish_stream()
            cursor = since or STORE.rv
            opened_at = STORE.rv
        last_bookmark = time.time()
        try:
            while time.time() < deadline:
                with STORE.lock:
                    if STORE.watch_generation != generation:
                        self.close_connection = True
                        return   # dropped mid-stream, without the terminating chunk
                    if not any(h[0] > cursor for h in STORE.history[-1:]):
                        STORE.lock.wait(0.1)
                    scanned_up_to = STORE.rv
                    # History is in resourceVersion order: only what came after the cursor is looked at.
                    start = bisect.bisect_right(STORE.history, cursor, key=lambda h: h[0])
                    pending = [h for h in STORE.history[start:] if h[0] <= scanned_up_to and h[1] == plural and
                               (not namespace or h[3]["metadata"].get("namespace") == namespace)]
                if pending:
                    events = []
                    for (rv, _, t, o) in pending:
                        if t in ("RAW", "STORED"):   # bytes injected by a test, sent as they are
                            if t == "RAW" and rv <= opened_at:
                                continue   # a fault of the streams open at the time, not part of history
                            if events:
                                self.send_events(events)
                                events = []
                            self.chunk(bytes(o))
                        else:
                            events.append({"type": t, "object": o})
                    if events:
                        self.send_events(events)
                # Every event of this resource up to scanned_up_to has now been sent.
                cursor = max(cursor, scanned_up_to)
                if bookmarks and time.time() - last_bookmark >= FAULTS.bookmark_interval:
                    kind = RESOURCES[plural][0]
                    self.send_event({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(cursor)}}})
                    last_bookmark = time.time()
            self.finish_stream()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    def send_event(self, event):
        self.send_events([event])

    def send_events(self, events):
        data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        if FAULTS.split_chunks:
            cuts = sorted(random.sample(range(1, len(data)), min(len(data) - 1, 3 * len(events))))
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                self.chunk(data[a:b])
        elif FAULTS.coalesce or len(events) == 1:
            self.chunk(data)
        else:
            for e in events:
                self.chunk(json.dumps(e).encode() + b"\n")
        SENDS.record(events)

    def finish_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def fake_control(self, parts, query):
        result = control(parts[0] if parts else "", query)
        self.send_json(200 if "error" not in result else 404, result)

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")


def control(action, query):
    """Test hooks, from /fake/ACTION?k=v or a line `ACTION k=v` on standard input."""
    if True:
        if action == "compact":
            with STORE.lock:
                STORE.compacted = STORE.rv + 1
        elif action == "drop-watches":
            with STORE.lock:
                STORE.watch_generation += 1
                STORE.lock.notify_all()
        elif action == "fail":
            with FAULTS.lock:
                FAULTS.fail.append((int(query.get("status", 500)), int(query.get("count", 1))))
        elif action == "split-chunks":
            FAULTS.split_chunks = query.get("on", "1") == "1"
        elif action == "coalesce":
            FAULTS.coalesce = query.get("on", "1") == "1"
        elif action == "forbid":
            FAULTS.forbidden = set(filter(None, query.get("resources", "").split(",")))
        elif action == "inject":
            # inject kind=services file=PATH: the file's bytes go to every watch of that resource as they are
            # (a malformed event, a stray byte), at a resourceVersion of their own
            # (stored=1: kept in history like an event, so a watch from an older resourceVersion gets it again;
            # the text RV in it becomes its resourceVersion)
            with open(query["file"], "rb") as f:
                raw = f.read()
            with STORE.lock:
                STORE.rv += 1
                raw = raw.replace(b"RV", str(STORE.rv).encode())
                STORE.history.append((STORE.rv, query["kind"], "STORED" if query.get("stored") == "1" else "RAW", raw))
                STORE.lock.notify_all()
                return {"resourceVersion": STORE.rv}
        elif action == "empty-watches":
            with FAULTS.lock:
                FAULTS.empty_watches = int(query.get("count", 1))
        elif action == "slow-writes":
            with FAULTS.lock:
                FAULTS.slow_writes[query["resource"]] = float(query.get("seconds", 30))
        elif action == "slow-lists":
            with FAULTS.lock:
                FAULTS.slow_lists[query["resource"]] = float(query.get("seconds", 30))
        elif action == "bookmark-interval":
            FAULTS.bookmark_interval = float(query.get("seconds", 1))
        elif action == "expire-continue":
            FAULTS.list_expired_continue = True
        elif action == "state":
            with STORE.lock:
                return {"resourceVersion": STORE.rv, "counts": {p: len(o) for p, o in STORE.objects.items()},
                        "emptyWatchesServed": FAULTS.empty_watches_served, "listPagesServed": FAULTS.list_pages_served}
        elif action == "apply":
            # apply kind=services namespace=ns file=PATH: create or merge an object from a JSON file
            with open(query["file"]) as f:
                obj = json.load(f)
            plural = query["kind"]
            namespaced = RESOURCES[plural][1]
            ns = query.get("namespace") or obj.get("metadata", {}).get("namespace") or ("default" if namespaced else None)
            key = STORE.key(ns if namespaced else None, obj["metadata"]["name"])
            with STORE.lock:
                exists = key in STORE.objects[plural]
            code, body = STORE.replace(plural, key, obj, merge=True) if exists else STORE.create(plural, ns, obj)
            return {"code": code}
        elif action == "churn":
            # churn kind=services name=N namespace=NS count=C rate=R: C annotation changes at R per second
            plural, count, rate = query["kind"], int(query["count"]), float(query["rate"])
            key = STORE.key(query.get("namespace") if RESOURCES[plural][1] else None, query["name"])

            def churn():
                start = time.time()
                for i in range(1, count + 1):
                    STORE.replace(plural, key, {"metadata": {"annotations": {"epok.getbetter.ro/churn": str(i)}}}, merge=True)
                    delay = start + i / rate - time.time()
                    if delay > 0:
                        time.sleep(delay)
            threading.Thread(target=churn, daemon=True).start()
        elif action == "remap":
            # remap first=F count=C port=P rate=R namespace=NS log=PATH: Service svc-(F+k), k < C, gets the annotation
            # externalports "P+k:NODEPORT" (its own node port), R per second (0: one after another); when all are made
            # and sent, PATH gets a line "PORT STORED SENT" for each: when the change was stored and handed to the
            # watches, and when its event was written to a watch's socket ("-" if it was not within 30 s)
            ns, first, count, port = query.get("namespace", "bench"), int(query["first"]), int(query["count"]), int(query["port"])
            rate = float(query.get("rate", 0))

            def remap():
                start, sent = time.time(), []
                SENDS.track(range(port, port + count))
                for k in range(count):
                    key = STORE.key(ns, f"svc-{first + k}")
                    with STORE.lock:
                        node_port = STORE.objects["services"][key]["spec"]["ports"][0]["nodePort"]
                    patch = {"metadata": {"annotations": {"epok.getbetter.ro/externalports": f"{port + k}:{node_port}"}}}
                    STORE.replace("services", key, patch, merge=True)
                    sent.append(time.time())
                    delay = start + (k + 1) / rate - time.time() if rate else 0
                    if delay > 0:
                        time.sleep(delay)
                written = SENDS.take(range(port, port + count), 30)
                with open(query["log"] + ".part", "w") as f:
                    f.writelines(f"{port + k} {stored:.6f} {'-' if at is None else f'{at:.6f}'}\n"
                                 for k, (stored, at) in enumerate(zip(sent, written)))
                os.rename(query["log"] + ".part", query["log"])
            threading.Thread(target=remap, daemon=True).start()
        elif action == "delete":
            plural = query["kind"]
            key = STORE.key(query.get("namespace") if RESOURCES[plural][1] else None, query["name"])
            return {"code": STORE.delete(plural, key)[0]}
        else:
            return {"error": "unknown fake control " + action}
        return {"ok": True}


def control_from_stdin():
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        query = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        result = control(words[0], query)
        print("ok " + words[0] + " " + json.dumps(result), flush=True)


def write_kubeconfig(path, port, ca, token_file, client_cert=None, client_key=None):
    user = {"client-certificate": client_cert, "client-key": client_key} if client_cert else {"tokenFile": token_file}
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"https://127.0.0.1:{port}", "certificate-authority": ca}}],
        "users": [{"name": "epokd", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "epokd"}}],
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True, help="CA of the server and of client certificates")
    parser.add_argument("--token-file", required=True, help="the bearer token accepted (re-read on every request)")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    parser.add_argument("--seed", help="a JSON or kubectl List of objects to start with")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--control-stdin", action="store_true", help="read test hooks as lines on standard input")
    args = parser.parse_args()
    CONFIG.update(token_file=args.token_file, verbose=args.verbose)
    if args.seed:
        with open(args.seed) as f:
            for item in json.load(f).get("items", []):
                plural = next(p for p, (kind, _) in RESOURCES.items() if kind == item["kind"])
                STORE.create(plural, item.get("metadata", {}).get("namespace"), item)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.load_verify_locations(args.ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    server = QuietServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, port, os.path.abspath(args.ca), os.path.abspath(args.token_file))
    print(f"listening on https://127.0.0.1:{port}", flush=True)
    if args.control_stdin:
        threading.Thread(target=control_from_stdin, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
