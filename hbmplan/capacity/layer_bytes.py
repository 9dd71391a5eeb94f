"""The byte model of one pass: the tensors autograd saves per decoder layer (norms, attention by
SDPA kernel, MLP or experts), the LM head's log-probs and the transient workspaces, from a
model's shapes, a dtype and the device's kernels (:class:`LayerBytes`).
:mod:`hbmplan.capacity.step_bytes` sums these into a step's phases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hbmplan.capacity.presets import ModelSpec
from hbmplan.kernels import logprobs

__all__ = ["LayerBytes", "Target", "cuda_masked_gqa_fused"]

Target = Literal["cpu", "cuda"]


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
class LayerBytes:
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
