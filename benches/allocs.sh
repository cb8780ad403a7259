#!/usr/bin/env bash
# Heap allocations per proxied request (malloc calls seen by a uprobe on libc's malloc, so rustls'
# own allocations count too), on one keep-alive connection, for the current build and, given
# BASELINE_BINARY, for another build in the same run. Needs root and perf with uprobes.
#
#   bash benches/allocs.sh [REQUESTS] [BASELINE_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-20000}
baseline=${2:-}
command -v oha >/dev/null || { echo "oha not found: cargo install oha" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf not found" >&2; exit 1; }
libc=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
perf probe -q -x "$libc" malloc 2>/dev/null || true

cargo build --release --quiet --bin certgate --example bench_backend
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
target/release/examples/bench_backend 127.0.0.1:0 >"$dir/backend.out" &
pids+=($!)
until grep -q listening "$dir/backend.out" 2>/dev/null; do sleep 0.05; done
backend=$(sed -n 's/^listening on //p' "$dir/backend.out")

measure() { # name binary
    local name=$1 binary=$2 db="$dir/$1.db"
    "$binary" --db "$db" init >/dev/null
    "$binary" --db "$db" api add bench --context /bench --backend "http://$backend" >/dev/null
    "$binary" --db "$db" cert add --api bench --alias bench fixtures/client-a.pem >/dev/null
    "$binary" --db "$db" server-cert show --pem >"$dir/$name.pem"
    "$binary" --db "$db" serve --listen 127.0.0.1:0 >/dev/null 2>"$dir/$name.err" &
    local pid=$!
    pids+=("$pid")
    until grep -q listening "$dir/$name.err" 2>/dev/null; do sleep 0.05; done
    local port
    port=$(sed -n 's/^listening on //p' "$dir/$name.err" | head -1)
    port=${port##*:}
    local tls=(--cert fixtures/client-a.pem --key fixtures/client-a.key --cacert "$dir/$name.pem")
    # Warm up: the handshake, the first backend connection, buffers grown.
    oha --no-tui -n 100 -c 1 "${tls[@]}" "https://localhost:$port/bench/x" >/dev/null
    perf stat -x, -e probe_libc:malloc -p "$pid" -o "$dir/$name.stat" &
    local perf_pid=$!
    sleep 0.5
    oha --no-tui -n "$requests" -c 1 "${tls[@]}" "https://localhost:$port/bench/x" >/dev/null
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    local mallocs
    mallocs=$(awk -F, '/probe_libc:malloc/ {print $1}' "$dir/$name.stat")
    python3 -c "print(f'$name: {$mallocs} mallocs for $requests requests, {$mallocs/$requests:.2f} per request')"
}

measure current target/release/certgate
if [ -n "$baseline" ]; then
    measure baseline "$baseline"
fi
