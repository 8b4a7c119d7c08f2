"""Model-building and training helpers for the tiny world: tokenizer, SFT, draft distillation, reward model.

Pure functions over HF models and token-id lists; `trainer/tiny/bootstrap.py` decides the order and caching.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from trainer.tiny import task

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Renders a messages list to the bare prompt text (user contents concatenated), no special tokens.
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel over space-separated words; encoding adds <bos>, decoding joins words with spaces."""
    words = task.SPECIAL_TOKENS + task.WORDS + task.DIGITS
    vocab = {w: i for i, w in enumerate(words)}
    assert [vocab[t] for t in task.SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",  # decoder-only generation pads on the left
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_words(text: str, vocab: dict[str, int]) -> list[int]:
    """Token ids of space-separated words without <bos> (fast path used in training loops)."""
    return [vocab.get(w, UNK_ID) for w in text.split()]


# ----------------------------------------------------------------------------------------------------------
# Model configs


def llama_config(vocab_size: int, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                 max_positions: int, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **extra,
    )


def build_causal_lm(cfg: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    return model


def build_reward_model(cfg: LlamaConfig, seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(cfg)


# ----------------------------------------------------------------------------------------------------------
# Sequences and batches


@dataclass
class Seq:
    """One training sequence: <bos> prompt response [<eos>]; loss/eval positions are the response tokens."""
    ids: list[int]
    n_prompt: int  # tokens before the response, <bos> included


def encode_example(prompt: str, response: str, vocab: dict[str, int], eos: bool = True) -> Seq:
    p = [BOS_ID] + encode_words(prompt, vocab)
    return Seq(p + encode_words(response, vocab) + ([EOS_ID] if eos else []), len(p))


def length_buckets(seqs: list[Seq], token_budget: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), about token_budget tokens each, shuffled."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].ids), rng.random()))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i].ids) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], target mask [B, T-1] (True where ids[:, 1:] is response)."""
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    tgt = torch.zeros((len(seqs), T - 1), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        attn[b, : len(s.ids)] = 1
        tgt[b, s.n_prompt - 1 : len(s.ids) - 1] = True
    return ids, attn, tgt


def teacher_forced_exact(model, seqs: list[Seq], batch_size: int = 64) -> float:
    """Fraction of sequences whose every response token is the model's argmax = greedy exact match (with <eos>)."""
    hits = 0
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(seqs), batch_size):
            ids, attn, tgt = collate(seqs[k : k + batch_size])
            pred = model(input_ids=ids, attention_mask=attn).logits[:, :-1].argmax(-1)  # [B, T-1]
            ok = (pred == ids[:, 1:]) | ~tgt
            hits += int(ok.all(dim=1).sum())
    return hits / max(1, len(seqs))


# ----------------------------------------------------------------------------------------------------------
# Actor SFT


def train_sft(model, train: list[Seq], held_out: list[Seq], *, lr: float, token_budget: int, max_steps: int,
              target_exact: float, eval_every: int, seed: int, max_seconds: float | None = None,
              progress=None) -> dict:
    """SFT with loss on response tokens; stops when held-out greedy exact >= target_exact, or at a budget."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    t0, step, exact, history = time.time(), 0, 0.0, []
    batches: list[list[int]] = []
    while step < max_steps and (max_seconds is None or time.time() - t0 < max_seconds):
        if not batches:
            batches = length_buckets(train, token_budget, rng)
        model.train()
        ids, attn, tgt = collate([train[i] for i in batches.pop()])
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [B, T-1, V]
        loss = F.cross_entropy(logits[tgt], ids[:, 1:][tgt])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", exact=f"{exact:.2f}")
        if step % eval_every == 0:
            exact = teacher_forced_exact(model, held_out)
            history.append((step, round(time.time() - t0, 1), round(loss.item(), 4), exact))
            if exact >= target_exact:
                break
    model.eval()
    return {"steps": step, "seconds": time.time() - t0, "held_out_exact": exact, "history": history}


# ----------------------------------------------------------------------------------------------------------
# Generation


def generate_continuations(model, prompts: list[str], vocab: dict[str, int], max_new_tokens: int,
                    batch_size: int = 64, do_sample: bool = False, seed: int = 0) -> list[list[int]]:
    """Greedy (or sampled) continuations, token ids up to <eos>, for each prompt; prompts bucketed by length."""
    torch.manual_seed(seed)
    enc = [[BOS_ID] + encode_words(p, vocab) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[list[int]] = [[] for _ in prompts]
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            T = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), T), PAD_ID, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, i in enumerate(idx):  # left padding
                ids[b, T - len(enc[i]) :] = torch.tensor(enc[i])
                attn[b, T - len(enc[i]) :] = 1
            gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, top_k=None, top_p=None, temperature=1.0 if do_sample else None)
            for b, i in enumerate(idx):
                toks = gen[b, T:].tolist()
                out[i] = toks[: toks.index(EOS_ID)] if EOS_ID in toks else [t for t in toks if t != PAD_ID]
    return out


def decode_ids(ids: list[int], inv_vocab: dict[int, str]) -> str:
    return " ".join(inv_vocab[i] for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID))


# ----------------------------------------------------------------------------------------------------------
# Draft distillation


def distill_draft(draft, actor, train: list[Seq], *, lr: float, token_budget: int, max_steps: int,
                  seed: int, max_seconds: float | None = None, progress=None) -> dict:
    """Train the draft to match the actor's next-token distribution (KL(actor || draft)) on response positions."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    actor.eval()
    t0, step, batches = time.time(), 0, []
    while step < max_steps and (max_seconds is None or time.time() - t0 < max_seconds):
        if not batches:
            batches = length_buckets(train, token_budget, rng)
        ids, attn, tgt = collate([train[i] for i in batches.pop()])
        with torch.inference_mode():
            teacher = F.log_softmax(actor(input_ids=ids, attention_mask=attn).logits[:, :-1][tgt], -1)  # [N, V]
        draft.train()
        student = F.log_softmax(draft(input_ids=ids, attention_mask=attn).logits[:, :-1][tgt], -1)
        loss = F.kl_div(student, teacher.clone(), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kl=f"{loss.item():.3f}")
    draft.eval()
    return {"steps": step, "seconds": time.time() - t0, "final_kl": loss.item() if step else None}


def distill_head(head, actor, train: list[Seq], *, lr: float, token_budget: int, max_steps: int, seed: int) -> dict:
    """`distill_draft` for an EAGLE-style head (drafting/head.py): the same batches and budget, the head's own loss
    (KL to the actor at the response positions plus feature regression) on the actor's features."""
    from trainer.draft.head_learner import HeadLearner, head_batch

    rng = random.Random(seed)
    learner = HeadLearner(head, lr=lr, batch_size=1 << 30)  # one optimizer step per length bucket
    t0, step, batches, last = time.time(), 0, [], {}
    while step < max_steps:
        if not batches:
            batches = length_buckets(train, token_budget, rng)
        ids, attn, tgt = collate([train[i] for i in batches.pop()])
        learn = F.pad(tgt, (0, 1))  # [B, T]: position t predicts token t + 1
        last = learner.train(head_batch(actor, ids, attn, learn=learn), seed=seed + step, steps=1)
        step += 1
    return {"steps": step, "seconds": time.time() - t0, "final_kl": last.get("kl")}


def greedy_agreement(draft, seqs: list[Seq], batch_size: int = 64) -> float:
    """Token-level: fraction of response positions where the draft's argmax equals the given (actor) token."""
    agree = total = 0
    draft.eval()
    with torch.inference_mode():
        for k in range(0, len(seqs), batch_size):
            ids, attn, tgt = collate(seqs[k : k + batch_size])
            pred = draft(input_ids=ids, attention_mask=attn).logits[:, :-1].argmax(-1)
            agree += int(((pred == ids[:, 1:]) & tgt).sum())
            total += int(tgt.sum())
    return agree / max(1, total)


# ----------------------------------------------------------------------------------------------------------
# Reward model


CORRUPTIONS = ["sub", "drop", "insert", "swap", "truncate", "unreversed"]


def corrupt(words: list[str], rng: random.Random, kind: str | None = None) -> list[str]:
    """A wrong answer near the right one: substitute, drop, insert or swap digits, truncate, or reverse it."""
    w = list(words)
    kind = kind or rng.choice(["sub"] + CORRUPTIONS)  # substitutions twice as often
    if kind == "sub" or (kind in ("drop", "swap", "truncate", "unreversed") and len(w) < 2):
        for i in rng.sample(range(len(w)), min(len(w), rng.choice([1, 1, 2, 3]))):
            w[i] = rng.choice([d for d in task.DIGITS if d != w[i]])
    elif kind == "drop":
        del w[rng.randrange(len(w))]
    elif kind == "insert":
        w.insert(rng.randrange(len(w) + 1), rng.choice(task.DIGITS))
    elif kind == "swap":
        i = rng.randrange(len(w) - 1)
        w[i], w[i + 1] = w[i + 1], w[i]
        if w == words:
            w[i] = rng.choice([d for d in task.DIGITS if d != w[i]])
    elif kind == "truncate":
        w = w[: rng.randrange(1, len(w))]
    else:
        w = w[::-1]
        if w == words:
            w[0] = rng.choice([d for d in task.DIGITS if d != w[0]])
    return w


def reward_pairs(examples: list[dict], samples: list[str] | None, rng: random.Random) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) triples with task.score(better) > task.score(worse)."""
    pairs = []
    for j, ex in enumerate(examples):
        prompt, right = ex["prompt"], ex["answer"].split()
        cands = [" ".join(right), " ".join(corrupt(right, rng)), " ".join(corrupt(right, rng))]
        if samples is not None:
            cands.append(samples[j])
        rng.shuffle(cands)
        for a in range(len(cands)):
            for b in range(a + 1, len(cands)):
                sa, sb = task.score(prompt, cands[a]), task.score(prompt, cands[b])
                if sa != sb:
                    pairs.append((prompt, cands[a], cands[b]) if sa > sb else (prompt, cands[b], cands[a]))
    return pairs


def reward_batch(texts: list[tuple[str, str]], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded <bos> prompt response <eos> ids [B, T] + mask; the score is read at the last non-pad token."""
    seqs = [encode_example(p, r, vocab, eos=True).ids for p, r in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
    return ids, attn


def reward_scores(rm, texts: list[tuple[str, str]], vocab: dict[str, int], batch_size: int = 128) -> torch.Tensor:
    out = []
    rm.eval()
    with torch.inference_mode():
        for k in range(0, len(texts), batch_size):
            ids, attn = reward_batch(texts[k : k + batch_size], vocab)
            out.append(rm(input_ids=ids, attention_mask=attn).logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(rm, pairs: list[tuple[str, str, str]], vocab: dict[str, int]) -> float:
    better = reward_scores(rm, [(p, g) for p, g, _ in pairs], vocab)
    worse = reward_scores(rm, [(p, b) for p, _, b in pairs], vocab)
    return float((better > worse).float().mean()) if len(pairs) else 0.0


def train_reward(rm, pairs: list[tuple[str, str, str]], vocab: dict[str, int], *, lr: float, batch_pairs: int,
                 max_steps: int, seed: int, max_seconds: float | None = None, progress=None) -> dict:
    """Bradley-Terry: minimise -log sigmoid(r(better) - r(worse)); pairs bucketed by prompt length."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, max_steps // 20)  # then linear decay to 10%: the BT loss is noisy, so settle at the end
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / max_steps))
    t0, step, batches = time.time(), 0, []
    while step < max_steps and (max_seconds is None or time.time() - t0 < max_seconds):
        if not batches:
            order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), rng.random()))
            batches = [order[k : k + batch_pairs] for k in range(0, len(order), batch_pairs)]
            rng.shuffle(batches)
        chunk = [pairs[i] for i in batches.pop()]
        ids, attn = reward_batch([(p, g) for p, g, _ in chunk] + [(p, b) for p, _, b in chunk], vocab)
        rm.train()
        r = rm(input_ids=ids, attention_mask=attn).logits[:, 0]  # [2B]
        loss = -F.logsigmoid(r[: len(chunk)] - r[len(chunk) :]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(bt=f"{loss.item():.3f}")
    rm.eval()
    return {"steps": step, "seconds": time.time() - t0, "final_loss": loss.item() if step else None}


# ----------------------------------------------------------------------------------------------------------
# Cost of one decode step


def decode_step_seconds(model, batch: int, context: int, repeats: int = 20, device: str = "cpu") -> float:
    """Median wall time of one KV-cached forward of 1 new token per sample, after a prefill of `context` tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch, context), generator=g).to(device)
    model.eval()
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # [B, 1]
        for r in range(repeats + 3):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            if device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            if r >= 3:  # warm-up steps are not timed
                times.append(time.perf_counter() - t)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times.sort()
    return times[len(times) // 2]
