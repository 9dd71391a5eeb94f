"""ReuseGRPOTrainer trains what trl.GRPOTrainer trains: both fed identical completions, SGD, the
update read just before ``optimizer.step()`` (the gradient: update = -lr x gradient), per loss
type, KL coefficient, ``num_iterations``, with gradient accumulation over several groups, LoRA;
logged curves over 10 steps; fewer tokens through the training forwards; TRL's defaults."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from hbmplan.integrations.trl import ReuseGRPOTrainer
from hbmplan.integrations.trl_batches import BATCH, WEIGHT, regroup
from tests.helpers.trl import (
    FixedCompletions,
    prompts,
    reward_w3,
    saved_qwen3,
    tiny_qwen3,
    tiny_tokenizer,
)

pytestmark = pytest.mark.timeout(300)


class TRL(FixedCompletions, GRPOTrainer):
    pass


class Reuse(FixedCompletions, ReuseGRPOTrainer):
    pass


class TRLGrouped(FixedCompletions, GRPOTrainer):
    """TRL's own loss, fed the reuse trainer's micro-batches of whole groups."""

    _prepare_inputs = ReuseGRPOTrainer._prepare_inputs
    _row_weights = ReuseGRPOTrainer._row_weights


class Updates(TrainerCallback):
    """Each optimizer step's gradients, read just before ``optimizer.step()``."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


class ForwardTokens:
    """Tokens through the decoder's forwards with gradients (training) and without (scoring;
    generation is patched out)."""

    def __init__(self, decoder):
        self.train = self.score = 0
        decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        n = kwargs["input_ids"].numel()
        if torch.is_grad_enabled():
            self.train += n
        else:
            self.score += n


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    saved_qwen3(path)
    return path


def config(tmp, **kw):
    base = dict(
        output_dir=str(tmp), per_device_train_batch_size=4, num_generations=4,
        gradient_accumulation_steps=2, max_completion_length=6, learning_rate=0.1, optim="sgd",
        max_steps=2, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
        max_grad_norm=0.0, seed=0, use_cpu=True, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", beta=0.0,
    )  # fmt: skip
    return GRPOConfig(**(base | kw))


def train(cls, model, args, n_prompts=8, **kw):
    updates = Updates()
    dataset = Dataset.from_dict({"prompt": prompts(n_prompts, vary=True)})
    trainer = cls(model, reward_w3, args, train_dataset=dataset, processing_class=tiny_tokenizer(),
                  callbacks=[updates], **kw)  # fmt: skip
    tokens = ForwardTokens(trainer.accelerator.unwrap_model(trainer.model).get_decoder())
    trainer.train()
    return updates.steps, trainer.state.log_history, tokens


def rel_diff(a, b):
    assert a.keys() == b.keys()
    top = max(t.abs().max().item() for t in b.values())
    return max(
        (a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-6 * top) for k in b
    )


CASES = [  # each loss type with beta 0 and > 0, num_iterations 1 and 2, accumulation over groups
    ("grpo", 0.0, 1, {}),
    ("grpo", 0.04, 2, {"delta": 1.5, "epsilon_high": 0.28}),  # two-sided clipping, clip-higher
    ("dr_grpo", 0.0, 2, {}),
    ("dr_grpo", 0.04, 1, {}),
    ("dapo", 0.0, 1, {"mask_truncated_completions": True}),
    ("dapo", 0.04, 2, {"use_bias_correction_kl": True}),
    ("bnpo", 0.0, 2, {"per_device_train_batch_size": 2}),  # one group, one empty micro-batch
    ("bnpo", 0.04, 1, {}),
]


@pytest.mark.parametrize("loss_type, beta, iterations, extra", CASES)
def test_update_equals_trl(model_dir, tmp_path, loss_type, beta, iterations, extra):
    steps = 2 if beta or iterations > 1 else 1  # the KL gradient is zero at the first step
    args = dict(loss_type=loss_type, beta=beta, num_iterations=iterations, max_steps=steps, **extra)
    want, _, _ = train(TRL, saved_qwen3(model_dir), config(tmp_path, **args))
    got, _, _ = train(Reuse, saved_qwen3(model_dir), config(tmp_path, **args))
    assert len(got) == len(want) == steps
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_diff(g, w) <= 1e-5, f"step {step}"
    if beta:  # the KL term (zero gradient at the first step) trained at the second
        assert any(v.abs().max() > 0 for v in want[1].values())


def test_ten_steps_log_trl_curves_with_fewer_tokens(model_dir, tmp_path):
    args = dict(loss_type="dapo", beta=0.04, num_iterations=2, max_steps=10,
                gradient_accumulation_steps=1)  # fmt: skip
    _, want, trl_tokens = train(TRL, saved_qwen3(model_dir), config(tmp_path, **args), 10)
    _, got, reuse_tokens = train(Reuse, saved_qwen3(model_dir), config(tmp_path, **args), 10)
    steps = [(g, w) for g, w in zip(got, want, strict=True) if "loss" in w]
    assert len(steps) == 10
    worst = {}
    for g, w in steps:  # the reward is logged at generation steps (every other one here)
        assert {k for k in w if not k.endswith("step_time")} <= set(g)
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "reward"):
            if key in w:
                worst[key] = max(worst.get(key, 0.0), abs(g[key] - w[key]) / (1 + abs(w[key])))
    assert set(worst) == {"loss", "kl", "entropy", "clip_ratio/region_mean", "reward"}
    assert max(worst.values()) <= 1e-5, worst  # bound: 1e-5 of the curve's scale
    assert steps[0][0]["hbmplan/token_ratio"] > 1 and steps[0][0]["hbmplan/flop_ideal_speedup"] > 1
    # the prompt once per group: training forwards and no-grad scoring passes
    assert reuse_tokens.train < 0.5 * trl_tokens.train
    assert reuse_tokens.score < 0.5 * trl_tokens.score


def test_whole_groups_to_optimizer_steps_equal_trl_fed_the_same_grouping(model_dir, tmp_path):
    """steps_per_generation > gradient_accumulation_steps: TRL would split a group over two
    optimizer steps; whole groups go to steps instead (TRL fed that grouping trains the same)."""
    args = config(tmp_path, gradient_accumulation_steps=1, steps_per_generation=2)
    want, _, _ = train(TRLGrouped, saved_qwen3(model_dir), args)
    got, _, _ = train(Reuse, saved_qwen3(model_dir), args)
    for g, w in zip(got, want, strict=True):
        assert rel_diff(g, w) <= 1e-5


def test_lora_with_the_reference_as_the_disabled_adapter(model_dir, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False)  # fmt: skip
    args = dict(beta=0.04, num_iterations=2, per_device_train_batch_size=8,
                gradient_accumulation_steps=1)  # fmt: skip
    want, _, _ = train(TRL, saved_qwen3(model_dir), config(tmp_path, **args), peft_config=lora)
    got, _, _ = train(Reuse, saved_qwen3(model_dir), config(tmp_path, **args), peft_config=lora)
    assert all("lora" in k for k in want[0])
    for g, w in zip(got, want, strict=True):
        assert rel_diff(g, w) <= 1e-5


def test_trl_defaults_train_with_checkpointing_replaced(tmp_path, caplog):
    """GRPOConfig's defaults: bf16=True, gradient_checkpointing=True, loss_type="dapo"."""
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", disable_tqdm=True)  # fmt: skip
    assert args.bf16 and args.gradient_checkpointing and args.loss_type == "dapo"
    with caplog.at_level(logging.WARNING, logger="hbmplan.integrations.trl"):
        _, logs, _ = train(Reuse, tiny_qwen3(), args)
    assert "replaced by hbmplan's planner" in caplog.text
    assert not args.gradient_checkpointing
    assert torch.isfinite(torch.tensor(logs[-1]["train_loss"]))


def _inputs(trainer, seed=0):
    """A hand-made batch: 2 prompts x 4 completions, one masked out, vLLM importance ratios."""
    g = torch.Generator().manual_seed(seed)
    tok = tiny_tokenizer()
    text = prompts(2, vary=True)
    p = tok(text, padding=True, return_tensors="pt")
    B, C = 8, 5
    completion_ids = torch.randint(3, 40, (B, C), generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 3])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_mask[6] = 0  # a truncated completion TRL masks out
    return {
        "prompt_ids": p["input_ids"].repeat_interleave(4, 0),
        "prompt_mask": p["attention_mask"].repeat_interleave(4, 0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": -3.8 + 0.1 * torch.randn(B, C, generator=g),
        "importance_sampling_ratio": 1 + 0.1 * torch.rand(B, C, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }


def test_vllm_importance_sampling_path_without_vllm(tmp_path):
    """use_vllm leaves generation to vLLM; the loss multiplies the importance ratio TRL computed.
    Checked on TRL's own compute_loss, vLLM not installed: the attributes are set directly."""
    grads = []
    for cls in (GRPOTrainer, ReuseGRPOTrainer):
        trainer = cls(tiny_qwen3(), reward_w3, config(tmp_path, gradient_accumulation_steps=1),
                      train_dataset=Dataset.from_dict({"prompt": prompts(4)}),
                      processing_class=tiny_tokenizer())  # fmt: skip
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        inputs = _inputs(trainer)
        if cls is ReuseGRPOTrainer:  # as _prepare_inputs hands it over: groups whole
            (inputs,) = regroup(inputs, 1, trainer._row_weights, exact=True)
            assert WEIGHT in inputs and BATCH in inputs
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()  # what Trainer.training_step does; a no-op for the reuse trainer
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert rel_diff(grads[1], grads[0]) <= 1e-5


def test_no_grad_log_probs_equal_trls(tmp_path):
    """The old-policy / reference pass: TRL's fused LM head vs the prompt once per group."""
    out = []
    for cls in (GRPOTrainer, ReuseGRPOTrainer):
        trainer = cls(tiny_qwen3(), reward_w3, config(tmp_path, temperature=0.7),
                      train_dataset=Dataset.from_dict({"prompt": prompts(4)}),
                      processing_class=tiny_tokenizer())  # fmt: skip
        x = _inputs(trainer)
        ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
        mask = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)
        with torch.no_grad():
            out.append(trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, 5, compute_entropy=True))  # fmt: skip
    (want, want_h, _), (got, got_h, _) = out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    assert (got[x["completion_mask"] == 0] == 0).all()


def test_models_it_cannot_train_exactly_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3MoeConfig, Qwen3MoeForCausalLM

    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=48, hidden_size=16, intermediate_size=16, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.01))  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=16, n_layer=1, n_head=2))
    for model, match in [(moe, r"router loss .*\(router_aux_loss_coef=0.01\)"),
                         (gpt2, "unsupported Hugging Face model_type 'gpt2'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ReuseGRPOTrainer(model, reward_w3, config(tmp_path),
                             train_dataset=Dataset.from_dict({"prompt": prompts(4)}),
                             processing_class=tiny_tokenizer())  # fmt: skip


def test_offloaded_prompt_activations_train_the_same(model_dir, tmp_path):
    """A ReuseConfig asking for offload: the update is unchanged, the bytes are logged."""
    from hbmplan import ReuseConfig

    args = config(tmp_path, max_steps=1, logging_steps=1)
    want, _, _ = train(TRL, saved_qwen3(model_dir), args)
    got, logs, _ = train(Reuse, saved_qwen3(model_dir), args,
                         reuse_config=ReuseConfig(offload="all"))  # fmt: skip
    assert rel_diff(got[0], want[0]) <= 1e-5
    assert logs[0]["hbmplan/offloaded_MiB"] > 0


def test_evaluation_loss_equals_trls(model_dir, tmp_path):
    """Evaluation runs TRL's loss on the no-grad log-probs of the prompt-once pass."""
    losses = []
    for cls in (TRL, Reuse):
        args = config(tmp_path, per_device_eval_batch_size=4, num_generations_eval=4)
        trainer = cls(saved_qwen3(model_dir), reward_w3, args,
                      train_dataset=Dataset.from_dict({"prompt": prompts(4)}),
                      eval_dataset=Dataset.from_dict({"prompt": prompts(4, seed=1)}),
                      processing_class=tiny_tokenizer())  # fmt: skip
        losses.append(trainer.evaluate())
    assert losses[1]["eval_loss"] == pytest.approx(losses[0]["eval_loss"], rel=1e-5, abs=1e-7)
    assert losses[1]["eval_entropy"] == pytest.approx(losses[0]["eval_entropy"], rel=1e-5)
