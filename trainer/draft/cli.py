"""Fit a draft to an actor, offline, before RL: sample from the actor on a prompt file, then distil.

    python -m trainer.distill_draft --actor DIR --prompts FILE --out DIR [--draft DIR | --layers 2] [--budget-min 15]

The answer to "where do I get a draft for my actor?": start from a small model with the actor's vocabulary
(--draft), or from the actor itself cut to its first --layers layers (same embeddings, norm and head). The
draft learns on the actor's own samples with the loss online adaptation uses (trainer/draft/distill.py), and the
held-out acceptance probability (sum_x min(p, q), the chance speculative sampling accepts a drafted token)
is printed before and after each epoch. A wall-clock budget (--budget-min) sizes the run to the machine: sampling
takes prompts until half of it, training stops at its end. The last line is the draft's verdict
(drafting/policy/verdict.py): the acceptance reached and whether drafting can pay with it on this hardware. `tiny` for
--actor / --prompts means the tiny world's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from configs.schema import DRAFT_LOSSES, DraftConfig
from trainer.core.deepspeed_backend import load_causal_lm
from trainer.core.experience import Experience
from trainer.draft.distill import DraftLearner
from trainer.draft.teacher import (draft_from_actor, feature_teacher_batch, held_out_scores, keeps_features,
                                   sample_outputs, teacher_batch)


# --- draft kinds: how the draft starts (E adds "head"); the sampling, teacher pass and fit are shared ---
def layers_draft(args, actor_path: str) -> torch.nn.Module:
    """A draft model: the one --draft names, else the actor cut to its first --layers layers."""
    return load_causal_lm(args.draft, "draft") if args.draft else draft_from_actor(actor_path, args.layers)


def head_draft(args, actor_path: str):
    """An EAGLE-style draft head (drafting/head.py): it trains on the actor's features, in trainer/distill_head.py."""
    raise NotImplementedError("--kind head runs trainer.distill_head.fit")


KINDS = {"layers": layers_draft, "head": head_draft}

# of --budget-min: sampling stops taking new prompts past it; training has the rest (the teacher is the actor's LM
# head on the features the engine kept while sampling; an architecture the engine keeps none for pays a teacher
# pass, a second forward over every sample, out of training's share). A head's step is one layer and a sampled
# LM head, so data, not training, limits it: it samples for longer.
SAMPLING_SHARE = {"layers": 0.5, "head": 0.7}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--actor", required=True, help="HF dir of the actor (or 'tiny')")
    parser.add_argument("--prompts", required=True, help="JSONL / Parquet prompt file (or 'tiny')")
    parser.add_argument("--out", required=True, help="where the draft is saved (HF dir)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="layers", help="what kind of draft to fit")
    init = parser.add_mutually_exclusive_group()
    init.add_argument("--draft", help="HF dir of the draft to start from (same vocabulary as the actor)")
    init.add_argument("--layers", type=int, default=2, help="else: the actor cut to its first N layers")
    parser.add_argument("--budget-min", type=float, default=15.0,
                        help="wall-clock budget in minutes: sampling stops taking prompts at half of it, training "
                             "stops at the end of it (the run may overshoot by one batch)")
    parser.add_argument("--prompt-key", default="prompt", help="the prompt column (Verl: chat messages)")
    parser.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts are left out")
    parser.add_argument("--num-prompts", type=int, default=1024, help="at most this many prompts, from the top "
                                                                      "of the file (the budget may use fewer)")
    parser.add_argument("--held-out", type=int, default=16, help="the first N prompts only measure acceptance")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="actor samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="the rollout temperature to fit")
    parser.add_argument("--loss", choices=DRAFT_LOSSES, default=DraftConfig.loss, help="as draft.loss")
    parser.add_argument("--top-k", type=int, default=DraftConfig.top_k, help="actor log-probs per position (kl_topk)")
    parser.add_argument("--vocab-sample", type=int, default=DraftConfig.vocab_sample,
                        help="sampled-softmax size for kl_topk on large vocabularies (0: full softmax)")
    parser.add_argument("--lr", type=float, default=DraftConfig.lr, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step")
    parser.add_argument("--epochs", type=int, default=3, help="at most; the budget may stop training sooner")
    parser.add_argument("--live", type=int, default=32, help="live samples per instance the speed verdict assumes")
    parser.add_argument("--calibration", default="auto", help="step-time calibration for the speed verdict: a file, "
                        "or 'auto' (this pair's cached profile at one thread, if any)")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="--kind head: AdamW learning rate")
    parser.add_argument("--head-feature-weight", type=float, default=30.0,
                        help="--kind head: weight of the feature regression beside the top-k KL (EAGLE weighs its "
                             "feature loss 10x its token loss; on SmolLM2, 8 epochs: held-out acceptance 0.422 "
                             "at 0.1, 0.450 at 10, 0.479 at 30, 0.453 at 100 after 7)")
    parser.add_argument("--head-init", choices=("random", "actor"), default="random",
                        help="--kind head: the layer from scratch, or a copy of the actor's last layer")
    parser.add_argument("--seed", type=int, default=0, help="sampling and minibatch order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return parser


def load_inputs(args) -> tuple[str, str, object, list[list[int]]]:
    """The actor and prompt paths ('tiny': the tiny world's), the actor's tokenizer, and the prompts, each once per
    sample it gets (the held-out ones first)."""
    from transformers import AutoTokenizer

    from trainer.loop.data import load_prompts

    actor_path, prompt_path = args.actor, args.prompts
    if "tiny" in (actor_path, prompt_path):
        from trainer.tiny.bootstrap import ensure_tiny_world

        world = ensure_tiny_world()
        actor_path = world.actor_path if actor_path == "tiny" else actor_path
        prompt_path = world.train_prompts if prompt_path == "tiny" else prompt_path
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    prompts = [p.token_ids for p in load_prompts(prompt_path, tokenizer, args.max_prompt_len,
                                                 prompt_key=args.prompt_key, size=args.num_prompts)]
    if len(prompts) <= args.held_out:
        raise ValueError(f"--held-out {args.held_out} leaves no training prompts out of {len(prompts)}")
    return actor_path, prompt_path, tokenizer, [list(p) for p in prompts for _ in range(args.samples_per_prompt)]


def print_plan(args, prompts: list[list[int]], teacher_pass: bool) -> None:
    """How the budget will be spent, up front: a run that cannot fit shows it before it starts."""
    k = args.samples_per_prompt
    print(f"{len(prompts) // k} prompts x {k} samples, up to {args.max_new_tokens} new tokens, {args.threads} "
          f"threads; budget {args.budget_min:g} min: sampling until "
          f"{SAMPLING_SHARE[args.kind] * args.budget_min:.1f} min, "
          f"then {'the teacher pass and ' if teacher_pass else ''}up to {args.epochs} epochs until "
          f"{args.budget_min:g} min", flush=True)


def draft_verdict(args, actor_path: str, out: str, acceptance: float, prompts: list[list[int]], draft_config,
                  actor_config):
    """Whether drafting pays with this acceptance: on this pair's calibration if there is one, else the bound from
    the two models' forward costs, which holds on any hardware."""
    from drafting.policy.verdict import find_calibration, forward_cost, judge

    ctx = int(sum(map(len, prompts)) / len(prompts) + args.max_new_tokens / 2)
    cal = find_calibration(actor_path, out, spec=args.calibration)
    ratio = forward_cost(draft_config) / forward_cost(actor_config)
    return judge(acceptance, cal, live=args.live, ctx=ctx, cost_ratio=ratio)


def fit_head_draft(args, actor_path: str, tokenizer, prompts: list[list[int]], held: int, start: float,
                   end: float) -> dict:
    """--kind head: trainer/draft/distill_head.py samples with the actor's features, trains and saves; this adds
    the verdict to its report."""
    from transformers import AutoConfig

    from drafting.model.head import draft_config
    from trainer.draft.distill_head import fit as fit_head

    report = fit_head(args, actor_path, tokenizer, prompts, held, start, end, SAMPLING_SHARE[args.kind])
    actor = AutoConfig.from_pretrained(actor_path)
    verdict = draft_verdict(args, actor_path, args.out, report["history"][-1]["acceptance"], prompts,
                            draft_config(args.out, actor), actor)
    report["verdict"] = verdict.metrics("")
    (Path(args.out) / "distill.json").write_text(json.dumps(report, indent=1, default=str))
    print(verdict.line(), flush=True)
    return report


def sample_actor(args, actor_path: str, prompts: list[list[int]], held: int, start: float, end: float,
                 features: bool) -> tuple[list, float]:
    """The actor's samples, taken until the sampling share of the budget (but enough for the held-out ones and two
    batches), and the seconds they took."""
    max_len = max(map(len, prompts)) + args.max_new_tokens + 1
    sample_start = time.perf_counter()
    deadline, least = start + SAMPLING_SHARE[args.kind] * (end - start), held + 2 * args.batch_size
    outputs = sample_outputs(actor_path, prompts, args.temperature, args.max_new_tokens, args.seed, max_len,
                             deadline=deadline, progress=args.progress, min_samples=least, features=features)
    responses = [o.token_ids for o in outputs]
    sampled_s = time.perf_counter() - sample_start
    if len(responses) <= held:
        raise ValueError(f"--held-out {args.held_out}: leaves none of the {len(responses)} samples to train on")
    tokens = sum(map(len, responses))
    print(f"sampled {len(responses)} samples ({tokens} tokens, {tokens / sampled_s:.1f} tokens/s) in "
          f"{sampled_s:.0f} s", flush=True)
    return outputs, sampled_s


def teacher_batches(args, actor, tokenizer, prompts: list[list[int]], outputs: list, held: int,
                    features: bool) -> tuple[Experience, Experience]:
    """The held-out and training batches with the actor's top-k: read off the features the engine kept, or (an
    architecture it keeps none for) from a teacher pass, a second forward over every sample."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if features:
        held_out = feature_teacher_batch(actor, prompts[:held], outputs[:held], pad_id, args.temperature,
                                         args.top_k)
        train = feature_teacher_batch(actor, prompts[held:], outputs[held:], pad_id, args.temperature, args.top_k)
    else:
        responses = [o.token_ids for o in outputs]
        held_out = teacher_batch(actor, prompts[:held], responses[:held], pad_id, args.temperature, args.top_k,
                                 desc="teacher (held out)" if args.progress else None)
        train = teacher_batch(actor, prompts[held:], responses[held:], pad_id, args.temperature, args.top_k,
                              desc="teacher" if args.progress else None)
    return held_out, train


def fit_draft(args, actor, actor_path: str, train: Experience, held_out: Experience, held: int,
              end: float) -> tuple[torch.nn.Module, list[dict]]:
    """The draft --kind starts from, distilled for --epochs or until the budget ends (the first epoch runs
    whatever it), with its held-out scores before and after each epoch."""
    draft = KINDS[args.kind](args, actor_path)
    steps = math.ceil(train.batch_size / args.batch_size)  # one pass per epoch
    cfg = DraftConfig(online=False, loss=args.loss, top_k=args.top_k, lr=args.lr, batch_size=args.batch_size,
                      steps=steps, vocab_sample=args.vocab_sample)
    learner = DraftLearner(draft, cfg, args.temperature)

    history = [{"epoch": 0, **held_out_scores(actor, draft, held_out, learner.temperature)}]
    print(f"{train.batch_size} training samples, {held} held out; before: acceptance "
          f"{history[0]['acceptance']:.4f}, top-1 agreement {history[0]['top1_agreement']:.4f}", flush=True)
    left = end - time.perf_counter()
    print(f"training: {steps} steps per epoch{' (sampled softmax)' if learner.sampled else ''}, up to "
          f"{args.epochs} epochs in the {max(left, 0) / 60:.1f} min left (one at least)", flush=True)
    bar = tqdm(total=steps * args.epochs, desc="training", unit="step", disable=not args.progress)

    def out_of_time() -> bool:  # asked before each step; the first epoch runs whatever the budget
        bar.update(1)
        return epoch > 1 and time.perf_counter() > end

    for epoch in range(1, args.epochs + 1):
        fit = learner.train(train, seed=args.seed * 1000 + epoch, should_stop=out_of_time)
        history.append({"epoch": epoch, "loss": fit["loss"], "steps": fit["steps"],
                        **held_out_scores(actor, draft, held_out, learner.temperature)})
        tqdm.write(f"epoch {epoch}: {args.loss} {fit['loss']:.4f}; held-out acceptance "
                   f"{history[-1]['acceptance']:.4f}, top-1 agreement {history[-1]['top1_agreement']:.4f}"
                   + ("" if fit["steps"] == steps else f" (budget spent after {fit['steps']:.0f} of {steps} steps)"))
        if time.perf_counter() > end:
            break
    bar.close()
    return draft, history


def main(argv: list[str] | None = None) -> dict:
    """The command (see the module docstring): resolve the inputs, sample from the actor, distil, save, judge; the
    budget's clock starts before all of it."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    end = start + 60.0 * args.budget_min
    actor_path, prompt_path, tokenizer, prompts = load_inputs(args)
    held = args.held_out * args.samples_per_prompt
    teacher_pass = args.kind != "head" and not keeps_features(actor_path)
    print_plan(args, prompts, teacher_pass)
    if args.kind == "head":  # samples carry the actor's features; no teacher pass (trainer/distill_head.py)
        return fit_head_draft(args, actor_path, tokenizer, prompts, held, start, end)

    with_features = not teacher_pass  # the engine keeps the features: the teacher is the LM head on them
    outputs, sampled_s = sample_actor(args, actor_path, prompts, held, start, end, with_features)
    prompts, samples = prompts[:len(outputs)], len(outputs)
    actor = load_causal_lm(actor_path, "actor").eval()
    held_out, train = teacher_batches(args, actor, tokenizer, prompts, outputs, held, with_features)
    del outputs  # the features: only the teacher read them
    draft, history = fit_draft(args, actor, actor_path, train, held_out, held, end)

    out = Path(args.out)
    draft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    verdict = draft_verdict(args, actor_path, str(out), history[-1]["acceptance"], prompts, draft.config,
                            actor.config)
    report = {"actor": actor_path, "prompts": prompt_path, "kind": args.kind,
              "init": args.draft or f"actor's first {args.layers} layers", "args": vars(args), "history": history,
              "samples": samples, "sample_seconds": round(sampled_s, 1),
              "seconds": round(time.perf_counter() - start, 1), "verdict": verdict.metrics("")}
    (out / "distill.json").write_text(json.dumps(report, indent=1))
    print(f"draft saved to {out} ({report['seconds']:.0f} s)")
    print(verdict.line(), flush=True)
    return report


if __name__ == "__main__":
    main()
