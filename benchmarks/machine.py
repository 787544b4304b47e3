"""What a benchmark ran on: the CPU model, for the tables under reports/results/."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name and logical CPU count, e.g. ``"AMD EPYC, 2 logical CPUs"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"
