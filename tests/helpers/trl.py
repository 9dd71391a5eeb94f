"""A tiny TRL setup for the integration tests: a word-level tokenizer and a random Qwen3 built
locally, prompts sharing a long prefix, a verifiable reward, and completions fixed by a seed so
that TRL's trainer and the reuse trainer train on identical generations."""

from __future__ import annotations

import torch

WORDS = [f"w{i}" for i in range(45)]
VOCAB = 3 + len(WORDS)  # <pad> <eos> <unk> + words
PAD, EOS = 0, 1


def tiny_tokenizer():
    """The example's word-level tokenizer over ``WORDS`` (<pad> = PAD, <eos> = EOS)."""
    from tools.examples.trl_grpo import tiny_tokenizer as example_tokenizer

    return example_tokenizer(WORDS)


def tiny_qwen3(seed: int = 0, dtype=torch.float32, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config).to(dtype)


def prompts(n: int, prefix_len: int = 40, seed: int = 0, vary: bool = False) -> list[str]:
    """``n`` prompts: one shared prefix of ``prefix_len`` words and a 3-word question each
    (``vary``: questions of 2-4 words, so the batch's prompts are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    prefix = [WORDS[i] for i in torch.randint(0, len(WORDS), (prefix_len,), generator=g)]
    out = []
    for k in range(n):
        q = 2 + k % 3 if vary else 3
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (q,), generator=g)]
        out.append(" ".join(prefix + words))
    return out


def reward_w3(completions, **kwargs) -> list[float]:
    """Verifiable: how often the completion says w3, minus a length term."""
    return [c.split().count("w3") - 0.05 * len(c.split()) for c in completions]


class FixedCompletions:
    """Mixin for a GRPO trainer: completions drawn from a seed and the call count instead of the
    model (the same for every trainer fed the same prompts in the same order). Lengths 1 to
    ``max_completion_length``; about half end with EOS, the rest are truncated."""

    completion_seed = 0

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):  # fmt: skip
        calls = getattr(self, "_fixed_calls", 0)
        self._fixed_calls = calls + 1
        g = torch.Generator().manual_seed(1000 * self.completion_seed + calls)
        out = []
        top = self.max_completion_length
        for _ in prompt_ids:
            n = int(torch.randint(1, top + 1, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            if n < top and bool(torch.rand((), generator=g) < 0.6):
                ids.append(EOS)
            out.append(ids)
        return out, None


def saved_qwen3(path, seed: int = 0, layers: int = 2):
    """:func:`tiny_qwen3` saved to ``path`` and loaded back (fp32), so that TRL can build the
    reference model from its ``_name_or_path``."""
    from transformers import Qwen3ForCausalLM

    if not (path / "config.json").exists():
        tiny_qwen3(seed, layers=layers).save_pretrained(path)
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model
