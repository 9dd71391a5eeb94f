"""See every tensor autograd saves during a phase, with its bytes, layer and producing op.

`SavedTensorCapture` is a ``saved_tensors_hooks`` context whose pack hook files each saved tensor
in a store it owns and hands autograd a small ticket object. Owning the store (instead of handing
the tensor back) avoids the reference cycle ``tensor -> grad_fn -> packed tensor`` that an
identity pack hook creates for saved outputs (the store keeps detached aliases), and it is the
seam offload and recompute use: a stored tensor can be swapped for a host copy and fetched back
at its unpack, or dropped and rebuilt at its unpack by replaying its decoder layer (the layer's
call is kept, and the replay's saved tensors fill the dropped entries in save order). When
autograd drops a ticket (its node ran backward, or the graph branch died) the store drops the
tensor too, so lifetimes are exactly autograd's.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from hbmplan.allocator.engine import OffloadEngine, OffloadHandle
from hbmplan.allocator.views import TensorMeta, rebuild
from hbmplan.runtime.replay import Dropped, LayerCall, rng_state, set_rng_state, without_cache

__all__ = ["SavedStorage", "SavedTensorCapture", "storage_key"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the memory it lives in); any other tensor as is."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory a tensor lives in: (device, storage data pointer); a DTensor's
    (tensor parallel) is its local shard's."""
    t = _local(t)
    return (str(t.device), t.untyped_storage().data_ptr())


def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass that wraps others (DTensor, FSDP2's sharded parameters)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t``, or the plain tensors a wrapper subclass holds (recursively)."""
    if not _is_wrapper(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, n, None) for n in names]
    return [x for i in inner if isinstance(i, torch.Tensor) for x in _plain_tensors(i)]


def _exclude_keys(tensors: Iterable[torch.Tensor]) -> set[tuple[str, int]]:
    keys = set()
    for t in tensors:
        for x in _plain_tensors(t):
            if x.untyped_storage().nbytes() > 0:  # a resharded FSDP2 parameter holds nothing
                keys.add(storage_key(x))
    return keys


@dataclass(eq=False)
class SavedStorage:
    """One storage kept alive by autograd; views and aliases of it count once.

    Attributes:
        id: position in capture order (stable for a given model and input shapes).
        key: (device, data pointer) of the storage when it was saved.
        nbytes: bytes of the whole storage (what keeping it alive costs).
        dtype, shape: of the first saved tensor that referenced it.
        device: where it lives.
        layer: index of the decoder layer running when it was first saved; ``None`` outside
            the decoder layers (embedding, final norm).
        last_layer: the layer of its latest save: after that layer's forward no new reference
            to it is saved, and phase C's backward first needs it there.
        op: name of the autograd node that produced the first saved tensor (``"leaf"`` if none).
        phase: schedule phase in which it was first saved ("A", "B", ...).
        tickets: ids of the live tickets autograd holds for tensors in this storage.
        offloaded: its bytes are on the host (through an offload engine).
        freed: autograd dropped every ticket: the capture no longer holds it.
        recomputed: dropped after its layer's forward; phase C's first unpack of any tensor of
            the layer replays the layer to rebuild it (see :meth:`SavedTensorCapture.drop`).
    """

    id: int
    key: tuple[str, int]
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    layer: int | None
    op: str
    phase: str
    last_layer: int | None = None
    tickets: set[int] = field(default_factory=set)
    offloaded: bool = False
    freed: bool = False
    recomputed: bool = False


class _Ticket:
    """What autograd holds for a saved tensor: an id, nothing that keeps the tensor alive."""

    __slots__ = ("__weakref__", "id")

    def __init__(self, id: int) -> None:
        self.id = id


@dataclass(frozen=True)
class _Offloaded:
    """Stands in the store for a saved tensor whose storage is on the host."""

    handle: OffloadHandle
    meta: TensorMeta
    record: SavedStorage


class SavedTensorCapture:
    """Owns the tensors autograd saves while active; reports them by storage.

    Args:
        exclude: tensors whose storages are never recorded (the model's parameters and buffers:
            they outlive every schedule).
        layers: decoder layers; a forward pre-hook on each tells which layer is running.

    Use ``with capture.phase("A"):`` around the forward whose saved tensors to capture; the
    autograd graph built there unpacks from this store during backward. ``release()`` drops
    what is left (a graph abandoned after a failure).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), layers: nn.ModuleList | None = None):
        self._exclude = _exclude_keys(exclude)
        self._layers = layers
        self._store: dict[int, torch.Tensor | _Offloaded] = {}
        self._ticket_record: dict[int, SavedStorage] = {}
        self.records: list[SavedStorage] = []
        self._on_device: dict[tuple[str, int], SavedStorage] = {}
        self._tickets = itertools.count()
        self._phase = ""
        self._layer: int | None = None
        self._engine: OffloadEngine | None = None
        self._reloaded: dict[int, torch.UntypedStorage] = {}
        self._layer_tickets: dict[int, list[int]] = {}  # tickets saved inside each layer, in order
        self._in_layer = False
        self._calls: dict[int, LayerCall] = {}
        self._pending_x: dict[int, torch.Tensor] = {}
        self._inside_cache: dict[int, set[int]] = {}
        self.replay_layers: set[int] = set()
        """Layers whose calls are kept so that :meth:`drop` may drop their saved tensors (set
        before the forward)."""
        self.check_inputs = False
        """Check every layer (not only :attr:`replay_layers`) for :attr:`input_first` (set
        before the forward; one comparison, and on CUDA a host sync, per layer)."""
        self.input_first: dict[int, bool] = {}
        """Per checked layer: whether its first saved tensor equals its input (up to a cast),
        the condition for replaying it from that tensor."""
        self.nbytes = 0
        """Bytes of the distinct storages the capture holds on the device now."""
        self.peak_nbytes = 0
        """The most ``nbytes`` has been since the capture started (or ``reset_peak``)."""

    # -- hooks ---------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> _Ticket | torch.Tensor:
        if isinstance(t, nn.Parameter) or _is_wrapper(t):
            # model tensors (also FSDP2's gathered parameters, swapped in after the capture
            # began) and tensor subclasses (DTensor): never activations, never offloaded
            return t
        key = storage_key(t)
        if key in self._exclude:
            return t  # parameters: autograd's own reference, no cycle (they are leaves)
        ticket = _Ticket(next(self._tickets))
        # Detached: a saved output would otherwise hold its own grad_fn, whose saved variable
        # holds the ticket, which the store keys: a cycle that keeps dead graph branches alive.
        # Autograd re-attaches the grad_fn itself when it unpacks.
        self._store[ticket.id] = t.detach()
        rec = self._on_device.get(key)
        if rec is None:
            rec = SavedStorage(
                id=len(self.records),
                key=key,
                nbytes=_local(t).untyped_storage().nbytes(),
                dtype=t.dtype,
                shape=tuple(t.shape),
                device=t.device,
                layer=self._layer,
                op=type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf",
                phase=self._phase,
                last_layer=self._layer,
            )
            self.records.append(rec)
            self._on_device[key] = rec
            self.nbytes += rec.nbytes
            self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        if self._layer is not None:
            rec.last_layer = self._layer
        if self._in_layer:
            packs = self._layer_tickets.setdefault(self._layer, [])
            if not packs:
                self._check_checkpoint(self._layer, t)
            packs.append(ticket.id)
        rec.tickets.add(ticket.id)
        self._ticket_record[ticket.id] = rec
        weakref.finalize(ticket, self._drop_ticket, ticket.id)
        return ticket

    def _unpack(self, ticket: _Ticket | torch.Tensor) -> torch.Tensor:
        if isinstance(ticket, torch.Tensor):
            return ticket
        if ticket.id not in self._store:
            raise RuntimeError(
                f"saved tensor {ticket.id} was released before backward used it; "
                "release() must come after the backward of the captured graph"
            )
        entry = self._store[ticket.id]
        if isinstance(entry, Dropped):
            self._replay(entry.layer)
            entry = self._store[ticket.id]
        if not isinstance(entry, _Offloaded):
            return entry
        # The first unpack of an offloaded storage fetches it; its other views reuse the copy
        # until autograd has dropped all of their tickets.
        storage = self._reloaded.get(entry.record.id)
        if storage is None:
            assert self._engine is not None
            storage = self._reloaded[entry.record.id] = self._engine.fetch(entry.handle)
        return rebuild(storage, entry.meta)

    def _drop_ticket(self, ticket: int) -> None:
        entry = self._store.pop(ticket, None)
        rec = self._ticket_record.pop(ticket, None)
        if rec is None:
            return
        rec.tickets.discard(ticket)
        if rec.tickets:
            return
        rec.freed = True
        self._leave_device(rec)
        self._reloaded.pop(rec.id, None)
        live_copy = isinstance(entry, _Offloaded) and entry.handle.state in (
            "offloaded",
            "prefetched",
        )
        if live_copy and self._engine is not None and not self._engine.closed:
            self._engine.discard(entry.handle)  # a dead branch: its host copy is not needed

    def _enter_layer(self, index: int):
        def hook(module, args, kwargs):
            self._layer, self._in_layer = index, True
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if self.check_inputs or index in self.replay_layers:
                self._pending_x[index] = args[0]
            if index in self.replay_layers:
                self._calls[index] = LayerCall(
                    module, (None, *args[1:]), without_cache(kwargs), args[0].dtype,
                    rng_state(args[0].device),
                )  # fmt: skip

        return hook

    def _leave_layer(self, _module, _args, _output) -> None:
        self._in_layer = False

    def _check_checkpoint(self, layer: int, t: torch.Tensor) -> None:
        """A layer is replayable when its first saved tensor is its input (or its input cast,
        as a norm that computes in fp32 saves): the replay restarts from that tensor."""
        x = self._pending_x.pop(layer, None)
        if x is None:
            return
        ok = t.shape == x.shape and torch.equal(t.detach().to(x.dtype), x.detach())
        self.input_first[layer] = ok
        if layer in self._calls:
            self._calls[layer].replayable = ok

    def replayable(
        self, layers: Iterable[int], hot: Iterable[torch.Tensor]
    ) -> dict[int, frozenset[int]]:
        """For each of ``layers`` (ones known to save their input first), the ids of the
        dormant storages (not in ``hot``) a replay of the layer rebuilds: last saved by the
        layer, every reference saved inside its forward, after its first saved tensor (the
        checkpoint the replay restarts from). The planner's ``PlanInputs.replayable``."""
        hot_keys = {storage_key(t) for t in hot}
        by_layer: dict[int | None, list[SavedStorage]] = {}
        for rec in self.live_records():
            if rec.key not in hot_keys:
                by_layer.setdefault(rec.last_layer, []).append(rec)
        out = {}
        for layer in layers:
            packs = self._layer_tickets.get(layer)
            first = self._ticket_record.get(packs[0]) if packs else None
            if first is None or first.freed:
                continue
            inside = self._inside(layer)
            out[layer] = frozenset(
                rec.id
                for rec in by_layer.get(layer, [])
                if rec is not first and rec.tickets <= inside
            )
        return out

    def _inside(self, layer: int) -> set[int]:
        """Tickets saved inside ``layer``'s finished forward after its first (cached)."""
        inside = self._inside_cache.get(layer)
        if inside is None:
            inside = self._inside_cache[layer] = set(self._layer_tickets.get(layer, [])[1:])
        return inside

    # -- recompute -----------------------------------------------------------------------------
    def drop(self, rec: SavedStorage) -> bool:
        """Free storage ``rec`` now and rebuild it in phase C by replaying its layer (from the
        layer's first saved tensor, which must be kept or offloaded). Only storages saved inside
        one replayable layer in :attr:`replay_layers`, other than that first tensor, qualify;
        returns whether ``rec`` was dropped."""
        layer = rec.last_layer
        call = self._calls.get(layer)
        packs = self._layer_tickets.get(layer, [])
        if (
            call is None
            or not call.replayable
            or rec.offloaded
            or rec.freed
            or rec.recomputed
            or not packs
            or not rec.tickets <= self._inside(layer)
            or self._ticket_record.get(packs[0]) is rec
        ):
            return False
        for ticket in rec.tickets:
            self._store[ticket] = Dropped(layer, TensorMeta.of(self._store[ticket]))
        rec.recomputed = True
        self._leave_device(rec)
        return True

    def _replay(self, layer: int) -> None:
        """Rerun ``layer``'s forward from its checkpoint; its dropped tensors take the saved
        tensors of the replay, matched by save order (checked by shape and dtype)."""
        call, packs = self._calls[layer], self._layer_tickets[layer]
        x = self._unpack(_Ticket(packs[0])).detach().to(call.x_dtype).requires_grad_()
        count = 0

        def pack(t: torch.Tensor):
            nonlocal count
            if storage_key(t) in self._exclude:
                return None
            if count < len(packs):
                entry = self._store.get(packs[count])
                if isinstance(entry, Dropped):
                    if (tuple(t.shape), t.dtype) != (entry.meta.size, entry.meta.dtype):
                        raise RuntimeError(
                            f"replay of layer {layer} saved {tuple(t.shape)} {t.dtype} as its "
                            f"tensor {count}; the forward saved {entry.meta.size} "
                            f"{entry.meta.dtype}"
                        )
                    self._restore(packs[count], t.detach())
            count += 1
            return None

        def unpack(_):
            raise RuntimeError("the replay's own graph is never differentiated")

        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            set_rng_state(call.rng, x.device)
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                call.module(x, *call.args[1:], **call.kwargs)
        if count != len(packs):
            raise RuntimeError(
                f"replay of layer {layer} saved {count} tensors; its forward saved {len(packs)}"
            )

    def _restore(self, ticket: int, t: torch.Tensor) -> None:
        self._store[ticket] = t
        rec = self._ticket_record[ticket]
        if rec.recomputed:  # the first of its views back: the storage is on the device again
            rec.recomputed, rec.key = False, storage_key(t)
            if rec.key not in self._on_device:  # (a storage the capture holds already counts)
                self._on_device[rec.key] = rec
                self.nbytes += rec.nbytes
                self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    # -- public --------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[SavedTensorCapture]:
        """Capture the tensors saved inside the block, labelled with phase ``name``."""
        handles = []
        if self._layers is not None:
            for i, layer in enumerate(self._layers):
                handles.append(
                    layer.register_forward_pre_hook(self._enter_layer(i), with_kwargs=True)
                )
                handles.append(layer.register_forward_hook(self._leave_layer))
        self._phase, self._layer = name, None
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            for h in handles:
                h.remove()
            self._layer, self._in_layer = None, False

    @property
    def storages(self) -> dict[tuple[str, int], SavedStorage]:
        """Live storages still on the device, by key (offloaded and freed ones excluded)."""
        return dict(self._on_device)

    def live_records(self) -> list[SavedStorage]:
        """Records autograd still holds (on the device or offloaded), in capture order."""
        return [rec for rec in self.records if not rec.freed]

    def offload(self, rec: SavedStorage, engine: OffloadEngine) -> OffloadHandle:
        """Move storage ``rec`` to the host through ``engine``; the store keeps only markers.

        The device memory is released once the copy completes (the engine holds it until then)
        and nothing else references it. The backward's first unpack of any of its views fetches
        it back (from a prefetch when :meth:`OffloadEngine.start_reload` scheduled one).
        """
        if rec.offloaded or rec.freed:
            raise ValueError(
                f"storage {rec.id} is already {'offloaded' if rec.offloaded else 'freed'}"
            )
        if self._engine is not None and self._engine is not engine:
            raise ValueError("a capture offloads through one engine")
        self._engine = engine
        tickets = sorted(rec.tickets)
        handle = engine.offload(self._store[tickets[0]])
        for ticket in tickets:
            self._store[ticket] = _Offloaded(handle, TensorMeta.of(self._store[ticket]), rec)
        rec.offloaded = True
        self._leave_device(rec)
        return handle

    def _leave_device(self, rec: SavedStorage) -> None:
        # its address may be reused by a new storage now: it is no longer the key's owner
        if self._on_device.get(rec.key) is rec:
            del self._on_device[rec.key]
            self.nbytes -= rec.nbytes

    def held_nbytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Device bytes of the capture's storages plus those of ``tensors`` not among them."""
        seen, extra = set(self._on_device), 0
        for t in tensors:
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                extra += t.untyped_storage().nbytes()
        return self.nbytes + extra

    def unrecorded_nbytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Bytes of the storages of ``tensors`` the capture never recorded (each counted once):
        what a phase holds beside its saved tensors. A storage recorded and since dropped (the
        last layer's K/V, saved until the discarded hidden states' branch died) was in the
        capture's peak already."""
        recorded = {rec.key for rec in self.records}
        extra = {storage_key(t): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for key, n in extra.items() if key not in recorded)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes held now."""
        self.peak_nbytes = self.nbytes

    def release(self) -> None:
        """Drop every stored tensor and record (offloaded handles are the engine's to close)."""
        self._store.clear()
        self._ticket_record.clear()
        self._on_device.clear()
        self._reloaded.clear()
        self._calls.clear()
        self._pending_x.clear()
        self._inside_cache.clear()
        self._layer_tickets.clear()
        self.records = []
        self._engine = None
        self.nbytes = self.peak_nbytes = 0
