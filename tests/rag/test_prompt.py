"""The prompt builder: deterministic; while the history only grows, each turn's prompt is a prefix
of the next turn's; an eviction changes the prompt only from the evicted entry on; the ids train
as an ``hbmplan.Group``."""

import itertools

import pytest
import torch

pytest.importorskip("bm25s", reason="hbmplan.rag needs the rag extra (bm25s)")
pytest.importorskip("sklearn", reason="hbmplan.rag needs the rag extra (scikit-learn)")

from hypothesis import example, given
from hypothesis import strategies as st

import hbmplan
from hbmplan.rag.prompt import HashTokenizer, PromptBuilder, common_prefix
from hbmplan.rag.store import HistoryStore
from hbmplan.schedules import dense_step, reuse_step
from tests.helpers import VOCAB, pg_loss, tiny_reference

SYSTEM = "Answer from the passages."
PASSAGES = {i: f"Passage number {i} says fact {i * 7}." for i in range(8)}
phrases = st.lists(st.sampled_from(["who", "runs", "it", "Varelko", "founded", "1952", "?"]),
                   min_size=1, max_size=5).map(" ".join)  # fmt: skip
turns = st.lists(
    st.tuples(phrases, st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True), phrases),
    min_size=2,
    max_size=7,
)


def char_tokenizer(text):
    return [ord(c) % 251 for c in text]


def _play(builder, dialogue):
    """Build every turn's prompt with the history growing by one entry per turn."""
    store, prompts = HistoryStore(), []
    for t, (query, shown, response) in enumerate(dialogue):
        prompts.append(builder.build(store.entries, [(i, PASSAGES[i]) for i in shown], query))
        store.add(turn=t, query=query, passages=shown,
                  passage_texts=[PASSAGES[i] for i in shown], response=response)  # fmt: skip
    return store, prompts


@given(dialogue=turns, tok=st.sampled_from([HashTokenizer(), char_tokenizer]))
@example(dialogue=[("q", [0, 1], "r"), ("q", [1, 0], "r"), ("q", [1], "r")], tok=HashTokenizer())
def test_each_prompt_is_a_prefix_of_the_next_while_history_grows(dialogue, tok):
    _, prompts = _play(PromptBuilder(tok, SYSTEM), dialogue)
    for a, b in itertools.pairwise(prompts):
        assert common_prefix(a.ids, b.ids) == a.ids.numel(), "the whole prompt is reused"
        assert torch.equal(a.ids[: a.stable_len], b.ids[: a.stable_len])
        assert b.stable_len >= a.ids.numel() - len(tok("Assistant:"))


@given(dialogue=turns)
def test_deterministic(dialogue):
    _, p1 = _play(PromptBuilder(HashTokenizer(), SYSTEM), dialogue)
    _, p2 = _play(PromptBuilder(HashTokenizer(), SYSTEM), dialogue)
    assert all(
        torch.equal(a.ids, b.ids) and a.texts == b.texts for a, b in zip(p1, p2, strict=True)
    )
    assert all(p.ids.dtype == torch.int64 and p.ids.dim() == 1 for p in p1)


@given(dialogue=turns, drop=st.integers(0, 5))
def test_eviction_changes_the_prompt_only_from_the_evicted_entry(dialogue, drop):
    b = PromptBuilder(HashTokenizer(), SYSTEM)
    store, _ = _play(b, dialogue)
    entries = store.entries
    drop = drop % len(entries)
    query, shown = "next?", [(i, PASSAGES[i]) for i in (0, 5)]
    full = b.build(entries, shown, query)
    kept = b.build([e for e in entries if e.id != drop], shown, query)
    before = b.build(entries[:drop], [], "")  # the prompt up to the evicted entry's block
    head = before.stable_len
    assert common_prefix(full.ids, kept.ids) >= head


def test_layouts_and_passages_shown_once():
    b = PromptBuilder(HashTokenizer(), SYSTEM)
    pf = PromptBuilder(HashTokenizer(), SYSTEM, layout="passages-first")
    dialogue = [("q0", [0, 1], "r0"), ("q1", [1, 2], "r1")]
    store, _ = _play(b, dialogue)
    shown = [(2, PASSAGES[2]), (3, PASSAGES[3])]
    s = b.build(store.entries, shown, "q2")
    assert s.texts == (
        f"{SYSTEM}\n", f"Passage: {PASSAGES[0]}\n", f"Passage: {PASSAGES[1]}\n", "User: q0\n",
        "Assistant:", " r0\n", f"Passage: {PASSAGES[2]}\n", "User: q1\n", "Assistant:", " r1\n",
        f"Passage: {PASSAGES[3]}\n", "User: q2\n", "Assistant:",
    )  # fmt: skip
    p = pf.build(store.entries, shown, "q2")
    assert p.texts == (
        f"{SYSTEM}\n", f"Passage: {PASSAGES[2]}\n", f"Passage: {PASSAGES[3]}\n", "User: q0\n",
        "Assistant:", " r0\n", "User: q1\n", "Assistant:", " r1\n", "User: q2\n", "Assistant:",
    )  # fmt: skip
    assert p.stable_len == len(HashTokenizer()(f"{SYSTEM}\n"))
    tok = HashTokenizer()
    assert s.ids.tolist() == [i for piece in s.texts for i in tok(piece)]


def test_hugging_face_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in [SYSTEM, *PASSAGES.values()] for w in t.replace(".", " . ").split()})
    names = dict.fromkeys(["[UNK]", *words, ":", "User", "Assistant", "Passage"])
    vocab = {w: i for i, w in enumerate(names)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    b = PromptBuilder(lambda s: tok.encode(s, add_special_tokens=False), SYSTEM)
    _, prompts = _play(b, [("who runs it", [0], "Passage"), ("founded", [1, 2], "1952")])
    assert common_prefix(prompts[0].ids, prompts[1].ids) == prompts[0].ids.numel()
    assert int(prompts[1].ids.max()) < len(vocab)


def test_prompt_trains_as_a_group():
    """The ids go straight into hbmplan.Group; the reuse step matches the dense step on them."""
    b = PromptBuilder(HashTokenizer(vocab_size=VOCAB), SYSTEM)
    _, prompts = _play(b, [("who runs it ?", [0, 3], "Varelko"), ("founded ?", [1], "1952")])
    g = torch.Generator().manual_seed(0)
    group = hbmplan.Group(
        prompt=prompts[-1].ids,
        responses=[torch.randint(0, VOCAB, (s,), generator=g) for s in (5, 1, 3)],
        data={"advantages": torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)},
    )
    model = tiny_reference(layers=1)
    dense_step(model, [group], pg_loss)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reuse_step(model, [group], pg_loss)
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("tok", "layout", "err", "rule"),
    [
        (lambda s: [-1], "stable", TypeError, r"tokenizer must return ints >= 0, got \[-1\]"),
        (lambda s: [1.5], "stable", TypeError, r"tokenizer must return ints >= 0, got \[1.5\]"),
        (lambda s: [True], "stable", TypeError, "tokenizer must return ints >= 0"),
        (lambda s: [], "stable", ValueError, r"a prompt needs >= 2 tokens \(a Group's P >= 2\)"),
        (HashTokenizer(), "fancy", ValueError, "layout must be 'stable' or 'passages-first'"),
        ("not callable", "stable", TypeError, "tokenizer must be callable, got str"),
    ],
)
def test_rejects(tok, layout, err, rule):
    with pytest.raises(err, match=rule):
        PromptBuilder(tok, SYSTEM, layout).build([], [(0, "p")], "q")


def test_tensor_tokenizer_output_and_hash_tokenizer():
    b = PromptBuilder(lambda s: torch.tensor(HashTokenizer()(s)), SYSTEM)
    assert torch.equal(
        b.build([], [], "q").ids, PromptBuilder(HashTokenizer(), SYSTEM).build([], [], "q").ids
    )
    assert HashTokenizer(10)("a b, c") == HashTokenizer(10)("a b, c")
    assert all(0 <= i < 10 for i in HashTokenizer(10)("a b, c d e f g"))
    with pytest.raises(ValueError, match="vocab_size must be >= 2, got 1"):
        HashTokenizer(1)
