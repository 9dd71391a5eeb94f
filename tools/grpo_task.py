"""The synthetic verifiable task, the small policy model and its rollout sampler behind
``tools/grpo_trace.py``.

A prompt is a long table of ``key = value`` facts followed by one question (look a key up, add
two values, sort three values); a response is checked token by token against the answer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hbmplan.models import DecoderConfig, ReferenceDecoder

__all__ = [
    "EOS",
    "OPS",
    "ModelSpec",
    "Problem",
    "TaskConfig",
    "build_model",
    "make_problem",
    "render",
    "reward",
    "sample_group",
]

# Vocabulary: 8 specials, 3 question kinds, 10 digits, then one token per key.
PAD, BOS, FILL, EQ, SEP, Q, ANS, EOS = range(8)
OP_TOKENS = {"lookup": 8, "sum": 9, "sort": 10}
DIGIT0 = 11
FIRST_KEY = DIGIT0 + 10
OPS = tuple(OP_TOKENS)
_QUESTION_LEN = {"lookup": 4, "sum": 5, "sort": 6}  # Q op key... ANS
_FACT_LEN = 5  # key = d d ;
_MAX_ANSWER = 6  # sort: three two-digit values


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the synthetic task."""

    prompt_len: int = 512
    """Tokens per prompt P, exactly (BOS, filler, facts, question)."""
    num_keys: int = 128
    """Distinct key tokens in the vocabulary; a document holds at most this many facts."""
    max_new_tokens: int = 8
    """Longest response, EOS included; at least 7 so that a sorted answer fits."""
    ops: tuple[str, ...] = OPS
    """Question kinds drawn uniformly: "lookup" (a value's two digits), "sum" (two values added,
    decimal without leading zeros), "sort" (three values ascending, two digits each)."""

    def __post_init__(self) -> None:
        if not self.ops or any(op not in OP_TOKENS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops!r}")
        if self.num_keys < 3:
            raise ValueError(
                f"num_keys must be >= 3 (a sort question needs 3), got {self.num_keys}"
            )
        if self.facts < 3:
            need = 1 + max(_QUESTION_LEN.values()) + 3 * _FACT_LEN
            raise ValueError(f"prompt_len must be >= {need} to hold 3 facts, got {self.prompt_len}")
        if self.max_new_tokens < _MAX_ANSWER + 1:
            raise ValueError(
                f"max_new_tokens must be >= {_MAX_ANSWER + 1} (longest answer plus EOS), "
                f"got {self.max_new_tokens}"
            )

    @property
    def vocab_size(self) -> int:
        """Token ids used by the task: specials, digits and keys."""
        return FIRST_KEY + self.num_keys

    @property
    def facts(self) -> int:
        """Facts per document: as many as fit next to the longest question, up to num_keys."""
        room = (self.prompt_len - 1 - max(_QUESTION_LEN.values())) // _FACT_LEN
        return min(self.num_keys, room)


@dataclass(frozen=True)
class Problem:
    """One prompt and its checkable answer."""

    prompt: torch.Tensor
    """LongTensor [P] of token ids."""
    answer: tuple[int, ...]
    """Expected response tokens before EOS."""
    op: str
    """Question kind."""


def _digits(value: int, width: int | None) -> list[int]:
    text = f"{value:0{width}d}" if width else str(value)
    return [DIGIT0 + int(c) for c in text]


def make_problem(cfg: TaskConfig, gen: torch.Generator) -> Problem:
    """A random document of ``cfg.facts`` distinct keys with values 0..99, and one question about
    keys drawn from anywhere in it (so the answer depends on the whole long prompt)."""
    n = cfg.facts
    keys = (torch.randperm(cfg.num_keys, generator=gen)[:n] + FIRST_KEY).tolist()
    values = torch.randint(0, 100, (n,), generator=gen).tolist()
    op = cfg.ops[int(torch.randint(0, len(cfg.ops), (1,), generator=gen))]
    arity = {"lookup": 1, "sum": 2, "sort": 3}[op]
    picked = torch.randperm(n, generator=gen)[:arity].tolist()
    doc = []
    for k, v in zip(keys, values, strict=True):
        doc += [k, EQ, *_digits(v, 2), SEP]
    question = [Q, OP_TOKENS[op], *[keys[i] for i in picked], ANS]
    fill = cfg.prompt_len - 1 - len(doc) - len(question)
    prompt = torch.tensor([BOS] + [FILL] * fill + doc + question, dtype=torch.long)
    vals = [values[i] for i in picked]
    if op == "lookup":
        answer = _digits(vals[0], 2)
    elif op == "sum":
        answer = _digits(sum(vals), None)
    else:
        answer = [d for v in sorted(vals) for d in _digits(v, 2)]
    assert prompt.numel() == cfg.prompt_len
    return Problem(prompt=prompt, answer=tuple(answer), op=op)


def reward(response: Sequence[int], answer: Sequence[int]) -> float:
    """Partial-credit reward in [0, 1] of a response (token ids, EOS included when emitted).

    ``0.6 * accuracy + 0.2 * digits + 0.2 * stopped``: with ``content`` the tokens before the
    first EOS, accuracy counts positions where content and answer agree over
    ``max(len(answer), len(content))``, digits is the fraction of content tokens that are digits
    (the answer's format; 0 for empty content) and stopped says an EOS was emitted. Only an exact
    answer followed by EOS scores 1; the format terms give a random-init policy a varied reward,
    so that group advantages are not all zero from the first step.
    """
    response = [int(t) for t in response]
    stopped = EOS in response
    content = response[: response.index(EOS)] if stopped else response
    width = max(len(answer), len(content), 1)
    accuracy = sum(a == b for a, b in zip(content, answer, strict=False)) / width
    digits = sum(DIGIT0 <= t < FIRST_KEY for t in content) / len(content) if content else 0.0
    return 0.6 * accuracy + 0.2 * digits + 0.2 * stopped


def render(tokens: Sequence[int]) -> str:
    """Human-readable tokens, for logs: `` k17=42;`` facts, `` ? sum k3 k9 ->`` questions."""
    names = {PAD: "<pad>", BOS: "<s>", FILL: "_", EQ: "=", SEP: ";", Q: " ?", ANS: " ->",
             EOS: " </s>"} | {t: f" {op}" for op, t in OP_TOKENS.items()}  # fmt: skip
    out = []
    for t in (int(t) for t in tokens):
        if t in names:
            out.append(names[t])
        elif DIGIT0 <= t < FIRST_KEY:
            out.append(str(t - DIGIT0))
        else:
            out.append(f" k{t - FIRST_KEY}")
    return "".join(out)


@dataclass(frozen=True)
class ModelSpec:
    """The small policy model; its vocabulary and positions come from the task."""

    kind: Literal["reference", "qwen3"] = "reference"
    """hbmplan's ``ReferenceDecoder`` or a Hugging Face ``Qwen3ForCausalLM`` from a config."""
    hidden: int = 64
    """Model width h."""
    layers: int = 2
    """Decoder layers."""
    heads: int = 4
    """Query heads; head dim is hidden / heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    ffn: int = 128
    """SwiGLU inner width."""


def build_model(spec: ModelSpec, task: TaskConfig, seed: int) -> nn.Module:
    """A random-init fp32 model sized for ``task`` (vocabulary, prompt + response positions)."""
    torch.manual_seed(seed)
    positions = task.prompt_len + task.max_new_tokens
    if spec.kind == "reference":
        cfg = DecoderConfig(
            vocab_size=task.vocab_size,
            hidden_size=spec.hidden,
            num_layers=spec.layers,
            num_heads=spec.heads,
            num_kv_heads=spec.kv_heads,
            intermediate_size=spec.ffn,
            max_positions=positions,
        )
        return ReferenceDecoder(cfg)
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=task.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return transformers.Qwen3ForCausalLM(config).float()


class _ReferenceDecoding:
    """Incremental decoding of G rows with a per-layer K/V cache (``ReferenceDecoder``)."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, G: int) -> None:
        P = prompt.numel()
        hidden, kvs = model(prompt[None], torch.arange(P, device=prompt.device)[None])
        self.model, self.G, self.pos = model, G, P
        self.kv = [(k.expand(G, -1, -1, -1), v.expand(G, -1, -1, -1)) for k, v in kvs]
        self.first = model.lm_head(hidden[:, -1]).expand(G, -1)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.full((self.G, 1), self.pos, device=tokens.device)
        hidden, new = self.model(tokens[:, None], pos, prefix_kv=self.kv)
        self.kv = [
            (torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2))
            for (k0, v0), (k, v) in zip(self.kv, new, strict=True)
        ]
        self.pos += 1
        return self.model.lm_head(hidden[:, -1])


class _HFDecoding:
    """Incremental decoding of G rows through a Hugging Face model's own ``DynamicCache``."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, G: int) -> None:
        from transformers import DynamicCache

        params = inspect.signature(model.forward).parameters
        self.kw = "cache" if "cache" in params else "past_key_values"
        self.model, self.cache = model, DynamicCache()
        self.first = self._run(prompt[None].expand(G, -1))

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self.kw: self.cache})
        return out.logits[:, -1]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens[:, None])


@torch.no_grad()
def sample_group(
    model: nn.Module,
    prompt: torch.Tensor,
    G: int,
    max_new_tokens: int,
    temperature: float,
    gen: torch.Generator,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sample G responses to ``prompt`` (LongTensor [P]) from ``model`` at ``temperature``.

    Prefill once, then decode all rows together with a K/V cache; a row stops after its EOS or at
    ``max_new_tokens``. Returns the responses (LongTensors [S_i], EOS included when emitted) and
    their old log-probs (float32 [S_i]): ``log_softmax(logits)`` of each sampled token, the
    untempered quantity the trainer computes, so at temperature 1 they are the behaviour
    policy's log-probs. ``gen`` is a CPU generator and drives every draw.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    state = (_HFDecoding if hasattr(model, "config") else _ReferenceDecoding)(model, prompt, G)
    logits = state.first
    tokens, logps = [], []
    done = torch.zeros(G, dtype=torch.bool)
    lengths = torch.full((G,), max_new_tokens)
    for t in range(max_new_tokens):
        logits32 = logits.float().cpu()
        probs = torch.softmax(logits32 / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tokens.append(tok)
        logps.append(torch.log_softmax(logits32, dim=-1).gather(1, tok[:, None]).squeeze(1))
        finished = (tok == EOS) & ~done
        lengths[finished] = t + 1
        done |= finished
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        logits = state.next(tok.to(prompt.device))
    tok_all, lp_all = torch.stack(tokens, 1), torch.stack(logps, 1)
    n = lengths.tolist()
    responses = [tok_all[i, : n[i]].to(prompt.device) for i in range(G)]
    return responses, [lp_all[i, : n[i]].clone() for i in range(G)]
