"""A step as a timeline: the marks each process wrote (``rewardsignal.tracing``),
cut into steps at the benchmark's ``bench: step begins`` marks, each mark shown
at the median time after its step began, with the CPU its thread spent since
that thread's mark before it."""

from __future__ import annotations

import statistics
from collections import defaultdict

from rewardsignal import tracing

STEP = "bench: step begins"


def report(folder: str) -> None:
    marks = tracing.read(folder)
    starts = [m.t_ns for m in marks if m.name == STEP]
    if len(starts) < 2:
        print("timeline: fewer than two steps traced")
        return
    offsets: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)
    last_cpu: dict[tuple[int, int], int] = {}
    step, seen = -1, {}
    for m in marks:
        if step + 1 < len(starts) and m.t_ns >= starts[step + 1]:
            step += 1
            for name, n in seen.items():
                counts[name].append(n)
            seen = {}
        key = (m.pid, m.thread)
        spent = m.cpu_ns - last_cpu.get(key, m.cpu_ns)
        last_cpu[key] = m.cpu_ns
        # Whole steps only: the last window may be cut short by the run's end.
        if step < 0 or step + 1 >= len(starts):
            continue
        if m.name not in seen:
            offsets[m.name].append((m.t_ns - starts[step]) / 1e6)
            cpu[m.name].append(spent / 1e6)
        seen[m.name] = seen.get(m.name, 0) + 1
    steps = len(starts) - 1
    print(f"timeline of a step (medians over {steps} steps; ms after the SDK's call; "
          "CPU: the thread's since its mark before; n: marks per step):")
    for name in sorted(offsets, key=lambda k: statistics.median(offsets[k])):
        present = len(offsets[name])
        print(f"  {statistics.median(offsets[name]):8.2f}  cpu {statistics.median(cpu[name]):6.2f}"
              f"  n {statistics.median(counts[name] or [0]):3g}"
              f"{'' if present == steps else f' (in {present} of {steps} steps)'}  {name}")
