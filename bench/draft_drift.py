"""Draft drift: does online draft adaptation keep acceptance up while the actor moves away from the draft, and
which draft kind follows better, a 1-layer draft model or an EAGLE-style head (it reads the actor's features)?

    python -m bench.draft_drift --out bench/results/draft_drift.json [--quick] [--repeats 2] [--kinds model,head]
                                [key=value ...]

RLHF (GRPO) on the tiny world with an actor learning rate that makes the actor drift clearly, the same seeds
with `draft.online` off and on, runs interleaved (off, on, on, off, ...), for each draft kind. Per iteration,
kind and mode: accepted draft tokens per sample-step (`rollout/mean_accepted`), rollout seconds, iteration
seconds, and the update + weight-sync phase. `critical_path_added_s`: how much later that phase ends because of
the draft, measured inside each "on" run as the wait for the draft trainer after the policy update returned plus
the draft's part of the weight push (0 when fully overlapped); `update_sync_added_s` compares the phase across
the two runs instead (it also holds the CPU the draft trainer takes from the policy update on a small box).

The two kinds have equal parameter counts outside the embedding and LM head (a head borrows the actor's; a draft
model's own are left out of its count): the smaller of the two grows its MLP (intermediate size) to the larger's
count (`equal_sizes`, its rule and both counts in the JSON). Both are distilled offline from the tiny world's
actor on the same data and budget (the tiny world's draft recipe: `trainer.tiny.models.distill_draft` /
`distill_head`; the head starts from the actor's last layer, as EAGLE's does), cached next to the world.
Overrides after the options go to every run (e.g. draft.loss=ce_sampled); the JSON records them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DRIFT_LR = 5e-4  # 5x the tiny default: the actor moves far from the draft's teacher within the run
STRATEGY = "tree:3,2,6"  # a static tree: accepted tokens per step then compare across iterations and runs
# distill_steps: the offline distillation of each kind before the runs (150: the tiny world's own draft recipe)
FULL = {"iterations": 32, "prompts": 32, "samples": 4, "repeats": 2, "distill_steps": 150}
QUICK = {"iterations": 8, "prompts": 8, "samples": 4, "repeats": 1, "distill_steps": 40}
KINDS = ("model", "head")
HEAD_LR = 1e-3  # the head's offline distillation (it starts from the actor's last layer, not from scratch)


def own_params(module) -> int:
    """Parameters outside the embedding and LM head: a draft model's own layers and norm; all of a head's (fc
    and its layer: it borrows the actor's embedding and LM head)."""
    shared = set()
    if hasattr(module, "get_input_embeddings"):
        shared = {id(module.get_input_embeddings().weight), id(module.get_output_embeddings().weight)}
    return sum(p.numel() for p in module.parameters() if id(p) not in shared)


def equal_sizes(actor_config, draft_config) -> dict:
    """The intermediate sizes at which a head of this actor and a draft model shaped like this one (layers,
    width, heads kept) have equal counts outside the embedding and LM head: the smaller grows its MLP (3 x hidden
    parameters per unit) to the larger's count. A head's fc (2H x H) and attention are at the actor's width, so
    it cannot shrink below them; growing the smaller keeps both architectures whole."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from drafting.model.head import DraftHead

    def counts(head_inter: int, model_inter: int) -> tuple[int, int]:
        a, d = copy.deepcopy(actor_config), copy.deepcopy(draft_config)
        a.intermediate_size, d.intermediate_size = head_inter, model_inter
        with torch.device("meta"):
            return own_params(DraftHead(a)), own_params(AutoModelForCausalLM.from_config(d))

    head_i, model_i = actor_config.intermediate_size, draft_config.intermediate_size
    head_n, model_n = counts(head_i, model_i)
    before = {"head": head_n, "model": model_n}
    if head_n > model_n:
        model_i += round((head_n - model_n) / (3 * draft_config.hidden_size * draft_config.num_hidden_layers))
        rule = "the draft model's MLP grows to the head's count (the head is at the actor's own layer shape)"
    elif model_n > head_n:
        head_i += round((model_n - head_n) / (3 * actor_config.hidden_size))
        rule = "the head's MLP grows to the draft model's count"
    else:
        rule = "equal as they are"
    head_n, model_n = counts(head_i, model_i)
    return {"rule": rule, "before": before, "params": {"head": head_n, "model": model_n},
            "intermediate": {"head": head_i, "model": model_i},
            "actor_intermediate": actor_config.intermediate_size,
            "today_draft": {"params": before["model"], "intermediate": draft_config.intermediate_size,
                            "layers": draft_config.num_hidden_layers, "hidden": draft_config.hidden_size}}


def prepare_drafts(kinds: list[str], sizing: dict, steps: int) -> dict[str, str]:
    """Each kind at its sizing, distilled offline from the tiny world's actor for `steps` steps of the world's
    draft recipe (same data, batches and seed for both), cached beside the world."""
    import copy
    import hashlib
    import random

    import torch
    from transformers import AutoConfig

    from drafting.model.head import DraftHead
    from trainer.core.deepspeed_backend import load_causal_lm
    from trainer.tiny import bootstrap, task
    from trainer.tiny import models as tm

    world = bootstrap.ensure_tiny_world()
    recipe = bootstrap.RECIPE
    seed, dist = recipe["seed"], recipe["distill"]
    key = {"world": bootstrap.recipe_hash(recipe), "steps": steps, "head_lr": HEAD_LR,
           "sizing": sizing["intermediate"]}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(world.root).parent / "drift_drafts" / name
    paths, actor, train = {}, None, None
    for kind in kinds:
        out = cache / kind
        paths[kind] = str(out)
        if (out / "prep.json").is_file():
            continue
        if actor is None:
            actor = load_causal_lm(world.actor_path, "actor").eval()
            tok = tm.build_tokenizer()
            vocab, rng = tok.get_vocab(), random.Random(seed + 3)  # the world's SFT sequences (bootstrap)
            train = [tm.encode_example(e["prompt"], e["answer"], vocab)
                     for e in (task.make_example(rng) for _ in range(recipe["sft"]["n_examples"]))]
        inter = sizing["intermediate"][kind]
        if kind == "model":
            cfg = AutoConfig.from_pretrained(world.draft_path)
            cfg.intermediate_size = inter
            draft = tm.build_causal_lm(cfg, seed + 5)
            st = tm.distill_draft(draft, actor, train, lr=dist["lr"], token_budget=dist["token_budget"],
                                  max_steps=steps, seed=seed + 5)
            bootstrap._save(draft, tok, out)
        else:
            if inter == actor.config.intermediate_size:
                head = DraftHead.from_actor(actor, seed=seed)
            else:  # a resized MLP cannot start as the actor's last layer
                cfg = copy.deepcopy(actor.config)
                cfg.intermediate_size = inter
                torch.manual_seed(seed)
                head = DraftHead(cfg).bind(actor)
            st = tm.distill_head(head, actor, train, lr=HEAD_LR, token_budget=dist["token_budget"], max_steps=steps,
                                 seed=seed + 5)
            head.save(out)
        (out / "prep.json").write_text(json.dumps({"kind": kind, "intermediate": inter, **key, **st}, indent=1))
        print(f"{kind}: distilled {st['steps']} steps in {st['seconds']:.0f} s (final kl {st['final_kl']:.3f}) "
              f"-> {out}", flush=True)
    return paths


def run_once(draft: str, online: bool, sizes: dict, out_dir: Path, extra: list[str]) -> list[dict]:
    from configs.schema import load_config
    from trainer.loop.run import run

    overrides = [f"model.draft={draft}", f"trainer.actor_lr={DRIFT_LR}", f"generation.strategy={STRATEGY}",
                 "trainer.algorithm=grpo",
                 f"trainer.iterations={sizes['iterations']}", f"trainer.prompts_per_iteration={sizes['prompts']}",
                 f"trainer.samples_per_prompt={sizes['samples']}", "trainer.save_every=0", "data.eval.path=null",
                 "tracking.wandb=false", "tracking.progress=false", f"trainer.output_dir={out_dir}",
                 f"draft.online={str(online).lower()}", *extra]
    return run(load_config(None, overrides))


def series(history: list[dict], key: str, default: float = 0.0) -> list[float]:
    return [float(h.get(key, default)) for h in history]


def quarter_means(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return statistics.fmean(values[:q]), statistics.fmean(values[-q:])


def per_iteration_median(runs: list[list[float]]) -> list[float]:
    return [statistics.median(v) for v in zip(*runs)]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for kind, marker in zip(result["kinds"], "os^v"):
        for mode, line in (("off", ":"), ("on", "-")):
            r = result["kinds"][kind][mode]
            its = range(len(r["accepted_per_step"]))
            label = f"{kind}, draft.online={mode}"
            top.plot(its, r["accepted_per_step"], marker + line, ms=3, label=label)
            bottom.plot(its, r["iteration_s"], marker + line, ms=3, label=label)
    top.set_ylabel("accepted draft tokens / sample-step")
    top.set_title(f"tiny world, GRPO, actor lr {result['config']['actor_lr']:g}, {result['config']['strategy']}")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("iteration seconds")
    bottom.set_xlabel("iteration")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kind_result(runs: dict[str, list[list[dict]]]) -> dict:
    """One kind's off and on runs: per-iteration series (medians over repeats) and its summary."""
    result: dict = {}
    for mode, histories in runs.items():
        per_run = {
            "accepted_per_step": [series(h, "rollout/mean_accepted") for h in histories],
            "acceptance_rate": [series(h, "rollout/acceptance_rate") for h in histories],
            "rollout_s": [series(h, "time/generate") for h in histories],
            "iteration_s": [series(h, "time/iteration") for h in histories],
            "update_sync_s": [[a + b for a, b in zip(series(h, "time/update"), series(h, "time/weight_sync"))]
                              for h in histories],
            "kl": [series(h, "kl/mean") for h in histories],
            "score": [series(h, "score/mean") for h in histories],
        }
        if mode == "on":
            per_run.update({
                "draft_loss": [series(h, "draft/loss") for h in histories],
                "draft_train_s": [series(h, "draft/seconds") for h in histories],
                "draft_steps": [series(h, "draft/steps") for h in histories],
                "policy_update_s": [series(h, "time/policy_update") for h in histories],
                "draft_wait_s": [series(h, "time/draft_wait") for h in histories],
                "draft_sync_s": [series(h, "time/draft_sync") for h in histories],
            })
        # acceptance and losses are the same in every repeat (seeded, full budget or not: see README); times vary
        result[mode] = {k: per_iteration_median(v) for k, v in per_run.items()}
        result[mode]["repeats"] = per_run

    on, off = result["on"], result["off"]
    added = [w + s for w, s in zip(on["draft_wait_s"], on["draft_sync_s"])]
    first_on, last_on = quarter_means(on["accepted_per_step"])
    first_off, last_off = quarter_means(off["accepted_per_step"])
    mean_iteration = statistics.fmean(on["iteration_s"])
    result.update({
        "critical_path_added_s": statistics.fmean(added),
        "critical_path_added_per_iteration_s": added,
        "update_sync_added_s": statistics.median(on["update_sync_s"]) - statistics.median(off["update_sync_s"]),
        "summary": {
            "accepted_first_quarter": {"off": first_off, "on": first_on},
            "accepted_last_quarter": {"off": last_off, "on": last_on},
            # the last quarter over the first, minus one: how much acceptance the drift cost (negative: lost)
            "drift_vs_first_quarter": {"off": last_off / max(first_off, 1e-9) - 1,
                                       "on": last_on / max(first_on, 1e-9) - 1},
            "on_vs_off_last_quarter": last_on / max(last_off, 1e-9),
            "critical_path_fraction": statistics.fmean(added) / mean_iteration,
            "draft_train_s": spread(on["draft_train_s"]),
            "policy_update_s": spread(on["policy_update_s"]),
            "iteration_s": {"off": spread(off["iteration_s"]), "on": spread(on["iteration_s"])},
            "rollout_s": {"off": spread(off["rollout_s"]), "on": spread(on["rollout_s"])},
        },
    })
    s = result["summary"]
    result["targets"] = {
        "last_quarter_at_least_first": last_on >= first_on,
        "last_quarter_10pct_above_off": s["on_vs_off_last_quarter"] >= 1.10,
        "critical_path_under_5pct": s["critical_path_fraction"] < 0.05,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON result; the PNG goes next to it")
    parser.add_argument("--quick", action="store_true", help="8 iterations of 8 prompts, one repeat, 40 distillation "
                                                             "steps per kind (about 10 min on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per kind and mode (default: 2, quick: 1)")
    parser.add_argument("--iterations", type=int, default=None, help="RLHF iterations per run (default: 32, quick: 8)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="draft kinds, comma-separated: model, head")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("repeats", "iterations"):
        if getattr(args, key):
            sizes[key] = getattr(args, key)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: {args.kinds!r}; want some of {', '.join(KINDS)}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    from transformers import AutoConfig

    from configs.schema import load_config
    from trainer.tiny.bootstrap import ensure_tiny_world

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started, load = time.time(), {}  # the machine's load average around each run: a shared box shows here
    world = ensure_tiny_world()
    sizing = equal_sizes(AutoConfig.from_pretrained(world.actor_path), AutoConfig.from_pretrained(world.draft_path))
    print(f"parameters outside the embedding and LM head: head {sizing['before']['head']:,}, today's draft "
          f"{sizing['before']['model']:,}; {sizing['rule']}: head {sizing['params']['head']:,} (intermediate "
          f"{sizing['intermediate']['head']}), draft model {sizing['params']['model']:,} (intermediate "
          f"{sizing['intermediate']['model']})", flush=True)
    t0 = time.time()
    drafts = prepare_drafts(kinds, sizing, sizes["distill_steps"])
    prep_s = time.time() - t0
    work = Path(tempfile.mkdtemp(prefix="draft_drift-"))  # the runs' output dirs; nothing in them is kept
    runs = {kind: {"off": [], "on": []} for kind in kinds}
    for r in range(sizes["repeats"]):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")  # interleaved, ABBA: slow drift hits both modes
        for kind in kinds:
            for mode in order:
                t0 = time.time()
                before = os.getloadavg()[0]
                history = run_once(drafts[kind], mode == "on", sizes, work / f"{kind}-{mode}-{r}", args.overrides)
                runs[kind][mode].append([h for h in history if "rollout/mean_accepted" in h])
                load[f"{kind}-{mode}-{r}"] = {"before": before, "after_1min": os.getloadavg()[0],
                                              "seconds": time.time() - t0}
                print(f"repeat {r} {kind} draft.online={mode}: {time.time() - t0:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    per_kind = {kind: kind_result(runs[kind]) for kind in kinds}
    cfg = load_config(None, [f"trainer.actor_lr={DRIFT_LR}", f"generation.strategy={STRATEGY}", *args.overrides])
    summary = {key: {kind: per_kind[kind]["summary"][key] for kind in kinds}
               for key in ("accepted_first_quarter", "accepted_last_quarter", "drift_vs_first_quarter",
                           "on_vs_off_last_quarter")}
    if {"model", "head"} <= set(kinds):
        summary["head_vs_model_last_quarter_on"] = (summary["accepted_last_quarter"]["head"]["on"]
                                                    / max(summary["accepted_last_quarter"]["model"]["on"], 1e-9))
    result = {
        "config": {"actor_lr": DRIFT_LR, "strategy": STRATEGY, "algorithm": "grpo", "seed": cfg.seed, **sizes,
                   "kinds": kinds, "drafts": drafts, "head_distill_lr": HEAD_LR, "draft": vars(cfg.draft),
                   "overrides": args.overrides, "quick": args.quick},
        "params": sizing,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads_per_actor": cfg.trainer.threads_per_actor,
                    "instances": cfg.generation.num_instances, "platform": platform.platform(),
                    "torch": torch.__version__, "wall_s": round(time.time() - started, 1),
                    "distill_s": round(prep_s, 1), "runs": load},
        "summary": summary,
        "kinds": per_kind,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    p = result["params"]
    print(f"\nparameters outside the embedding and LM head: {json.dumps(p['params'])} ({p['rule']})")
    print("| kind | mode | accepted/step first quarter | last quarter | drift vs first | iteration s (median) | "
          "rollout s (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, r in result["kinds"].items():
        s = r["summary"]
        for mode in ("off", "on"):
            print(f"| {kind} | {mode} | {s['accepted_first_quarter'][mode]:.3f} | "
                  f"{s['accepted_last_quarter'][mode]:.3f} | {100 * s['drift_vs_first_quarter'][mode]:+.1f}% | "
                  f"{s['iteration_s'][mode]['median']:.2f} | {s['rollout_s'][mode]['median']:.2f} |")
    for kind, r in result["kinds"].items():
        s = r["summary"]
        print(f"{kind}: on/off last quarter {s['on_vs_off_last_quarter']:.3f}; critical path added "
              f"{r['critical_path_added_s']:.3f} s/iteration ({100 * s['critical_path_fraction']:.1f}% of an "
              f"iteration); update+sync on-off {r['update_sync_added_s']:+.3f} s; draft trainer "
              f"{s['draft_train_s']['median']:.2f} s vs policy update {s['policy_update_s']['median']:.2f} s; "
              f"targets {json.dumps(r['targets'])}")
    if "head_vs_model_last_quarter_on" in result["summary"]:
        print(f"head / model, last quarter with draft.online: {result['summary']['head_vs_model_last_quarter_on']:.3f}")


if __name__ == "__main__":
    main()
