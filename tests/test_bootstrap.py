"""The tiny world: task scoring, the cache stamp, and the quality of the cached models on a small sample."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trainer.tiny import task
from trainer.tiny import models as tm
from trainer.tiny.bootstrap import RECIPE, ensure_tiny_world, needs_rebuild, recipe_hash

N_SAMPLE = 64
DRAFT_AGREEMENT_FLOOR = 0.70  # measured ~0.80 on the built world; margin for a different machine's float rounding


@pytest.fixture(scope="module")
def world():
    return ensure_tiny_world(quiet=True)


@pytest.fixture(scope="module")
def tok(world):
    return AutoTokenizer.from_pretrained(world.tokenizer_path)


@pytest.fixture(scope="module")
def sample(world):
    return task.read_prompts_jsonl(world.eval_prompts)[:N_SAMPLE]


@pytest.fixture(scope="module")
def actor_greedy(world, tok, sample):
    """Greedy continuations of the actor on the sample, through the public HF surface (tokenizer + generate)."""
    actor = AutoModelForCausalLM.from_pretrained(world.actor_path).eval()
    enc = tok([r["prompt"] for r in sample], return_tensors="pt", padding=True)  # left-padded, <bos> added
    with torch.inference_mode():
        out = actor.generate(**enc, max_new_tokens=task.MAX_LEN + 1, do_sample=False)
    return out[:, enc["input_ids"].shape[1]:]  # [B, new]


# ---------------------------------------------------------------------------------------------------------
# Task


def test_score_hand_checked():
    p = "sort : 3 1 4 ="
    assert task.score(p, "1 3 4") == 1.0 and task.is_exact(p, "1 3 4")
    assert task.score(p, "1 3 4 <eos>") == 1.0  # special tokens left in by a decoder carry no content
    assert task.score(p, "1 4 3") == pytest.approx(0.5 * 1 / 3)
    assert task.score(p, "1 3") == pytest.approx(0.5 * 2 / 3)
    assert task.score(p, "1 3 4 4") == pytest.approx(0.5 * 3 / 4)  # too long: divided by the longer length
    assert task.score(p, "") == 0.0 and not task.is_exact(p, "1 3")
    assert task.score("sort : 2 2 0 =", "0 2 2") == 1.0
    assert task.score("reverse : 3 1 4 =", "4 1 3") == 1.0
    assert task.score("reverse : 3 1 4 =", "4 3 1") == pytest.approx(0.5 * 1 / 3)
    assert task.score("reverse : 3 1 4 =", "1 3 4") == 0.0  # the sorted answer is wrong for reverse
    with pytest.raises(ValueError, match="not of the form"):
        task.score("add : 1 2 =", "3")
    with pytest.raises(ValueError, match="non-digit"):
        task.score("sort : 1 x =", "1")


def test_examples_are_seeded_and_long_tailed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    task.write_prompts_jsonl(a, 2000, seed=7)
    task.write_prompts_jsonl(b, 2000, seed=7)
    assert a.read_text() == b.read_text()
    rows = task.read_prompts_jsonl(a)
    lengths = [len(task.parse_prompt(r["prompt"])[1]) for r in rows]
    assert all(task.score(r["prompt"], r["answer"]) == 1.0 for r in rows)
    assert min(lengths) == 1 and max(lengths) <= task.MAX_LEN
    # Geometric(p=0.1): mean ~10 (sd of the mean ~0.2), P(len=1) = 0.1, and a long tail past 30.
    assert 9.0 < sum(lengths) / len(lengths) < 11.0
    assert 0.07 < lengths.count(1) / len(lengths) < 0.13
    assert sum(n > 30 for n in lengths) > 40


# ---------------------------------------------------------------------------------------------------------
# Cache stamp


def test_rebuild_decision(tmp_path, world):
    assert needs_rebuild(tmp_path / "missing")
    assert needs_rebuild(tmp_path)  # exists but unstamped (e.g. a crash before the rename)
    (tmp_path / "stamp.json").write_text(json.dumps({"recipe_hash": recipe_hash(RECIPE)}))
    assert not needs_rebuild(tmp_path)
    bumped = {**RECIPE, "version": RECIPE["version"] + 1}
    assert needs_rebuild(tmp_path, bumped)
    changed = {**RECIPE, "sft": {**RECIPE["sft"], "lr": RECIPE["sft"]["lr"] * 2}}
    assert needs_rebuild(tmp_path, changed)
    (tmp_path / "stamp.json").write_text("{not json")
    assert needs_rebuild(tmp_path)
    assert not needs_rebuild(world.root)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and models


def test_tokenizer_round_trip_and_chat_template(world, tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "sort : 3 1 4 ="
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.split())
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text + " 1 3 4 <eos>")["input_ids"][1:]) == "sort : 3 1 4 = 1 3 4 <eos>"
    assert tok("sort : 3 1 4 = <eos>")["input_ids"][-1] == tok.eos_token_id
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": text}]
    assert tok.apply_chat_template(messages, tokenize=False) == text
    for path in (world.actor_path, world.draft_path, world.reward_path):
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tok.get_vocab()


def test_models_load_by_path(world, tok):
    actor = AutoModelForCausalLM.from_pretrained(world.actor_path)
    draft = AutoModelForCausalLM.from_pretrained(world.draft_path)
    reward = AutoModelForSequenceClassification.from_pretrained(world.reward_path)
    a, d = actor.config, draft.config
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads) == (8, 256, 4, 2)
    assert a.tie_word_embeddings and a.vocab_size == d.vocab_size == len(tok)
    assert d.num_hidden_layers <= 2 and d.hidden_size == 128
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tok.pad_token_id
    gc = actor.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 0)
    assert sum(p.numel() for p in actor.parameters()) > 5 * sum(p.numel() for p in draft.parameters())


# ---------------------------------------------------------------------------------------------------------
# Quality on a sample of the eval prompts


def test_actor_is_partially_competent(tok, sample, actor_greedy):
    responses = tok.batch_decode(actor_greedy, skip_special_tokens=True)
    exact = sum(task.is_exact(r["prompt"], resp) for r, resp in zip(sample, responses)) / len(sample)
    assert 0.3 <= exact <= 0.75, f"actor greedy exact-match {exact:.3f} on {len(sample)} eval prompts"
    # Errors get partial credit, so RL has a dense signal.
    wrong = [task.score(r["prompt"], s) for r, s in zip(sample, responses) if not task.is_exact(r["prompt"], s)]
    assert wrong and all(0.0 <= s < 0.5 for s in wrong) and sum(wrong) > 0


def test_draft_agrees_with_actor(world, tok, sample, actor_greedy):
    draft = AutoModelForCausalLM.from_pretrained(world.draft_path).eval()
    vocab = tok.get_vocab()
    seqs = []
    for r, cont in zip(sample, actor_greedy.tolist()):
        cont = cont[: cont.index(tm.EOS_ID) + 1] if tm.EOS_ID in cont else cont
        prompt_ids = [tm.BOS_ID] + tm.encode_words(r["prompt"], vocab)
        seqs.append(tm.Seq(prompt_ids + cont, len(prompt_ids)))
    agreement = tm.greedy_agreement(draft, seqs)
    assert agreement >= DRAFT_AGREEMENT_FLOOR, f"draft/actor greedy agreement {agreement:.3f}"


def test_reward_ranks_exact_above_corrupted(world, tok, sample):
    reward = AutoModelForSequenceClassification.from_pretrained(world.reward_path).eval()
    rng = random.Random(123)
    pairs = [(r["prompt"], r["answer"], " ".join(tm.corrupt(r["answer"].split(), rng))) for r in sample]
    assert all(task.score(p, good) > task.score(p, bad) for p, good, bad in pairs)
    # The HF tokenizer gives the same reward input as the training helper: <bos> prompt response <eos>.
    ids, _ = tm.reward_batch([pairs[0][:2]], tok.get_vocab())
    assert ids[0].tolist() == tok(f"{pairs[0][0]} {pairs[0][1]} <eos>")["input_ids"]
    good = tm.reward_scores(reward, [(p, g) for p, g, _ in pairs], tok.get_vocab())
    bad = tm.reward_scores(reward, [(p, b) for p, _, b in pairs], tok.get_vocab())
    acc = float((good > bad).float().mean())
    # The tiny RM is weak (0.75 here, 0.70 on held-out actor-vs-corrupted pairs): it is the PPO critic's
    # starting point and an optional reward term; the tiny default scores with the task rule.
    assert acc >= 0.7, f"reward ranks exact above corrupted in {acc:.3f} of pairs"
