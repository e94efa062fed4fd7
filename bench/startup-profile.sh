#!/usr/bin/env bash
# Where the start-up time of `cordon run -- true` goes, phase by phase, at native speed.
#
# An LD_PRELOAD shim (bench/trace_shim.c) timestamps the libc calls that set-up and teardown are
# made of (syscall(), mount, open, write/pwrite, ioctl, prctl, mkdir/rmdir, waitpid, ...) in the
# supervisor and in the sandbox's init; unlike strace there are no ptrace stops, so the phases
# take as long as they do without the shim (about 1 µs per call is added). The script runs the
# command N times, splits each timeline into phases by marker calls, and prints the median of
# each phase, then the slowest single calls.
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
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
cargo build --release --bin cordon -q
cordon="${CARGO_TARGET_DIR:-$PWD/target}/release/cordon"
work=$(mktemp -d /tmp/cordon-startup-profile.XXXXXX)
trap 'rm -rf "$work"' EXIT
cc -O2 -shared -fPIC -o "$work/trace_shim.so" bench/trace_shim.c -ldl

for i in $(seq 1 "$runs"); do
  LD_PRELOAD="$work/trace_shim.so" "$cordon" run --audit "$work/audit.db" "${extra[@]}" -- true \
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

def load(path):
    ev = []
    for line in open(path, errors="replace"):
        if not line.startswith("@@T "):
            continue
        f = line.rstrip("\n").split(" ", 5)
        pid, t, d, call = int(f[1]), int(f[2]), int(f[3]), f[4]
        det = f[5] if len(f) > 5 else ""
        if call == "syscall":
            m = re.match(r"nr=(\d+)", det)
            nr = int(m.group(1)) if m else -1
            call = SYS.get(nr, f"syscall{nr}")
        ev.append(dict(pid=pid, t=t, d=d, end=t + d, call=call, det=det))
    return ev

def phases(ev):
    sup = ev[0]["pid"]
    S = [e for e in ev if e["pid"] == sup]
    init = [e for e in ev if e["pid"] == 1]
    cmd = [e for e in ev if e["pid"] == 2]
    first = lambda xs, p: next((e for e in xs if p(e)), None)
    last = lambda xs, p: next((e for e in reversed(xs) if p(e)), None)
    t0 = S[0]["t"]
    out = {}
    ws0 = first(S, lambda e: re.search(r"cordon/(volumes|templates)|loop-control", e["det"]))
    ws1 = last(S, lambda e: e["call"] in ("open_tree", "fsmount", "fsconfig"))
    clone = first(S, lambda e: e["call"] == "clone")
    if not (ws0 and ws1 and clone):
        return None
    out["cli, policy, Landlock probe, seccomp compile"] = ws0["t"] - t0
    out["workspace volume prepare (copy, loop, ext4 mount)"] = ws1["end"] - ws0["t"]
    out["cgroup detect + create + limits"] = clone["t"] - ws1["end"]
    out["clone (6 namespaces)"] = clone["d"]
    after = [e for e in S if e["t"] >= clone["end"]]
    gid = first(after, lambda e: e["call"] == "open" and "/gid_map " in e["det"])
    gidw = first([e for e in after if gid and e["t"] > gid["t"]], lambda e: e["call"] == "write")
    if gidw:
        out["id maps (uid_map, gid_map)"] = gidw["end"] - clone["end"]
        pw = [e for e in after if e["t"] >= gidw["end"] and e["call"] == "pwrite"]
        first_poll = first(after, lambda e: e["call"] == "poll")
        pw = [e for e in pw if first_poll is None or e["t"] < first_poll["t"]]
        if pw:
            out["cgroup attach (cgroup.procs writes)"] = pw[-1]["end"] - pw[0]["t"]
            go = first(init, lambda e: e["call"] in ("recv", "recvmsg") and e["end"] >= pw[-1]["end"])
            m0 = first(init, lambda e: e["call"] == "mount")
            if go and m0:
                out["handshake (pidfd, go)"] = m0["t"] - pw[-1]["end"]
    m0 = first(init, lambda e: e["call"] == "mount")
    um = first(init, lambda e: e["call"] == "umount2")
    if m0 and um:
        out["init: mounts, pivot_root"] = um["end"] - m0["t"]
    fork = first(init, lambda e: e["call"] in ("fork", "clone") and e["det"].endswith("ret=2"))
    cexec = first(cmd, lambda e: e["call"] == "execve")
    if um and fork:
        out["init: hostname, loopback, fds, fork the command"] = fork["end"] - um["end"]
    if fork and cexec:
        ll = sum(e["d"] for e in cmd if e["call"].startswith("landlock"))
        sc = sum(e["d"] for e in cmd if e["call"] == "seccomp")
        out["command: caps, rlimits, setsid (before exec)"] = cexec["t"] - fork["end"] - ll - sc
        out["command: Landlock (ruleset, rules, restrict)"] = ll
        out["command: seccomp (load BPF)"] = sc
    isec = first(init, lambda e: e["call"] == "seccomp")
    if fork and isec:
        out["(init, in parallel: caps + seccomp)"] = isec["end"] - fork["end"]
    reap = first(S, lambda e: e["call"] == "waitpid")
    iw = first(init, lambda e: e["call"] == "waitpid")
    if cexec and iw:
        out["exec + run `true` + exit"] = iw["end"] - cexec["t"]
    if iw and reap:
        out["init exits, supervisor reaps"] = reap["end"] - iw["end"]
    rm = last(S, lambda e: e["call"] == "rmdir")
    if reap and rm:
        out["cgroup stats + remove"] = rm["end"] - reap["end"]
    audit = first(S, lambda e: e["call"] == "open" and "audit.db" in e["det"])
    if rm and audit:
        out["workspace discard (umount ext4, detach loop)"] = audit["t"] - rm["end"]
        out["audit store (session start + end)"] = S[-1]["end"] - audit["t"]
    out["total (shim start to last call)"] = S[-1]["end"] - t0
    return out, ev

per = {}
slow = {}
for i in range(1, runs + 1):
    r = phases(load(f"{work}/run.{i}"))
    if r is None:
        print(f"run {i}: markers not found; the code path changed, see --raw", file=sys.stderr)
        continue
    out, ev = r
    for k, v in out.items():
        per.setdefault(k, []).append(v / 1e6)
    for e in ev:
        key = (str(e["pid"]) if e["pid"] in (1, 2) else "sup", e["call"], re.sub(r"fd=\d+|\d{6,}\S*|01[0-9A-Z]{24}", "…", e["det"])[:70])
        slow.setdefault(key, []).append(e["d"] / 1e6)
print(f"cordon run -- true, {len(per.get('total (shim start to last call)', []))} runs; median ms (p10 .. p90)")
for k, v in per.items():
    v = sorted(v)
    p = lambda q: v[min(len(v) - 1, int(len(v) * q))]
    print(f"  {k:<50}{statistics.median(v):>8.2f}   ({p(0.1):.2f} .. {p(0.9):.2f})")
print("\nslowest single calls (median ms over runs; sup = supervisor, 1 = init, 2 = command):")
top = sorted(((statistics.median(v), k) for k, v in slow.items() if len(v) >= len(per.get('total (shim start to last call)', [1])) // 2), reverse=True)[:12]
for m, (who, call, det) in top:
    print(f"  {m:>7.2f}  {who:>3} {call:<16} {det}")
PY
