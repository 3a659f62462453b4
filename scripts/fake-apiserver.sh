#!/usr/bin/env bash
# Starts the fake Kubernetes API server on loopback with a test CA, a bearer token and a kubeconfig,
# so that epokd and real kubectl can be pointed at it:
#   scripts/fake-apiserver.sh [DIR]        (default DIR: /tmp/epokd-fake-apiserver)
#   export KUBECONFIG=DIR/kubeconfig; kubectl get services -A -w
# kubectl apply needs --validate=false (the fake serves no OpenAPI schema).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/epokd-fake-apiserver}
mkdir -p "$dir"
key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
if [ ! -f "$dir/server.crt" ]; then
  openssl req -x509 "${key[@]}" -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=epokd fake CA" -days 30 2>/dev/null
  openssl req "${key[@]}" -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/server.crt" -days 30 -extfile "$dir/server.ext" 2>/dev/null
fi
[ -f "$dir/token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/token"
echo "kubeconfig: $dir/kubeconfig"
exec python3 Tests/FakeAPIServer/fake_apiserver.py --port "${PORT:-6443}" --cert "$dir/server.crt" --key "$dir/server.key" \
  --ca "$dir/ca.crt" --token-file "$dir/token" --kubeconfig "$dir/kubeconfig" ${SEED:+--seed "$SEED"}
