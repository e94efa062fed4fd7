#!/usr/bin/env bash
# Egress proxies side by side in one run, against a fast origin on loopback
# (cordon-gateway's examples/origin.rs):
#   direct       wrk/curl straight to the origin
#   cordon       `cordon gateway` (release build; token auth; auditing ON to a temp SQLite store)
#   tinyproxy    Debian's tinyproxy, default-deny URL filter allowing only the origin
#   squid        Debian's squid, no cache, http_access allowing only the origin's address and port
# Every proxy runs on its own loopback port with its own temp config (the system services are
# never touched) and is stopped by pid. Nothing leaves 127.0.0.1.
#
# Small requests: wrk, 1 thread, keep-alive, N connections, D seconds, absolute-form requests
# for the proxies (bench/proxy.lua); requests/s and p50/p99 latency, median over R rounds
# (rounds interleave the targets, so machine noise hits all of them alike).
# Large download: curl -o /dev/null of a 100 MiB body through each proxy, median of 5.
#
# Usage (--rounds 0 or --downloads 0 skips that part):
#        bench/gateway.sh [--duration SECONDS] [--connections "8 32"] [--rounds N]
#                         [--downloads N] [--download-mib N] [--cordon-threads N]
#                         [--noaudit] [--export FILE]
#   --noaudit      also measure the gateway library with auditing off ("gw-noaudit": cordon-gateway's
#                  examples/gateway.rs with --sink noop, same threads), to show what the audit costs
#   --export FILE  also write the raw samples as JSON
set -euo pipefail
cd "$(dirname "$0")/.."
duration=10
connections="8 32"
rounds=3
downloads=5
download_mib=100
cordon_threads=""
export_json=""
noaudit=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --downloads) downloads="$2"; shift 2 ;;
    --download-mib) download_mib="$2"; shift 2 ;;
    --cordon-threads) cordon_threads="$2"; shift 2 ;;
    --export) export_json="$2"; shift 2 ;;
    --noaudit) noaudit=1; shift ;;
    *) sed -n '2,23p' "$0" >&2; exit 2 ;;
  esac
done

scripts/deps.sh --bench
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p cordon --bin cordon
cargo build --release -q -p cordon-gateway --example origin
[[ $noaudit == 1 ]] && cargo build --release -q -p cordon-gateway --example gateway
cordon="$target_dir/release/cordon"
origin_bin="$target_dir/release/examples/origin"
squid_bin=$(command -v squid || echo /usr/sbin/squid)
tinyproxy_bin=$(command -v tinyproxy || echo /usr/bin/tinyproxy)
lua="$PWD/bench/proxy.lua"

work=$(mktemp -d /tmp/cordon-bench-gateway.XXXXXX)
chmod 755 "$work"
source bench/lib.sh
trap 'stop_all; rm -rf "$work"' EXIT

start_origin "$origin_bin" "$work/origin.log"
blocked="127.0.0.1:$((oport + 1))" # same host, a port no allowlist names

# --- cordon gateway: the origin is loopback, so it needs an allow_private entry; budgets are
# raised so that they never interfere (a real policy would keep its own).
cport=$(free_port)
bench_policy "$work/cordon.toml" "$oport"
threads_flag=()
[[ -n "$cordon_threads" ]] && threads_flag=(--threads "$cordon_threads")
"$cordon" gateway --listen "127.0.0.1:$cport" --policy "$work/cordon.toml" \
  --audit "$work/audit.db" --session bench "${threads_flag[@]}" \
  >"$work/cordon.tokens" 2>"$work/cordon.log" &
cordon_pid=$!
pids+=($cordon_pid)
wait_port "$cport" $cordon_pid "$work/cordon.log"
token=$(gateway_token "$work/cordon.tokens")
cordon_auth=$(basic_auth "$token")

if [[ $noaudit == 1 ]]; then
  nport=$(free_port)
  "$target_dir/release/examples/gateway" --listen "127.0.0.1:$nport" \
    --allow-private "127.0.0.1/32:$oport" --sink noop --threads "${cordon_threads:-$(nproc)}" \
    >"$work/gw-noaudit.log" 2>&1 &
  pids+=($!)
  noaudit_pid=$!
  wait_port "$nport" $! "$work/gw-noaudit.log"
fi

# --- tinyproxy: default deny, URL filter (so the port is part of the allowlist too).
tport=$(free_port)
printf '^http://127\\.0\\.0\\.1:%s/\n' "$oport" >"$work/tinyproxy.filter"
cat >"$work/tinyproxy.conf" <<EOF
Port $tport
Listen 127.0.0.1
Timeout 600
MaxClients 1000
Allow 127.0.0.1
LogFile "$work/tinyproxy.log"
LogLevel Critical
PidFile "$work/tinyproxy.pid"
Filter "$work/tinyproxy.filter"
FilterURLs On
FilterType ere
FilterDefaultDeny Yes
DisableViaHeader Yes
EOF
[[ $(id -u) -eq 0 ]] && printf 'User nobody\nGroup nogroup\n' >>"$work/tinyproxy.conf"
touch "$work/tinyproxy.log"
[[ $(id -u) -eq 0 ]] && chown nobody "$work/tinyproxy.log"
"$tinyproxy_bin" -d -c "$work/tinyproxy.conf" >>"$work/tinyproxy.out" 2>&1 &
pids+=($!)
tinyproxy_pid=$!
wait_port "$tport" $! "$work/tinyproxy.log"

# --- squid: no cache, one worker, only the origin's address and port.
sport=$(free_port)
mkdir -p "$work/squid"
[[ $(id -u) -eq 0 ]] && chown proxy:proxy "$work/squid"
cat >"$work/squid.conf" <<EOF
http_port 127.0.0.1:$sport
pid_filename $work/squid/squid.pid
cache_log $work/squid/cache.log
access_log none
cache deny all
cache_mem 8 MB
cache_dir null /tmp
coredump_dir $work/squid
acl origin_addr dst 127.0.0.1/32
acl origin_port port $oport
http_access allow origin_addr origin_port
http_access deny all
workers 1
pinger_enable off
shutdown_lifetime 0 seconds
max_filedescriptors 8192
EOF
"$squid_bin" -N -f "$work/squid.conf" >"$work/squid.log" 2>&1 &
pids+=($!)
squid_pid=$!
wait_port "$sport" $! "$work/squid.log"

# --- each target: proxy URL for curl, proxy address and auth header for wrk.
names=(direct cordon tinyproxy squid)
[[ $noaudit == 1 ]] && names=(direct cordon gw-noaudit tinyproxy squid)
declare -A curl_proxy wrk_url wrk_target wrk_auth
curl_proxy[direct]=""
curl_proxy[cordon]="http://cordon:$token@127.0.0.1:$cport"
curl_proxy[tinyproxy]="http://127.0.0.1:$tport"
curl_proxy[squid]="http://127.0.0.1:$sport"
wrk_url[direct]="http://$origin/"
wrk_url[cordon]="http://127.0.0.1:$cport/"
wrk_url[tinyproxy]="http://127.0.0.1:$tport/"
wrk_url[squid]="http://127.0.0.1:$sport/"
for n in "${names[@]}"; do wrk_target[$n]="$origin"; wrk_auth[$n]=""; done
wrk_target[direct]=""
wrk_auth[cordon]="$cordon_auth"
declare -A proxy_pid=([direct]="" [cordon]=$cordon_pid [tinyproxy]=$tinyproxy_pid [squid]=$squid_pid)
if [[ $noaudit == 1 ]]; then
  curl_proxy[gw-noaudit]="http://127.0.0.1:$nport"
  wrk_url[gw-noaudit]="http://127.0.0.1:$nport/"
  wrk_target[gw-noaudit]="$origin"
  wrk_auth[gw-noaudit]=""
  proxy_pid[gw-noaudit]=$noaudit_pid
fi

status_via() { # NAME URL
  local p=()
  [[ -n "${curl_proxy[$1]}" ]] && p=(-x "${curl_proxy[$1]}")
  curl -s -o /dev/null -w '%{http_code}' --max-time 10 --noproxy '' "${p[@]}" "$2" || true
}

# The allowlists work: the origin is allowed, the same host on another port is refused.
for n in "${names[@]}"; do
  code=$(status_via "$n" "http://$origin/")
  [[ "$code" == 200 ]] || { echo "$n: expected 200 from the origin, got $code" >&2; exit 1; }
  [[ "$n" == direct ]] && continue
  code=$(status_via "$n" "http://$blocked/")
  [[ "$code" == 403 ]] || { echo "$n: expected 403 for $blocked, got $code" >&2; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' --noproxy '' -x "http://127.0.0.1:$cport" "http://$origin/" || true)
[[ "$code" == 407 ]] || { echo "cordon: expected 407 without a token, got $code" >&2; exit 1; }
echo "allowlists checked: origin allowed, $blocked refused (403) by ${names[*]:1}" >&2

samples="$work/samples.txt"
: >"$samples"
bytes=$((download_mib * 1024 * 1024))
for round in $(seq 1 "$rounds"); do
  for c in $connections; do
    for n in "${names[@]}"; do
      before=$(cpu_ticks "${proxy_pid[$n]}")
      obefore=$(cpu_ticks "$origin_pid")
      out=$(BENCH_TARGET="${wrk_target[$n]}" BENCH_AUTH="${wrk_auth[$n]}" \
        /usr/bin/time -f 'WRKCPU %U %S' \
        wrk -t1 -c"$c" -d"${duration}s" --timeout 5s -s "$lua" "${wrk_url[$n]}" 2>&1) || {
        echo "wrk failed for $n: $out" >&2; exit 1; }
      ticks=$(( $(cpu_ticks "${proxy_pid[$n]}") - before ))
      oticks=$(( $(cpu_ticks "$origin_pid") - obefore ))
      line=$(grep '^RESULT ' <<<"$out") || { echo "wrk printed no result for $n: $out" >&2; exit 1; }
      wrkcpu=$(awk '/^WRKCPU /{ print $2 + $3 }' <<<"$out")
      echo "wrk $n $c $round ${line#RESULT } $ticks $oticks ${wrkcpu:-0}" >>"$samples"
      echo "round $round, $c connections, $n: ${line#RESULT }" >&2
    done
  done
done
for i in $(seq 1 "$downloads"); do
  for n in "${names[@]}"; do
    p=()
    [[ -n "${curl_proxy[$n]}" ]] && p=(-x "${curl_proxy[$n]}")
    r=$(curl -s -o /dev/null --noproxy '' "${p[@]}" -w '%{http_code} %{size_download} %{speed_download}' \
      "http://$origin/big?bytes=$bytes")
    read -r code size speed <<<"$r"
    [[ "$code" == 200 && "$size" == "$bytes" ]] || { echo "$n download: status $code, $size bytes" >&2; exit 1; }
    echo "dl $n $i $speed" >>"$samples"
  done
done

# Stop cordon first and count what it audited (proof that auditing was on).
kill -TERM "$cordon_pid"
wait "$cordon_pid" || { echo "cordon gateway exited with $?" >&2; cat "$work/cordon.log" >&2; exit 1; }
audited=$("$cordon" audit --audit "$work/audit.db" sessions --json |
  python3 -c 'import json,sys; print(sum(json.loads(l)["events"] for l in sys.stdin))')
stop_all

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git status --porcelain crates/cordon-gateway crates/cordon 2>/dev/null)" ]] && commit="$commit (with uncommitted changes)"
python3 - "$samples" "$audited" "$duration" "$rounds" "$downloads" "$download_mib" "$export_json" "$commit" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
path, audited, duration, rounds, downloads, mib, export, commit, hz = sys.argv[1:10]
hz = int(hz)
wrk, dl = {}, {}
raw = []
for line in open(path):
    f = line.split()
    if f[0] == "wrk":
        name, conns = f[1], int(f[2])
        reqs, dur_us, p50, p99, errs, non2xx = int(f[4]), int(f[5]), float(f[6]), float(f[7]), int(f[8]), int(f[9])
        cpu_s = int(f[10]) / hz
        origin_s = int(f[11]) / hz
        wrk_s = float(f[12])
        per = lambda sec: sec * 1e6 / reqs if reqs else 0.0
        s = dict(rps=reqs / (dur_us / 1e6), p50=p50 / 1000, p99=p99 / 1000, errors=errs, non2xx=non2xx,
                 cpu_us_per_req=per(cpu_s), origin_us_per_req=per(origin_s), wrk_us_per_req=per(wrk_s))
        wrk.setdefault((name, conns), []).append(s)
        raw.append(dict(kind="wrk", target=name, connections=conns, round=int(f[3]), **s))
    elif f[0] == "dl":
        dl.setdefault(f[1], []).append(float(f[3]))
        raw.append(dict(kind="download", target=f[1], run=int(f[2]), bytes_per_s=float(f[3])))
names = [n for n in ["direct", "cordon", "gw-noaudit", "tinyproxy", "squid"] if n in dl or any(k[0] == n for k in wrk)]
med = lambda xs: statistics.median(xs)
if wrk:
    print(f"small requests: wrk -t1 -c N -d {duration}s, keep-alive, GET / (median of {rounds} rounds)")
    print(f"{'target':<10}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>8}{'sockerr':>9}{'CPU µs/req':>11}{'origin':>8}{'wrk':>6}{'vs squid':>10}{'vs direct':>10}")
    for conns in sorted({c for _, c in wrk}):
        m = {n: {k: med([s[k] for s in wrk[(n, conns)]]) for k in ("rps", "p50", "p99", "cpu_us_per_req", "origin_us_per_req", "wrk_us_per_req")} for n in names}
        for n in names:
            non2xx = sum(s["non2xx"] for s in wrk[(n, conns)])
            sockerr = sum(s["errors"] for s in wrk[(n, conns)])
            cpu = "-" if n == "direct" else f"{m[n]['cpu_us_per_req']:.1f}"
            print(f"{n:<10}{conns:>6}{m[n]['rps']:>10.0f}{m[n]['p50']:>9.3f}{m[n]['p99']:>9.3f}{non2xx:>8}{sockerr:>9}{cpu:>11}"
                  f"{m[n]['origin_us_per_req']:>8.1f}{m[n]['wrk_us_per_req']:>6.1f}"
                  f"{m[n]['rps'] / m['squid']['rps']:>9.2f}x{m[n]['rps'] / m['direct']['rps']:>9.2f}x")
    print("(sockerr: wrk read/connect errors; a proxy that closes the client connection after every")
    print(" response, as tinyproxy does, shows one per request: wrk reconnects, the request succeeded;")
    print(" CPU µs/req: the proxy process's user+system CPU time during its runs, per request;")
    print(" origin, wrk: the same for the origin and for wrk; the machine has 2 CPUs = 2e6 µs/s)")
    print()
if dl:
    print(f"large download: {mib} MiB body, curl -o /dev/null (median of {downloads})")
    print(f"{'target':<10}{'MiB/s':>10}{'vs squid':>10}{'vs direct':>10}")
    d = {n: med(dl[n]) / 2**20 for n in names}
    for n in names:
        print(f"{n:<10}{d[n]:>10.0f}{d[n] / d['squid']:>9.2f}x{d[n] / d['direct']:>9.2f}x")
print(f"\ncordon audited {audited} events (session start/end and one per request)")
print(f"cordon at {commit}")
if export:
    json.dump(raw, open(export, "w"), indent=1)
PY
