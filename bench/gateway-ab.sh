#!/usr/bin/env bash
# A/B of `cordon gateway` builds, audited, on loopback: each NAME=BINARY runs as its own gateway
# (token auth, auditing ON to its own temp store) in front of one origin (cordon-gateway's
# examples/origin.rs); wrk rounds interleave the builds, so the machine's load changes hit every
# build alike. Reports per build the median req/s, p50 and p99 latency, and CPU µs per request
# (the gateway process's user+system time during its runs, per request: the number to trust
# when other work shares the machine), plus the load average at the start and the end.
#
# Usage: bench/gateway-ab.sh [--rounds R] [--duration D] [--connections "8 32"]
#                            NAME="BINARY [EXTRA ARGS]" [NAME=...]
# e.g.   bench/gateway-ab.sh before=/tmp/cordon-main after=$CARGO_TARGET_DIR/release/cordon
#        bench/gateway-ab.sh one="$CARGO_TARGET_DIR/release/cordon --threads 1" two="…/cordon --threads 2"
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5
duration=5
connections="8 32"
builds=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    *=*) builds+=("$1"); shift ;;
    *) sed -n '2,14p' "$0" >&2; exit 2 ;;
  esac
done
[[ ${#builds[@]} -ge 1 ]] || { sed -n '2,14p' "$0" >&2; exit 2; }

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p cordon-gateway --example origin
origin_bin="$target_dir/release/examples/origin"
lua="$PWD/bench/proxy.lua"
work=$(mktemp -d /tmp/cordon-bench-gwab.XXXXXX)
chmod 755 "$work"
source bench/lib.sh
trap 'stop_all; rm -rf "$work"' EXIT

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
start_origin "$origin_bin" "$work/origin.log"
bench_policy "$work/policy.toml" "$oport"
declare -A port pid auth
names=()
for b in "${builds[@]}"; do
  name=${b%%=*}
  read -r -a cmd <<<"${b#*=}"
  names+=("$name")
  port[$name]=$(free_port)
  "${cmd[0]}" gateway "${cmd[@]:1}" --listen "127.0.0.1:${port[$name]}" --policy "$work/policy.toml" \
    --audit "$work/$name.db" --session bench >"$work/$name.tokens" 2>"$work/$name.log" &
  pid[$name]=$!
  pids+=($!)
  wait_port "${port[$name]}" "${pid[$name]}" "$work/$name.log"
  auth[$name]=$(basic_auth "$(gateway_token "$work/$name.tokens")")
done
: >"$work/samples"
for r in $(seq 1 "$rounds"); do
  for c in $connections; do
    for name in "${names[@]}"; do
      before=$(cpu_ticks "${pid[$name]}")
      out=$(BENCH_TARGET="$origin" BENCH_AUTH="${auth[$name]}" \
        wrk -t1 -c"$c" -d"${duration}s" --timeout 5s -s "$lua" "http://127.0.0.1:${port[$name]}/" 2>&1)
      ticks=$(($(cpu_ticks "${pid[$name]}") - before))
      line=$(grep '^RESULT ' <<<"$out") || { echo "wrk printed no result for $name: $out" >&2; exit 1; }
      echo "$name $c ${line#RESULT } $ticks $(cut -d' ' -f1 /proc/loadavg)" >>"$work/samples"
      echo "round $r, $c connections, $name: ${line#RESULT } (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    done
  done
done
stop_all
for name in "${names[@]}"; do
  grep -q "events lost\|dropped" "$work/$name.log" && { echo "$name lost audit events:" >&2; cat "$work/$name.log" >&2; }
done
python3 - "$work/samples" "$(getconf CLK_TCK)" "$load_start" "$(cut -d' ' -f1-3 /proc/loadavg)" "${names[@]}" <<'PY'
import statistics, sys
path, hz, load_start, load_end, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
rows = {}
for line in open(path):
    f = line.split()
    name, conns, reqs, dur, p50, p99, errs, non2xx, ticks = f[0], int(f[1]), int(f[2]), int(f[3]), float(f[4]), float(f[5]), int(f[6]), int(f[7]), int(f[8])
    rows.setdefault((name, conns), []).append((reqs / (dur / 1e6), p50 / 1000, p99 / 1000, ticks / hz * 1e6 / max(reqs, 1), errs + non2xx))
print(f"{'build':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}{'errors':>8}   (medians of {len(next(iter(rows.values())))} interleaved rounds)")
for conns in sorted({c for _, c in rows}):
    base = None
    for name in names:
        s = rows[(name, conns)]
        med = [statistics.median(x[i] for x in s) for i in range(4)]
        base = base or med
        print(f"{name:<12}{conns:>6}{med[0]:>10.0f}{med[1]:>9.3f}{med[2]:>9.3f}{med[3]:>12.1f}{sum(x[4] for x in s):>8}"
              f"   req/s {med[0] / base[0]:.2f}x, CPU {med[3] / base[3]:.2f}x")
print(f"load average: {load_start} at the start, {load_end} at the end")
PY
