#!/usr/bin/env python3
"""Interleaved timing of several commands: round after round, each command once per round, so
that the machine's load changes hit every command alike (hyperfine runs one command's runs in a
row). Prints the median and p90 wall time of each and its ratio to the first.

Usage: bench/interleave.py RUNS GAP_SECONDS NAME=COMMAND...   (COMMAND split on spaces)
e.g.   bench/interleave.py 100 0 before="/tmp/cordon-old run -- true" after="target/release/cordon run -- true"
"""
import os
import statistics
import sys
import time


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    runs, gap = int(sys.argv[1]), float(sys.argv[2])
    cmds = [(a.split("=", 1)[0], a.split("=", 1)[1].split()) for a in sys.argv[3:]]
    times = {name: [] for name, _ in cmds}
    null = os.open("/dev/null", os.O_RDWR)
    quiet = [(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
    for _ in range(runs):
        for name, argv in cmds:
            if gap:
                time.sleep(gap)
            t = time.perf_counter_ns()
            pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=quiet)
            _, status = os.waitpid(pid, 0)
            elapsed = (time.perf_counter_ns() - t) / 1e6
            if status != 0:
                sys.exit(f"{name} failed (wait status {status})")
            times[name].append(elapsed)
    base = statistics.median(times[cmds[0][0]])
    print(f"{'command':<12}{'median ms':>10}{'p90 ms':>9}{'ratio':>8}   ({runs} interleaved rounds, gap {gap}s)")
    for name, _ in cmds:
        v = sorted(times[name])
        med = statistics.median(v)
        print(f"{name:<12}{med:>10.2f}{v[int(len(v) * 0.9)]:>9.2f}{med / base:>7.2f}x")


if __name__ == "__main__":
    main()
