#!/bin/bash
# Large-download throughput with curl -o /dev/null, median of RUNS.
#   bench/download.sh direct|proxy|connect BYTES RUNS [PROXY_PORT]
# `connect` tunnels with CONNECT (curl -p); ORIGIN defaults to 127.0.0.1:28080.
set -u
mode=$1; bytes=$2; runs=$3; port=${4:-}
url="http://${ORIGIN:-127.0.0.1:28080}/big?bytes=$bytes"
for i in $(seq "$runs"); do
  case $mode in
    direct) curl -s -o /dev/null -w "%{speed_download}\n" "$url" ;;
    proxy) curl -s -o /dev/null -w "%{speed_download}\n" -x "http://127.0.0.1:$port" "$url" ;;
    connect) curl -s -o /dev/null -w "%{speed_download}\n" -p -x "http://127.0.0.1:$port" "$url" ;;
  esac
done | sort -g | awk -v m="$mode" '{a[NR]=$1} END {printf "%-8s median %.2f GB/s (min %.2f, max %.2f, n=%d)\n", m, a[int((NR+1)/2)]/1e9, a[1]/1e9, a[NR]/1e9, NR}'
