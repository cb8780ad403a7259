#!/usr/bin/env bash
# Requests per second through certgate against the same backend called directly, on 1 and on 50
# keep-alive connections, with oha presenting a client certificate. Also the release binary size
# and the memory of `serve`. Figures are relative to the direct run of the same moment.
#
#   cargo install oha   # once
#   bash benches/throughput.sh [SECONDS] [BASELINE_BINARY]
#
# With BASELINE_BINARY (another build of certgate, e.g. of an earlier commit), that binary is
# measured in the same run, against the same backend, for a before/after comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
baseline=${2:-}
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

# Starts BINARY serving the bench API with its own database; prints "PID PORT".
start() { # name binary
    local name=$1 binary=$2 db="$dir/$1.db"
    "$binary" --db "$db" init >/dev/null
    "$binary" --db "$db" api add bench --context /bench --backend "http://$backend" >/dev/null
    "$binary" --db "$db" cert add --api bench --alias bench fixtures/client-a.pem >/dev/null
    "$binary" --db "$db" server-cert show --pem >"$dir/$name.pem"
    "$binary" --db "$db" serve --listen 127.0.0.1:0 >/dev/null 2>"$dir/$name.err" &
    local pid=$!
    until grep -q listening "$dir/$name.err" 2>/dev/null; do sleep 0.05; done
    local addr
    addr=$(sed -n 's/^listening on //p' "$dir/$name.err" | head -1)
    echo "$pid ${addr##*:}"
}

rps() { # url connections [tls args...]
    local url=$1 c=$2
    shift 2
    oha --no-tui --output-format json -z "${secs}s" -c "$c" "$@" "$url" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["summary"]["requestsPerSec"])); sys.exit(0 if d["summary"]["successRate"]==1 else 1)'
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

read -r serve_pid port < <(start current "$bin")
pids+=("$serve_pid")
names=(current)
ports=("$port")
if [ -n "$baseline" ]; then
    read -r base_pid base_port < <(start baseline "$baseline")
    pids+=("$base_pid")
    names+=(baseline)
    ports+=("$base_port")
fi
sleep 1

printf 'release binary: %s KiB\n' $(( $(stat -c %s "$bin") / 1024 ))
printf 'idle serve RSS: %s KiB\n' "$(rss "$serve_pid")"
for c in 1 50; do
    direct=$(rps "http://$backend/x" "$c")
    line="$(printf '%2s' "$c") connections: direct $direct req/s"
    for i in "${!names[@]}"; do
        tls=(--cert fixtures/client-a.pem --key fixtures/client-a.key --cacert "$dir/${names[$i]}.pem")
        through=$(rps "https://localhost:${ports[$i]}/bench/x" "$c" "${tls[@]}")
        line+=$(python3 -c "print(f', {\"${names[$i]}\"} {$through} req/s (ratio {$through/$direct:.2f})')")
    done
    echo "$line"
done
printf 'serve RSS after load: %s KiB\n' "$(rss "$serve_pid")"
