#!/usr/bin/env bash
# The README walkthrough in one go, in a scratch directory: a backend, a database, an API, a
# client certificate, the gateway, and two calls with curl (with the certificate, and without).
# The gateway keeps serving until Ctrl-C; the directory is printed so you can call it yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin certgate
certgate=$PWD/target/release/certgate
dir=$(mktemp -d)
cd "$dir"
export CERTGATE_DB=$dir/certgate.db
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

# A backend: any HTTP server; here Python's, serving this directory on port 9080.
python3 -m http.server 9080 --bind 127.0.0.1 >backend.log 2>&1 &
pids+=($!)
until curl -s -o /dev/null http://127.0.0.1:9080/; do sleep 0.1; done

"$certgate" init >/dev/null
"$certgate" api add pizzashack --context /pizzashack --version 1.0.0 --backend http://127.0.0.1:9080 >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj /CN=pizza-client -keyout client.key -out client.pem 2>/dev/null
"$certgate" cert add --api pizzashack --alias pizza-client --tier Gold client.pem >/dev/null
"$certgate" server-cert show --pem >server.pem
"$certgate" serve --listen 127.0.0.1:8443 2>gateway.log &
pids+=($!)
until grep -q 'listening on' gateway.log; do sleep 0.1; done

echo "in $dir:"
echo '$ curl --cert client.pem --key client.key --cacert server.pem https://localhost:8443/pizzashack/1.0.0/'
curl -sS --cert client.pem --key client.key --cacert server.pem https://localhost:8443/pizzashack/1.0.0/ | head -4
echo '...'
echo '$ curl --cacert server.pem https://localhost:8443/pizzashack/1.0.0/'
curl -sS --cacert server.pem https://localhost:8443/pizzashack/1.0.0/
echo
echo "certgate serves on https://localhost:8443 (log: $dir/gateway.log); Ctrl-C stops it."
wait "${pids[1]}"
