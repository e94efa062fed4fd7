#!/usr/bin/env bash
# Cold start of a sandbox running `true`, side by side in one run:
#   cordon run -- true           (all layers: user/pid/mnt/net/ipc/uts/cgroup ns, pivot_root,
#                                 read-only root, Landlock, seccomp, cgroup limits, capped workspace)
#   bwrap --unshare-all ... true (namespaces + binds; no Landlock, seccomp or cgroup)
#   unshare -rn true             (user + net namespace only)
#   true                         (no sandbox)
# Two rounds, each printing medians and ratios:
#   back-to-back  N runs of each command in a row (hyperfine's usual loop)
#   isolated      N/5 runs (at least 20), each after a pause of --gap seconds (default 0.25), like
#                 a sandbox started now and then. On cgroup v1 (or v2 mounted elsewhere than
#                 /sys/fs/cgroup) cordon writes cgroup.procs, which waits for an RCU grace period
#                 when no other cgroup write happened in the last few milliseconds, unless a
#                 cgroup mount has favordynmods (`cordon doctor`, docs/benchmarks.md).
# cordon is the release binary as `cargo release-bin` builds it (static PIE).
# Every cordon run audits to a temp store (not the user's). `--export FILE` writes hyperfine's JSON
# of both rounds to FILE.back-to-back.json and FILE.isolated.json.
# Usage: bench/startup.sh [--runs N] [--gap SECONDS] [--export FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=200
gap=0.25
export_json=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --gap) gap="$2"; shift 2 ;;
    --export) export_json="$2"; shift 2 ;;
    *) echo "usage: bench/startup.sh [--runs N] [--gap SECONDS] [--export FILE]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh --bench
cargo -q release-bin
cordon="${CARGO_TARGET_DIR:-$PWD/target}/release/cordon"
work=$(mktemp -d /tmp/cordon-bench-startup.XXXXXX)
trap 'rm -rf "$work"' EXIT
cordon_cmd="$cordon run --audit $work/audit.db -- true"

bwrap_cmd="bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/sbin /sbin --proc /proc --dev /dev --tmpfs /tmp --dir /workspace --chdir /workspace true"
$bwrap_cmd || { echo "bwrap cannot run here" >&2; exit 1; }
$cordon_cmd || { echo "cordon cannot run here (see cordon doctor)" >&2; exit 1; }

table() { # JSON TITLE
  python3 - "$1" "$2" <<'PY'
import json, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
med = {r["command"]: statistics.median(r["times"]) * 1000 for r in res}
p90 = {r["command"]: sorted(r["times"])[int(len(r["times"]) * 0.9)] * 1000 for r in res}
n = len(res[0]["times"])
base = med["cordon"]
print(f"{sys.argv[2]} ({n} runs each)")
print(f"{'command':<14}{'median ms':>10}{'p90 ms':>10}{'vs cordon':>11}")
for name in ["cordon", "bwrap", "unshare -rn", "true"]:
    print(f"{name:<14}{med[name]:>10.2f}{p90[name]:>10.2f}{med[name] / base:>10.2f}x")
print(f"cordon / bwrap median ratio: {base / med['bwrap']:.2f} (below 1.00 means cordon starts faster)\n")
PY
}

bench() { # JSON EXTRA_HYPERFINE_ARGS...
  local out="$1"; shift
  hyperfine -N "$@" --export-json "$out" \
    -n cordon "$cordon_cmd" \
    -n bwrap "$bwrap_cmd" \
    -n "unshare -rn" "unshare -rn true" \
    -n "true" "true" >/dev/null 2>"$work/hyperfine.err" || { cat "$work/hyperfine.err" >&2; exit 1; }
}

# What the host gives cordon's start-up, printed with the tables (docs/benchmarks.md explains
# each): the kernel, whether cgroup writes wait for an RCU grace period (cgroup v1, or v2 mounted
# elsewhere, without favordynmods), and the spare workspace volumes a previous run left.
echo "host: $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
if [[ "$(stat -fc %T /sys/fs/cgroup)" == cgroup2fs ]]; then
  echo "cgroup: v2 at /sys/fs/cgroup (clone3 CLONE_INTO_CGROUP: no attach wait)"
elif grep -q favordynmods /proc/mounts; then
  echo "cgroup: v1 (a cgroup mount has favordynmods: no attach wait)"
else
  echo "cgroup: v1 (no favordynmods: an isolated start waits for a grace period when it joins its cgroup, unless an earlier favordynmods left the fast path on; see cordon doctor)"
fi
echo "spare volumes before the runs: $(ls /var/lib/cordon/volumes/spares/*/ 2>/dev/null | grep -c '\.img$' || true)"

isolated_runs=$(( runs / 5 > 20 ? runs / 5 : 20 ))
bench "$work/b2b.json" --warmup 20 --runs "$runs"
bench "$work/iso.json" --runs "$isolated_runs" --prepare "sleep $gap"
table "$work/b2b.json" "back-to-back"
table "$work/iso.json" "isolated (each run after a ${gap}s pause)"
if [[ -n "$export_json" ]]; then
  cp "$work/b2b.json" "$export_json.back-to-back.json"
  cp "$work/iso.json" "$export_json.isolated.json"
fi
exit 0
