#!/usr/bin/env bash
# Installs every Debian package epokd's build, tests, demo and benchmarks need.
# Idempotent: when everything is present it only checks and returns.
set -euo pipefail

packages=(
  libnftnl-dev libmnl-dev libnetfilter-conntrack-dev libcurl4-openssl-dev
  nftables iproute2 conntrack iptables procps socat openssl pkg-config time gcc libc6-dev util-linux iputils-ping
  # The router's DNS test: dnsmasq (the binary only: no system service that would take port 53) and dig.
  dnsmasq-base bind9-dnsutils
  # The status page's browser test: Debian's chromium, driven by Playwright for Python (below, from PyPI).
  chromium
  # The pair of routers (deploy/ha): VRRP and connection-table replication, run by the tests in namespaces only.
  keepalived conntrackd
)
# The fake API server is Python (stdlib only); its tests drive it with real kubectl.
command -v python3 >/dev/null || packages+=(python3)
command -v kubectl >/dev/null || packages+=(kubernetes-client)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Installing keepalived or conntrackd must not start them as services on this host (the tests run their own,
  # inside namespaces): services stay stopped during the install, as in a container build.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: all ${#packages[@]} packages present"

# Playwright for Python, pinned; it drives Debian's chromium (it downloads no browser of its own).
playwright=playwright==1.65.3
if ! python3 -c 'import playwright' 2>/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore)
  echo "setup: installing $playwright from PyPI"
  # Debian's own Python refuses pip outside a virtual environment (PEP 668) unless told.
  python3 -m pip install "${pip_flags[@]}" "$playwright" 2>/dev/null \
    || python3 -m pip install "${pip_flags[@]}" --break-system-packages "$playwright"
fi
echo "setup: $(python3 -c 'import importlib.metadata as m; print("playwright", m.version("playwright"))') present"
