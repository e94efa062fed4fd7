#!/bin/bash
# Small requests through proxies, interleaved so machine noise hits every target alike.
#   bench/rps.sh ROUNDS CONNECTIONS SECONDS NAME=PORT...   (NAME=direct: straight to the origin)
# wrk -t1 with keep-alive; prints the median req/s, p50 and p99 per target over the rounds.
# ORIGIN (host:port) defaults to 127.0.0.1:28080.
set -u
here=$(cd "$(dirname "$0")" && pwd)
origin=${ORIGIN:-127.0.0.1:28080}
rounds=$1; c=$2; d=$3; shift 3
declare -A R P50 P99
us() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s/,"",v); print v*1e6} else print v}'; }
for i in $(seq "$rounds"); do
  for t in "$@"; do
    name=${t%%=*}; port=${t##*=}
    if [ "$name" = direct ]; then out=$(wrk -t1 -c"$c" -d"${d}"s --latency "http://$origin/")
    else out=$(TARGET=$origin wrk -t1 -c"$c" -d"${d}"s --latency -s "$here/proxy.lua" "http://127.0.0.1:$port/"); fi
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "WARN $name: $(echo "$out" | grep -E 'Non-2xx|Socket')"; fi
    R[$name]+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "
    P50[$name]+="$(echo "$out" | awk '$1=="50%" {print $2}' | us) "
    P99[$name]+="$(echo "$out" | awk '$1=="99%" {print $2}' | us) "
  done
done
med() { echo "$1" | tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for t in "$@"; do
  name=${t%%=*}
  printf "%-10s req/s %8.0f  p50 %6.0f us  p99 %6.0f us   (req/s per round: %s)\n" "$name" \
    "$(med "${R[$name]}")" "$(med "${P50[$name]}")" "$(med "${P99[$name]}")" "${R[$name]}"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
