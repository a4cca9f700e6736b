#!/usr/bin/env bash
# Instructions the balancer executes to store N documents (default 3000),
# counted by callgrind: repeatable whatever else the machine is doing.
# Three release servers, one release balancer under valgrind, `client ftp N`;
# prints the total and the functions that cost most.
#   cargo build --release && scripts/callgrind-balancer.sh [N]
set -euo pipefail
N=${1:-3000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release
WORK=$(mktemp -d -t lbft-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
listening() { # file -> address after "listening on", waiting up to 60 s
    for _ in $(seq 1 600); do
        if grep -q '^listening on' "$1"; then
            grep -m1 '^listening on' "$1" | awk '{print $3}' | tr -d ','
            return
        fi
        sleep 0.1
    done
    echo "no readiness line in $1" >&2
    exit 1
}
SERVERS=()
for i in 0 1 2; do
    "$BIN/server" --listen 127.0.0.1:0 --dir "$WORK/s$i" --cluster-key-file "$WORK/cluster.key" >"$WORK/s$i.out" 2>&1 &
    PIDS+=($!)
done
for i in 0 1 2; do SERVERS+=("$(listening "$WORK/s$i.out")"); done
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$BIN/balancer" \
    --listen 127.0.0.1:0 --servers "$(IFS=,; echo "${SERVERS[*]}")" --no-state \
    --log-file "$WORK/lb.log" --cluster-key-file "$WORK/cluster.key" >"$WORK/b.out" 2>&1 &
BALANCER=$!
PIDS+=($BALANCER)
"$BIN/client" --balancer "$(listening "$WORK/b.out")" ftp "$N" | tail -n 1
kill -TERM "$BALANCER"
wait "$BALANCER" || true
callgrind_annotate --inclusive=no "$WORK/cg.out" 2>/dev/null | sed -n '/PROGRAM TOTALS/,+14p'
