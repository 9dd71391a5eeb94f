"""Time per optimisation step: TRL's GRPOTrainer vs hbmplan's ReuseGRPOTrainer, same run.

Both trainers train the same random Qwen3 on one prompt group per step (a shared prompt of P
tokens, G completions of S tokens each, fixed so that both see identical batches; generation is
patched out, so the step is the training step), without gradient checkpointing on either side,
``beta=0`` and ``num_iterations=1`` (no scoring passes). Short runs alternate between the
trainers; the first step of each run is dropped. Prints per P the median and the minimum step
time of each, the ratios of both (the minimum is the steadier one on a shared machine: a step
can only be slowed by other load), a loud warning when the spread exceeds 15%, and the
FLOP-ideal speedup of those shapes
(:func:`hbmplan.capacity.flops.flop_ideal_speedup`), and writes
``benchmarks/results/trl_<card>_<date>.md``.

    python tools/bench_trl.py                       # P = 1k, 2k, 4k on CPU
    python tools/bench_trl.py --prompts 1024 2048 4096 8192 --hidden 1024 --layers 8   # a GPU
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from hbmplan.capacity import model_spec
from hbmplan.capacity.flops import flop_ideal_speedup
from hbmplan.integrations.trl import ReuseGRPOTrainer
from tools.examples.trl_grpo import tiny_tokenizer
from tools.harness import (
    add_threads_arg,
    apply_threads,
    card_name,
    machine_line,
    markdown_table,
    warn,
    write_results,
)


def tokenizer(vocab: int):
    """Words w0..w{vocab - 4} after <pad>, <eos>, <unk>: the example's tokenizer, ``vocab`` ids."""
    return tiny_tokenizer([f"w{i}" for i in range(vocab - 3)])


def qwen3(args, max_positions: int, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 128), head_dim=32,
        max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config).to(dtype)


class FixedCompletions:
    """Completions of exactly ``max_completion_length`` tokens drawn from a seed (no EOS)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):  # fmt: skip
        g = torch.Generator().manual_seed(len(prompt_ids))
        n = self.max_completion_length
        vocab = self.model.config.vocab_size
        return [torch.randint(3, vocab, (n,), generator=g).tolist() for _ in prompt_ids], None


class TRL(FixedCompletions, GRPOTrainer):
    pass


class Reuse(FixedCompletions, ReuseGRPOTrainer):
    pass


def reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]  # varied, so advantages are not all zero


def step_times(cls, model, data, tok, args, steps: int, out: str, dtype) -> list[float]:
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=args.generations,
        num_generations=args.generations, gradient_accumulation_steps=1,
        max_completion_length=args.response, max_steps=steps, learning_rate=1e-6,
        optim="sgd", beta=0.0, loss_type="dapo", logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = cls(model, reward, config, train_dataset=data, processing_class=tok)
    trainer.train()
    times = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    return times[1:]  # the first step of a run warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="steps per run (first dropped)")
    parser.add_argument("--repeats", type=int, default=4, help="runs per trainer, alternating")
    add_threads_arg(parser)
    args = parser.parse_args()
    logging.getLogger("hbmplan").setLevel(logging.ERROR)
    apply_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"{card_name(device)}; {machine_line()}")
    tok = tokenizer(args.vocab)
    rows, table = [], []
    for P in args.prompts:
        words = [f"w{i % (args.vocab - 3)}" for i in torch.randperm(P).tolist()]
        data = Dataset.from_dict({"prompt": [" ".join(words)] * 64})
        model = qwen3(args, P + args.response + 8, dtype)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        times: dict[str, list[float]] = {"trl": [], "reuse": []}
        start = time.perf_counter()
        for _ in range(args.repeats):
            for name, cls in (("trl", TRL), ("reuse", Reuse)):
                model.load_state_dict(state)
                times[name] += step_times(
                    cls, model, data, tok, args, args.steps, "/tmp/hbmplan_bench_trl", dtype
                )
        trl_s, reuse_s = statistics.median(times["trl"]), statistics.median(times["reuse"])
        trl_min, reuse_min = min(times["trl"]), min(times["reuse"])
        ideal = flop_ideal_speedup(model_spec(model), P, [args.response] * args.generations)
        ratio, ratio_min = trl_s / reuse_s, trl_min / reuse_min
        for name, ts in times.items():
            spread = (max(ts) - min(ts)) / statistics.median(ts)
            if spread > 0.15:
                warn(f"P={P} {name}: step times spread {spread:.0%} ({machine_line()}): "
                     "something else is using the CPUs")  # fmt: skip
        print(f"P={P}: TRL {trl_s * 1e3:.0f} ms/step (min {trl_min * 1e3:.0f}), reuse "
              f"{reuse_s * 1e3:.0f} ms/step (min {reuse_min * 1e3:.0f}), ratio {ratio:.2f}x "
              f"(of minima {ratio_min:.2f}x), FLOP-ideal {ideal:.2f}x; "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        rows.append(dict(P=P, S=args.response, G=args.generations, trl_s=trl_s,
                         reuse_s=reuse_s, ratio=ratio, ratio_of_minima=ratio_min,
                         flop_ideal=ideal, trl_times=times["trl"],
                         reuse_times=times["reuse"]))  # fmt: skip
        table.append([P, args.response, args.generations, f"{trl_s * 1e3:.0f}",
                      f"{reuse_s * 1e3:.0f}", f"{ratio:.2f}x", f"{ratio_min:.2f}x",
                      f"{ideal:.2f}x", f"{ratio_min / ideal:.0%}"])  # fmt: skip
    header = ["P", "S", "G", "TRL ms/step (median)", "reuse ms/step (median)", "ratio",
              "ratio of minima", "FLOP-ideal", "minima, of ideal"]  # fmt: skip
    md = markdown_table(header, table)
    model_line = (
        f"Qwen3 random init: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{dtype}; {machine_line()} (at the end)"
    )
    path = write_results("trl", device, " ".join(sys.argv), f"{model_line}\n\n{md}", rows)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
