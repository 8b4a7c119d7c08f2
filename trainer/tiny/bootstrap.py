"""Build (once) and cache the tiny world: tokenizer, SFT'd actor, distilled draft, reward model, prompt files.

`ensure_tiny_world()` returns the cached world, rebuilding it only when missing or when RECIPE changes.
`python -m trainer.tiny.bootstrap` builds or reports it and prints its metrics.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.tiny import task

# Everything that decides the world's content. Bump "version" when the code that uses it changes meaning.
RECIPE = {
    "version": 2,
    "seed": 0,
    "task": {"op": task.TASK_WORD, "length_p": task.LENGTH_P, "max_len": task.MAX_LEN},
    "prompts": {"n_train": 4096, "n_eval": 256},
    "actor": {"layers": 8, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 768, "max_positions": 256},
    # Budgets are in steps, not seconds, so the world is the same on a busy machine. Early stopping on a dev set
    # at ~0.5 greedy exact leaves room for RL; the step cap bounds the time.
    "sft": {"n_examples": 40000, "n_dev": 256, "lr": 1e-3, "token_budget": 1024, "max_steps": 400,
            "eval_every": 25, "target_exact": 0.5},
    "draft": {"layers": 1, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 384, "max_positions": 256},
    "distill": {"lr": 3e-3, "token_budget": 2048, "max_steps": 150},
    "reward": {"layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 384, "max_positions": 256},
    # Pairs from actor samples on n_prompts train prompts, plus corrupted-answer pairs on n_synthetic fresh
    # examples: a weak BT signal needs many distinct prompts more than epochs.
    "reward_train": {"n_prompts": 1024, "n_synthetic": 12000, "lr": 3e-3, "batch_pairs": 64, "max_steps": 400},
    "cost": {"context": 32, "batches": [1, 64]},
}


@dataclass
class TinyWorld:
    """Paths of a built tiny world (all `from_pretrained`-loadable dirs / JSONL files) and its metrics."""
    root: str
    tokenizer_path: str
    actor_path: str
    draft_path: str
    reward_path: str
    train_prompts: str
    eval_prompts: str
    metrics: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    """$RLHFSPEC_CACHE if set (the world dir itself), else ~/.cache/rlhfspec/tiny."""
    env = os.environ.get("RLHFSPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhfspec" / "tiny"


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def needs_rebuild(root: str | Path, recipe: dict = RECIPE) -> bool:
    """True when the world at root is missing, unstamped, or was built from a different recipe."""
    stamp = Path(root) / "stamp.json"
    if not stamp.is_file():
        return True
    try:
        return json.loads(stamp.read_text()).get("recipe_hash") != recipe_hash(recipe)
    except (OSError, json.JSONDecodeError):
        return True


def world_at(root: str | Path) -> TinyWorld:
    root = Path(root)
    metrics_file = root / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return TinyWorld(
        root=str(root), tokenizer_path=str(root / "tokenizer"), actor_path=str(root / "actor"),
        draft_path=str(root / "draft"), reward_path=str(root / "reward"),
        train_prompts=str(root / "train.jsonl"), eval_prompts=str(root / "eval.jsonl"), metrics=metrics,
    )


def ensure_tiny_world(cache_dir: str | Path | None = None, quiet: bool = False) -> TinyWorld:
    """The cached tiny world; built (minutes on 2 cores) into a temp dir and renamed in, so a crash leaves none."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:  # one builder at a time per world
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in root.parent.glob(f".{root.name}-build-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if needs_rebuild(root):
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-build-"))
            try:
                build_world(tmp, RECIPE, quiet=quiet)
                if root.exists():  # a stale world: move aside, swap in, then delete
                    old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-old-"))
                    os.rename(root, old / "w")
                    os.rename(tmp, root)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return world_at(root)


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# The build's thread count changes its models (measured: 2 threads gave actor exact 0.387, 1 thread 0.355, other
# bytes): pinned, so every machine builds the world this one cached (2 cores), whatever its core count.
BUILD_THREADS = 2


def build_world(out: Path, recipe: dict, quiet: bool = False) -> dict:
    """Build every part of the world into `out` and write metrics.json, then stamp.json last. The parts run in a
    fixed order, each from its own seed, so a build is the same world every time."""
    import torch  # here, not at the top: finding a built world (the preflight) imports no torch
    from tqdm.auto import tqdm

    t_start = time.time()
    torch.set_num_threads(BUILD_THREADS)
    recipe = copy.deepcopy(recipe)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    bar = lambda total, desc: tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
    metrics: dict = {}

    train_rows, eval_rows, tok = _write_prompts_and_tokenizer(out, recipe)
    actor, sft_seqs = _sft_actor(out, recipe, tok, metrics, log, bar)
    eval_prompts = [r["prompt"] for r in eval_rows]
    greedy, greedy_text = _judge_actor_greedy(actor, tok, eval_prompts, metrics, log)
    draft = _distil_draft(out, recipe, tok, actor, sft_seqs, eval_prompts, greedy, metrics, log, bar)
    _measure_cost_ratio(recipe, actor, draft, metrics, log)
    _train_reward_model(out, recipe, tok, actor, train_rows, eval_rows, greedy_text, metrics, log, bar)

    metrics["build_seconds"] = round(time.time() - t_start, 1)
    metrics["threads"] = torch.get_num_threads()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))
    (out / "stamp.json").write_text(json.dumps({"recipe_hash": recipe_hash(recipe), "version": recipe["version"]}))
    return metrics


def _write_prompts_and_tokenizer(out: Path, recipe: dict) -> tuple[list[dict], list[dict], object]:
    """The train and eval prompt files (read back, as the run will read them) and the word-level tokenizer."""
    from trainer.tiny import models as tm

    seed = recipe["seed"]
    n_train, n_eval = recipe["prompts"]["n_train"], recipe["prompts"]["n_eval"]
    task.write_prompts_jsonl(out / "train.jsonl", n_train, seed + 1)
    task.write_prompts_jsonl(out / "eval.jsonl", n_eval, seed + 2)
    train_rows, eval_rows = task.read_prompts_jsonl(out / "train.jsonl"), task.read_prompts_jsonl(out / "eval.jsonl")
    tok = tm.build_tokenizer()
    tok.save_pretrained(out / "tokenizer")
    return train_rows, eval_rows, tok


def _sft_actor(out: Path, recipe: dict, tok, metrics: dict, log, bar):
    """The actor, SFT'd from scratch to partial competence (room left for RL); also the SFT sequences, which the
    draft distils on. Adds its metrics to `metrics`."""
    from trainer.tiny import models as tm

    seed, vocab = recipe["seed"], tok.get_vocab()
    sft = recipe["sft"]
    rng = random.Random(seed + 3)
    sft_seqs = [tm.encode_example(e["prompt"], e["answer"], vocab)
                for e in (task.make_example(rng) for _ in range(sft["n_examples"]))]
    rng = random.Random(seed + 4)
    dev_seqs = [tm.encode_example(e["prompt"], e["answer"], vocab)
                for e in (task.make_example(rng) for _ in range(sft["n_dev"]))]
    a = recipe["actor"]
    actor_cfg = tm.llama_config(len(vocab), a["layers"], a["hidden"], a["heads"], a["kv_heads"], a["intermediate"],
                                a["max_positions"])
    actor = tm.build_causal_lm(actor_cfg, seed)
    with bar(sft["max_steps"], "actor SFT") as pb:
        st = tm.train_sft(actor, sft_seqs, dev_seqs, lr=sft["lr"], token_budget=sft["token_budget"],
                          max_steps=sft["max_steps"],
                          target_exact=sft["target_exact"], eval_every=sft["eval_every"], seed=seed, progress=pb)
    metrics.update(sft_steps=st["steps"], sft_seconds=round(st["seconds"], 1), sft_dev_exact=st["held_out_exact"])
    log(f"actor SFT: {st['steps']} steps, {st['seconds']:.0f}s, dev exact {st['held_out_exact']:.3f}")
    _save(actor, tok, out / "actor")
    return actor, sft_seqs


def _judge_actor_greedy(actor, tok, eval_prompts: list[str], metrics: dict, log) -> tuple[list, list[str]]:
    """The actor's greedy continuations of the eval prompts (as ids and text): its exact-match rate, and what the
    draft and the reward model are judged on. Adds its metrics to `metrics`."""
    from trainer.tiny import models as tm

    vocab = tok.get_vocab()
    inv_vocab = {i: w for w, i in vocab.items()}
    t = time.time()
    greedy = tm.generate_continuations(actor, eval_prompts, vocab, task.MAX_LEN + 1)
    greedy_text = [tm.decode_ids(g, inv_vocab) for g in greedy]
    metrics["actor_exact"] = sum(task.is_exact(p, r) for p, r in zip(eval_prompts, greedy_text)) / len(eval_prompts)
    metrics["actor_mean_score"] = sum(task.score(p, r) for p, r in zip(eval_prompts, greedy_text)) / len(eval_prompts)
    metrics["eval_generate_seconds"] = round(time.time() - t, 1)
    log(f"actor greedy exact on {len(eval_prompts)} eval prompts: {metrics['actor_exact']:.3f}")
    return greedy, greedy_text


def _distil_draft(out: Path, recipe: dict, tok, actor, sft_seqs: list, eval_prompts: list[str], greedy: list,
                  metrics: dict, log, bar):
    """The draft, distilled from the actor's logits on the SFT sequences; its greedy agreement with the actor is
    measured on the actor's own eval continuations. Adds its metrics to `metrics`."""
    from trainer.tiny import models as tm

    seed, vocab = recipe["seed"], tok.get_vocab()
    d, dist = recipe["draft"], recipe["distill"]
    draft_cfg = tm.llama_config(len(vocab), d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["intermediate"],
                                d["max_positions"])
    draft = tm.build_causal_lm(draft_cfg, seed + 5)
    with bar(dist["max_steps"], "draft distill") as pb:
        st = tm.distill_draft(draft, actor, sft_seqs, lr=dist["lr"], token_budget=dist["token_budget"],
                              max_steps=dist["max_steps"], seed=seed + 5, progress=pb)
    actor_conts = [tm.Seq([tm.BOS_ID] + tm.encode_words(p, vocab) + g + [tm.EOS_ID], 1 + len(p.split()))
                   for p, g in zip(eval_prompts, greedy)]
    metrics.update(distill_steps=st["steps"], distill_seconds=round(st["seconds"], 1),
                   draft_agreement=tm.greedy_agreement(draft, actor_conts))
    log(f"draft distill: {st['steps']} steps, {st['seconds']:.0f}s, greedy agreement {metrics['draft_agreement']:.3f}")
    _save(draft, tok, out / "draft")
    return draft


def _measure_cost_ratio(recipe: dict, actor, draft, metrics: dict, log) -> None:
    """One KV-cached decode step of the actor vs the draft, per batch size: what drafting can save. Adds its
    metrics to `metrics`."""
    from trainer.tiny import models as tm

    for b in recipe["cost"]["batches"]:
        ta = tm.decode_step_seconds(actor, b, recipe["cost"]["context"])
        td = tm.decode_step_seconds(draft, b, recipe["cost"]["context"])
        metrics[f"actor_step_ms_b{b}"], metrics[f"draft_step_ms_b{b}"] = round(ta * 1e3, 3), round(td * 1e3, 3)
        metrics[f"cost_ratio_b{b}"] = round(ta / td, 2)
        log(f"decode step batch {b}: actor {ta * 1e3:.2f} ms, draft {td * 1e3:.2f} ms, ratio {ta / td:.1f}x")


def _train_reward_model(out: Path, recipe: dict, tok, actor, train_rows: list[dict], eval_rows: list[dict],
                        greedy_text: list[str], metrics: dict, log, bar) -> None:
    """The reward model: Bradley-Terry on pairs ranked by task.score (the actor's samples and corrupted answers),
    held out on pairs from the actor's greedy eval answers. Adds its metrics to `metrics`."""
    from trainer.tiny import models as tm

    seed, vocab = recipe["seed"], tok.get_vocab()
    inv_vocab = {i: w for w, i in vocab.items()}
    r, rt = recipe["reward"], recipe["reward_train"]
    rm_rows = train_rows[: rt["n_prompts"]]
    sampled = tm.generate_continuations(actor, [x["prompt"] for x in rm_rows], vocab, task.MAX_LEN + 1,
                                        do_sample=True, seed=seed + 6)
    train_pairs = tm.reward_pairs(rm_rows, [tm.decode_ids(s, inv_vocab) for s in sampled], random.Random(seed + 7))
    rng = random.Random(seed + 10)
    synthetic = [task.make_example(rng) for _ in range(rt["n_synthetic"])]
    train_pairs += tm.reward_pairs(synthetic, None, random.Random(seed + 11))
    held_pairs = tm.reward_pairs(eval_rows, greedy_text, random.Random(seed + 8))
    rm_cfg = tm.llama_config(len(vocab), r["layers"], r["hidden"], r["heads"], r["kv_heads"], r["intermediate"],
                             r["max_positions"], num_labels=1)
    rm = tm.build_reward_model(rm_cfg, seed + 9)
    with bar(rt["max_steps"], "reward BT") as pb:
        st = tm.train_reward(rm, train_pairs, vocab, lr=rt["lr"], batch_pairs=rt["batch_pairs"],
                             max_steps=rt["max_steps"], seed=seed + 9, progress=pb)
    metrics.update(reward_steps=st["steps"], reward_seconds=round(st["seconds"], 1),
                   reward_train_pairs=len(train_pairs), reward_heldout_pairs=len(held_pairs),
                   reward_accuracy=tm.pairwise_accuracy(rm, held_pairs, vocab))
    log(f"reward model: {st['steps']} steps, {st['seconds']:.0f}s, "
        f"held-out pairwise acc {metrics['reward_accuracy']:.3f}")
    _save(rm, tok, out / "reward")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build (or find cached) the tiny world: tokenizer, actor, draft, "
                                             "reward model and prompts, trained here from a fixed recipe.")
    ap.add_argument("root", nargs="?", default=None, help="the world's folder (default: $RLHFSPEC_CACHE, else "
                                                          "~/.cache/rlhfspec/tiny)")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else default_cache_dir()
    cached = not needs_rebuild(root)
    w = ensure_tiny_world(root)
    m = w.metrics
    print(f"tiny world {'(cached)' if cached else '(built)'} at {w.root}")
    print(json.dumps(m, indent=1))
    print(f"actor greedy exact-match {m['actor_exact']:.3f} | draft/actor greedy agreement "
          f"{m['draft_agreement']:.3f} | reward pairwise accuracy {m['reward_accuracy']:.3f}")
    print(f"decode-step cost ratio actor/draft: batch 1 {m['cost_ratio_b1']:.1f}x, batch 64 {m['cost_ratio_b64']:.1f}x")


if __name__ == "__main__":
    main()
