#!/usr/bin/env bash
# HTTPS through an explicit proxy, side by side in one run, against a TLS origin on loopback
# (cordon-gateway's examples/tls_bench.rs):
#   tunnel      the cordon gateway library, CONNECT tunnel (TLS end to end client <-> origin)
#   intercept   the same gateway intercepting the host: TLS terminated with a leaf from the session
#               CA, a credential swapped in, rules/DLP scan of every request, redaction scan of
#               every response, re-encrypted to the origin (verified)
#   mitmproxy   Debian's mitmdump (regular proxy mode, upstream verified against the origin's CA)
# Every proxy listens on its own loopback port and is stopped by pid; nothing leaves 127.0.0.1.
# No audit sink for the gateway (NoopSink) and no addon for mitmproxy: the proxies' own cost.
# The gateway runs on two tokio workers, as in `cordon run`; the client and the origin on one each.
#
# Client: tls_bench client, CONNS keep-alive HTTPS connections (one CONNECT + one TLS handshake
# each, then GET /small with a 64-byte body back to back) for SECS seconds; requests/s and p50/p99
# latency; the median over ROUNDS rounds that interleave the targets. The -h2 rows are the same
# over HTTP/2 (tls_bench client-h2: ALPN h2 only, STREAMS requests in flight per connection; the
# origin speaks h2 too, so tunnel-h2 is HTTP/2 end to end and intercept-h2 is HTTP/2 on both
# sides of the gateway).
# DLP: the streaming request-body scanner over MIB MiB of JSON-like text (2 literals + every
# secret format), milliseconds per MiB.
#
# Usage: bench/tls.sh [--secs N] [--conns "1 8"] [--rounds N] [--streams N] [--dlp-mib N]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=5
conns="1 8"
rounds=3
streams=1
dlp_mib=256
while [[ $# -gt 0 ]]; do
  case "$1" in
    --secs) secs="$2"; shift 2 ;;
    --conns) conns="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --streams) streams="$2"; shift 2 ;;
    --dlp-mib) dlp_mib="$2"; shift 2 ;;
    *) sed -n '2,23p' "$0" >&2; exit 2 ;;
  esac
done

scripts/deps.sh --bench
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p cordon-gateway --example tls_bench
bin="$target_dir/release/examples/tls_bench"

work=$(mktemp -d /tmp/cordon-bench-tls.XXXXXX)
pids=()
fifos=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap 'stop_all; rm -rf "$work"' EXIT

# Starts "$@" with stdin on a FIFO held open by this script (closing it stops the process) and
# waits for the port it prints first (in $work/NAME.out). Not in a subshell: the FIFO and the
# pid must stay with this script.
start() { # NAME CMD...
  local name="$1"; shift
  mkfifo "$work/$name.in"
  "$@" <"$work/$name.in" >"$work/$name.out" 2>"$work/$name.log" &
  pids+=("$!")
  exec {fd}>"$work/$name.in"
  fifos+=("$fd")
  local i
  for i in $(seq 1 200); do
    [[ -s "$work/$name.out" ]] && break
    sleep 0.05
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start origin "$bin" origin "$work"
origin_port=$(head -n1 "$work/origin.out")
start tunnel "$bin" gateway tunnel "$work/origin-ca.pem" "$work"
tunnel_port=$(head -n1 "$work/tunnel.out")
start intercept "$bin" gateway intercept "$work/origin-ca.pem" "$work"
intercept_port=$(head -n1 "$work/intercept.out")
mitm_port=$(free_port)
mkdir -p "$work/mitm"
mitmdump --listen-host 127.0.0.1 --listen-port "$mitm_port" --set confdir="$work/mitm" \
  --set ssl_verify_upstream_trusted_ca="$work/origin-ca.pem" --set connection_strategy=lazy \
  -q >"$work/mitm.log" 2>&1 &
pids+=("$!")
for i in $(seq 1 200); do
  [[ -s "$work/mitm/mitmproxy-ca-cert.pem" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$mitm_port") 2>/dev/null && break
  sleep 0.1
done

declare -A ca=( [tunnel]="$work/origin-ca.pem" [intercept]="$work/session-ca.pem" [mitmproxy]="$work/mitm/mitmproxy-ca-cert.pem" )
declare -A port=( [tunnel]=$tunnel_port [intercept]=$intercept_port [mitmproxy]=$mitm_port )
targets="tunnel intercept mitmproxy tunnel-h2 intercept-h2 mitmproxy-h2"

echo "# bench/tls.sh: secs=$secs conns=\"$conns\" rounds=$rounds streams=$streams load=$(cut -d' ' -f1-3 /proc/loadavg)"
for c in $conns; do
  for t in $targets; do : >"$work/res.$t.$c"; done
  for r in $(seq 1 "$rounds"); do
    for t in $targets; do
      p=${t%-h2}
      if [[ $t == *-h2 ]]; then
        "$bin" client-h2 "127.0.0.1:${port[$p]}" "$origin_port" "${ca[$p]}" "$c" "$secs" "$streams" >>"$work/res.$t.$c"
      else
        "$bin" client "127.0.0.1:${port[$p]}" "$origin_port" "${ca[$p]}" "$c" "$secs" >>"$work/res.$t.$c"
      fi
    done
  done
  for t in $targets; do
    python3 - "$t" "$c" "$work/res.$t.$c" <<'PY'
import json, statistics, sys
name, conns, path = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(path) if l.strip()]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"{name:12} conns={conns:>2}  rps={med('rps'):8.0f}  p50={med('p50_us')/1000:7.2f} ms  p99={med('p99_us')/1000:7.2f} ms  (rounds: {' '.join(str(int(r['rps'])) for r in rows)})")
PY
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" dlp "$dlp_mib" >"$work/dlp.json"
python3 - "$work/dlp.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"dlp          {d['mib']} MiB in {d['seconds']} s: {d['mib_per_s']} MiB/s, {d['ms_per_mib']} ms per MiB")
PY
