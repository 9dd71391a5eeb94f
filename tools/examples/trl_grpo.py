"""GRPO with TRL on hbmplan's reuse schedule: one changed import.

Builds everything locally (no hub download): a word-level tokenizer, a tiny random-initialised
Qwen3, and a dataset whose prompts share a long document and end with a short question; the
reward is verifiable (does the completion name the word the question asks for). TRL generates
with ``transformers``; ``ReuseGRPOTrainer`` trains each prompt group with the prompt forward
and backward once. Under two minutes on a CPU:

    python tools/examples/trl_grpo.py                 # ReuseGRPOTrainer, tiny model, CPU
    python tools/examples/trl_grpo.py --trainer trl   # TRL's GRPOTrainer, for comparison

With a real model on a GPU (its own tokenizer; the same dataset as text):

    python tools/examples/trl_grpo.py --model Qwen/Qwen3-0.6B --prompt-words 4000 --steps 20
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from hbmplan.integrations.trl import ReuseGRPOTrainer  # the one changed import

WORDS = [f"w{i}" for i in range(200)]


def tiny_tokenizer(words=WORDS):
    """Whitespace-split ``words`` (default w0..w199) after <pad> 0, <eos> 1, <unk> 2; left
    padding, as TRL wants."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: 3 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def tiny_qwen3(vocab_size: int, max_positions: int):
    """A 4-layer Qwen3 with random weights (fp32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return Qwen3ForCausalLM(config)


def dataset(n: int, prompt_words: int, seed: int = 0) -> Dataset:
    """``n`` prompts: one shared document of ``prompt_words`` words (a retrieved context, a
    system prompt) and a question naming the word to answer with."""
    rng = random.Random(seed)
    document = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
    answers = [rng.choice(WORDS) for _ in range(n)]
    prompts = [f"{document} w0 w1 w2 {a}" for a in answers]  # "w0 w1 w2" marks the question
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def reward_answer(completions, answer, **kwargs) -> list[float]:
    """Verifiable: 1 if the completion names the asked word, else 0."""
    return [float(a in c.split()) for c, a in zip(completions, answer, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", choices=["reuse", "trl"], default="reuse")
    parser.add_argument("--model", default=None, help="a hub id or local path (default: tiny)")
    parser.add_argument("--prompt-words", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument(
        "--output-dir",
        default=tempfile.mkdtemp(prefix="trl_grpo_"),
        help="checkpoints and logs (default: a new temporary directory)",
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if args.model is None:
        tokenizer = tiny_tokenizer()
        model = tiny_qwen3(len(tokenizer), args.prompt_words + 256)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if cuda else torch.float32
        )
    config = GRPOConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.generations,
        num_generations=args.generations, gradient_accumulation_steps=2,
        max_completion_length=args.completion_length, max_steps=args.steps, learning_rate=1e-5,
        logging_steps=1, report_to=[], save_strategy="no", bf16=cuda, use_cpu=not cuda,
        loss_type="dapo", beta=0.0, disable_tqdm=True,
    )  # fmt: skip
    cls = ReuseGRPOTrainer if args.trainer == "reuse" else GRPOTrainer
    trainer = cls(model, reward_answer, config, train_dataset=dataset(64, args.prompt_words),
                  processing_class=tokenizer)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    keys = ("loss", "reward", "entropy", "step_time", "hbmplan/token_ratio")
    for log in trainer.state.log_history:
        if "loss" in log:
            print(" ".join(f"{k}={log[k]:.4g}" for k in keys if k in log))
    print(f"{cls.__name__}: {args.steps} steps in {wall:.1f} s")


if __name__ == "__main__":
    main()
