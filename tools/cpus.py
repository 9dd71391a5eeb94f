"""How many CPUs this process may actually use: its affinity mask and its cgroup's CPU bandwidth
limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), not the host's core count. Standard library only.

    python tools/cpus.py            # prints the number (the Makefile's `pytest -n`)
    python tools/cpus.py --explain  # affinity, cgroup limit and where it was read

Benchmarks, the demo and the test suite size their thread counts from :func:`usable_cpus`: more
threads than CPUs makes torch's intra-op threads wait on each other, and CPU timings collapse
(a 5x speedup measured as 1.7x).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

__all__ = [
    "affinity_cpus",
    "cgroup_cpu_limit",
    "threads_per_process",
    "usable_cpus",
    "usable_from",
]


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.sched_getaffinity``; ``os.cpu_count()`` where
    the platform has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _mounts(proc_self: Path) -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of each cgroup mount in ``mountinfo``."""
    out = []
    for line in (proc_self / "mountinfo").read_text().splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        out.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return out


def _memberships(proc_self: Path) -> list[tuple[set[str], str]]:
    """(controllers, path) per line of ``/proc/self/cgroup``; v2's line has no controllers."""
    out = []
    for line in (proc_self / "cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append(({c for c in parts[1].split(",") if c}, parts[2]))
    return out


def _directories(mount: str, root: str, path: str, sysroot: Path) -> list[Path]:
    """The process's cgroup directory under ``mount`` and each ancestor up to the mount point,
    leaf first. ``root`` is the cgroup the mount shows (a namespaced mount shows the container's
    own cgroup as ``/``)."""
    inside = root == "/" or path == root or path.startswith(root.rstrip("/") + "/")
    rel = os.path.relpath(path, root) if inside else "."  # another namespace's path: the mount
    parts = [p for p in Path(rel).parts if p not in (".", "/")]
    base = sysroot / mount.lstrip("/")
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _limit_v2(directory: Path) -> float | None:
    """``cpu.max``: "max 100000" (none) or "<quota> <period>" in microseconds."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or 100000)
    except (ValueError, ZeroDivisionError):
        return None


def _limit_v1(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 is no limit."""
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(
    proc_self: Path = Path("/proc/self"), sysroot: Path = Path("/")
) -> tuple[float, Path] | None:
    """The tightest CPU bandwidth limit on this process, in CPUs, and the file it came from.

    Reads every cgroup the process belongs to (v2, and v1's ``cpu`` hierarchy) from its own
    directory up to the mount point, since an ancestor's quota binds its descendants too.
    ``None`` when no limit is set or the files cannot be read. ``proc_self`` and ``sysroot``
    exist for tests (a directory tree standing in for ``/proc/self`` and ``/``).
    """
    try:
        mounts, memberships = _mounts(proc_self), _memberships(proc_self)
    except OSError:
        return None
    best: tuple[float, Path] | None = None
    for root, mount, fstype, options in mounts:
        v2 = fstype == "cgroup2"
        if not v2 and "cpu" not in options:
            continue
        for controllers, path in memberships:
            if (not controllers) != v2 or (not v2 and "cpu" not in controllers):
                continue
            for directory in _directories(mount, root, path, sysroot):
                limit = (_limit_v2 if v2 else _limit_v1)(directory)
                if limit is not None and (best is None or limit < best[0]):
                    name = "cpu.max" if v2 else "cpu.cfs_quota_us"
                    best = (limit, directory / name)
    return best


def usable_from(affinity: int, limit: float | None) -> int:
    """The rule: ``affinity`` CPUs, capped by the bandwidth ``limit`` (CPUs, ``None``: no limit)
    rounded down, since a thread beyond the quota is throttled mid-step (the jitter this avoids);
    at least 1."""
    n = affinity if limit is None else min(affinity, math.floor(limit))
    return max(1, n)


def usable_cpus() -> int:
    """CPUs this process may use: :func:`usable_from` of :func:`affinity_cpus` and
    :func:`cgroup_cpu_limit`."""
    found = cgroup_cpu_limit()
    return usable_from(affinity_cpus(), found[0] if found else None)


def threads_per_process(processes: int, cpus: int | None = None) -> int:
    """Threads each of ``processes`` concurrent processes (e.g. pytest-xdist workers) may run
    without oversubscribing ``cpus`` (default :func:`usable_cpus`): ``cpus // processes``, at
    least 1."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    return max(1, (usable_cpus() if cpus is None else cpus) // processes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--explain"]):
        print("usage: python tools/cpus.py [--explain]", file=sys.stderr)
        return 2
    if not argv:
        print(usable_cpus())
        return 0
    found = cgroup_cpu_limit()
    where = f"{found[0]:g} CPUs ({found[1]})" if found else "none"
    print(f"affinity: {affinity_cpus()} CPUs; cgroup CPU limit: {where}; host: {os.cpu_count()}")
    print(f"usable: {usable_cpus()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
