"""tools/cpus.py: usable CPUs from the affinity mask and the cgroup CPU limit (v1 and v2), read
from directory trees laid out like /proc/self and /sys/fs/cgroup, and on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import cpus

ROOT = Path(__file__).resolve().parent.parent
V1_CPU = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct"
V1_MEM = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
V2 = "41 23 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"


def _tree(tmp: Path, mountinfo: list[str], cgroup: list[str], files: dict[str, str]) -> Path:
    """A fake ``/`` under ``tmp``: proc/self/{mountinfo,cgroup} and the given cgroup files."""
    proc = tmp / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (proc / "cgroup").write_text("\n".join(cgroup) + "\n")
    for name, text in files.items():
        path = tmp / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc


def _limit(tmp: Path, *args) -> float | None:
    found = cpus.cgroup_cpu_limit(_tree(tmp, *args), sysroot=tmp)
    return None if found is None else found[0]


def test_v2_quota_of_the_process_cgroup(tmp_path):
    files = {"/sys/fs/cgroup/job/cpu.max": "150000 100000", "/sys/fs/cgroup/cpu.max": "max 100000"}
    found = cpus.cgroup_cpu_limit(_tree(tmp_path, [V2], ["0::/job"], files), sysroot=tmp_path)
    assert found == (1.5, tmp_path / "sys/fs/cgroup/job/cpu.max")


def test_v2_an_ancestor_quota_binds_the_child(tmp_path):
    files = {"/sys/fs/cgroup/a/cpu.max": "200000 100000",
             "/sys/fs/cgroup/a/b/cpu.max": "max 100000"}  # fmt: skip
    assert _limit(tmp_path, [V2], ["0::/a/b"], files) == 2.0


def test_v2_without_a_quota_is_no_limit(tmp_path):
    assert _limit(tmp_path, [V2], ["0::/a"], {"/sys/fs/cgroup/a/cpu.max": "max 100000"}) is None
    assert _limit(tmp_path / "x", [V2], ["0::/"], {}) is None  # no cpu controller: no file


def test_v2_namespaced_mount_shows_the_container_as_root(tmp_path):
    """Inside a cgroup namespace /proc/self/cgroup says ``0::/`` and the mount is the container's
    own cgroup: the limit is the mount point's file."""
    mount = "41 23 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw"
    files = {"/sys/fs/cgroup/cpu.max": "400000 100000"}
    assert _limit(tmp_path, [mount], ["0::/"], files) == 4.0


def test_v1_quota_and_period(tmp_path):
    files = {"/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
             "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}  # fmt: skip
    cgroup = ["4:memory:/docker/abc", "2:cpu,cpuacct:/docker/abc", "1:name=systemd:/"]
    assert _limit(tmp_path, [V1_MEM, V1_CPU], cgroup, files) == 0.5


def test_v1_quota_minus_one_is_no_limit(tmp_path):
    files = {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1",
             "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"}  # fmt: skip
    assert _limit(tmp_path, [V1_CPU], ["2:cpu,cpuacct:/"], files) is None


def test_hybrid_takes_the_tightest_hierarchy(tmp_path):
    """v1 ``cpu`` and a v2 tree mounted side by side (systemd's hybrid layout): both are read."""
    unified = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw"
    files = {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000",
             "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
             "/sys/fs/cgroup/unified/cpu.max": "250000 100000"}  # fmt: skip
    assert _limit(tmp_path, [V1_CPU, unified], ["2:cpu,cpuacct:/", "0::/"], files) == 2.5


def test_unreadable_or_garbled_files_are_no_limit(tmp_path):
    assert cpus.cgroup_cpu_limit(tmp_path / "missing", sysroot=tmp_path) is None
    assert _limit(tmp_path, [V2], ["0::/a"], {"/sys/fs/cgroup/a/cpu.max": "lots"}) is None


@pytest.mark.parametrize(
    ("affinity", "limit", "usable"),
    [(8, None, 8), (8, 2.0, 2), (8, 2.5, 2), (2, 16.0, 2), (4, 0.5, 1), (1, None, 1)],
)
def test_usable_is_affinity_capped_by_the_limit_rounded_down(affinity, limit, usable):
    assert cpus.usable_from(affinity, limit) == usable


def test_threads_per_process_never_oversubscribes():
    for n in range(1, 9):
        for procs in range(1, 9):
            t = cpus.threads_per_process(procs, cpus=n)
            assert t >= 1 and (t * procs <= n or t == 1)
    with pytest.raises(ValueError, match="processes must be >= 1, got 0"):
        cpus.threads_per_process(0, cpus=4)


def test_this_machine_and_this_test_process():
    n = cpus.usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    # tests/conftest.py: this process's torch threads times the xdist workers fit in n, and
    # subprocesses inherit the same count
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert 1 <= torch.get_num_threads() <= cpus.threads_per_process(workers)
    assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "cpus.py")], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == str(n)
