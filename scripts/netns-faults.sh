#!/usr/bin/env bash
# A real network with faults, on one machine: a client, the balancer and
# three storage servers, each in its own network namespace, joined by veth
# pairs to a bridge in a switch namespace (10.77.0.0/24, addresses that
# exist only inside the namespaces made here). Every host's link gets
# 50 ms of delay and 2 % loss, a 5,000-document batch goes through, and in
# the middle one server is cut off completely and then healed.
#
# Checks: every acknowledged document is on disk exactly once across the
# storage folders, none failed (exit 1 when one of these fails), the
# cut-off server was marked down within 2 s and back up within 2 s of
# healing (exit 2 when only a time was missed). Prints the throughput
# before, during and after the partition.
#
# Usage: scripts/netns-faults.sh [BIN_DIR]   (default target/debug)
# Needs root, iproute2 and python3. Environment: LBFT_COUNT (documents,
# default 5000), LBFT_DOCS (documents folder, default file),
# LBFT_PARTITION_SECS (default 3).
#
# Faults: `tc netem delay 50ms loss 2%` on each host's link when the kernel
# has netem. Without it, loss is 2 % random drops by iptables (statistic
# match) on each host's output, and the delay is added by
# scripts/nfq-delay.py (holds each outgoing packet 50 ms through NFQUEUE)
# when the kernel has NFQUEUE; the script says which it used.
#
# Balancer settings for detection within 2 s over 100 ms round trips:
# --check-interval 100ms, --probe-timeout 400ms (a probe is a fresh
# connection: connect plus one exchange, 200 ms with no loss), --fall 3
# (a probe round lasts up to 400 ms while a server is cut off, so down is
# seen within about 0.4 + 3 x 0.4 = 1.6 s; three lost probes in a row at
# 2 % loss are rare), --rise 2 (back after two good rounds of ~0.2 s), and
# --server-timeout 3s (requests stuck on the cut-off server go elsewhere
# after 3 s). On a machine busy with other work the 2 s bounds can be
# missed: the checks measure the system, not a model of it.
set -euo pipefail

BIN=$(cd "${1:-${LBFT_BIN:-target/debug}}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
DOCS=$(cd "${LBFT_DOCS:-$HERE/../file}" && pwd)
COUNT=${LBFT_COUNT:-5000}
PARTITION_SECS=${LBFT_PARTITION_SECS:-3}
P="lbft$$"   # unique per run, so parallel runs do not collide
SW="$P-sw"
HOSTS=(bal s1 s2 s3 cli)
declare -A ADDR=([bal]=10.77.0.2 [s1]=10.77.0.11 [s2]=10.77.0.12 [s3]=10.77.0.13 [cli]=10.77.0.20)
VICTIM=s2
PORT=5001
WORK=$(mktemp -d -t lbft-netns.XXXXXX)
PIDS=()

say() { printf '%s\n' "$*"; }
now() { date +%s.%N; }

cleanup() {
    local rc=$?
    # SIGKILL: a balancer given SIGTERM would drain for up to 30 s first.
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for h in "${HOSTS[@]}"; do
        ip netns del "$P-$h" 2>/dev/null || true
    done
    ip netns del "$SW" 2>/dev/null || true
    if [[ $rc -ne 0 && -f $WORK/balancer.log ]]; then
        say "--- balancer log lines about servers"
        grep -E "server [0-9.:]+ is|requests not yet sent" "$WORK/balancer.log" | tail -n 40 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# For commands run to completion. Background processes are started with
# `ip netns exec` itself, which becomes the program (exec), so that `$!` is
# the program's pid and the cleanup ends it; a backgrounded function would
# give the pid of a subshell and leave the program running.
in_ns() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }

# ------------------------------------------------------------ the network
ip netns add "$SW"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
for h in "${HOSTS[@]}"; do
    ip netns add "$P-$h"
    ip -n "$P-$h" link set lo up
    # Both ends are made inside namespaces: nothing appears in the host's.
    ip link add eth0 netns "$P-$h" type veth peer name "p-$h" netns "$SW"
    ip -n "$SW" link set "p-$h" master br0 up
    ip -n "$P-$h" addr add "${ADDR[$h]}/24" dev eth0
    ip -n "$P-$h" link set eth0 up
done

FAULTS=""
if in_ns bal tc qdisc add dev eth0 root netem delay 50ms loss 2% 2>/dev/null; then
    for h in "${HOSTS[@]}"; do
        [[ $h == bal ]] || in_ns "$h" tc qdisc add dev eth0 root netem delay 50ms loss 2%
    done
    FAULTS="netem delay 50ms loss 2% on every link"
else
    if ! command -v iptables >/dev/null; then
        say "no netem in this kernel and no iptables for the loss: cannot make faults"
        exit 1
    fi
    for h in "${HOSTS[@]}"; do
        in_ns "$h" iptables -A OUTPUT -o eth0 -m statistic --mode random \
            --probability 0.02 -j DROP
    done
    FAULTS="no netem in this kernel: 2% loss by iptables on every link"
    if command -v python3 >/dev/null &&
        in_ns bal iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0 2>/dev/null; then
        in_ns bal iptables -D OUTPUT -o eth0 -j NFQUEUE --queue-num 0
        for h in "${HOSTS[@]}"; do
            ip netns exec "$P-$h" python3 "$HERE/nfq-delay.py" 50 >"$WORK/delay-$h.log" 2>&1 &
            PIDS+=($!)
        done
        for h in "${HOSTS[@]}"; do
            deadline=$((SECONDS + 10))
            until grep -q "delaying" "$WORK/delay-$h.log"; do
                if ((SECONDS > deadline)); then
                    say "the delay relay of $h did not start:"
                    cat "$WORK/delay-$h.log"
                    exit 1
                fi
                sleep 0.05
            done
            # --queue-bypass: were the relay gone, packets pass undelayed.
            in_ns "$h" iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass
        done
        FAULTS="$FAULTS, 50ms delay by an NFQUEUE relay"
    else
        FAULTS="$FAULTS, and no delay (no NFQUEUE)"
    fi
fi
say "faults: $FAULTS"

# ------------------------------------------------------------ the system
# Waits (with a deadline) for "listening on" in a process's output file.
wait_listening() {
    local file=$1 pid=$2 deadline=$((SECONDS + 30))
    until grep -q "^listening on" "$file" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            say "not listening: $file"
            cat "$file"
            exit 1
        fi
        sleep 0.05
    done
}

SERVERS=()
for s in s1 s2 s3; do
    mkdir -p "$WORK/$s"
    ip netns exec "$P-$s" env RUST_LOG=warn "$BIN/server" --listen "${ADDR[$s]}:$PORT" \
        --dir "$WORK/$s" --cluster-key-file "$WORK/cluster.key" >"$WORK/$s.out" 2>"$WORK/$s.err" &
    PIDS+=($!)
    wait_listening "$WORK/$s.out" $!
    SERVERS+=("${ADDR[$s]}:$PORT")
done
BALANCER="${ADDR[bal]}:60002"
ip netns exec "$P-bal" env RUST_LOG=info "$BIN/balancer" --listen "$BALANCER" \
    --servers "$(IFS=,; echo "${SERVERS[*]}")" \
    --check-interval 100ms --probe-timeout 400ms --fall 3 --rise 2 \
    --server-timeout 3s --queue-timeout 60s --max-attempts 20 \
    --log-file "$WORK/balancer.log" --state "$WORK/balancer.db" \
    --cluster-key-file "$WORK/cluster.key" \
    >"$WORK/balancer.out" 2>"$WORK/balancer.err" &
PIDS+=($!)
wait_listening "$WORK/balancer.out" $!

# Every server up before the batch starts.
deadline=$((SECONDS + 20))
for addr in "${SERVERS[@]}"; do
    until grep -q "server $addr is up" "$WORK/balancer.log"; do
        if ((SECONDS > deadline)); then
            say "server $addr never came up"
            exit 1
        fi
        sleep 0.05
    done
done

# ------------------------------------------------------------ the batch
stored_count() {
    local n=0 s
    for s in s1 s2 s3; do
        n=$((n + $(find "$WORK/$s" -maxdepth 1 -name '*.json' ! -name '.*' | wc -l)))
    done
    echo "$n"
}

say "sending $COUNT documents from ${ADDR[cli]} to $BALANCER"
T_START=$(now)
ip netns exec "$P-cli" "$BIN/client" --balancer "$BALANCER" --documents "$DOCS" \
    ftp "$COUNT" >"$WORK/client.out" 2>"$WORK/client.err" &
CLIENT=$!
PIDS+=($CLIENT)

# Cuts the victim off completely (on) or heals it (off). With iptables every
# IP packet to or from it is dropped (loss 100 %), and nothing else changes.
# Without, its link goes down; but then the kernel may take up to a second
# after healing to let packets through again (carrier changes are applied
# at most once a second), which counts against the 2 s to come back.
if command -v iptables >/dev/null; then
    PARTITION="every packet to or from it dropped"
else
    PARTITION="its link down"
fi
partition() {
    local op=-I h
    [[ $1 == on ]] || op=-D
    if ! command -v iptables >/dev/null; then
        ip -n "$SW" link set "p-$VICTIM" "$([[ $1 == on ]] && echo down || echo up)"
        return
    fi
    in_ns "$VICTIM" iptables "$op" INPUT -j DROP
    for h in "${HOSTS[@]}"; do
        [[ $h == "$VICTIM" ]] || in_ns "$h" iptables "$op" INPUT -s "${ADDR[$VICTIM]}" -j DROP
    done
}

# Partition once a fifth of the batch is stored.
deadline=$((SECONDS + 120))
until (($(stored_count) >= COUNT / 5)); do
    if ! kill -0 "$CLIENT" 2>/dev/null || ((SECONDS > deadline)); then
        say "the batch ended or stalled before the partition"
        exit 1
    fi
    sleep 0.02
done
N_PART=$(stored_count)
T_PART=$(now)
partition on
say "partitioned $VICTIM (${ADDR[$VICTIM]}) at $N_PART stored ($PARTITION)"
# The fault lasts a fixed time: this is the outage itself, not a wait for
# something to happen.
sleep "$PARTITION_SECS"
N_HEAL=$(stored_count)
T_HEAL=$(now)
partition off
say "healed $VICTIM at $N_HEAL stored"

CLIENT_RC=0
wait "$CLIENT" || CLIENT_RC=$?
T_END=$(now)
N_END=$(stored_count)
say "client: $(tail -n 1 "$WORK/client.out") (exit $CLIENT_RC)"

# ------------------------------------------------------------ the checks
# The victim must be seen up again, and copies of retried documents set
# aside, before the folders are compared (both with a deadline).
python3 - "$WORK" "$COUNT" "$CLIENT_RC" "${ADDR[$VICTIM]}:$PORT" \
    "$T_START" "$T_PART" "$T_HEAL" "$T_END" "$N_PART" "$N_HEAL" "$N_END" <<'EOF'
import json, os, re, sys, time
from datetime import datetime

work, count, client_rc, victim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t_start, t_part, t_heal, t_end = map(float, sys.argv[5:9])
n_part, n_heal, n_end = map(int, sys.argv[9:12])
failures = []
late = []

def check(ok, text, timing=False):
    print(("ok   " if ok else "FAIL ") + text)
    if not ok:
        (late if timing else failures).append(text)

def log_events():
    events = []
    line_re = re.compile(r"^\[(\S+) +\w+ +[^\]]*\] server (\S+) is (up|down|recovered|overloaded)")
    with open(os.path.join(work, "balancer.log"), encoding="utf-8", errors="replace") as f:
        for line in f:
            m = line_re.match(line)
            if m:
                t = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                events.append((t, m.group(2), m.group(3)))
    return events

def stored():
    numbers = {}
    per_dir = {}
    for s in ("s1", "s2", "s3"):
        d = os.path.join(work, s)
        per_dir[s] = 0
        for name in os.listdir(d):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            with open(os.path.join(d, name), encoding="utf-8") as f:
                doc = json.load(f)
            numbers.setdefault(doc["numero_richiesta"], []).append(f"{s}/{name}")
            per_dir[s] += 1
    return numbers, per_dir

# Settle: the victim back up, no number held twice (forget done).
deadline = time.time() + 15
while True:
    events = log_events()
    back = [t for (t, who, what) in events if who == victim and what == "up" and t >= t_heal]
    numbers, per_dir = stored()
    twice = {n: where for n, where in numbers.items() if len(where) > 1}
    if (back and not twice) or time.time() > deadline:
        break
    time.sleep(0.1)

summary = open(os.path.join(work, "client.out"), encoding="utf-8").read().strip().splitlines()
summary = summary[-1] if summary else ""
m = re.search(r"(\d+) documents?: (\d+) stored, (\d+) failed", summary)
acked, failed = (int(m.group(2)), int(m.group(3))) if m else (-1, -1)
check(client_rc == 0, f"client exit code {client_rc}")
check(acked == count and failed == 0, f"{acked} of {count} acknowledged, {failed} failed")
check(not twice, f"no request number stored twice ({len(twice)} are: {list(twice.items())[:3]})")
check(len(numbers) == acked, f"{len(numbers)} documents on disk for {acked} acknowledged")
per_server = dict(re.findall(r"(\d+\.\d+\.\d+\.\d+:\d+): (\d+)", summary))
by_dir = {f"10.77.0.1{s[1]}:5001": n for s, n in per_dir.items()}
check(all(int(per_server.get(a, 0)) == n for a, n in by_dir.items()),
      f"each folder holds what its server acknowledged: {by_dir} vs {per_server}")

victim_events = [(t, what) for (t, who, what) in events if who == victim]
before = [what for (t, what) in victim_events if t <= t_part]
down = [t for (t, what) in victim_events if what == "down" and t_part < t <= t_heal]
if before and before[-1] == "down":
    # Lost probes took it down by chance just before it was cut off.
    check(True, f"{victim} marked down 0.00 s after the partition (already down by chance)")
elif down:
    detect = down[0] - t_part
    check(detect <= 2.0, f"{victim} marked down {detect:.2f} s after the partition", timing=True)
else:
    check(False, f"{victim} never marked down during the partition")
if back:
    rejoin = back[0] - t_heal
    check(rejoin <= 2.0, f"{victim} back up {rejoin:.2f} s after healing", timing=True)
else:
    check(False, f"{victim} never came back up after healing")
false_downs = [(t, who) for (t, who, what) in events if what == "down" and not (who == victim and t_part - 0.5 <= t <= t_heal + 0.5)]
print(f"     other down transitions (loss on the links): {len(false_downs)}")

def rate(n, secs):
    return f"{n / secs:.0f} docs/s ({n} in {secs:.2f} s)" if secs > 0 else "n/a"
print(f"throughput before the partition: {rate(n_part, t_part - t_start)}")
print(f"throughput during the partition: {rate(n_heal - n_part, t_heal - t_part)}")
print(f"throughput after healing:        {rate(n_end - n_heal, t_end - t_heal)}")
print(f"whole batch: {rate(n_end, t_end - t_start)}")
sys.exit(1 if failures else 2 if late else 0)
EOF
