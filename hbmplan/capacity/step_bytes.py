"""Bytes a training step holds, derived from a decoder's shapes: the tensors autograd saves per
layer and per pass, prompt K/V, the gradient cache and transient workspaces, per schedule phase.

The saved-tensor model was read off :class:`hbmplan.runtime.capture.SavedTensorCapture` records of
the reference decoder and of Hugging Face Llama/Qwen3/Qwen3-MoE (transformers 5.x) on CPU, tensor
by tensor; with ``target="cpu"`` it reproduces the schedules' CPU ``StepStats`` peaks exactly.
``target="cuda"`` swaps in the CUDA attention kernels' saved tensors and adds transients the
caching allocator sees; those parts are estimates until calibrated (``frontier(calibrate=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from hbmplan.capacity.layer_bytes import LayerBytes, Target, cuda_masked_gqa_fused
from hbmplan.capacity.presets import ModelSpec
from hbmplan.config import ATTENTIONS
from hbmplan.kernels.prefix_attention import kernel_rejects
from hbmplan.schedules.attention import auto_attention
from hbmplan.schedules.microbatch import pack_rows, pack_tokens

__all__ = [
    "SCHEDULES",
    "PhaseBytes",
    "Schedule",
    "Target",
    "cuda_masked_gqa_fused",
    "estimate_step",
    "prompt_layer_bytes",
    "resolve_packed",
    "to_dtype",
]

Schedule = Literal[
    "dense", "dense+ckpt", "reuse", "reuse+recompute", "reuse+offload", "reuse+offload+recompute"
]
SCHEDULES: tuple[Schedule, ...] = (
    "dense", "dense+ckpt", "reuse", "reuse+recompute", "reuse+offload", "reuse+offload+recompute"
)  # fmt: skip

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "fp32": torch.float32, "float": torch.float32, "float64": torch.float64,
           "fp64": torch.float64, "double": torch.float64}  # fmt: skip


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.dtype`` from a dtype or a name such as ``"bfloat16"``/``"bf16"``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be a 16-, 32- or 64-bit float, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


@dataclass(frozen=True)
class PhaseBytes:
    """Predicted device bytes of one schedule phase at its peak, by component. Excludes the
    parameters, gradients and optimizer state (see :class:`hbmplan.capacity.frontier.StaticMemory`)."""

    prompt_activations: int = 0
    """Saved tensors of the prompt forward kept on the device, K/V excluded."""
    prompt_kv: int = 0
    """Post-RoPE prompt K/V of all layers: 2 L Hkv (P-1) D itemsize."""
    grad_cache: int = 0
    """gK/gV accumulators: 2 L Hkv (P-1) D itemsize(fp32 for 16-bit models)."""
    microbatch: int = 0
    """Saved tensors of the largest microbatch alive at the peak: the log-probs' [N, V] (or
    chunked, [N]) included unless the peak is a layer's forward or backward (on CUDA), when the
    LM head's saved tensors do not exist yet or are freed."""
    recompute: int = 0
    """One layer's activations rebuilt during backward (activation checkpointing)."""
    workspace: int = 0
    """Transients outside saved tensors (layer backward, logits, casts); ``target="cuda"`` only."""

    @property
    def total(self) -> int:
        """Sum of the components."""
        return sum(getattr(self, f.name) for f in fields(self))


def _total(p: PhaseBytes) -> int:
    return p.total


def _shapes(
    row_lens: Sequence[int],
    response_lens: Sequence[int],
    tokens_per_microbatch: int | None,
    packed: bool = False,
) -> set[tuple[int, int, int]]:
    """Distinct (rows, padded length, response tokens) of the microbatches the schedules run;
    for packed microbatches (sequences, total tokens, response tokens): one row of all tokens."""
    if packed:
        return {
            (len(mb), sum(row_lens[i] for i in mb), sum(response_lens[i] for i in mb))
            for mb in pack_tokens(row_lens, tokens_per_microbatch)
        }
    return {
        (len(mb), max(row_lens[i] for i in mb), sum(response_lens[i] for i in mb))
        for mb in pack_rows(row_lens, tokens_per_microbatch)
    }


def resolve_packed(
    attention: str,
    spec: ModelSpec,
    dtype: torch.dtype,
    target: Target,
    grad_cache_dtype: str | torch.dtype | None = None,
) -> bool:
    """Whether phase B runs packed rows through the Triton prefix-attention kernel, as
    :func:`hbmplan.schedules.reuse_step`'s ``attention=`` resolves: "auto" on CUDA when the
    kernel takes the head dim, the dtype and the gradient cache (fp32, the default for 16- and
    32-bit models); "triton" always; "padded" never. The kernel's PyTorch reference
    ("reference", a CPU and testing path) has no byte model."""
    modelled = tuple(a for a in ATTENTIONS if a != "reference")
    if attention not in modelled:
        raise ValueError(f"attention must be one of {modelled} for an estimate, got {attention!r}")
    if attention == "auto":
        cache = to_dtype(grad_cache_dtype) if grad_cache_dtype is not None else torch.float32
        return auto_attention(target, None, kernel_rejects(dtype, spec.head_dim, cache)).packed
    return attention == "triton"


def _pass(b: LayerBytes, rows: int, T: int, prefix: int, lm_tokens: int) -> tuple[int, int]:
    """(saved bytes, transient bytes) of one microbatch forward+backward at its peak (ids are
    fresh).

    The CPU accounting counts held tensors only: all of them, at the end of the forward. On
    CUDA the peak is the larger of two moments: the LM head's backward (every saved tensor plus
    the log-prob working bytes), and a layer's forward or backward, when the LM head's saved
    tensors do not exist yet or are already freed (its backward is the step's first).
    """
    head = b.lm_head(lm_tokens)
    saved = b.layers(rows, T, prefix) + b.outside_layers(rows, T, rows * T * 8) + head
    if b.target != "cuda":
        return saved, 0
    logits = b.logits_workspace(lm_tokens)
    layer = max(b.backward_workspace(rows, T, prefix), b.forward_workspace(rows, T))
    return (saved, logits) if logits >= layer - head else (saved - head, layer)


def estimate_step(
    spec: ModelSpec,
    prompt_len: int,
    response_lens: int | Sequence[int],
    schedule: Schedule = "reuse",
    dtype: str | torch.dtype = "bfloat16",
    *,
    target: Target = "cuda",
    tokens_per_microbatch: int | None = None,
    grad_cache_dtype: str | torch.dtype | None = None,
    tp: int = 1,
    prefetch_layers: int = 2,
    fused_gqa: bool = False,
    offload_during_a: bool = True,
    attention: str = "auto",
    recompute_layers: int | None = None,
    offload_layers: int | None = None,
    cp: int = 1,
) -> dict[str, PhaseBytes]:
    """Predicted peak bytes per phase of one group's step, parameters excluded.

    Args:
        spec: the model's shapes.
        prompt_len: P >= 2 (the last token is the boundary token).
        response_lens: S_i >= 1 for each of the G responses, or one int for a single response.
        schedule: "dense" (each trajectory [P + S_i - 1] its own row), "dense+ckpt" (the same with
            per-layer activation checkpointing), "reuse" (phases A/B/C, nothing offloaded),
            "reuse+offload" (dormant prompt activations on the host during B; during A and C only
            ``prefetch_layers`` layers of them on the device), "reuse+recompute" (the planner's
            recompute without offload: each layer's dormant tensors dropped after its forward
            and rebuilt in C from its input, which stays on the device), "reuse+offload+recompute"
            (the planner's lowest plan: every layer recomputed, its input offloaded; one layer
            rebuilt and ``prefetch_layers`` inputs on the device in A and C; plans that offload
            some layers whole and recompute others lie between it and "reuse+offload").
        dtype: parameter/activation dtype.
        target: "cpu" reproduces what the schedules' CPU ``StepStats`` count (saved tensors, CPU
            SDPA kernels, no transients); "cuda" models CUDA SDPA kernels and adds transients.
        tokens_per_microbatch: row packing as in :func:`hbmplan.schedules.reuse_step`
            (rows x longest row within this budget); ``None``: one row per microbatch.
        grad_cache_dtype: default fp32 for 16-bit models, else the model dtype.
        tp: tensor-parallel degree; divides heads, FFN width, experts' width and vocabulary.
        prefetch_layers: the offload schedules' window of prompt layers on the device in A
            and C.
        offload_during_a: the offload and recompute schedules stream dormant tensors to the
            host or drop them while A computes (a plan made before A, the design); ``False``:
            only after A, which then peaks like the reuse schedule.
        fused_gqa: the CUDA memory-efficient SDPA kernel takes GQA with a mask or in fp32
            (pytorch#191085); ``False`` assumes torch's math fallback, which saves
            [B, Hq, T, S] probabilities (only fp32 GQA reaches it with the supported models).
        attention: phase B's attention as ``reuse_step(attention=...)``; "auto" is the Triton
            kernel over packed rows on CUDA when it takes the head dim and dtype, padded rows
            otherwise (see :func:`resolve_packed`). Packed rows count ``tokens_per_microbatch``
            as total tokens.
        recompute_layers: "reuse+recompute" only: how many of the last layers recompute (the
            planner recomputes as few as the budget allows); the others keep their tensors.
            ``None``: every layer.
        offload_layers: "reuse+offload" only: how many of the first layers offload (the
            planner's layer-by-layer order; as few as the budget allows); the others keep
            their tensors. ``None``: every layer.
        cp: context-parallel degree, per rank. Reuse schedules
            (:mod:`hbmplan.distributed.context_parallel`): the prompt's activations, K/V and
            gradient cache are a ceil((P-1)/cp)-token slice; phase A adds one layer's gathered
            K/V and position mask as working memory; a phase-B microbatch runs on one rank and
            keeps, per layer, its partial attentions' outputs and log-sum-exps and what the
            cheaper exchange by volume moved (pass-Q: the gathered queries; all-gather: every
            slice's K/V), working in [Hq, queries, 1024-key] blocks. Dense schedules: each
            trajectory split cp ways (PyTorch's ``context_parallel``), its saved tensors
            divided by cp, transients not modelled.

    Returns:
        ``{"A", "B", "C"}`` for the reuse schedules, ``{"dense"}`` for the dense ones.

    Every parameter is assumed to train (full fine-tuning). Frozen parameters and LoRA adapters
    are not modelled: they save less (a frozen layer nothing, a K/V without a graph no gK/gV),
    so for them this is an over-estimate (CPU, tiny Llama, P=200: 1.04x with frozen
    embeddings, 1.2-1.5x under LoRA, 2-4x with the lower layer frozen). The runtime planner
    (``hbmplan.memory(hbm_budget=...)``) plans from each step's own capture and is exact.
    """
    dt = to_dtype(dtype)
    lens = [response_lens] if isinstance(response_lens, int) else list(response_lens)
    if prompt_len < 2:
        raise ValueError(f"prompt_len must be >= 2 (boundary token), got {prompt_len}")
    if not lens or min(lens) < 1:
        raise ValueError(f"response lengths must be >= 1 and non-empty, got {lens}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if target not in ("cpu", "cuda"):
        raise ValueError(f"target must be 'cpu' or 'cuda', got {target!r}")
    if tp < 1 or prefetch_layers < 1 or cp < 1:
        raise ValueError(
            f"tp, cp and prefetch_layers must be >= 1, got {tp}, {cp} and {prefetch_layers}"
        )
    if cp > 1 and schedule != "reuse" and schedule != "dense":
        raise ValueError(
            f"cp > 1 is modelled for the 'reuse' and 'dense' schedules (context parallel runs "
            f"without offload or recompute), got {schedule!r}"
        )
    for name, n in (("recompute_layers", recompute_layers), ("offload_layers", offload_layers)):
        if n is not None and not 0 <= n <= spec.num_layers:
            raise ValueError(f"{name} must lie in [0, {spec.num_layers}] (layers), got {n}")
    packed = schedule.startswith("reuse") and resolve_packed(
        attention, spec, dt, target, grad_cache_dtype
    )
    b = LayerBytes(spec, dt, target, tp, fused_gqa, packed)
    P, cuda = prompt_len, target == "cuda"

    if schedule.startswith("dense"):
        best = PhaseBytes()
        for rows, T, N in _shapes([P + s - 1 for s in lens], lens, tokens_per_microbatch):
            if schedule == "dense+ckpt":  # keep layer inputs only; rebuild one layer at a time
                head = b.lm_head(N)
                kept = spec.num_layers * rows * T * spec.hidden_size * b.it
                kept += b.outside_layers(rows, T, rows * T * 8) + head
                # the LM head's backward, then each layer rebuilt after the head's tensors died
                at_head = PhaseBytes(
                    microbatch=kept, workspace=b.logits_workspace(N) if cuda else 0
                )
                at_layer = PhaseBytes(
                    microbatch=kept - head,
                    recompute=b.largest_layer(rows, T, 0),
                    workspace=b.backward_workspace(rows, T, 0) if cuda else 0,
                )
                cand = max(at_head, at_layer, key=_total)
            else:
                saved, ws = _pass(b, rows, -(-T // cp), 0, -(-N // cp))
                cand = PhaseBytes(microbatch=saved, workspace=ws)
            best = max(best, cand, key=_total)
        return {"dense": best}

    if cp > 1:
        return _reuse_cp(b, spec, P, lens, tokens_per_microbatch, grad_cache_dtype, cp)
    Pm = P - 1
    gc_dt = to_dtype(grad_cache_dtype) if grad_cache_dtype is not None else None
    if gc_dt is None:
        gc_dt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
    kv = spec.num_layers * b.kv(Pm)
    cache = kv // b.it * gc_dt.itemsize
    casts = kv if gc_dt != dt else 0  # GradientCache.backward casts gK/gV to the K/V dtype
    graph = b.prompt_graph(P)

    mb_saved, mb_ws = 0, 0
    for rows, T, N in _shapes(lens, lens, tokens_per_microbatch, packed):
        if packed:  # one row of T tokens, plus the int32 cu_seqlens the kernel keeps
            saved, ws = _pass(b, 1, T, Pm, N)
            saved += 4 * (rows + 1)
        else:
            saved, ws = _pass(b, rows, T, Pm, N)
        if saved + ws > mb_saved + mb_ws:
            mb_saved, mb_ws = saved, ws
    fwd_ws = b.forward_workspace(1, Pm) if cuda else 0
    bwd_ws = b.backward_workspace(1, Pm, 0) if cuda else 0

    # A peaks as its forward ends, everything saved (the discarded hidden states' branch dies
    # only then); on CUDA the gradient cache is allocated after that branch is freed.
    full = b.layers(1, Pm, 0) - kv + b.outside_layers(1, Pm, P * 8)
    a = PhaseBytes(prompt_activations=full, prompt_kv=kv, workspace=fwd_ws)
    if cuda:
        a = max(a, PhaseBytes(prompt_activations=graph, prompt_kv=kv, grad_cache=cache), key=_total)
    L = spec.num_layers
    r = L if recompute_layers is None else recompute_layers
    k = L if offload_layers is None else offload_layers
    if schedule != "reuse" and r and k:  # K/V and RoPE tables stay, and of the rest a window
        rope_ids = 2 * Pm * spec.head_dim * b.it + P * 8  # of layers or checkpoints
        window = min(prefetch_layers, L)
        dormant, ckpt = b.largest_layer(1, Pm, 0) - b.kv(Pm), b.ckpt(Pm)
        # what the last layer holds, less than the others: the branch after its K/V died with
        # the discarded hidden states
        last = b.kv_path(1, Pm) - b.kv(Pm)
        if schedule == "reuse+offload":  # whole layers in flight (A) or prefetched (C); the
            # first k layers offload, the others keep their tensors
            graph_b = rope_ids if k == L else max(graph - k * dormant, rope_ids)
            graph = graph_b + window * dormant
        elif schedule == "reuse+offload+recompute":  # one layer computing (A) or rebuilt (C)
            # beside a window of layer-input checkpoints in flight to or from the host
            graph, graph_b = rope_ids + window * ckpt + dormant - ckpt, rope_ids
        else:  # the last r layers keep only their checkpoint, one of them computing (A) or
            # rebuilt (C) in full; the other layers keep everything
            floor = rope_ids + L * ckpt
            partial = graph - (last + (r - 1) * dormant - r * ckpt)
            graph_b = floor if r == L else max(partial, floor)
            graph = graph_b + dormant - ckpt
        if offload_during_a:
            a = PhaseBytes(prompt_activations=graph, prompt_kv=kv, grad_cache=cache if cuda else 0,
                           workspace=max(fwd_ws - cache, 0) if cuda else 0)  # fmt: skip
    else:
        graph_b = graph
    phase_b = PhaseBytes(
        prompt_activations=graph_b, prompt_kv=kv, grad_cache=cache, microbatch=mb_saved,
        workspace=mb_ws,
    )  # fmt: skip
    c = PhaseBytes(
        prompt_activations=graph,
        prompt_kv=kv,
        grad_cache=cache,
        workspace=(casts + max(bwd_ws - cache, 0)) if cuda else 0,
    )
    return {"A": a, "B": phase_b, "C": c}


def _reuse_cp(b, spec, P, lens, tokens_per_microbatch, grad_cache_dtype, cp):
    """:func:`estimate_step`'s "reuse" on one of ``cp`` context-parallel ranks (see ``cp``)."""
    Pm, dt = P - 1, b.dtype
    Pl = -(-Pm // cp)  # the longest slice
    gc_dt = to_dtype(grad_cache_dtype) if grad_cache_dtype is not None else None
    if gc_dt is None:
        gc_dt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
    L, cuda, D = spec.num_layers, b.target == "cuda", spec.head_dim
    kv = L * b.kv(Pl)
    cache = kv // b.it * gc_dt.itemsize
    graph = b.prompt_graph(Pl + 1)
    gathered = b.kv(Pm) + Pl * Pm  # one layer's K/V of every slice, and the bool mask
    full = b.layers(1, Pl, 0) - kv + b.outside_layers(1, Pl, (Pl + 1) * 8)
    a = PhaseBytes(prompt_activations=full, prompt_kv=kv, workspace=gathered if cuda else 0)
    acc = 4 if b.it < 4 else b.it
    mb_saved, mb_ws = 0, 0
    for rows, T, N in _shapes(lens, lens, tokens_per_microbatch, True):
        saved, ws = _pass(b, 1, T, 0, N)
        partial = T * b.hq * (D + 1) * acc  # one (O, LSE) over T queries
        q_moves = (cp - 1) * T * b.hq * (4 * D + 2)
        kv_moves = (cp - 1) * Pl * 4 * b.hkv * D
        if q_moves <= kv_moves:  # the gathered queries, their partials sent and received
            exchange, queries = cp * T * b.hq * D * b.it + 2 * cp * partial, cp * T
        else:  # every slice's K/V, and the partial over them
            exchange, queries = b.kv(Pm) + partial, T
        # per layer: its own rows' partial, the exchange's, the merge; one key block at a time
        saved += 4 * (rows + 1) + L * (2 * partial + exchange)
        block = 3 * b.hq * queries * min(1024, max(Pl, T)) * acc if cuda else 0
        if saved + ws + block > mb_saved + mb_ws:
            mb_saved, mb_ws = saved, ws + block
    phase_b = PhaseBytes(
        prompt_activations=graph, prompt_kv=kv, grad_cache=cache, microbatch=mb_saved,
        workspace=mb_ws,
    )  # fmt: skip
    casts = kv if gc_dt != dt and cuda else 0
    c = PhaseBytes(
        prompt_activations=graph, prompt_kv=kv, grad_cache=cache,
        workspace=casts + 2 * gathered if cuda else 0,
    )  # fmt: skip
    return {"A": a, "B": phase_b, "C": c}


def prompt_layer_bytes(
    spec: ModelSpec,
    prompt_len: int,
    dtype: str | torch.dtype = "bfloat16",
    *,
    target: Target = "cuda",
    tp: int = 1,
    fused_gqa: bool = False,
) -> tuple[int, int]:
    """(dormant, checkpoint) bytes of one prompt layer (the largest, for a mixed MoE model):
    what its phase-A forward saves besides its K/V, which the offload schedules copy to the
    host and back, and its input as the attention RMSNorm saves it, which a recomputed layer
    keeps or copies instead."""
    b = LayerBytes(spec, to_dtype(dtype), target, tp, fused_gqa)
    Pm = prompt_len - 1
    return b.largest_layer(1, Pm, 0) - b.kv(Pm), b.ckpt(Pm)
