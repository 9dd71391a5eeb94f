"""ReuseGRPOTrainer under data parallel (accelerate's DDP, 2 gloo ranks): each rank's update
equals trl.GRPOTrainer's on 2 ranks fed the same completions and grouping, hbmplan's DDP driver
reduces once (DDP's reducer never fires), and the logged metrics are TRL's cross-rank ones."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers.dist import run_ranks

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("trl_ddp")]

CASES = [  # KL and two iterations; one group per micro-batch with an empty one (bnpo)
    dict(loss_type="dapo", beta=0.04, num_iterations=2, max_steps=2),
    dict(loss_type="bnpo", beta=0.0, num_iterations=2, max_steps=2, per_device_train_batch_size=2),
]
METRICS = ("loss", "kl", "entropy", "clip_ratio/region_mean", "clip_ratio/high_max", "reward")


def _accelerate_env(rank: int, world_size: int) -> None:
    """accelerate detects a multi-process run from these variables and reuses the process group
    ``run_ranks`` initialised (it calls ``init_process_group`` only when none is; the master
    address is then never contacted)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")  # fmt: skip


def _rank(rank: int, world_size: int, model_dir: str, tmp: str):
    import torch.distributed as dist
    from datasets import Dataset
    from torch.nn.parallel import DistributedDataParallel

    from hbmplan.distributed.data_parallel import DDPSync
    from tests.helpers.trl import prompts, reward_w3, saved_qwen3, tiny_tokenizer
    from tests.integrations.test_trl import TRL, Reuse, Updates, config, rel_diff

    _accelerate_env(rank, world_size)

    class Seen:
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            self.prompts.extend(tuple(p) for p in prompt_ids)
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    out = []
    for case, kw in enumerate(CASES):
        runs = {}
        for name, base in (("trl", TRL), ("reuse", Reuse)):
            cls = type(f"Seen{name}", (Seen, base), {"prompts": None})
            updates = Updates()
            trainer = cls(saved_qwen3(Path(model_dir)), reward_w3,
                          config(Path(tmp) / f"{name}{case}-{rank}", **kw),
                          train_dataset=Dataset.from_dict({"prompt": prompts(8, vary=True)}),
                          processing_class=tiny_tokenizer(), callbacks=[updates])  # fmt: skip
            trainer.prompts = []
            assert trainer.accelerator.num_processes == dist.get_world_size() == world_size
            trainer.train()
            assert isinstance(trainer.model_wrapped, DistributedDataParallel)  # accelerate's
            if name == "reuse":
                # the context was built on the DDP model: hbmplan's driver did the reduction
                assert isinstance(trainer.memory(trainer.model_wrapped).data_parallel, DDPSync)
                trainer.close_memory()
            runs[name] = (updates.steps, trainer.state.log_history, sorted(set(trainer.prompts)))
        (got, got_log, seen), (want, want_log, trl_seen) = runs["reuse"], runs["trl"]
        assert seen == trl_seen  # the same prompts on this rank
        logged = [(g, w) for g, w in zip(got_log, want_log, strict=True) if "loss" in w]
        worst = max(
            abs(g[k] - w[k]) / (1 + abs(w[k])) for g, w in logged for k in METRICS if k in w
        )
        diffs = [rel_diff(g, w) for g, w in zip(got, want, strict=True)]
        out.append({"diffs": diffs, "metrics": worst, "steps": len(want), "prompts": seen,
                    "grads": [{k: v.sum().item() for k, v in g.items()} for g in got]})  # fmt: skip
    return out


def test_ddp_update_and_metrics_equal_trl_on_two_ranks(tmp_path):
    from tests.helpers.trl import saved_qwen3

    saved_qwen3(tmp_path / "qwen3")
    start = time.monotonic()
    ranks = run_ranks(_rank, 2, (str(tmp_path / "qwen3"), str(tmp_path)), timeout_s=110)
    print(f"2 ranks, {len(CASES)} cases: {time.monotonic() - start:.1f} s")
    for case in range(len(CASES)):
        r0, r1 = ranks[0][case], ranks[1][case]
        print(CASES[case], "update rel diff", r0["diffs"], r1["diffs"], "metrics", r0["metrics"])
        assert set(r0["prompts"]).isdisjoint(r1["prompts"])  # each rank trains its own groups
        for r in (r0, r1):
            assert r["steps"] == 2
            assert max(r["diffs"]) <= 1e-5, r["diffs"]
            assert r["metrics"] <= 1e-5
        assert r0["grads"] == r1["grads"]  # averaged over the ranks: the same on both
