"""The status page in a real browser: Playwright for Python driving Debian's chromium against the daemon.

Run by scripts/test.sh as root: `python3 Tests/Browser/status_page_test.py EPOKD [SCREENSHOT]`. It makes a
network namespace of its own (deleted at the end), runs epokd there with a snapshot file as its source, and
points chromium, in the same namespace, at the page. It checks that the page lists the mappings with their
nodes; that a Service added to the file appears and a Node made NotReady shows `not ready`, both without a
reload; that an annotation holding markup is shown as text and runs nothing; that no request leaves for
another origin; and that no script error happens. It saves a screenshot (SCREENSHOT, default
status-page.png in a temporary folder) and exits 1 on the first failure, saying what failed.
"""

import os
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

NAMESPACE = f"epk-browser-{os.getpid()}"
PORT = 9899
ORIGIN = f"http://127.0.0.1:{PORT}"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def service(name, host_port, node_port, annotations=None):
    notes = {"epok.getbetter.ro/externalports": f"{host_port}:{node_port}"}
    notes.update(annotations or {})
    lines = "\n".join(f"      {key}: {quote(value)}" for key, value in notes.items())
    return f"""- apiVersion: v1
  kind: Service
  metadata:
    name: {name}
    namespace: shop
    creationTimestamp: "2024-03-01T12:00:00Z"
    annotations:
{lines}
  spec:
    type: NodePort
    ports:
    - {{name: http, protocol: TCP, port: 80, nodePort: {node_port}}}
"""


def quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node(name, address, ready=True):
    return f"""- apiVersion: v1
  kind: Node
  metadata: {{name: {name}}}
  status:
    addresses: [{{type: InternalIP, address: {address}}}]
    conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]
"""


def snapshot(services, nodes):
    return "apiVersion: v1\nkind: List\nitems:\n" + "".join(services) + "".join(nodes)


def write(path, text):
    # Written beside and renamed, as an editor or a ConfigMap update does: epokd never reads half a file.
    with open(path + ".new", "w") as f:
        f.write(text)
    os.rename(path + ".new", path)


def fail(message):
    print(f"browser test: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run(*command):
    subprocess.run(command, check=True)


def main():
    epokd = sys.argv[1]
    shot = sys.argv[2] if len(sys.argv) > 2 else os.path.join(tempfile.mkdtemp(prefix="epokd-browser-"), "status-page.png")
    run("ip", "netns", "add", NAMESPACE)
    try:
        run("ip", "-n", NAMESPACE, "link", "set", "lo", "up")
        run("ip", "-n", NAMESPACE, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        run("ip", "-n", NAMESPACE, "link", "set", "eth0", "up")
        # epokd, Playwright's driver and chromium all run in the namespace, where the page is on loopback.
        status = subprocess.run(["ip", "netns", "exec", NAMESPACE, sys.executable, os.path.abspath(__file__), "--inside", epokd, shot]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE])
    if status != 0:
        sys.exit(status)
    print(f"browser test: passed; screenshot {shot}")


def inside(epokd, shot):
    work = tempfile.mkdtemp(prefix="epokd-browser-")
    source = os.path.join(work, "cluster.yaml")
    services = [
        service("web", 8080, 30080),
        service("api", 8443, 30443, {"epok.getbetter.ro/allow-range": "192.0.2.0/24"}),
        # Markup in an annotation: it must reach the page as text (in the problem it causes) and run nothing.
        service("evil", 9090, 30090, {"epok.getbetter.ro/allow-range": HOSTILE}),
    ]
    nodes = [node("node-1", "10.0.1.1"), node("node-2", "10.0.1.2")]
    write(source, snapshot(services, nodes))
    log_path = os.path.join(work, "epokd.log")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([epokd, "--interfaces", "eth0", "--external-interface", "eth0", "--source", source,
                                   "--metrics-address", f"127.0.0.1:{PORT}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        browse(source, services, nodes, shot)
    except Exception as error:
        fail(f"{error}\n--- epokd's log:\n{open(log_path).read()[-3000:]}")
    finally:
        daemon.terminate()
        daemon.wait()


def browse(source, services, nodes, shot):
    foreign, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: None if r.url.startswith(ORIGIN + "/") else foreign.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        # The daemon may still be starting: the page is there once /healthz answers.
        for _ in range(200):
            try:
                if page.request.get(ORIGIN + "/healthz").ok:
                    break
            except Exception:
                pass
            page.wait_for_timeout(50)
        page.goto(ORIGIN + "/")
        mappings = page.locator("#mappings")
        mappings.get_by_text("shop/web").wait_for(timeout=10000)
        row = mappings.locator("tr", has_text="8080/tcp")
        for name in ["node-1 ready", "node-2 ready"]:
            if row.get_by_text(name).count() != 1:
                fail(f"the row of 8080/tcp does not show {name!r}: {row.inner_text()!r}")
        if "allow 192.0.2.0/24" not in mappings.locator("tr", has_text="8443/tcp").inner_text():
            fail("the allow-range of shop/api is not shown")
        problems = page.locator("#problems")
        problems.get_by_text(HOSTILE, exact=False).wait_for(timeout=10000)
        if page.evaluate("window.__pwned") is not None or page.locator("#problems img").count() != 0:
            fail("the annotation's markup became an element or ran")
        url = page.url

        # A Service added to the source appears without a reload.
        services.append(service("added", 8081, 30081))
        write(source, snapshot(services, nodes))
        mappings.get_by_text("shop/added").wait_for(timeout=3000)
        # A Node made NotReady shows so.
        nodes[1] = node("node-2", "10.0.1.2", ready=False)
        write(source, snapshot(services, nodes))
        row.get_by_text("node-2 not ready").wait_for(timeout=3000)
        if page.url != url:
            fail("the page reloaded")
        page.screenshot(path=shot, full_page=True)
        browser.close()
    if foreign:
        fail(f"requests left for another origin: {foreign}")
    if errors:
        fail(f"script errors: {errors}")


if __name__ == "__main__":
    if sys.argv[1] == "--inside":
        inside(sys.argv[2], sys.argv[3])
    else:
        main()
