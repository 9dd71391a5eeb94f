"""The TRL integration's parts on their own: version pin, refusals naming the option, groups
kept whole per process and per micro-batch with TRL's row weights, import without TRL."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOConfig
from trl.trainer.utils import RepeatSampler

from hbmplan.integrations.trl_batches import BATCH, WEIGHT, group_rows, regroup, row_weights
from hbmplan.integrations.trl_options import check_trl_version, unsupported

BASE = GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], per_device_train_batch_size=4,
                  num_generations=4)  # fmt: skip


def options(**kw):
    """A GRPOConfig's attributes with ``kw`` changed (world_size is a property there)."""
    return SimpleNamespace(**{**vars(BASE), "world_size": 1, **kw})


def test_the_trl_release_is_pinned():
    check_trl_version("1.16.0")
    check_trl_version("1.16.3.dev0")
    for other in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=rf"supports TRL >=1.16,<1.17 .* got trl {other}"):
            check_trl_version(other)


@pytest.mark.parametrize(
    "kw, named",
    [(dict(loss_type="sapo"), "loss_type='sapo'"),
     (dict(loss_type="cispo"), "loss_type='cispo'"),
     (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
     (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
     (dict(entropy_coef=0.01), "entropy_coef=0.01"),
     (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
     (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
     (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32=True"),
     (dict(fp16=True), "fp16=True"),
     (dict(use_liger_kernel=True), "use_liger_kernel=True"),
     (dict(fsdp=True), "fsdp=True: the trainer drives DDP only"),
     (dict(deepspeed="ds.json"), "deepspeed='ds.json': the trainer drives DDP only"),
     (dict(per_device_train_batch_size=3, steps_per_generation=1), "must be a multiple of"),
     (dict(per_device_train_batch_size=2, steps_per_generation=2, gradient_accumulation_steps=1),
      "per_device_train_batch_size=2 must be a multiple of num_generations=4")],
)  # fmt: skip
def test_unsupported_options_are_named(kw, named):
    assert unsupported(options()) == unsupported(options(world_size=2)) == []  # DDP: supported
    (why,) = unsupported(options(**kw))
    assert named in why


def test_the_trainer_refuses_before_loading_anything():
    from hbmplan.integrations.trl import ReuseGRPOTrainer

    args = GRPOConfig(output_dir="unused", use_cpu=True, report_to=[], loss_type="sapo",
                      importance_sampling_level="sequence")  # fmt: skip
    with pytest.raises(ValueError, match=r"loss_type='sapo'.*; importance_sampling_level="):
        ReuseGRPOTrainer("no/such-model", lambda completions, **kw: [0.0], args)
    with pytest.raises(TypeError, match="reuse_config must be an hbmplan ReuseConfig"):
        ReuseGRPOTrainer("no/such-model", None, BASE, reuse_config={"hbm_budget": "1GiB"})


@pytest.mark.parametrize(
    "per_device, spg, accumulation",
    [(4, 1, 1), (2, 2, 2), (8, 2, 2), (4, 2, 1), (6, 2, 2), (3, 2, 2), (2, 1, 1)],
)
def test_accepted_batching_keeps_each_group_on_one_process(per_device, spg, accumulation):
    """TRL's RepeatSampler repeats each prompt G times in a row; accelerate gives each of the
    world's processes a consecutive slice of the global generation batch. Whenever the options
    are accepted, every slice holds whole groups."""
    G, world = 4, 2
    args = options(per_device_train_batch_size=per_device, steps_per_generation=spg,
                   gradient_accumulation_steps=accumulation)  # fmt: skip
    grouping = [w for w in unsupported(args) if "num_generations" in w]
    local = per_device * spg
    batch = local * world
    sampler = RepeatSampler(range(64), mini_repeat_count=G, batch_size=batch // G, seed=0)
    indices = list(sampler)[: 3 * batch]
    whole = True
    for start in range(0, len(indices), batch):
        for rank in range(world):
            part = indices[start + rank * local : start + (rank + 1) * local]
            whole &= all(part.count(i) == G for i in set(part))
    assert whole or grouping, "accepted options split a group over processes"
    if local % G:  # TRL's own batching would split groups here: refused
        assert grouping and not whole


def _batch(seed=0, groups=3, G=4, C=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 40, (n,), generator=g) for n in (7, 5, 9)[:groups]]
    P = max(p.numel() for p in prompts)
    B = groups * G
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for r in range(B):
        p = prompts[r // G]
        prompt_ids[r, P - p.numel() :], prompt_mask[r, P - p.numel() :] = p, 1
    lengths = torch.randint(0, C + 1, (B,), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    batch = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, 40, (B, C), generator=g), "completion_mask": mask,
        "advantages": torch.randn(B, generator=g), "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    perm = torch.randperm(B, generator=g)
    return {k: (v[perm] if v.dim() else v) for k, v in batch.items()}


def _weights(loss_type):
    def weights(part):
        return row_weights(part["completion_mask"], loss_type, accumulation=2,
                           steps_per_generation=2, num_items_in_batch=part["num_items_in_batch"],
                           max_completion_length=5)  # fmt: skip

    return weights


@pytest.mark.parametrize("spg", [1, 2, 4])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_regroup_keeps_groups_whole_and_trls_row_weights(spg, loss_type):
    batch = _batch()
    B = batch["prompt_ids"].shape[0]
    parts = regroup(batch, spg, _weights(loss_type), exact=True)
    assert len(parts) == spg
    seen = []
    for part in parts:
        pairs = zip(part["prompt_ids"], part["prompt_mask"], strict=True)
        keys = {tuple(r[m.bool()].tolist()) for r, m in pairs}
        seen.append(keys)
        assert len(part["advantages"]) == 4 * len(keys)  # whole groups only
    assert sum(len(k) for k in seen) == 3 and sum(len(p["advantages"]) for p in parts) == B
    # each row keeps the weight and metric batch of the micro-batch TRL's split put it in
    chunk = B // spg
    want = torch.cat([_weights(loss_type)({k: (v[j * chunk : (j + 1) * chunk] if v.dim() else v)
                                           for k, v in batch.items()}) for j in range(spg)])  # fmt: skip
    for part in parts:
        for row in range(len(part["advantages"])):
            (r,) = torch.nonzero(batch["advantages"] == part["advantages"][row]).flatten()
            assert part[WEIGHT][row] == want[r] and part[BATCH][row] == r // chunk


def test_regroup_without_trls_split_weights_each_micro_batch_by_its_own_rows():
    batch = _batch()
    parts = regroup(batch, 3, _weights("bnpo"), exact=False)
    for j, part in enumerate(parts):
        assert torch.equal(part[WEIGHT], _weights("bnpo")(part)) and (part[BATCH] == j).all()


def test_group_rows_cuts_completions_at_their_last_loss_token():
    batch = _batch(seed=1)
    grouped = group_rows(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                         batch["completion_mask"])  # fmt: skip
    lengths = batch["completion_mask"].sum(-1)
    assert sorted(grouped.skipped) == torch.nonzero(lengths == 0).flatten().tolist()
    for group, rows in zip(grouped.groups, grouped.rows, strict=True):
        for response, r in zip(group.responses, rows, strict=True):
            assert torch.equal(response, batch["completion_ids"][r, : lengths[r]])
            assert torch.equal(group.prompt, batch["prompt_ids"][r][batch["prompt_mask"][r].bool()])


def test_hbmplan_imports_without_trl(monkeypatch):
    """No module outside hbmplan.integrations imports TRL, and the integration's own import
    fails with the extra to install when TRL is missing."""
    from tests.helpers.imports import imports, modules

    users = {name for name, path in modules().items() if imports(name, path, package="trl")}
    assert users == {"hbmplan.integrations.trl"}
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    monkeypatch.delitem(sys.modules, "hbmplan.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'hbmplan\[trl\]'"):
        importlib.import_module("hbmplan.integrations.trl")
