"""How many tokens per step rollout drafts can carry on a workload, whatever the engine: its samples decoded once
(plain, position-keyed sampling, so every strategy emits these very tokens), then the drafter replayed on them
step by step with exact acceptance (a drafted token counts while it equals the sample's next one), a GRPO group's
samples in lockstep as the engine runs them, history from an earlier rollout of the same prompts with other seeds.

    python -m bench.rollout_drafts_ceiling --actor ~/models/smollm2-135m-instruct \\
        --prompts ~/data/arith/test.parquet --name smollm2 [--quick]

Rows (tokens per sample-step):
- `engine`: `drafting.spec.suffix.RolloutDrafter` with the default `SuffixConfig`, one chain per sample-step (what
  `bench.rollout_drafts`'s `rollout_drafts` row measures in the engine; the two agree to the token);
- `chain_vote_every_depth`: one chain, no cap on the occurrences read, equally long matches voting at every depth
  (the best single chain found);
- `two_branches`: the two first tokens the equally long matches vote for most, each continued by vote (a tree of
  two chains);
- `oracle_all_candidates`: every occurrence's continuation verified at once, the longest accepted counted (a tree
  holding every candidate: the ceiling of drafting from these texts).
One thread; the replay is pure Python."""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

MAX_MATCH, DEPTH, PROMPT_TAIL = 8, 6, 8


def occurrences(docs: list[list[int]], ctx: list[int], mn: int = 1) -> list[tuple[int, list[int], int]]:
    """(match length, document, position after the match) of every place a document continues ctx's last mn
    tokens, each match extended backwards up to MAX_MATCH."""
    key, out = ctx[-mn:], []
    for d in docs:
        for p in range(mn, len(d)):
            if d[p - mn:p] == key:
                m = mn
                while m < MAX_MATCH and m < p and m < len(ctx) and d[p - m - 1] == ctx[-m - 1]:
                    m += 1
                out.append((m, d, p))
    return out


def voted_chains(occ: list, branches: int) -> list[list[int]]:
    """The `branches` first tokens the longest matches vote for most, each continued by vote at every depth."""
    if not occ:
        return []
    best = max(o[0] for o in occ)
    live = [o for o in occ if o[0] == best]
    chains = []
    for first, _ in Counter(d[p] for _, d, p in live).most_common(branches):
        agree, chain = [o for o in live if o[1][o[2]] == first], []
        for k in range(DEPTH):
            votes = Counter(d[p + k] for _, d, p in agree if p + k < len(d))
            if not votes:
                break
            t = votes.most_common(1)[0][0]
            chain.append(t)
            agree = [o for o in agree if o[2] + k < len(o[1]) and o[1][o[2] + k] == t]
        chains.append(chain)
    return chains


def accepted(chain: list[int], out: list[int], pos: int) -> int:
    n = 0
    for t in chain:
        if pos + n < len(out) - 1 and out[pos + n] == t:
            n += 1
        else:
            break
    return n


def replay(prompts, current: dict, history: dict, rule: str) -> float:
    """Tokens per sample-step of `rule` over the rollout `current` {(prompt, sample): tokens}."""
    from drafting.spec.suffix import HistoryStore, RolloutDrafter, SuffixConfig

    cfg = SuffixConfig()
    store = HistoryStore(cfg)
    for (i, _), toks in sorted(history.items()):
        store.add(i, toks)
    groups = defaultdict(list)
    for i, j in sorted(current):
        groups[i].append(j)
    tokens = steps = 0
    for i, js in groups.items():
        p, pos = prompts[i], {j: 0 for j in js}
        hist_docs = [p[-PROMPT_TAIL:] + h for h in store.get(i)]
        index = None
        if rule == "engine":
            index = RolloutDrafter(cfg)
            for j in js:
                index.add(j, i, p, store.get(i))
        while pos:
            now = {j: current[i, j][:pos.get(j, len(current[i, j]))] for j in js}  # lockstep: siblings so far
            live = sorted(pos)
            found = index.drafts(live) if index is not None else [None] * len(live)
            for j, d in zip(live, found):
                out, at = current[i, j], pos[j]
                if rule == "engine":
                    chains = [d.tokens] if d is not None else []
                else:
                    ctx = p + now[j]
                    docs = [ctx] + [p[-PROMPT_TAIL:] + now[s] for s in js if s != j] + hist_docs
                    occ = occurrences(docs, ctx)
                    chains = ([o[1][o[2]:o[2] + DEPTH] for o in occ] if rule == "oracle_all_candidates"
                              else voted_chains(occ, 2 if rule == "two_branches" else 1))
                n = min(max((accepted(c, out, at) for c in chains), default=0) + 1, len(out) - at)
                if index is not None:
                    index.commit(j, out[at:at + n])
                pos[j], tokens, steps = at + n, tokens + n, steps + 1
                if pos[j] >= len(out):
                    del pos[j]
                    if index is not None:
                        index.finish(j)
    return tokens / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actor", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 32 new tokens")
    p.add_argument("--out-dir", default="bench/results")
    a = p.parse_args(argv)
    if a.quick:
        a.num_prompts, a.samples, a.max_new_tokens = 4, 4, 32
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from bench.rollout_drafts import HISTORY_SEED_OFFSET, Rows, rollout
    from drafting.spec.suffix import SuffixConfig
    from trainer.loop.data import load_prompts

    actor = os.path.expanduser(a.actor)
    tok = AutoTokenizer.from_pretrained(actor)
    prompts = [list(x.token_ids) for x in load_prompts(os.path.expanduser(a.prompts), tok, 256, size=a.num_prompts)]
    rows = Rows(actor, None, a.num_prompts * a.samples, max(map(len, prompts)) + a.max_new_tokens + 1, None,
                SuffixConfig())
    t0 = time.perf_counter()
    current = rollout(rows.engine("none"), prompts, a.samples, a.max_new_tokens, a.seed)["outputs"]
    history = rollout(rows.engine("none"), prompts, a.samples, a.max_new_tokens, a.seed + HISTORY_SEED_OFFSET)[
        "outputs"]
    decode_s = time.perf_counter() - t0
    result = {"name": (a.name or Path(actor).name) + ("_quick" if a.quick else ""), "args": vars(a),
              "workload": f"{a.num_prompts} prompts x {a.samples} samples, {a.max_new_tokens} new tokens, temperature "
                          f"1; history: one earlier rollout, seeds + {HISTORY_SEED_OFFSET}",
              "suffix_config": vars(SuffixConfig()), "decode_s": round(decode_s, 1), "tokens_per_step": {}}
    for rule in ("engine", "chain_vote_every_depth", "two_branches", "oracle_all_candidates"):
        t0 = time.perf_counter()
        result["tokens_per_step"][rule] = round(replay(prompts, current, history, rule), 4)
        print(f"{rule}: {result['tokens_per_step'][rule]} tokens per step ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    out = Path(a.out_dir) / f"rollout_drafts_ceiling_{result['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
