"""`python -m trainer.distill_draft --kind head`: fit an EAGLE-style draft head (drafting/head.py) to the actor.

The actor's samples come from the engine with the head's feature buffer on, so every sample comes back with the
actor's features at all its positions (the ones a head reads and regresses): no separate teacher pass. The head
then trains on them (top-k KL to the actor's next-token distribution, which its LM head gives from the feature,
plus feature regression) until the budget ends; held-out acceptance is measured at the response positions, at
the rollout temperature, as for a draft model. The head directory holds fc + one layer, not the actor.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from drafting.model.head import DraftHead
from trainer.draft.head_learner import HeadBatch, HeadLearner, head_scores


def sample_with_features(actor_path: str, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                         seed: int, max_len: int, **kw) -> list:
    """The actor's samples (plain decoding) with its features [len - 1, H] each, in prompt order
    (`trainer.distill_draft.sample_outputs`: a deadline and min_samples as there)."""
    from trainer.draft.teacher import sample_outputs

    return sample_outputs(actor_path, prompts, temperature, max_new_tokens, seed, max_len, features=True, **kw)


def batch_of(outputs, prompts_too: bool = False) -> HeadBatch:
    """Right-padded rows of prompt + response with their features; the head learns the response tokens (its
    output at position t predicts token t + 1, for t from the last prompt token on), and with `prompts_too` the
    prompt's as well: the same mapping (features, token) -> next features on text the prefill already paid for,
    as EAGLE learns it on any text, which more than doubles a small budget's data."""
    seqs = [o.prompt_token_ids + o.token_ids for o in outputs]
    B, T, H = len(seqs), max(map(len, seqs)), outputs[0].features.shape[-1]
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, H)
    learn = torch.zeros(B, T, dtype=torch.bool)
    for i, (s, o) in enumerate(zip(seqs, outputs)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        feats[i, :len(s) - 1] = o.features.float()
        learn[i, 1 if prompts_too else len(o.prompt_token_ids) - 1:len(s) - 1] = True
    return HeadBatch(tokens, mask, feats, learn)


def fit(args, actor, tokenizer, prompts: list[list[int]], held: int, start: float, end: float,
        sampling_share: float) -> dict:
    """Sample (with features) until the sampling share of the budget, train until its end, save, report."""
    max_len = max(map(len, prompts)) + args.max_new_tokens + 1
    outs = sample_with_features(actor, prompts, args.temperature, args.max_new_tokens, args.seed, max_len,
                                deadline=start + sampling_share * (end - start), progress=args.progress)
    sampled_s = time.perf_counter() - start
    if len(outs) <= held:
        raise ValueError(f"--budget-min {args.budget_min:g}: only {len(outs)} samples in the sampling share, not "
                         f"more than the {held} held out; give more time or fewer --held-out")
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"sampled {len(outs)} samples ({tokens} tokens, {tokens / sampled_s:.1f} tokens/s) in {sampled_s:.0f} s, "
          f"with the actor's features", flush=True)
    hf_actor = load_actor(actor)
    head_init = getattr(args, "head_init", "random")
    if head_init == "actor":
        head = DraftHead.from_actor(hf_actor, seed=args.seed)
    else:
        torch.manual_seed(args.seed)
        head = DraftHead(hf_actor.config).bind(hf_actor)
    held_out, train = batch_of(outs[:held]), batch_of(outs[held:], prompts_too=True)
    learner = HeadLearner(head, lr=args.head_lr, temperature=args.temperature, top_k=args.top_k,
                          batch_size=args.batch_size, vocab_sample=args.vocab_sample,
                          feature_weight=args.head_feature_weight)
    train = learner.cache_teacher(train)
    history = [{"epoch": 0, **head_scores(head, held_out, args.temperature)}]
    steps = math.ceil(train.size / args.batch_size)
    print(f"{train.size} training samples, {held} held out; before: acceptance {history[0]['acceptance']:.4f}, "
          f"top-1 agreement {history[0]['top1_agreement']:.4f}; training: {steps} steps per epoch, up to "
          f"{args.epochs} epochs in the {max(end - time.perf_counter(), 0) / 60:.1f} min left", flush=True)
    if time.perf_counter() > end:
        print(f"--budget-min {args.budget_min:g} was spent while sampling (the last live samples finish past the "
              f"sampling share): the head trains one epoch anyway; give more time or fewer prompts", flush=True)
        end = time.perf_counter() + 1e9  # one epoch, below
    for epoch in range(1, args.epochs + 1):
        fitted = learner.train(train, seed=args.seed * 1000 + epoch, steps=steps, deadline=end)
        history.append({"epoch": epoch, "loss": fitted["loss"], "kl": fitted["kl"], "feature": fitted["feature"],
                        "steps": fitted["steps"], **head_scores(head, held_out, args.temperature)})
        print(f"epoch {epoch}: kl_topk {fitted['kl']:.4f}, feature {fitted['feature']:.4f}; held-out acceptance "
              f"{history[-1]['acceptance']:.4f}, top-1 agreement {history[-1]['top1_agreement']:.4f}"
              + ("" if fitted["steps"] == steps else f" (budget spent after {fitted['steps']:.0f} of {steps} steps)"),
              flush=True)
        if time.perf_counter() > end or end - time.perf_counter() > 1e8:
            break
    out = head.save(args.out)
    tokenizer.save_pretrained(out)
    report = {"actor": actor, "prompts": args.prompts, "kind": "head", "init": head_init, "args": vars(args),
              "history": history, "samples": len(outs), "sample_seconds": round(sampled_s, 1),
              "seconds": round(time.perf_counter() - start, 1)}
    (Path(out) / "distill.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"draft head saved to {out} ({report['seconds']:.0f} s): held-out acceptance "
          f"{history[0]['acceptance']:.3f} -> {history[-1]['acceptance']:.3f}", flush=True)
    return report


def load_actor(path: str):
    from trainer.core.deepspeed_backend import load_causal_lm

    return load_causal_lm(path, "actor").eval()
