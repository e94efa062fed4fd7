# Helpers shared by the gateway benchmarks (bench/gateway.sh, gateway-ab.sh, gateway-callgrind.sh;
# source it). Every process a script starts goes into `pids` and is stopped by pid, never by name.
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() { # PORT PID [LOG]: until something listens on 127.0.0.1:PORT; fails if PID exits first (printing LOG)
  local i
  for i in $(seq 1 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || {
      echo "process $2 exited at start-up${3:+; its log:}" >&2
      [[ -n "${3:-}" ]] && cat "$3" >&2
      exit 1
    }
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}
cpu_ticks() { # PID -> user+system clock ticks of the process (all its threads), 0 without a pid
  [[ -z "${1:-}" ]] && { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
start_origin() { # BIN LOG: the bench origin on a free port; sets oport, origin, origin_pid
  oport=$(free_port)
  "$1" "127.0.0.1:$oport" 1 >"$2" 2>&1 &
  origin_pid=$!
  pids+=("$origin_pid")
  wait_port "$oport" "$origin_pid" "$2"
  origin="127.0.0.1:$oport"
}
bench_policy() { # FILE PORT: a cordon policy allowing the loopback origin on PORT, budgets out of reach
  cat >"$1" <<POLICY
[network]
allow_private = ["127.0.0.1/32:$2"]
[network.rate]
requests_per_minute = 4294967295
requests_per_minute_per_host = 4294967295
max_connections = 10000
max_bytes_out = "1T"
max_bytes_in = "1T"
POLICY
}
gateway_token() { # TOKENS_FILE: waits for `cordon gateway`'s first token line; prints the token
  local token=""
  for _ in $(seq 1 600); do [[ -s "$1" ]] && break; sleep 0.1; done
  token=$(sed -n 's/.* token=\([^ ]*\) .*/\1/p' "$1" | head -1)
  [[ -n "$token" ]] || { echo "cordon gateway printed no token in $1" >&2; exit 1; }
  printf '%s' "$token"
}
basic_auth() { # TOKEN: the Proxy-Authorization value naming the token's session
  printf 'Basic %s' "$(printf 'cordon:%s' "$1" | base64 -w0)"
}
