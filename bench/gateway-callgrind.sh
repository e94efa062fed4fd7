#!/usr/bin/env bash
# Instructions per request of the egress gateway, under valgrind --tool=callgrind (counts
# instructions, not time: immune to whatever else the machine runs).
#
#   cordon      `cordon gateway` (release), auditing ON to a temp SQLite store: what
#               bench/gateway.sh measures as "cordon"
#   gw-noaudit  cordon-gateway's examples/gateway.rs --sink noop (events dropped)
#
# Each target serves N1 and then N2 keep-alive requests (a fresh process each time) from a small
# Python client through the explicit proxy to examples/origin.rs on loopback; per-request cost =
# (Ir(N2) - Ir(N1)) / (N2 - N1), which cancels start-up and shutdown. The N2 profile is kept and
# its largest inclusive costs (per request of the whole run) are printed with --top.
#
# Valgrind's CPU has no SHA-NI, so sha2 runs its portable code here (a few thousand instructions
# per audited record that the real CPU does in a few hundred): the sha2 share is printed apart.
#
# Usage: bench/gateway-callgrind.sh [--calls "N1 N2"] [--targets "cordon gw-noaudit"]
#                                   [--top N] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
calls="1000 3000"
targets="cordon gw-noaudit"
top=0
keep=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --calls) calls="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    --top) top="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    *) sed -n '2,18p' "$0" >&2; exit 2 ;;
  esac
done

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p cordon --bin cordon
cargo build --release -q -p cordon-gateway --example origin --example gateway
cordon="$target_dir/release/cordon"
gw="$target_dir/release/examples/gateway"
origin_bin="$target_dir/release/examples/origin"

work=$(mktemp -d /tmp/cordon-bench-gwcg.XXXXXX)
chmod 755 "$work"
source bench/lib.sh
trap 'stop_all; rm -rf "$work"' EXIT

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
start_origin "$origin_bin" "$work/origin.log"
bench_policy "$work/cordon.toml" "$oport"
cat >"$work/client.py" <<'EOF'
import base64, http.client, sys
port, origin, n, token = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
headers = {"Host": origin}
if token:
    headers["Proxy-Authorization"] = "Basic " + base64.b64encode(f"cordon:{token}".encode()).decode()
c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
for _ in range(n):
    c.request("GET", f"http://{origin}/", headers=headers)
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
EOF

read -r n1 n2 <<<"$calls"
for t in $targets; do
  for n in $n1 $n2; do
    p=$(free_port)
    out="$work/cg-$t-$n.out"
    token=""
    case "$t" in
      cordon)
        rm -f "$work/audit.db"*
        valgrind --tool=callgrind --callgrind-out-file="$out" "$cordon" gateway \
          --listen "127.0.0.1:$p" --policy "$work/cordon.toml" --audit "$work/audit.db" \
          --session bench >"$work/tokens" 2>"$work/$t.log" &
        ;;
      gw-noaudit)
        valgrind --tool=callgrind --callgrind-out-file="$out" "$gw" --listen "127.0.0.1:$p" \
          --allow-private "127.0.0.1/32:$oport" --sink noop --threads 2 >"$work/$t.log" 2>&1 &
        ;;
      *) echo "unknown target $t" >&2; exit 2 ;;
    esac
    g=$!
    pids+=("$g")
    wait_port "$p" "$g"
    if [[ $t == cordon ]]; then
      token=$(gateway_token "$work/tokens")
    fi
    python3 "$work/client.py" "$p" "$origin" "$n" "$token"
    # cordon stops on SIGTERM, the example on SIGINT (Ctrl-C).
    if [[ $t == cordon ]]; then kill -TERM "$g"; else kill -INT "$g"; fi
    wait "$g" || { echo "$t exited with $?" >&2; cat "$work/$t.log" >&2; exit 1; }
    ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
    sha=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
      awk '/sha2::sha256::soft::compress|sha2::sha256::compress256/ { gsub(",", "", $1); if ($1 > m) m = $1 } END { print m + 0 }')
    echo "$t $n $ir $sha" >>"$work/cg.txt"
    echo "callgrind $t, $n requests: $ir instructions (sha2 $sha)" >&2
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
awk -v n1="$n1" -v n2="$n2" '
  $2 == n1 { a[$1] = $3; sa[$1] = $4 } $2 == n2 { b[$1] = $3; sb[$1] = $4; order[++k] = $1 }
  END { for (i = 1; i <= k; i++) { t = order[i]; d = n2 - n1
          printf "CALLGRIND %-10s %7.0f instructions/request (sha2 %5.0f; without sha2 %7.0f)\n",
            t, (b[t] - a[t]) / d, (sb[t] - sa[t]) / d, (b[t] - a[t] - (sb[t] - sa[t])) / d } }' "$work/cg.txt"
if [[ $top -gt 0 ]]; then
  for t in $targets; do
    echo "--- $t: top $top inclusive, instructions per request over the $n2-request run"
    callgrind_annotate --inclusive=yes "$work/cg-$t-$n2.out" 2>/dev/null |
      awk -v n="$n2" -v top="$top" '/^ *[0-9,]+ .*\(/ && c < top { x = $1; gsub(",", "", x); $1 = ""; printf "%9.0f %s\n", x / n, substr($0, 1, 150); c++ }'
  done
fi
[[ -n "$keep" ]] && mkdir -p "$keep" && cp "$work"/cg-*.out "$keep"/
exit 0
