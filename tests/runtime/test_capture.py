"""The saved-tensor capture on its own: what it records and counts, when it lets go, and the
layer replay it runs for recompute (drop after the forward, rebuild at phase C's unpack)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbmplan.runtime.capture import SavedTensorCapture
from hbmplan.runtime.replay import rng_state, set_rng_state, without_cache
from tests.helpers import replay_spy


class Block(nn.Module):
    """A residual layer whose first saved tensor is its input (``lin1`` saves it), then three
    dormant storages: tanh's output, sigmoid's output and their product."""

    def __init__(self, width: int = 8, drift: bool = False) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(width, width), nn.Linear(width, width)
        self.drift, self.calls = drift, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.tanh(self.lin1(x))
        if self.drift and self.calls > 1:  # a replay that saves one more tensor
            h = h.exp()
        return x + self.lin2(h * torch.sigmoid(x))


def _model(seed: int = 0, **kw) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList([Block(**kw), Block(**kw)]).double()


def _run(layers, x, capture=None):
    ctx = capture.phase("A") if capture is not None else torch.enable_grad()
    with ctx:
        h = x
        for layer in layers:
            h = layer(h)
        return h.square().sum()


def test_views_count_once_and_parameters_are_not_recorded():
    w = torch.randn(6, 4, requires_grad=True)
    a = torch.randn(12, 6, requires_grad=True)
    cap = SavedTensorCapture(exclude=[w])
    with cap.phase("A"):
        b = a * 2  # saves nothing
        c = b[:6] * b[6:]  # saves two views of b's storage
        d = (c @ w).sum()  # saves c (and w, excluded)
    assert [r.shape for r in cap.records] == [(6, 6), (6, 6)]
    b_rec, c_rec = cap.records
    assert len(b_rec.tickets) == 2 and len(c_rec.tickets) == 1
    assert b_rec.nbytes == b.untyped_storage().nbytes() == 12 * 6 * 4
    assert cap.nbytes == cap.peak_nbytes == b_rec.nbytes + c_rec.nbytes
    assert all(r.phase == "A" and r.layer is None for r in cap.records)
    del b, c, d  # the graph dies: autograd drops its tickets, the capture its tensors
    assert all(r.freed for r in cap.records) and cap.nbytes == 0
    assert cap.peak_nbytes == b_rec.nbytes + c_rec.nbytes and cap.live_records() == []


def test_held_and_unrecorded_bytes():
    a = torch.randn(4, 4, requires_grad=True)
    other = torch.randn(16)
    cap = SavedTensorCapture()
    with cap.phase("A"):
        b = a.exp()  # saves its output
    assert cap.held_nbytes([b]) == cap.nbytes == b.nbytes
    assert cap.held_nbytes([b, other, other[:4]]) == b.nbytes + other.nbytes
    assert cap.unrecorded_nbytes([b, other, other[2:]]) == other.nbytes
    cap.release()
    assert cap.records == [] and cap.nbytes == cap.peak_nbytes == 0


def test_layers_attribute_each_storage_to_the_layer_that_saved_it():
    """Saves before the first layer have no layer; saves after a layer count to the last layer
    that ran (a final norm goes with the last layer, whose backward runs next to it)."""
    layers = _model()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    cap = SavedTensorCapture(exclude=list(layers.parameters()), layers=layers)
    with cap.phase("A"):
        h = x.exp()  # saves its output, before any layer
        for layer in layers:
            h = layer(h)
        loss = h.square().sum()  # saves h, after the last layer
    assert [r.layer for r in cap.records] == [None, 0, 0, 0, 1, 1, 1, 1, 1]
    assert [r.last_layer for r in cap.records] == [0, 0, 0, 0, 1, 1, 1, 1, 1]  # lin1 of layer 0
    assert cap.records[0].op == "ExpBackward0" and len(cap.records[0].tickets) == 2
    loss.backward()
    cap.release()


def test_release_before_backward_is_an_error():
    a = torch.randn(3, requires_grad=True)
    cap = SavedTensorCapture()
    with cap.phase("A"):
        y = a.exp().sum()
    cap.release()
    with pytest.raises(RuntimeError, match="released before backward used it"):
        y.backward()


def test_dropped_layers_replay_and_give_the_same_gradients(monkeypatch):
    x0 = torch.randn(5, 8, dtype=torch.float64)
    layers = _model()
    x = x0.clone().requires_grad_()
    _run(layers, x).backward()
    want = [p.grad.clone() for p in layers.parameters()] + [x.grad]
    layers.zero_grad(set_to_none=True)

    replays = replay_spy(monkeypatch)
    cap = SavedTensorCapture(exclude=list(layers.parameters()), layers=layers)
    cap.replay_layers = {0, 1}
    x = x0.clone().requires_grad_()
    loss = _run(layers, x, cap)
    assert cap.input_first == {0: True, 1: True}
    before = cap.nbytes
    dropped = [cap.drop(r) for r in cap.live_records() if r.last_layer in (0, 1)]
    # every storage but each layer's input, and the loss's (saved after the last layer)
    assert dropped == [False, True, True, True] * 2 + [False]
    assert cap.nbytes < before
    assert cap.replayable([0, 1], []) == {
        0: frozenset(r.id for r in cap.records if r.layer == 0 and r.recomputed),
        1: frozenset(r.id for r in cap.records if r.layer == 1 and r.recomputed),
    }  # the replay of a layer rebuilds exactly what was dropped
    loss.backward()
    got = [p.grad for p in layers.parameters()] + [x.grad]
    assert replays == [1, 0]  # phase C's backward order
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    cap.release()


def test_a_layer_whose_first_save_is_not_its_input_is_not_dropped():
    class ExpFirst(Block):
        def forward(self, x):
            return super().forward(x + 0.0 * x.exp().sum())

    torch.manual_seed(0)
    layers = nn.ModuleList([ExpFirst(), Block()]).double()
    cap = SavedTensorCapture(exclude=list(layers.parameters()), layers=layers)
    cap.replay_layers = {0, 1}
    loss = _run(layers, torch.randn(5, 8, dtype=torch.float64, requires_grad=True), cap)
    assert cap.input_first == {0: False, 1: True}
    assert not any(cap.drop(r) for r in cap.live_records() if r.last_layer == 0)
    loss.backward()
    cap.release()


def test_a_replay_that_saves_differently_is_refused():
    layers = _model(drift=True)
    cap = SavedTensorCapture(exclude=list(layers.parameters()), layers=layers)
    cap.replay_layers = {1}
    loss = _run(layers, torch.randn(5, 8, dtype=torch.float64), cap)
    assert any(cap.drop(r) for r in cap.live_records() if r.last_layer == 1)
    with pytest.raises(RuntimeError, match="replay of layer 1 saved"):
        loss.backward()
    cap.release()


def test_replay_helpers():
    kwargs = {"past_key_values": object(), "use_cache": True, "cache": None, "mask": 1}
    assert without_cache(kwargs) == {"past_key_values": None, "use_cache": False,
                                     "cache": None, "mask": 1}  # fmt: skip
    assert kwargs["use_cache"] is True  # a copy
    state = rng_state(torch.device("cpu"))
    first = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)
