"""The phase-hook protocol as the next participants (data-parallel sync, votes, filtering) will
rely on it: which hooks run, in which order, with which contexts, and what a failure does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hbmplan
from hbmplan.runtime import Participant, Participants
from hbmplan.schedules import reuse_step
from hbmplan.schedules.microbatch import pack_rows, pack_tokens
from tests.helpers import grads_of, pg_loss, random_group, tiny_reference


class Recorder(Participant):
    """Writes down every hook it sees, with what its context says."""

    def __init__(self, log: list, name: str = "r") -> None:
        self.log, self.name = log, name

    def _add(self, *event) -> None:
        self.log.append((self.name, *event))

    def begin_step(self, ctx):
        self._add("begin_step", len(ctx.plan.groups))

    def end_step(self, ctx, ok):
        self._add("end_step", ok)

    def abort(self, exc):
        self._add("abort", type(exc).__name__)

    def before_a(self, ctx):
        self._add("before_a", ctx.index, ctx.phase, ctx.hot)

    def on_layer(self, ctx, layer):
        self._add("on_layer", ctx.index, layer)

    def after_a(self, ctx):
        self._add("after_a", ctx.index, len(ctx.hot), ctx.kv_bytes, ctx.grad_cache_bytes)

    def before_microbatch(self, ctx):
        self._add("before_microbatch", ctx.group.index, ctx.index, ctx.microbatch.indices)

    def before_backward(self, ctx):
        self._add("before_backward", ctx.group.index, ctx.index, ctx.loss.requires_grad)

    def after_microbatch(self, ctx):
        self._add("after_microbatch", ctx.group.index, ctx.index, ctx.group.phase)

    def before_c(self, ctx):
        self._add("before_c", ctx.index, ctx.phase)

    def after_c(self, ctx):
        self._add("after_c", ctx.index)


def _groups():
    return [random_group(9, [3, 2, 5], seed=1), random_group(6, [4], seed=2)]


def test_hooks_run_in_phase_order_with_their_contexts():
    model = tiny_reference(layers=2)
    log: list = []
    groups = _groups()
    stats = reuse_step(model, groups, pg_loss, 6, participants=[Recorder(log)])
    events = [e[1:] for e in log]
    want = [("begin_step", 2)]
    splits = [pack_rows(g.response_lens, 6) for g in groups]
    assert splits[0] == [[0, 1], [2]]  # a microbatch of two rows, and one of one
    for g, mbs in enumerate([[tuple(mb) for mb in split] for split in splits]):
        want += [("before_a", g, "A", ()), ("on_layer", g, 0), ("on_layer", g, 1)]
        kv = stats.prompt_kv_bytes if g == 0 else None
        after_a = next(e for e in events if e[:2] == ("after_a", g))
        assert after_a[2] == 4  # K and V of two layers are what phase B reads
        assert kv is None or after_a[3] == kv
        want.append(after_a)
        for i, indices in enumerate(mbs):
            want += [
                ("before_microbatch", g, i, indices),
                ("before_backward", g, i, True),
                ("after_microbatch", g, i, "B"),
            ]
        want += [("before_c", g, "C"), ("after_c", g)]
    want.append(("end_step", True))
    assert events == want


def test_participants_run_in_the_order_given_at_every_hook():
    log: list = []
    parts = [Recorder(log, "first"), Recorder(log, "second")]
    reuse_step(tiny_reference(), [random_group(5, [2], seed=3)], pg_loss, participants=parts)
    names = [e[0] for e in log]
    assert names == ["first", "second"] * (len(log) // 2)


@pytest.mark.parametrize("packed", [False, True])
def test_the_step_plan_is_the_split_the_step_runs(packed):
    seen = {}

    class Plan(Participant):
        def begin_step(self, ctx):
            seen["plan"] = ctx.plan

    groups = _groups()
    attention = "reference" if packed else "padded"
    reuse_step(tiny_reference(), groups, pg_loss, 8, attention=attention, participants=[Plan()])
    plan = seen["plan"]
    assert plan.attention.name == attention and plan.kv_copies
    for gp, group in zip(plan.groups, groups, strict=True):
        lens = group.response_lens
        split = pack_tokens(lens, 8) if packed else pack_rows(lens, 8)
        assert [list(mb.indices) for mb in gp.microbatches] == split
        for mb in gp.microbatches:
            sizes = [lens[i] for i in mb.indices]
            assert mb.rows == len(sizes)
            assert mb.tokens == (sum(sizes) if packed else len(sizes) * max(sizes))
            assert mb.logprob_bytes > 0
        assert gp.prompt_tokens == group.prompt_len - 1


def test_a_participant_that_only_reads_changes_no_gradient():
    model = tiny_reference()
    groups = _groups()
    plain = grads_of(model, lambda: reuse_step(model, groups, pg_loss, 8))
    watched = grads_of(
        model, lambda: reuse_step(model, groups, pg_loss, 8, participants=[Recorder([])])
    )
    assert plain.keys() == watched.keys() and all(torch.equal(plain[k], watched[k]) for k in plain)


def test_a_failure_reaches_every_end_step_then_every_abort():
    log: list = []

    def failing(lp, group, i):
        if i == 2:
            raise RuntimeError("late")
        return pg_loss(lp, group, i)

    with pytest.raises(RuntimeError, match="late"):
        reuse_step(
            tiny_reference(), _groups(), failing, participants=[Recorder(log, "a"), Recorder(log)]
        )
    tail = log[-4:]
    assert tail == [("a", "end_step", False), ("r", "end_step", False),
                    ("a", "abort", "RuntimeError"), ("r", "abort", "RuntimeError")]  # fmt: skip
    assert not any(e[1] == "before_c" for e in log)  # the failing group never reached phase C


class Vote(Participant):
    """Stands in for a cross-rank vote: another rank failed, so this step must not count."""

    def end_step(self, ctx, ok):
        if ok:
            raise RuntimeError("rank 1 failed its step")


def test_an_end_step_that_raises_fails_the_step_for_the_participants_after_it():
    log: list = []
    model = tiny_reference()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with (
        pytest.raises(RuntimeError, match="rank 1 failed"),
        hbmplan.memory(model, participants=[Vote(), Recorder(log)]) as mem,
    ):
        mem.step(_groups(), pg_loss)
    assert [e[1:] for e in log[-2:]] == [("end_step", False), ("abort", "RuntimeError")]
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())  # atomic


def test_a_failing_abort_is_warned_and_the_step_failure_propagates():
    class BadAbort(Participant):
        def abort(self, exc):
            raise ValueError("cannot clean up")

    def failing(lp, group, i):
        raise KeyError("the loss")

    with pytest.warns(RuntimeWarning, match="BadAbort.abort failed"), pytest.raises(KeyError):
        reuse_step(tiny_reference(), _groups(), failing, participants=[BadAbort()])


def test_participants_must_be_participants():
    with pytest.raises(TypeError, match="participants must be hbmplan Participant"):
        Participants([object()])
    with pytest.raises(TypeError, match="participants must be hbmplan Participant"):
        reuse_step(tiny_reference(), _groups(), pg_loss, participants=[lambda ctx: None])


def test_capture_only_when_a_participant_asks():
    seen = []

    class Looks(Participant):
        captures_prompt = True

        def after_a(self, ctx):
            seen.append(ctx.capture.peak_nbytes)

    groups = [random_group(7, [2, 3], seed=4, dtype=torch.float32)]
    reuse_step(tiny_reference(torch.float32), groups, pg_loss, participants=[Looks()])
    assert len(seen) == 1 and seen[0] > 0


class DropResponse(Participant):
    """Drops one response from the step's plan (as a filter of inert responses would) and pads
    the group with an empty microbatch (as a rank matching the others' shape would)."""

    def __init__(self, group: int, response: int, log: list) -> None:
        self.group, self.response, self.log = group, response, log

    def adjust_plan(self, plan):
        g = plan.groups[self.group]
        kept = tuple(mb for mb in g.microbatches if mb.indices != (self.response,))
        empty = dataclasses.replace(kept[0], indices=(), rows=0, tokens=0)
        groups = list(plan.groups)
        groups[self.group] = dataclasses.replace(g, microbatches=(*kept, empty))
        return dataclasses.replace(plan, groups=tuple(groups))

    def before_backward(self, ctx):
        self.log.append((ctx.microbatch.indices, ctx.loss is None))


def test_a_participant_can_adjust_the_plan_the_driver_runs():
    model = tiny_reference()
    groups = _groups()

    def zero_for_dropped(lp, group, i):  # the same step with response 1 of group 0 inert
        loss = pg_loss(lp, group, i)
        return loss * 0 if (group is groups[0] and i == 1) else loss

    want = grads_of(model, lambda: reuse_step(model, groups, zero_for_dropped))
    log: list = []
    box = {}

    def dropped():
        box["stats"] = reuse_step(model, groups, pg_loss, participants=[DropResponse(0, 1, log)])

    got = grads_of(model, dropped)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert ((1,), False) not in log and log.count(((), True)) == 1  # the empty one ran its hooks
    assert box["stats"].trajectories == 3 and box["stats"].microbatches == 3


def test_adjust_plan_must_return_a_plan():
    class Bad(Participant):
        def adjust_plan(self, plan):
            return None

    with pytest.raises(TypeError, match="Bad.adjust_plan must return a StepPlan, got NoneType"):
        reuse_step(tiny_reference(), _groups(), pg_loss, participants=[Bad()])
