#!/usr/bin/env bash
# Cold start of a sandbox running `true`, side by side in one run:
#   cordon run -- true           (all layers: user/pid/mnt/net/ipc/uts/cgroup ns, pivot_root,
#                                 read-only root, Landlock, seccomp, cgroup limits, capped workspace)
#   bwrap --unshare-all ... true (namespaces + binds; no Landlock, seccomp or cgroup)
#   unshare -rn true             (user + net namespace only)
#   true                         (no sandbox)
# Prints medians and ratios; `--export FILE` also writes hyperfine's JSON.
# Usage: bench/startup.sh [--runs N] [--export FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=200
export_json=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --export) export_json="$2"; shift 2 ;;
    *) echo "usage: bench/startup.sh [--runs N] [--export FILE]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh --bench
cargo build --release --bin cordon -q
cordon="${CARGO_TARGET_DIR:-$PWD/target}/release/cordon"
json=$(mktemp --suffix=.json)
trap 'rm -f "$json"' EXIT

bwrap_cmd="bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/sbin /sbin --proc /proc --dev /dev --tmpfs /tmp --dir /workspace --chdir /workspace true"
$bwrap_cmd || { echo "bwrap cannot run here" >&2; exit 1; }
"$cordon" run -- true || { echo "cordon cannot run here (see cordon doctor)" >&2; exit 1; }

hyperfine -N --warmup 20 --runs "$runs" --export-json "$json" \
  -n cordon "$cordon run -- true" \
  -n bwrap "$bwrap_cmd" \
  -n "unshare -rn" "unshare -rn true" \
  -n "true" "true" >/dev/null

python3 - "$json" <<'PY'
import json, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
med = {r["command"]: statistics.median(r["times"]) * 1000 for r in res}
p90 = {r["command"]: sorted(r["times"])[int(len(r["times"]) * 0.9)] * 1000 for r in res}
base = med["cordon"]
print(f"{'command':<14}{'median ms':>10}{'p90 ms':>10}{'vs cordon':>11}")
for name in ["cordon", "bwrap", "unshare -rn", "true"]:
    print(f"{name:<14}{med[name]:>10.2f}{p90[name]:>10.2f}{med[name] / base:>10.2f}x")
print(f"\ncordon / bwrap median ratio: {base / med['bwrap']:.2f} (below 1.00 means cordon starts faster)")
PY
[[ -n "$export_json" ]] && cp "$json" "$export_json"
exit 0
