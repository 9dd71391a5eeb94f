"""The multi-process harness itself: results in rank order, a rank's failure named with its
traceback, a hung rank killed within the deadline, collectives bounded by their timeout."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import RankError, run_ranks


def _sum_of_ranks(rank: int, world_size: int, scale: int) -> list[float]:
    t = torch.tensor([float(rank * scale)])
    dist.all_reduce(t)
    return [rank, dist.get_world_size(), t.item()]


def _rank_one_raises(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("injected on rank 1")
    return rank


def _rank_one_skips_the_collective(rank: int, world_size: int) -> int:
    if rank != 1:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: the collective times out
    return rank


def _rank_one_hangs(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)
    return rank


def test_results_come_back_in_rank_order():
    got = run_ranks(_sum_of_ranks, 3, args=(2,), timeout_s=120)
    assert got == [[0, 3, 6.0], [1, 3, 6.0], [2, 3, 6.0]]


def test_a_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*injected on rank 1"):
        run_ranks(_rank_one_raises, 2, timeout_s=120)


def test_a_collective_without_its_peer_times_out_instead_of_hanging():
    with pytest.raises(RankError, match="rank 0 failed"):
        run_ranks(_rank_one_skips_the_collective, 2, timeout_s=120, collective_s=5)


def test_a_hung_rank_is_killed_at_the_deadline():
    # (rank 0 may not have started either on a loaded machine: only rank 1 is certain)
    with pytest.raises(RankError, match=r"ranks \[(0, )?1\] did not finish within 20 s"):
        run_ranks(_rank_one_hangs, 2, timeout_s=20)
