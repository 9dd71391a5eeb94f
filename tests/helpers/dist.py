"""Run one function on N CPU ranks (gloo), bounded in time, and collect each rank's result.

    results = run_ranks(check_fsdp_cases, world_size=2, args=(seed,), timeout_s=180)

Each rank is a spawned process that joins a gloo process group through a file in a fresh
temporary directory (no TCP port to race on, safe under pytest-xdist), with ``collective_s`` as
the timeout of every collective, and calls ``fn(rank, world_size, *args)``. Whatever happens,
the rank destroys its process group and reports either its result or its traceback. The parent
waits at most ``timeout_s`` in all; ranks still running then are killed, and the error names
them. A failure names its rank and carries that rank's traceback.

``fn`` must be importable by name (a module-level function): spawned processes re-import it.
Results travel through a pipe (pickled): return plain data or CPU tensors, not process groups.
Spawn one world per (engine, world size) and run many cases inside it: starting a world costs
seconds (each rank imports torch).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RankError", "run_ranks"]


class RankError(AssertionError):
    """One or more ranks failed or did not finish in time (an ``AssertionError`` so that pytest
    shows it as a test failure)."""


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    collective_s: float,
    threads: int,
    args: Sequence[Any],
    conn,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    outcome: tuple[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_s),
        )
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group still ends the process
                dist.destroy_process_group()
    try:
        conn.send(outcome)
    except Exception:
        conn.send(
            ("error", f"rank {rank}: its result could not be sent:\n{traceback.format_exc()}")
        )
    conn.close()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 240.0,
    collective_s: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each on its
    own spawned rank of a gloo process group.

    Args:
        fn: a module-level function ``fn(rank, world_size, *args)``.
        world_size: ranks to spawn, >= 1.
        args: extra picklable arguments, the same for every rank.
        timeout_s: the most the whole run may take, start-up included; then every rank still
            running is killed.
        collective_s: the process group's timeout for every collective (a rank waiting on a
            dead peer raises after this long).
        threads: torch threads per rank.

    Raises:
        RankError: a rank raised (its rank and traceback in the message), died without a
            result, or did not finish within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="hbmplan-ranks-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        procs, conns = [], []
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_rank_main,
                    args=(fn, rank, world_size, init_file, collective_s, threads, args, child),
                    daemon=True,
                )
                proc.start()
                child.close()
                procs.append(proc)
                conns.append(parent)
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < world_size and time.monotonic() < deadline:
                for rank, conn in enumerate(conns):
                    if rank in outcomes:
                        continue
                    if conn.poll(0.05):
                        try:
                            outcomes[rank] = conn.recv()
                        except EOFError:
                            outcomes[rank] = ("error", "the rank exited without a result")
                    elif not procs[rank].is_alive() and not conn.poll(0):
                        code = procs[rank].exitcode
                        outcomes[rank] = ("error", f"the rank died (exit code {code})")
        finally:
            for proc in procs:
                proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
            for conn in conns:
                conn.close()
    missing = [r for r in range(world_size) if r not in outcomes]
    failed = {r: o[1] for r, o in sorted(outcomes.items()) if o[0] != "ok"}
    if missing or failed:
        parts = [f"rank {r} failed:\n{tb}" for r, tb in failed.items()]
        if missing:
            parts.append(f"ranks {missing} did not finish within {timeout_s:g} s (killed)")
        raise RankError(f"{fn.__name__} on {world_size} ranks: " + "\n".join(parts))
    return [outcomes[r][1] for r in range(world_size)]


def shared_result(tmp_path_factory, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per test session, also across pytest-xdist workers: the first worker to
    ask computes and pickles it, the others wait on a file lock and read it (the xdist recipe for
    session-wide fixtures). For a world that every test of a module reads, whichever worker the
    scheduler sends those tests to."""
    import pickle

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by its workers
    path = root / f"{name}.pickle"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return pickle.loads(path.read_bytes())
        result = compute()
        path.write_bytes(pickle.dumps(result))
        return result
