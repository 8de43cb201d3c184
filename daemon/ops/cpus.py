"""How many CPUs this process may use: the default number of workers (`LSTMD_WORKERS`).

A container's CPU limit is a CFS quota, not a CPU mask: `os.cpu_count()` in a pod
limited to 2 CPUs on a 64-core node says 64. The quota (cgroup v2 `cpu.max`, or
cgroup v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`) is what the kernel lets
the pod use, so it comes first, rounded up (1.5 CPUs: 2 workers, each then
throttled a little rather than half a core left idle); without a quota, the CPUs
this process may be scheduled on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in CPUs (quota / period), or None when there is none or no cgroup
    file says so. cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>") is read
    first, then cgroup v1 (`cpu/cpu.cfs_quota_us`, -1 = unlimited, and
    `cpu/cpu.cfs_period_us`; also under `cpu,cpuacct/`)."""
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if fields:
        if fields[0] == "max" or len(fields) < 2:
            return None
        return _ratio(fields[0], fields[1])
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / controller
        try:
            quota = (base / "cpu.cfs_quota_us").read_text().strip()
            period = (base / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use, at least 1: the cgroup quota rounded up, else the
    scheduler affinity mask, else `os.cpu_count()`."""
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        return max(1, math.ceil(quota - 1e-9))
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
