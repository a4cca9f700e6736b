#!/usr/bin/env bash
# Makes docs/dashboard.png, the picture in README's "Metrics": a balancer
# with three servers carries documents, computations and 40 MB files for
# 75 s while its /metrics is scraped once a second; one server is killed
# with kill -9 at 30 s, during uploads, and restarted 12 s later. The
# scrapes are drawn in the layout of docs/grafana-dashboard.json by
# scripts/dashboard-picture.py and photographed by headless Chromium
# (`apt-get install chromium`). Ports 62002, 62011-62013 and 62090.
#   cargo build && scripts/dashboard-picture.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/debug
WORK=$(mktemp -d -t lbft-picture.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
"$BIN/balancer" --listen 127.0.0.1:62002 --metrics 127.0.0.1:62090 --check-interval 200ms \
    --servers 127.0.0.1:62011,127.0.0.1:62012,127.0.0.1:62013 >balancer.out 2>/dev/null &
PIDS+=($!)
sleep 0.5
declare -A SERVER
for port in 62011 62012 62013; do
    "$BIN/server" --port "$port" --balancer 127.0.0.1:62002 >"server$port.out" 2>/dev/null &
    SERVER[$port]=$!
    PIDS+=($!)
done
sleep 1
C=("$BIN/client" --balancer 127.0.0.1:62002 --documents "$ROOT/file")
head -c 40000000 /dev/urandom >big.bin
(for _ in $(seq 1 75); do
    echo "=== $(date +%s.%N)"
    curl -s 127.0.0.1:62090/metrics || true
    sleep 1
done) >samples.txt &
SCRAPER=$!
(end=$(($(date +%s) + 68))
while [ "$(date +%s)" -lt $end ]; do
    "${C[@]}" ftp 120 >/dev/null 2>&1 || true
    "${C[@]}" calc 20 >/dev/null 2>&1 || true
    sleep 0.7
done) &
(sleep 8
for i in 1 2 3; do
    "${C[@]}" send big.bin >/dev/null 2>&1 || true
    "${C[@]}" get big.bin -o "got$i.bin" >/dev/null 2>&1 || true
    sleep 3
done) &
(sleep 45
for i in 1 2; do
    "${C[@]}" send big.bin >/dev/null 2>&1 || true
    "${C[@]}" get big.bin -o "again$i.bin" >/dev/null 2>&1 || true
done) &
sleep 30
for k in 1 2 3; do "${C[@]}" send big.bin >/dev/null 2>&1 & done
sleep 0.15
kill -9 "${SERVER[62012]}"
sleep 12
"$BIN/server" --port 62012 --balancer 127.0.0.1:62002 >server62012b.out 2>/dev/null &
PIDS+=($!)
wait "$SCRAPER"
python3 "$ROOT/scripts/dashboard-picture.py" samples.txt page.html
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1380,1150 \
    --screenshot="$ROOT/docs/dashboard.png" "file://$WORK/page.html" 2>/dev/null
echo "wrote $ROOT/docs/dashboard.png"
