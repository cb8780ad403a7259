#!/usr/bin/env bash
# Requests per second through certgate against the same backend called directly, on 1 and on 50
# keep-alive connections, with oha presenting a client certificate. Also the release binary size
# and the idle memory of `serve`. Figures are relative to the direct run of the same moment.
#
#   cargo install oha   # once
#   bash benches/throughput.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v oha >/dev/null || { echo "oha not found: cargo install oha" >&2; exit 1; }

cargo build --release --quiet --bin certgate --example bench_backend
bin=target/release/certgate
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT

target/release/examples/bench_backend 127.0.0.1:0 >"$dir/backend.out" &
pids+=($!)
until grep -q listening "$dir/backend.out" 2>/dev/null; do sleep 0.05; done
backend=$(sed -n 's/^listening on //p' "$dir/backend.out")

db="$dir/certgate.db"
$bin --db "$db" init >/dev/null
$bin --db "$db" api add bench --context /bench --backend "http://$backend" >/dev/null
$bin --db "$db" cert add --api bench --alias bench fixtures/client-a.pem >/dev/null
$bin --db "$db" server-cert show --pem >"$dir/server.pem"
$bin --db "$db" serve --listen 127.0.0.1:0 2>"$dir/serve.err" &
pids+=($!)
serve_pid=$!
until grep -q listening "$dir/serve.err" 2>/dev/null; do sleep 0.05; done
gateway=$(sed -n 's/^listening on //p' "$dir/serve.err" | head -1)
port=${gateway##*:}
sleep 1
idle_kib=$(awk '/VmRSS/ {print $2}' "/proc/$serve_pid/status")

rps() { # url connections [tls args...]
    local url=$1 c=$2
    shift 2
    oha --no-tui --output-format json -z "${secs}s" -c "$c" "$@" "$url" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["summary"]["requestsPerSec"])); sys.exit(0 if d["summary"]["successRate"]==1 else 1)'
}
tls=(--cert fixtures/client-a.pem --key fixtures/client-a.key --cacert "$dir/server.pem")

printf 'release binary: %s KiB\n' $(( $(stat -c %s "$bin") / 1024 ))
printf 'idle serve RSS: %s KiB\n' "$idle_kib"
for c in 1 50; do
    direct=$(rps "http://$backend/x" "$c")
    through=$(rps "https://localhost:$port/bench/x" "$c" "${tls[@]}")
    python3 -c "print(f'{$c:>2} connections: direct {$direct} req/s, through certgate {$through} req/s, ratio {$through/$direct:.2f}')"
done
printf 'serve RSS after load: %s KiB\n' "$(awk '/VmRSS/ {print $2}' "/proc/$serve_pid/status")"
