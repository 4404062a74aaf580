"""CPU seconds a command spends, by process: every process it starts, Ray's included.

    python benchmarks/process_cpu.py clara-ray demo --address local run.name=small ...

Runs the command, reads /proc every 0.2 s for its process tree (a local Ray
instance's processes descend from the driver that started it) and prints each
kind of process (Ray's process title, e.g. ``ray::TrainController``) with its
CPU seconds and how many there were. A process that lives less than a sample
is missed; one that changes title (``ray::IDLE`` becoming an actor) counts under
its last title other than ``ray::IDLE``. Linux only. CPU seconds, unlike wall
time, change little when something else runs beside the command.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def _parents() -> dict[int, list[int]]:
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children[int(fields[1])].append(int(name))
    return children


def _tree(root: int) -> list[int]:
    children, found, todo = _parents(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _read(pid: int) -> tuple[float, str] | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        command = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS, command  # utime + stime


def _kind(command: str) -> str:
    if command.startswith("ray::"):
        return command.split()[0]
    if "default_worker.py" in command:
        return "ray worker (before its first task)"
    return " ".join(os.path.basename(word) for word in command.split()[:2])[:60]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.perf_counter()
    process = subprocess.Popen(argv)
    cpu: dict[int, float] = {}
    title: dict[int, str] = {}
    while process.poll() is None:
        for pid in _tree(process.pid):
            seen = _read(pid)
            if seen is None:
                continue
            cpu[pid] = max(cpu.get(pid, 0.0), seen[0])
            if seen[1] and (seen[1] != "ray::IDLE" or pid not in title):
                title[pid] = seen[1]
        time.sleep(0.2)
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for pid, seconds in cpu.items():
        kind = kinds[_kind(title.get(pid, ""))]
        kind[0] += seconds
        kind[1] += 1
    print(f"exit {process.returncode}, wall {time.perf_counter() - started:.0f} s, "
          f"CPU {sum(cpu.values()):.0f} s in {len(cpu)} processes")
    print(f"{'CPU s':>8} {'count':>5}  process")
    for name, (seconds, count) in sorted(kinds.items(), key=lambda item: -item[1][0]):
        print(f"{seconds:8.1f} {count:5d}  {name}")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
