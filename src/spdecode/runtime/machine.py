"""What this machine offers: usable cores (affinity and cgroup quota), the CPU's name and the
instruction sets that decide which weight backend is fast. Nothing here assumes two cores."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

# The flags that change which backend wins (bf16 GEMMs want avx512_bf16 or AMX; fp16w wants AVX2/F16C).
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_tile")


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup's quota allows (cgroup v2 cpu.max, or v1's cfs quota), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def threads_per_rank(ranks: int, cores: int | None = None) -> int:
    """Each of `ranks` processes on this machine gets its share of the usable cores (at least one)."""
    return max(1, (usable_cores() if cores is None else cores) // max(1, ranks))


def thread_sweep(cores: int | None = None) -> list[int]:
    """Thread counts worth timing: 1, powers of two, and every usable core."""
    cores = usable_cores() if cores is None else cores
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return [*out, cores]


def cpuinfo_field(text: str, field: str) -> str | None:
    """The first core's `field` ("model name", "flags") in /proc/cpuinfo's text."""
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def describe_cpu() -> dict:
    """The CPU as every reported number should name it: model, the flags that matter, torch's
    dispatch level and the usable cores."""
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        info = ""
    flags = set((cpuinfo_field(info, "flags") or "").split())
    name = cpuinfo_field(info, "model name") or platform.processor() or platform.machine()
    return {"cpu": name, "flags": [f for f in RELEVANT_FLAGS if f in flags],
            "capability": torch.backends.cpu.get_cpu_capability(), "usable_cores": usable_cores()}


def cpu_line() -> str:
    d = describe_cpu()
    return f"{d['cpu']} ({d['usable_cores']} usable cores; torch {d['capability']}; {' '.join(d['flags']) or '-'})"
