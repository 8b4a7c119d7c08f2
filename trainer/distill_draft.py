"""Fit a draft to an actor, offline, before RL: sample from the actor on a prompt file, then distil.

    python -m trainer.distill_draft --actor DIR --prompts FILE --out DIR [--draft DIR | --layers 2]

The answer to "where do I get a draft for my actor?": start from a small model with the actor's vocabulary
(--draft), or from the actor itself cut to its first --layers layers (same embeddings, norm and head). The
draft learns on the actor's own samples with the loss online adaptation uses (trainer/distill.py), and the
held-out acceptance probability (sum_x min(p, q), the chance speculative sampling accepts a drafted token)
is printed before and after each epoch. `tiny` for --actor / --prompts means the tiny world's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from configs.schema import DRAFT_LOSSES, DraftConfig
from trainer.distill import DraftLearner, acceptance_probability
from trainer.experience import Experience, make_sequences, response_logits, sequence_logprobs_topk
from trainer.strategy import load_causal_lm


def draft_from_actor(actor_path: str, layers: int) -> torch.nn.Module:
    """The actor's first `layers` decoder layers with its embeddings, final norm and head: a draft that shares
    the vocabulary and starts close to the actor's early representations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(actor_path)
    if not 1 <= layers < config.num_hidden_layers:
        raise ValueError(f"--layers: {layers} must be in [1, {config.num_hidden_layers}) for this actor")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    actor = load_causal_lm(actor_path, "actor")
    keep = {k: v for k, v in actor.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    draft = AutoModelForCausalLM.from_config(config)
    draft.load_state_dict(keep)
    return draft


@torch.no_grad()
def sample_responses(actor_path: str, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                     seed: int, max_len: int) -> list[list[int]]:
    """The actor's samples with the project's engine (plain decoding: nothing to draft with yet)."""
    from drafting import SamplingParams, SpeculativeEngine

    engine = SpeculativeEngine(actor_path, None, strategy="none", max_slots=64, max_len=max_len)
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    return [o.token_ids for o in outs]


@torch.no_grad()
def teacher_batch(actor, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float,
                  top_k: int, chunk: int = 32) -> Experience:
    """Sequences and masks of the samples with the actor's top-k log-probs per response position."""
    seqs, attn, action = make_sequences(prompts, responses, pad_id)
    R = action.shape[1]
    parts = [sequence_logprobs_topk(actor, seqs[i:i + chunk], attn[i:i + chunk], R, temperature, top_k)
             for i in range(0, len(seqs), chunk)]
    _, top_logp, top_ids = (torch.cat(p) for p in zip(*parts))
    return Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)


@torch.no_grad()
def held_out_scores(actor, draft, batch: Experience, temperature: float, chunk: int = 32) -> dict[str, float]:
    """Mean acceptance probability and draft/actor top-1 agreement over the response positions."""
    draft.eval()
    accept, agree, n = 0.0, 0, 0
    for i in range(0, batch.batch_size, chunk):
        mb = batch.select(slice(i, i + chunk))
        p, _ = response_logits(actor, mb.sequences, mb.attention_mask, mb.num_actions, temperature)
        q, _ = response_logits(draft, mb.sequences, mb.attention_mask, mb.num_actions, temperature)
        mask = mb.action_mask[:, :p.shape[1]].bool()
        accept += float(acceptance_probability(p[mask], q[mask]).sum())
        agree += int((p[mask].argmax(-1) == q[mask].argmax(-1)).sum())
        n += int(mask.sum())
    return {"acceptance": accept / max(n, 1), "top1_agreement": agree / max(n, 1), "positions": n}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actor", required=True, help="HF dir of the actor (or 'tiny')")
    parser.add_argument("--prompts", required=True, help="JSONL / Parquet prompt file (or 'tiny')")
    parser.add_argument("--out", required=True, help="where the draft is saved (HF dir)")
    init = parser.add_mutually_exclusive_group()
    init.add_argument("--draft", help="HF dir of the draft to start from (same vocabulary as the actor)")
    init.add_argument("--layers", type=int, default=2, help="else: the actor cut to its first N layers")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=1024, help="prompts used (from the top of the file)")
    parser.add_argument("--held-out", type=int, default=64, help="of those, the last N only measure acceptance")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="the rollout temperature to fit")
    parser.add_argument("--loss", choices=DRAFT_LOSSES, default=DraftConfig.loss)
    parser.add_argument("--top-k", type=int, default=DraftConfig.top_k)
    parser.add_argument("--lr", type=float, default=DraftConfig.lr)
    parser.add_argument("--batch-size", type=int, default=DraftConfig.batch_size, help="samples per optimizer step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from transformers import AutoTokenizer

    from trainer.data import load_prompts

    actor_path, prompt_path = args.actor, args.prompts
    if "tiny" in (actor_path, prompt_path):
        from trainer.tiny.bootstrap import ensure_tiny_world

        world = ensure_tiny_world()
        actor_path = world.actor_path if actor_path == "tiny" else actor_path
        prompt_path = world.train_prompts if prompt_path == "tiny" else prompt_path
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [p.token_ids for p in load_prompts(prompt_path, tokenizer, args.max_prompt_len,
                                                 prompt_key=args.prompt_key, size=args.num_prompts)]
    if len(prompts) <= args.held_out:
        raise ValueError(f"--held-out {args.held_out} leaves no training prompts out of {len(prompts)}")
    prompts = [list(p) for p in prompts for _ in range(args.samples_per_prompt)]
    held = args.held_out * args.samples_per_prompt

    max_len = max(map(len, prompts)) + args.max_new_tokens + 1
    responses = sample_responses(actor_path, prompts, args.temperature, args.max_new_tokens, args.seed, max_len)
    sampled_s = time.perf_counter() - start
    actor = load_causal_lm(actor_path, "actor").eval()
    train = teacher_batch(actor, prompts[:-held], responses[:-held], pad_id, args.temperature, args.top_k)
    held_out = teacher_batch(actor, prompts[-held:], responses[-held:], pad_id, args.temperature, args.top_k)
    draft = load_causal_lm(args.draft, "draft") if args.draft else draft_from_actor(actor_path, args.layers)
    cfg = DraftConfig(online=False, loss=args.loss, top_k=args.top_k, lr=args.lr, batch_size=args.batch_size,
                      steps=math.ceil(train.batch_size / args.batch_size))  # one pass per epoch
    learner = DraftLearner(draft, cfg, args.temperature)

    history = [{"epoch": 0, **held_out_scores(actor, draft, held_out, learner.temperature)}]
    print(f"{train.batch_size} training samples, {held} held out; before: acceptance "
          f"{history[0]['acceptance']:.4f}, top-1 agreement {history[0]['top1_agreement']:.4f}", flush=True)
    for epoch in range(1, args.epochs + 1):
        fit = learner.train(train, seed=args.seed * 1000 + epoch)
        history.append({"epoch": epoch, "loss": fit["loss"], **held_out_scores(actor, draft, held_out,
                                                                                learner.temperature)})
        print(f"epoch {epoch}: {args.loss} {fit['loss']:.4f}; held-out acceptance {history[-1]['acceptance']:.4f}, "
              f"top-1 agreement {history[-1]['top1_agreement']:.4f}", flush=True)

    out = Path(args.out)
    draft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"actor": actor_path, "prompts": prompt_path, "init": args.draft or f"actor's first {args.layers} layers",
              "args": vars(args), "history": history, "sample_seconds": round(sampled_s, 1),
              "seconds": round(time.perf_counter() - start, 1)}
    (out / "distill.json").write_text(json.dumps(report, indent=1))
    print(f"draft saved to {out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
