"""Every Python example in the README runs as written, each on its own (a fresh namespace), on
CPU. The Hugging Face example loads a tiny Qwen3 saved to a temporary directory instead of the
hub checkpoint it names (no download)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
CHECKPOINT = '"Qwen/Qwen3-0.6B"'


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(needle: str) -> str:
    (block,) = [b for b in _blocks() if needle in b]
    return block


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_python_block_is_covered_here():
    names = ["ReferenceDecoder(DecoderConfig(vocab_size=1000, hidden_size=128, num_layers=2",
             "from_pretrained(checkpoint", "global_mean = ", "static = params", 'hbm_budget="',
             "from hbmplan.rag import",  # tests/rag/test_readme_rag.py
             "fully_shard(layer",  # on 2 ranks: tests/distributed/test_data_parallel.py
             "token_filter=EntropyQuantile"]  # fmt: skip
    assert len(_blocks()) == len(names)
    for needle in names:
        _block(needle)  # exactly one block holds it


def test_first_example(capsys):
    _run(_block("ReferenceDecoder(DecoderConfig(vocab_size=1000, hidden_size=128, num_layers=2"))
    assert "hbmplan reuse step 1" in capsys.readouterr().out


def test_hugging_face_checkpoint_in_a_training_loop(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    code = _block("from_pretrained(checkpoint")
    assert CHECKPOINT in code
    ns = _run(code.replace(CHECKPOINT, repr(str(tmp_path)), 1))
    assert ns["model"].dtype == torch.bfloat16 and ns["model"].training
    assert "hbmplan reuse step 3" in capsys.readouterr().out


def test_losses_across_groups_give_the_means_they_name():
    """Per-token weights as the schedules apply them (summed over every response of every
    group): ``per_group`` averages the groups' token-means, ``global_mean`` is one token-mean."""
    ns = _run(_block("global_mean = "))
    groups, per_group, global_mean = ns["groups"], ns["per_group"], ns["global_mean"]
    assert len(groups) >= 2 and len({sum(g.response_lens) for g in groups}) > 1

    def total_weight(loss, per_token):
        return sum(loss.scale * loss.weight(g, i) * sum(per_token(g, i)) for g in groups
                   for i in range(g.group_size))  # fmt: skip

    ones = lambda g, i: [1.0] * g.response_lens[i]  # noqa: E731
    assert total_weight(global_mean, ones) == pytest.approx(1.0)
    assert total_weight(per_group, ones) == pytest.approx(1.0)
    # a loss of 1 on the first group's tokens only: the global mean weighs it by its tokens
    first = lambda g, i: ones(g, i) if g is groups[0] else [0.0] * g.response_lens[i]  # noqa: E731
    tokens = [sum(g.response_lens) for g in groups]
    assert total_weight(global_mean, first) == pytest.approx(tokens[0] / sum(tokens))
    assert total_weight(per_group, first) == pytest.approx(1 / len(groups))


def test_budget_arithmetic(capsys):
    ns = _run(_block("static = params"))
    assert 0 < ns["budget"] < ns["card"]
    assert capsys.readouterr().out.startswith("hbm_budget=")


def test_offload_example_offloads_within_its_budget(capsys):
    ns = _run(_block('hbm_budget="'))
    last = ns["mem"].report().last
    out = capsys.readouterr().out
    assert "hbmplan reuse step 2" in out and "hbmplan plan (auto): budget 40.0 MiB" in out
    assert max(p.peak_bytes for p in last.phases.values()) <= 40 * 2**20
    assert last.offload.engine.bytes_offloaded > 0


def test_skipping_and_filtering_example(capsys):
    ns = _run(_block("token_filter=EntropyQuantile"))
    out = capsys.readouterr().out
    assert "skipped (exact): 4 inert response(s), 1 whole group(s), 48 response token(s)" in out
    assert ns["stats"].microbatches == 4 and ns["approx"].filtered_tokens > 0
