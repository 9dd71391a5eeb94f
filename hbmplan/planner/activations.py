"""Bytes a training step holds, derived from a decoder's shapes: the tensors autograd saves per
layer and per pass, prompt K/V, the gradient cache and transient workspaces, per schedule phase.

The saved-tensor model was read off :class:`hbmplan.planner.capture.SavedTensorCapture` records of
the reference decoder and of Hugging Face Llama/Qwen3/Qwen3-MoE (transformers 5.x) on CPU, tensor
by tensor; with ``target="cpu"`` it reproduces the schedules' CPU ``StepStats`` peaks exactly.
``target="cuda"`` swaps in the CUDA attention kernels' saved tensors and adds transients the
caching allocator sees; those parts are estimates until calibrated (``frontier(calibrate=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from hbmplan.kernels.prefix_attention import kernel_rejects
from hbmplan.planner.presets import ModelSpec
from hbmplan.schedules import logprobs
from hbmplan.schedules.attention import ATTENTIONS
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
Target = Literal["cpu", "cuda"]

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
    parameters, gradients and optimizer state (see :class:`hbmplan.planner.frontier.StaticMemory`)."""

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


def cuda_masked_gqa_fused(device: torch.device | str = "cuda") -> bool:
    """Whether CUDA's memory-efficient SDPA kernel takes GQA (``enable_gqa``) with a mask on
    this torch build; if not, such calls fall back to the math kernel. Runs a tiny probe."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 8, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 12, 64, device=device, dtype=torch.bfloat16)
    mask = torch.ones(8, 12, dtype=torch.bool, device=device).tril(4)
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(
                q, kv, kv, attn_mask=mask, enable_gqa=True
            )
    except RuntimeError:
        return False
    return True


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class _Bytes:
    """Shapes and byte sizes of one estimate: model, dtype, device kernels, tensor parallelism."""

    spec: ModelSpec
    dtype: torch.dtype
    target: Target
    tp: int
    fused_gqa: bool = False
    packed: bool = False
    """Response rows attend to the prompt through hbmplan's prefix-attention kernel (packed
    rows, prompt K/V read in place); prompt-free attention is unaffected."""

    @property
    def it(self) -> int:  # parameter/activation itemsize
        return self.dtype.itemsize

    @property
    def ct(self) -> int:  # RMSNorm compute itemsize: HF upcasts to fp32
        return 4 if self.spec.impl == "hf" else self.it

    @property
    def acc(self) -> int:  # log-prob dtype (and the math SDPA kernel's upcast)
        return 8 if self.dtype == torch.float64 else 4

    @property
    def hq(self) -> int:
        return math.ceil(self.spec.num_heads / self.tp)

    @property
    def hkv(self) -> int:
        return math.ceil(self.spec.num_kv_heads / self.tp)

    def kv(self, tokens: int) -> int:
        """Per-layer post-RoPE K and V of ``tokens`` tokens."""
        return 2 * tokens * self.hkv * self.spec.head_dim * self.it

    def norm(self, vectors: int, width: int) -> int:
        # input (in compute dtype), rsqrt, normalized (saved for the scale's gradient)
        return vectors * (width * (self.ct + self.it) + self.ct)

    def masked(self, T: int, prefix: int) -> bool:
        """Whether attention gets an explicit mask: the reference always passes one with a prefix;
        HF drops it when every query sees every key (one query token per row)."""
        return prefix > 0 and (self.spec.impl == "reference" or T > 1)

    def backend(self, T: int, prefix: int) -> str:
        """SDPA kernel that runs: "cpu", or on CUDA "flash", "efficient" or "math".

        The reference passes prefix attention a lower-right ``CausalBias`` on CUDA, which runs
        flash (16-bit) with no mask tensor; HF passes a mask and K/V repeated to Hq heads, which
        runs the efficient kernel. No fused CUDA kernel takes GQA with a mask or in fp32, so
        those fall back to math (unless ``fused_gqa``).
        """
        if self.target == "cpu":
            return "cpu"
        masked = self.masked(T, prefix)
        hf_mask = masked and self.spec.impl == "hf"
        if not hf_mask and self.it == 2 and self.spec.head_dim <= 256:
            return "flash"
        kernel_heads = self.hq if hf_mask else self.hkv
        return "efficient" if kernel_heads == self.hq or self.fused_gqa else "math"

    def _attention(self, rows: int, T: int, prefix: int) -> int:
        it, hq, hkv, D = self.it, self.hq, self.hkv, self.spec.head_dim
        if self.packed and prefix > 0:  # q, out, own k/v, lse [Hq, T] fp32; no mask, no copy
            return 2 * rows * T * hq * D * it + 2 * rows * T * hkv * D * it + rows * hq * T * 4
        S, masked = prefix + T, self.masked(T, prefix)  # keys each query row sees
        # Stored K/V heads: the reference concatenates [prefix; own] with Hkv heads; HF repeats
        # them to Hq heads whenever it passes a mask (a view, not a copy, when Hkv == 1).
        kvh = hq if (masked and self.spec.impl == "hf" and hkv > 1) else hkv
        backend = self.backend(T, prefix)
        q_out = 2 * rows * T * hq * D * it
        if backend == "math":  # out, upcast q, repeated k/v, probabilities [B, Hq, T, S]
            a = max(self.acc, it)
            return rows * T * hq * D * it + a * rows * hq * (T * D + 2 * S * D + T * S)
        mask_rows = rows if self.spec.impl == "hf" else 1  # HF masks are [B, 1, T, S]
        if backend == "cpu":
            mask = mask_rows * T * S * it if masked else 0
            return q_out + 2 * rows * S * kvh * D * it + mask + rows * hq * T * 4
        if backend == "flash":  # q, k, v, out, lse [B, Hq, T] fp32
            return q_out + 2 * rows * S * kvh * D * it + rows * hq * T * 4
        # efficient: HF's mask as a padded bias (the reference's CausalBias needs none), lse
        bias = mask_rows * T * _pad(S, 16) * it if masked and self.spec.impl == "hf" else 0
        return q_out + 2 * rows * S * kvh * D * it + bias + rows * hq * _pad(T, 32) * 4

    def _mlp(self, n: int, moe: bool) -> int:
        s, it = self.spec, self.it
        if not moe:  # gate, up, silu(gate), silu(gate) * up
            return 4 * n * math.ceil(s.intermediate_size / self.tp) * it
        E, k, F = s.num_experts, s.experts_per_token, math.ceil(s.moe_intermediate_size / self.tp)
        # router softmax [n, E] fp32 + int64 routing indices; per routed copy: gathered input,
        # gate|up, silu, product, expert output, weight; int32 expert offsets.
        return n * (E * 4 + 32 * k + k * it * (2 * s.hidden_size + 4 * F + 1)) + E * 4

    def layer(self, rows: int, T: int, prefix: int, moe: bool = False) -> int:
        """Saved tensors of one decoder layer over ``rows`` x ``T`` tokens with ``prefix`` keys."""
        s, n = self.spec, rows * T
        b = 2 * (self.norm(n, s.hidden_size) + n * s.hidden_size * self.it)
        if s.qk_norm:
            b += self.norm(n * self.hq, s.head_dim) + self.norm(n * self.hkv, s.head_dim)
        return b + self._attention(rows, T, prefix) + self._mlp(n, moe)

    def layers(self, rows: int, T: int, prefix: int) -> int:
        s = self.spec
        dense = s.num_layers - s.moe_layers
        return dense * self.layer(rows, T, prefix) + s.moe_layers * self.layer(
            rows, T, prefix, True
        )

    def largest_layer(self, rows: int, T: int, prefix: int) -> int:
        s = self.spec
        return max(
            self.layer(rows, T, prefix, moe)
            for moe in {s.moe_layers > 0, s.moe_layers < s.num_layers}
        )

    def ckpt(self, tokens: int) -> int:
        """A layer's first saved tensor, its input as the attention RMSNorm saves it (fp32 for
        HF): the checkpoint a recomputed layer restarts from."""
        return tokens * self.spec.hidden_size * self.ct

    def kv_path(self, rows: int, T: int) -> int:
        """The part of a layer that its K/V depend on: attention RMSNorm, k-norm, K and V."""
        s, n = self.spec, rows * T
        b = self.norm(n, s.hidden_size) + n * s.hidden_size * self.it + self.kv(n)
        return b + (self.norm(n * self.hkv, s.head_dim) if s.qk_norm else 0)

    def prompt_graph(self, P: int) -> int:
        """Saved tensors of phase A that stay alive through B and C, K/V excluded.

        The prompt's hidden states are discarded, so the branch after the last layer's K/V dies
        with them: the last layer's q, attention output, MLP and the final norm are freed.
        """
        s, Pm = self.spec, P - 1
        held = self.layers(1, Pm, 0) - s.num_layers * self.kv(Pm)
        held += P * 8 + 2 * Pm * s.head_dim * self.it  # the prompt's ids storage, RoPE tables
        return held - self.layer(1, Pm, 0, s.moe_layers > 0) + self.kv_path(1, Pm)

    def outside_layers(self, rows: int, T: int, ids_bytes: int) -> int:
        """Token ids (embedding), RoPE cos/sin [B, 1, T, D], final RMSNorm."""
        s = self.spec
        return ids_bytes + 2 * rows * T * s.head_dim * self.it + self.norm(rows * T, s.hidden_size)

    def logprob_chunk(self, N: int) -> int | None:
        """Rows per chunk the schedules' log-probs take for N tokens (``None``: unchunked)."""
        V = math.ceil(self.spec.vocab_size / self.tp)
        return logprobs.chunk_rows(N, V, self.spec.hidden_size, self.it, self.acc)

    def lm_head(self, N: int) -> int:
        """Picked hidden [N, h], log-softmax output [N, V] (fp32; chunked: logsumexp [N] only),
        gathered targets [N] int64. All of it is freed by the LM head's backward."""
        held, _ = self._logprobs(N)
        return N * (self.spec.hidden_size * self.it + 8) + held

    def _logprobs(self, N: int) -> tuple[int, int]:
        V = math.ceil(self.spec.vocab_size / self.tp)
        return logprobs.logprob_bytes(
            N, V, self.spec.hidden_size, self.it, self.acc, self.logprob_chunk(N)
        )

    def backward_workspace(self, rows: int, T: int, prefix: int) -> int:
        """One layer's backward: two [n, F] MLP gradients live at once (saved inputs are freed
        as their nodes run), or the math kernel's two [B, Hq, T, S] probability gradients."""
        s, n = self.spec, rows * T
        F = math.ceil(s.intermediate_size / self.tp) if s.moe_layers < s.num_layers else 0
        if s.moe_layers:
            F = max(F, s.experts_per_token * math.ceil(s.moe_intermediate_size / self.tp))
        attn = 0
        if self.backend(T, prefix) == "math" and not (self.packed and prefix > 0):
            attn = 2 * max(self.acc, self.it) * rows * self.hq * T * (prefix + T)
        return max(2 * n * F * self.it, attn)

    def forward_workspace(self, rows: int, T: int) -> int:
        """Two live [n, width] temporaries (a norm's squared input, RoPE's rotated half)."""
        n, s = rows * T, self.spec
        return 2 * n * max(s.hidden_size * self.ct, self.hq * s.head_dim * self.it)

    def logits_workspace(self, N: int) -> int:
        """Logits in the model dtype plus two fp32 [N, V] gradients in their backward; chunked,
        the same for one chunk plus the head's weight gradient in fp32 and its cast."""
        return self._logprobs(N)[1]


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
        return target == "cuda" and kernel_rejects(dtype, spec.head_dim, cache) is None
    return attention == "triton"


def _pass(b: _Bytes, rows: int, T: int, prefix: int, lm_tokens: int) -> tuple[int, int]:
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
    if tp < 1 or prefetch_layers < 1:
        raise ValueError(f"tp and prefetch_layers must be >= 1, got {tp} and {prefetch_layers}")
    for name, n in (("recompute_layers", recompute_layers), ("offload_layers", offload_layers)):
        if n is not None and not 0 <= n <= spec.num_layers:
            raise ValueError(f"{name} must lie in [0, {spec.num_layers}] (layers), got {n}")
    packed = schedule.startswith("reuse") and resolve_packed(
        attention, spec, dt, target, grad_cache_dtype
    )
    b = _Bytes(spec, dt, target, tp, fused_gqa, packed)
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
                saved, ws = _pass(b, rows, T, 0, N)
                cand = PhaseBytes(microbatch=saved, workspace=ws)
            best = max(best, cand, key=_total)
        return {"dense": best}

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
    b = _Bytes(spec, to_dtype(dtype), target, tp, fused_gqa)
    Pm = prompt_len - 1
    return b.largest_layer(1, Pm, 0) - b.kv(Pm), b.ckpt(Pm)
