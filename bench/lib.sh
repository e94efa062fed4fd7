# Helpers shared by bench/gateway-ab.sh and bench/gateway-callgrind.sh (source it). Every
# process a script starts goes into `pids` and is stopped by pid, never by name.
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
wait_port() { # PORT PID: until something listens on 127.0.0.1:PORT; fails if PID exits first
  local i
  for i in $(seq 1 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "process $2 exited at start-up" >&2; exit 1; }
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}
cpu_ticks() { # PID -> user+system clock ticks of the process (all its threads)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
