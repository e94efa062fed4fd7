#!/usr/bin/env bash
# Where the start-up time of `cordon run -- true` goes, phase by phase, at native speed.
#
# Phases: cordon's own CORDON_TIMING marks (supervisor, init and command, one CLOCK_MONOTONIC
# timeline), median over N runs of each mark's time since the supervisor's start and of the step
# before it. Single calls: an LD_PRELOAD shim (bench/trace_shim.c) timestamps the libc calls that
# set-up and teardown are made of (syscall(), mount, open, write/pwrite, ioctl, prctl,
# mkdir/rmdir, waitpid, ...) in the supervisor and the sandbox's init; unlike strace there are no
# ptrace stops (about 1 µs is added per call), and the slowest calls are listed.
#
# The binary is the dynamically linked release build (`cargo build --release`): LD_PRELOAD does
# not reach the static `cargo release-bin` binary, which runs the same code. CORDON_BIN=path
# profiles another binary (the call list is empty for a static one).
#
# Usage: bench/startup-profile.sh [--runs N] [--gap SECONDS] [--raw FILE] [-- EXTRA cordon run FLAGS]
#   --gap S   sleep S seconds between runs (default 0; a cold start after an idle moment can
#             differ from back-to-back starts, see docs/benchmarks.md)
#   --raw F   keep every run's timeline in F
set -euo pipefail
cd "$(dirname "$0")/.."
runs=30
gap=0
raw=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --gap) gap="$2"; shift 2 ;;
    --raw) raw="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
  esac
done
[[ -n "${CORDON_BIN:-}" ]] || cargo build --release --bin cordon -q
cordon="${CORDON_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/cordon}"
work=$(mktemp -d /tmp/cordon-startup-profile.XXXXXX)
trap 'rm -rf "$work"' EXIT
cc -O2 -shared -fPIC -o "$work/trace_shim.so" bench/trace_shim.c -ldl

for i in $(seq 1 "$runs"); do
  CORDON_TIMING=1 LD_PRELOAD="$work/trace_shim.so" "$cordon" run --audit "$work/audit.db" "${extra[@]}" -- true \
    2>"$work/run.$i" >/dev/null || { echo "run $i failed:" >&2; grep -v '^@@T' "$work/run.$i" >&2; exit 1; }
  [[ "$gap" != 0 ]] && sleep "$gap"
done
[[ -n "$raw" ]] && cat "$work"/run.* >"$raw"

python3 - "$work" "$runs" <<'PY'
import re, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
SYS = {56: "clone", 155: "pivot_root", 317: "seccomp", 428: "open_tree", 429: "move_mount",
       430: "fsopen", 431: "fsconfig", 432: "fsmount", 434: "pidfd_open", 442: "mount_setattr",
       444: "landlock_create_ruleset", 445: "landlock_add_rule", 446: "landlock_restrict_self"}
MARK = re.compile(r"^cordon: timing\s+([\d.]+) ms \(\+\s*([\d.]+)\) (.*)$")
TOTAL = re.compile(r"^cordon: timing\s+([\d.]+) ms total")

marks, totals, calls, lives = {}, [], {}, []
order = []
for i in range(1, runs + 1):
    seen = {}
    life = {}
    # The teardown child's shim lines can land in the middle of the supervisor's: split them.
    text = open(f"{work}/run.{i}", errors="replace").read()
    for line in re.sub(r"(?<!^)(?<!\n)@@T ", "\n@@T ", text).split("\n"):
        m = MARK.match(line)
        if m:
            name = m.group(3)
            seen[name] = seen.get(name, 0) + 1
            key = name if seen[name] == 1 else f"{name} (again)"
            if key not in order:
                order.append(key)
            marks.setdefault(key, []).append((float(m.group(1)), float(m.group(2))))
            continue
        m = TOTAL.match(line)
        if m:
            totals.append(float(m.group(1)))
            continue
        if not line.startswith("@@T "):
            continue
        f = line.split(" ", 5)
        pid, dur, call = int(f[1]), int(f[3]) / 1e6, f[4]
        if call in ("start", "exit") and pid not in (1, 2):
            life.setdefault(call, int(f[2]))
            continue
        det = f[5] if len(f) > 5 else ""
        if call == "syscall":
            nr = re.match(r"nr=(\d+)", det)
            call = SYS.get(int(nr.group(1)) if nr else -1, det.split(" ")[0])
            det = ""
        who = {1: "init", 2: "cmd"}.get(pid, "sup")
        det = re.sub(r"fd=\d+|ret=-?\d+|\d{6,}\S*|01[0-9A-Z]{24}|/proc/\d+/|\.[A-Za-z0-9]{6}/", "…", det)[:60]
        calls.setdefault((who, call, det), []).append(dur)
    if "start" in life and "exit" in life:
        lives.append((life["exit"] - life["start"]) / 1e6)
if not totals:
    sys.exit("no CORDON_TIMING output: this cordon has no timing marks")
med = statistics.median
pct = lambda v, q: sorted(v)[min(len(v) - 1, int(len(v) * q))]
print(f"cordon run -- true, {len(totals)} runs: CORDON_TIMING marks, median ms (p90 of the step)")
print(f"  {'at':>7} {'step':>7} {'p90':>7}  mark")
for k in sorted(order, key=lambda k: med([a for a, _ in marks[k]])):
    at = [a for a, _ in marks[k]]
    step = [d for _, d in marks[k]]
    print(f"  {med(at):7.2f} {med(step):7.2f} {pct(step, 0.9):7.2f}  {k}")
print(f"  {med(totals):7.2f} {'':7} {pct(totals, 0.9):7.2f}  total since main (process exec, dynamic loading and exit not included)")
if lives:
    print(f"  {med(lives):7.2f} {'':7} {pct(lives, 0.9):7.2f}  supervisor process: first constructor to exit() (exec, dynamic loading and the kernel's exit not included)")
print(f"\nslowest calls (mean ms per run, all calls of a kind summed; sup = supervisor and its threads):")
top = sorted(((sum(v) / len(totals), k) for k, v in calls.items()), reverse=True)[:14]
for m, (who, call, det) in top:
    print(f"  {m:7.2f}  {who:<4} {call:<16} {det}")
PY
