"""Rollout simulator: one rollout over N generation instances as a discrete-event simulation that runs the real
policy code (`drafting.adaptive`'s selection, the static strategies' shapes, `migration.planner`'s planner) against
a step-time model, recorded draft trees and a response-length distribution.

    python -m bench.simulate --validate --out bench/results/simulate.json [--quick]
    python -m bench.simulate --what-if --step-model FILE.json [--instances 8] [--requests 2048]

Step-time models: a calibration file (`drafting.calibration`: this machine's, a GPU's from `bench.gpu`), or an
analytic roofline (`roofline:h200:8b`: weight and K/V bytes at the memory bandwidth or FLOPs at peak, whichever is
larger, plus an overhead per forward; its assumptions are printed). The strategy reads the same model it is timed
by, as in the engine. Acceptance: `bench.sim_record`'s trees (every position of every sample of the tiny world, each
node on the target's path or not), so any selection accepts what the engine would. Migration: K/V bytes per token
x tokens over a link bandwidth, two-stage (the sample decodes at the source while stage 1 copies)."""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from drafting.policy.calibration import Calibration, load_calibration
from drafting.policy.strategy import DraftStrategy, StepView, parse_strategy
from drafting.runtime.step import run_step
from drafting.runtime.timing import StepTimer
from drafting.spec.tree import DraftTree, top_per_sample
from migration.planner import InstanceLoad, SampleLoad, plan, resolve_threshold

ROOT = Path(__file__).resolve().parent.parent
TREES = ROOT / "bench/results/simulate_trees.npz"
CONFIGS = ("none", "static", "adaptive", "adaptive+balancer")


# ---- step-time models --------------------------------------------------------------------------------------
@dataclass
class StepModel:
    """Milliseconds per engine stage (a calibration), prefill cost and the migration link."""

    name: str
    cal: Calibration
    prefill: dict  # "target" | "target+draft": (ms per admission, ms per prompt token) or sim_record's ratio
    kv_bytes_per_token: int  # target + draft K/V of one committed token
    link_gb_s: float  # instance-to-instance bandwidth, GB/s
    latency_ms: float  # per transfer stage / per balancer order
    note: str = ""
    adaptive_mode: str = "device"  # as the engine picks: 'host' on a CPU, 'device' on a GPU
    time_scale: float = 1.0  # this machine now vs when it was profiled (1: as profiled)

    def prefill_ms(self, prompt_lens: list[int], with_draft: bool) -> float:
        if "ratio" in self.prefill.get("target", {}):  # measured as so many plain steps of a full batch
            ref = self.prefill["target+draft" if with_draft else "target"]
            step = self.cal.plain_ms(ref["live"], ref["ctx"])
            return ref["ratio"] * step * sum(prompt_lens) / ref["prompt_tokens"]
        a, b = self.prefill["target+draft" if with_draft else "target"]
        return a + b * sum(prompt_lens)


def tiny_kv_bytes() -> int:
    from transformers import AutoConfig

    from trainer.tiny.bootstrap import ensure_tiny_world

    w = ensure_tiny_world(quiet=True)
    total = 0
    for path in (w.actor_path, w.draft_path):
        c = AutoConfig.from_pretrained(path)
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        total += 2 * c.num_hidden_layers * c.num_key_value_heads * hd * 4  # float32
    return total


# the 8B / 1B pair of the H200 profiles and cluster_8b.yaml (Llama-3.1-8B, Llama-3.2-1B, bf16)
PAIRS = {"8b": {"target": {"params": 8.03e9, "layers": 32, "kv_heads": 8, "head_dim": 128},
                "draft": {"params": 1.24e9, "layers": 16, "kv_heads": 8, "head_dim": 64}, "bytes": 2}}
ACCELERATORS = {  # HBM bandwidth B/s, dense bf16 FLOP/s; achieved fractions and a per-forward overhead assumed
    "h200": {"bw": 4.8e12, "flops": 989e12, "bw_eff": 0.8, "mfu": 0.5, "overhead_ms": 1.0, "link_gb_s": 25.0},
    "h100": {"bw": 3.35e12, "flops": 989e12, "bw_eff": 0.8, "mfu": 0.5, "overhead_ms": 1.0, "link_gb_s": 25.0},
    "a100": {"bw": 2.0e12, "flops": 312e12, "bw_eff": 0.8, "mfu": 0.5, "overhead_ms": 1.0, "link_gb_s": 25.0},
}


def kv_bytes(pair: dict) -> int:
    return sum(2 * m["layers"] * m["kv_heads"] * m["head_dim"] * pair["bytes"] for m in (pair["target"], pair["draft"]))


def gpu_prefill(pair: dict, acc: dict) -> dict:
    """Prefill is compute-bound: 2 x params FLOPs per prompt token at `mfu` of peak."""
    per = lambda ps: 1000 * 2 * ps / (acc["flops"] * acc["mfu"])  # noqa: E731
    t, d = pair["target"]["params"], pair["draft"]["params"]
    return {"target": (acc["overhead_ms"], per(t)), "target+draft": (2 * acc["overhead_ms"], per(t + d))}


def roofline_model(spec: str) -> StepModel:
    """`roofline:ACCEL:PAIR`: a calibration made from the roofline formula (sampled on the profiler's grid and
    fitted like a profile), so the strategy reads it as it would a file."""
    _, accel, pair_name = spec.split(":")
    if accel not in ACCELERATORS or pair_name not in PAIRS:
        raise ValueError(f"--step-model {spec!r}: want roofline:{{{','.join(ACCELERATORS)}}}:{{{','.join(PAIRS)}}}")
    acc, pair = ACCELERATORS[accel], PAIRS[pair_name]

    def fwd(m, live, tokens, ctx):  # one forward over `tokens` new tokens in all, `live` samples at context ctx
        kv = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * pair["bytes"]
        mem = (m["params"] * pair["bytes"] + live * ctx * kv) / (acc["bw"] * acc["bw_eff"])
        return acc["overhead_ms"] + 1000 * max(mem, 2 * m["params"] * tokens / (acc["flops"] * acc["mfu"]))

    T, D = pair["target"], pair["draft"]
    s = {"plain": [], "root": [], "level": [], "verify": []}
    for B in (1, 4, 16, 32, 64, 96, 128):
        for c in (64, 512, 1024, 2048, 3072):
            s["plain"].append([B, c, fwd(T, B, B, c)])
            for w in (1, 2, 4, 8):
                s["root"].append([B, w, c, fwd(D, B, B * w, c)])
                s["level"].append([B, w, c, fwd(D, B, B * w, c)])
            for n in (0, 1, 3, 7, 15):
                s["verify"].append([B, B * (1 + n), 1 + n, c, fwd(T, B, B * (1 + n), c)])
    key = {"models": f"roofline-{pair_name}", "dtype": "bfloat16", "device": accel, "threads": 0, "version": 1}
    cal = Calibration(key, s, meta={"max_slots": 128, "max_len": 3072, "roofline_ctx": 1024}).fit()
    note = (f"roofline {accel} {pair_name}: {acc['bw'] / 1e12:.2f} TB/s x {acc['bw_eff']}, {acc['flops'] / 1e12:.0f} "
            f"TFLOP/s x {acc['mfu']}, {acc['overhead_ms']} ms per forward, bf16 weights + K/V read per step; "
            f"prefill at {acc['mfu']} of peak; link {acc['link_gb_s']} GB/s")
    return StepModel(spec, cal, gpu_prefill(pair, acc), kv_bytes(pair), acc["link_gb_s"], 1.0, note)


def cpu_calibration_path() -> Path:
    """The tiny pair's CPU calibration at one thread (by its key: the cache also holds other pairs')."""
    from transformers import AutoConfig

    from drafting.policy.calibration import calibration_key, key_name
    from drafting.policy.calibration import cache_dir
    from trainer.tiny.bootstrap import ensure_tiny_world

    w = ensure_tiny_world(quiet=True)
    key = calibration_key(AutoConfig.from_pretrained(w.actor_path), AutoConfig.from_pretrained(w.draft_path),
                          "float32", "cpu", 1)
    path = cache_dir() / f"{key_name(key)}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no CPU calibration of the tiny world ({path}): run python -m drafting.profile "
                                f"--config configs/tiny.yaml --max-slots 64 once")
    return path


def load_step_model(spec: str, trees: "Trees | None" = None) -> StepModel:
    """'cpu' (this machine's tiny-world calibration), 'h200-old', 'h200-new', 'roofline:ACCEL:PAIR' or a
    calibration file (then the 8B/1B pair's K/V and an H200's prefill and link are assumed)."""
    if spec.startswith("roofline:"):
        return roofline_model(spec)
    if spec == "cpu":
        pre = trees.meta["prefill"] if trees else {"target": (0.0, 0.0), "target+draft": (0.0, 0.0)}
        return StepModel("cpu", load_calibration(cpu_calibration_path()), pre, tiny_kv_bytes(), 0.28, 10.0,
                         "this machine, tiny world, 1 thread per instance; prefill = sim_record's measured ratio to a "
                         "full plain step x the model's plain step; adaptive in host mode (as on a CPU); "
                         "link 0.28 GB/s, 10 ms per stage (gloo on loopback, bench.reallocation's large-KV moves)",
                         adaptive_mode="host")
    path = {"h200-old": "/work/shared/data/h200_calibration_37b4c37.json",
            "h200-new": str(ROOT / "bench/results/h200_calibration.json")}.get(spec, spec)
    acc, pair = ACCELERATORS["h200"], PAIRS["8b"]
    return StepModel(spec, load_calibration(path), gpu_prefill(pair, acc), kv_bytes(pair), acc["link_gb_s"], 1.0,
                     f"{path}; 8B/1B pair bf16 K/V {kv_bytes(pair)} B/token; prefill at {acc['mfu']} of H200 peak; "
                     f"link {acc['link_gb_s']} GB/s")


# ---- recorded draft trees ----------------------------------------------------------------------------------
class Trees:
    """`bench.sim_record`'s recording: per workload, samples and their trees (one per response position)."""

    def __init__(self, path: str | Path = TREES):
        if not Path(path).is_file():
            raise FileNotFoundError(f"draft-tree recording not found: {path} (python -m bench.sim_record)")
        z = np.load(path)
        self.meta = json.loads(str(z["meta"]))
        from bench.sim_record import layout

        self.depth, self.rank = layout()
        self.topk = self.meta["topk"]
        self.workloads = {}
        for name, w in self.meta["workloads"].items():
            value, q, margin = (z[f"{name}/{k}"].astype(np.float32) for k in ("value", "q", "margin"))
            parents, ok = z[f"{name}/parents"].astype(np.int64), z[f"{name}/on_path"]
            T, N = parents.shape
            children = np.full((T, N, self.topk), -1, dtype=np.int64)
            tt, jj = np.nonzero(parents >= 0)
            children[tt, parents[tt, jj], self.rank[jj]] = jj
            base = w["samples"][0]["first_tree"]
            samples = [{**s, "first_tree": s["first_tree"] - base} for s in w["samples"]]
            self.workloads[name] = {"samples": samples, "value": value, "q": q, "margin": margin,
                                    "parents": parents, "on_path": ok, "children": children,
                                    "max_slots": w["max_slots"]}


@dataclass
class Sample:
    rid: object
    prompt_len: int
    length: int  # response tokens it will emit
    max_new: int
    trees: np.ndarray  # tree index per response position
    group: int = 0
    done: int = 0
    lag: int = 1

    def tree(self) -> int:
        return int(self.trees[min(self.done, len(self.trees) - 1)])


def recorded_samples(trees: Trees, workload: str) -> list[Sample]:
    """The workload's samples as recorded (their true response lengths)."""
    out = []
    for i, s in enumerate(trees.workloads[workload]["samples"]):
        idx = s["first_tree"] + np.arange(s["length"])
        out.append(Sample(s["request_id"], s["prompt_len"], s["length"], s["max_new"], idx, group=i // 4))
    return out


def synthetic_samples(trees: Trees, workload: str, n: int, rng: np.random.Generator, median: float, sigma: float,
                      max_new: int, prompt: tuple[int, int]) -> list[Sample]:
    """n samples with log-normal response lengths (median, sigma; capped at max_new) and uniform prompt lengths;
    acceptance replayed from a random recorded sample's trees, cycled over its positions that still have a full
    path ahead (the last positions' paths are cut by the sample's end)."""
    src = [s for s in trees.workloads[workload]["samples"] if s["length"] > 16]
    out = []
    for i in range(n):
        length = int(min(max_new, max(1, round(rng.lognormal(math.log(median), sigma)))))
        s = src[int(rng.integers(len(src)))]
        usable = s["length"] - trees.meta["depth"]
        idx = s["first_tree"] + np.arange(length) % usable
        out.append(Sample(i, int(rng.integers(prompt[0], prompt[1] + 1)), length, max_new, idx, group=i // 4))
    return out


# ---- one instance ------------------------------------------------------------------------------------------
def make_strategy(config: str, model: StepModel, static: str) -> DraftStrategy:
    if config == "none":
        return parse_strategy("none")
    if config == "static":
        return parse_strategy(static)
    from drafting.policy.adaptive import adaptive

    return adaptive(model.cal, mode=model.adaptive_mode)


class Instance:
    """A generation instance: FIFO queue, `max_slots` live samples, one step at a time on its own clock."""

    def __init__(self, index: int, strategy: DraftStrategy, model: StepModel, trees: dict, topk_rec: int,
                 depth: np.ndarray, rank: np.ndarray, max_slots: int):
        self.index, self.s, self.m, self.rec = index, strategy, model, trees
        self.topk_rec, self.depth_rec, self.rank_rec = topk_rec, depth, rank
        self.max_slots = max_slots
        self.queue: collections.deque[Sample] = collections.deque()
        self.live: list[Sample] = []
        self.reserved = 0
        self.leaving: set = set()  # rids of samples in a migration's stage 1 (still decoding here)
        self.t = 0.0
        self.steps = self.tokens = self.accepted = 0
        self.last_admit = 0.0
        self.busy_s = 0.0
        self.end = 0.0

    @property
    def with_draft(self) -> bool:
        return self.s.max_depth > 0

    def has_work(self) -> bool:
        return bool(self.queue or self.live)

    def admit(self) -> float:
        new = []
        while self.queue and len(self.live) + len(new) + self.reserved < self.max_slots:
            new.append(self.queue.popleft())
        if not new:
            return 0.0
        self.live += new
        self.last_admit = self.t
        return self.m.prefill_ms([max(s.prompt_len - 1, 1) for s in new], self.with_draft)

    def step(self) -> list[Sample]:
        """One engine step from self.t, through the engine's own step loop (`drafting.runtime.step.run_step`) over
        recorded trees and modelled times; returns the finished samples."""
        admit_ms = self.admit()
        B = len(self.live)
        ctx = max(s.prompt_len + s.done for s in self.live)
        lag = max(s.lag for s in self.live)
        view = StepView(B, ctx, lag, torch.ones(B))
        stages, timer = ReplayStages(self, view), StepTimer(None)  # times come from the model, not a clock
        timer.log.update({"live": B, "ctx": ctx, "lag": lag, "t_admit": admit_ms * self.m.time_scale / 1000})
        run_step(stages, self.s, view, timer)
        ms, emitted, acc, log, s = stages.ms, stages.emitted, stages.accepted, timer.log, self.s
        draft = not log["plain"]
        dt = (admit_ms + ms) * self.m.time_scale / 1000
        log["t_total"], log["accepted"] = dt, int(acc.sum())
        log.update({f"plan_{k}": v for k, v in (getattr(s, "decision", None) or {}).items()})
        s.step_done(log)
        finished = []
        for smp, e in zip(self.live, emitted):
            e = min(int(e), smp.length - smp.done)
            smp.done += e
            smp.lag = e if draft else smp.lag + 1
            self.tokens += e
            if smp.done >= smp.length:
                finished.append(smp)
        self.accepted += int(acc.sum())
        self.live = [x for x in self.live if x.done < x.length]
        self.t += dt
        self.end = self.t  # the makespan counts steps, not an idle clock that follows the balancer's polls
        self.busy_s += dt
        self.steps += 1
        return finished


class ReplayStages:
    """The step's stage backend for a simulated instance: the draft tree grows as the policy asks, from each live
    sample's recorded tree (which node the target accepts is recorded); every stage adds its modelled time to
    `ms`. It is also the drafter whose buffers a device-mode policy scores (`score_nodes`)."""

    def __init__(self, inst: Instance, view: StepView):
        self.inst, self.view, self.s, self.cal = inst, view, inst.s, inst.m.cal
        self.ms = 0.0
        B = view.live
        self.emitted, self.accepted = np.ones(B, dtype=np.int64), np.zeros(B, dtype=np.int64)

    def plain(self, view: StepView) -> None:
        self.ms = self.cal.plain_ms(view.live, view.context)

    def root(self, view: StepView, k: int) -> None:
        """Level 1: the root's children (recorded ranks 0..topk-1)."""
        s, B, rec = self.s, view.live, self.inst.rec
        self.tix = np.array([x.tree() for x in self.inst.live])
        self.ch = rec["children"][self.tix]  # [B, Nrec, Krec]
        nmax = k + max(s.max_depth - 1, 0) * s.max_width * k
        self.rec_id = np.full((B, nmax), -1, dtype=np.int64)
        self.rec_id[:, :k] = np.arange(k)
        self.par = np.full((B, nmax), -1, dtype=np.int64)
        self.dep, self.rnk = np.zeros(nmax, dtype=np.int64), np.zeros(nmax, dtype=np.int64)
        self.dep[:k], self.rnk[:k] = 1, np.arange(k)
        self.fields = {f: np.zeros((B, nmax), dtype=np.float32) for f in ("value", "q", "margin")}
        self.ok = np.zeros((B, nmax), dtype=bool)
        # the drafter's buffers, as the device-mode strategy reads and writes them inside the stages
        self.value, self.q, self.margin = (torch.from_numpy(self.fields[f]) for f in ("value", "q", "margin"))
        self.parents, self.depth, self.rank = (torch.from_numpy(a) for a in (self.par, self.dep, self.rnk))
        self.score, self.cond = torch.zeros(B, nmax), torch.zeros(B, nmax)
        self._fill(0, k)
        s.score_nodes(self, B, 0, k, view.temperature)
        self.ms = self.cal.root_ms(B, max(view.draft_lag, 1), view.context)

    def _fill(self, lo: int, hi: int) -> None:
        rid = self.rec_id[:, lo:hi]
        have = rid >= 0
        safe = np.where(have, rid, 0)
        for f, a in self.fields.items():
            a[:, lo:hi] = np.where(have, self.inst.rec[f][self.tix[:, None], safe], 0.0)
        self.ok[:, lo:hi] = have & self.inst.rec["on_path"][self.tix[:, None], safe]
        self.score[:, lo:hi] = torch.from_numpy(self.fields["value"][:, lo:hi])  # the drafter's score: the value
        self.cond[:, lo:hi] = torch.from_numpy(self.fields["q"][:, lo:hi])

    def level(self, view: StepView, size: int, newest: int, levels: int, width: int, k: int) -> None:
        """Expand the `width` best of the newest level's nodes, each into its recorded children."""
        B, rows, ch = view.live, np.arange(view.live)[:, None], self.ch
        front = (size - newest) + self.score[:, size - newest:size].topk(width, dim=1).indices.numpy()  # [B, w]
        M = width * k
        fr = self.rec_id[rows, front]  # [B, w] recorded ids of the frontier (-1: not in the recording)
        kr = np.arange(k)  # sibling ranks past the recording's topk were not drafted there: placeholders
        kid = ch[rows[..., None], np.maximum(fr, 0)[..., None], np.minimum(kr, ch.shape[2] - 1)]
        kid = np.where((fr[..., None] >= 0) & (kr < ch.shape[2]), kid, -1)
        self.rec_id[:, size:size + M] = kid.reshape(B, M)
        self.par[:, size:size + M] = np.repeat(front, k, axis=1)
        self.dep[size:size + M], self.rnk[size:size + M] = levels + 1, np.tile(np.arange(k), width)
        self._fill(size, size + M)
        # value is the path product (recorded); a child found under another parent keeps its own path's
        self.s.score_nodes(self, B, size, size + M, view.temperature)
        self.ms += self.cal.level_ms(B, width, view.context)

    def tree(self, B: int, size: int) -> DraftTree:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[:, :size]))  # noqa: E731
        f = self.fields
        return DraftTree(torch.zeros(B, size, dtype=torch.long), t(self.par), t(f["value"]), t(f["q"]),
                         t(f["margin"]), torch.from_numpy(self.dep[:size]), torch.from_numpy(self.rnk[:size]),
                         torch.zeros(0), torch.zeros(B, 0, dtype=torch.long), self.score[:, :size], self.cond[:, :size])

    def choose(self, view: StepView, selected: torch.Tensor, size: int) -> np.ndarray:
        """Close the selection under ancestors (children come after their parents)."""
        chosen = selected.numpy().copy()
        for j in range(size - 1, -1, -1):
            p = self.par[:, j]
            sel = chosen[:, j] & (p >= 0)
            chosen[np.nonzero(sel)[0], p[sel]] = True
        return chosen

    def verify(self, view: StepView, chosen: np.ndarray | None, shape, size: int, levels: int
               ) -> tuple[int, int, int]:
        s, B, rows = self.s, view.live, np.arange(view.live)[:, None]
        tree = self.tree(B, size)
        if chosen is None:
            chosen = self.choose(view, top_per_sample(tree.score, min(shape.nodes, size)), size)
        self.accepted = acc = (chosen & self.ok[:, :size]).sum(1)
        self.emitted = acc + 1
        counts = chosen.sum(1)
        s.summarize(tree, None, None, torch.ones(B, dtype=torch.bool), levels)
        s.fetch_async()
        T = 1 + int(counts.max())
        self.ms += float(self.cal.verify_ms(B, [B + int(counts.sum())], [T], view.context)[0])
        if s.host_decisions or s.wants_records():
            parent_ok = np.where(self.par[:, :size] < 0, True, self.ok[rows, np.maximum(self.par[:, :size], 0)])
            tested = chosen & parent_ok
            if tested.any():
                f = self.fields
                feats = np.stack([f["value"][:, :size], f["q"][:, :size], f["margin"][:, :size],
                                  np.broadcast_to(self.dep[:size], (B, size)),
                                  np.broadcast_to(self.rnk[:size], (B, size)), np.ones((B, size))], -1)[tested]
                s.observe({"features": torch.from_numpy(feats.astype(np.float32)),
                           "accepted": torch.from_numpy(self.ok[:, :size][tested]),
                           "predicted": torch.from_numpy(self.cond[:, :size].numpy()[tested].copy())})
        return levels + 1, T, int(counts.sum())


# ---- a fleet -----------------------------------------------------------------------------------------------
@dataclass
class Balancer:
    interval_s: float = 0.25
    cooldown_s: float = 0.5
    threshold: object = "auto"
    two_stage: bool = True


def simulate(samples: list[Sample], instances: int, model: StepModel, trees: Trees, workload: str, config: str,
             max_slots: int, assignment: str = "round_robin", static: str = "chain:2",
             balancer: Balancer | None = None, warm: list[Sample] | None = None, group_size: int = 4) -> dict:
    """One rollout of `samples` over `instances`; returns makespan, tokens/s, migrations, bytes moved, phases."""
    from trainer.loop.rollout import assign

    rec = trees.workloads[workload]
    proto = make_strategy(config, model, static)
    if warm and config.startswith("adaptive"):  # as the benchmarks do: the strategy learnt on an earlier rollout
        w = Instance(0, proto, model, rec, trees.topk, trees.depth, trees.rank, max_slots)
        w.queue.extend(copy.deepcopy(warm))
        while w.has_work():
            w.step()
    fleet = []
    for i in range(instances):
        s = copy.deepcopy(proto) if i < instances - 1 else proto
        fleet.append(Instance(i, s, model, rec, trees.topk, trees.depth, trees.rank, max_slots))
    samples = copy.deepcopy(samples)
    for i, part in enumerate(assign(len(samples), instances, assignment, group_size)):
        fleet[i].queue.extend(samples[j] for j in part)
    arrivals: list[tuple] = []  # (time, destination, samples, 'queued' | 'running')
    leaving: list[tuple[float, int, int, list]] = []  # (time, source, destination, rids): stage 1 ends
    poll = balancer.interval_s if balancer else math.inf
    last_order: dict[int, float] = {}
    moves = {"migrations": 0, "requests_moved": 0, "samples_moved": 0, "bytes_moved": 0}
    thresholds = {}
    bw = model.link_gb_s * 1e9
    lat = model.latency_ms / 1000
    while True:
        busy = [f for f in fleet if f.has_work()]
        t_next = min((f.t for f in busy), default=math.inf)
        t_event = min([t_next, poll] + [a[0] for a in arrivals] + [x[0] for x in leaving])
        if t_event == math.inf:
            break
        if leaving and min(x[0] for x in leaving) == t_event:  # stage 1 done: freeze, copy the delta, hand over
            leaving.sort(key=lambda x: x[0])
            t, src, dst, rids = leaving.pop(0)
            go = [x for x in fleet[src].live if x.rid in rids]
            fleet[src].live = [x for x in fleet[src].live if x.rid not in rids]
            fleet[src].leaving -= set(rids)
            fleet[dst].reserved -= len(rids) - len(go)  # finished at the source during stage 1
            freeze = lat + sum(x.lag for x in go) * model.kv_bytes_per_token / bw
            arrivals.append((t + freeze, dst, go, "running"))
            continue
        if arrivals and min(a[0] for a in arrivals) == t_event:
            arrivals.sort(key=lambda a: a[0])
            t, dst, got, kind = arrivals.pop(0)
            f = fleet[dst]
            if not f.has_work():  # an idle instance starts when the samples arrive
                f.t = max(f.t, t)
            f.reserved -= len(got)
            if kind == "queued":
                f.queue.extend(got)
            else:
                f.live += got
            continue
        if poll <= t_next:
            now = poll
            poll += balancer.interval_s
            for f in fleet:  # an idle instance's clock follows the wall clock
                if not f.has_work():
                    f.t = max(f.t, now)
            if all(not f.has_work() for f in fleet) and not arrivals and not leaving:
                break
            loads = []
            for f in fleet:
                running = [SampleLoad(x.rid, x.prompt_len + x.done - 1, x.done, x.max_new) for x in f.live
                           if x.rid not in f.leaving]
                loads.append(InstanceLoad(f.index, len(f.live), len(f.queue), f.max_slots, f.reserved,
                                          sum(x.kv_tokens for x in running), 0.0, model.cal.saturation_live, running,
                                          [x.rid for x in f.queue]))
            thr = {ld.index: resolve_threshold(balancer.threshold, ld)[0] for ld in loads}
            thresholds = thr
            for o in plan(loads, thr, now, balancer.cooldown_s, last_order):
                src, dst = fleet[o.source], fleet[o.destination]
                last_order[o.source] = last_order[o.destination] = now
                ids = set(o.request_ids)
                if o.kind == "queued":
                    go = [x for x in src.queue if x.rid in ids]
                    src.queue = collections.deque(x for x in src.queue if x.rid not in ids)
                    dst.reserved += len(go)
                    arrivals.append((now + lat, dst.index, go, "queued"))
                    moves["requests_moved"] += len(go)
                else:
                    go = [x for x in src.live if x.rid in ids]
                    nbytes = sum(x.prompt_len + x.done - 1 for x in go) * model.kv_bytes_per_token
                    dst.reserved += len(go)
                    src.leaving |= ids
                    stage1 = lat + nbytes / bw
                    if balancer.two_stage:
                        leaving.append((now + stage1, src.index, dst.index, list(ids)))
                    else:  # stop-and-copy: frozen for the whole copy
                        src.live = [x for x in src.live if x.rid not in ids]
                        src.leaving -= ids
                        arrivals.append((now + stage1, dst.index, go, "running"))
                    moves["samples_moved"] += len(go)
                    moves["bytes_moved"] += nbytes
                moves["migrations"] += 1
            continue
        f = min(busy, key=lambda f: f.t)
        if not f.live and not f.queue:
            continue
        f.step()
    makespan = max(f.end for f in fleet)
    tokens = sum(f.tokens for f in fleet)
    batch_end = max(f.last_admit for f in fleet)
    return {"makespan_s": makespan, "tokens": tokens, "tokens_per_s": tokens / makespan if makespan else 0.0,
            "batch_s": batch_end, "tail_s": makespan - batch_end, "steps": sum(f.steps for f in fleet),
            "accepted_per_step": sum(f.accepted for f in fleet) / max(sum(f.steps for f in fleet), 1),
            "thresholds": sorted(set(thresholds.values())), **moves}


# ---- validation against the measured benchmarks ------------------------------------------------------------
def measured_rollout(path: Path, phase: str) -> dict:
    """bench.rollout's phase: median seconds per configuration (tokens / median tokens per second)."""
    d = json.loads(path.read_text())
    rows = {r["name"]: r for r in d["rows"] if r["phase"] == phase}
    static = rows["oracle"]["oracle_of"]
    out = {"none": rows["none"], "static": rows[static], "adaptive": rows["adaptive"]}
    return {"static_name": static, **{k: {"seconds": r["tokens"] / r["tokens_per_s"], "runs": r["repeats"]}
                                      for k, r in out.items()}}


def sorted_order(samples: list[Sample], per_prompt: int = 4) -> list[int]:
    """bench.reallocation's sorted_chunk ordering: prompts by (length, index), their samples adjacent."""
    prompts = sorted(range(len(samples) // per_prompt), key=lambda p: (samples[p * per_prompt].prompt_len, p))
    return [p * per_prompt + s for p in prompts for s in range(per_prompt)]


def validation_runs(trees: Trees) -> list[dict]:
    """Each measured configuration: where its median comes from and how to simulate it."""
    runs = []
    for phase in ("rollout", "live=16", "live=4", "live=1"):
        ro = measured_rollout(ROOT / "bench/results/rollout.json", phase)
        samples = recorded_samples(trees, phase)
        slots = trees.workloads[phase]["max_slots"]
        for config in ("none", "static", "adaptive"):
            name = config if config != "static" else f"static ({ro['static_name']})"
            runs.append({"instances": 1, "config": name, "phase": phase, "measured_s": ro[config]["seconds"],
                         "measured_runs": ro[config]["runs"], "source": f"bench/results/rollout.json ({phase})",
                         "sim": dict(samples=samples, instances=1, workload=phase, config=config, max_slots=slots,
                                     static=ro["static_name"], warm=samples)})
    re = json.loads((ROOT / "bench/results/reallocation.json").read_text())
    samples = recorded_samples(trees, "reallocation")
    ordered = [samples[i] for i in sorted_order(samples)]
    thr = [v[0] for run in re["tiny"]["runs"] for v in run.get("thresholds", {}).values()]
    bal = Balancer(threshold=int(statistics.median(thr)) if thr else "auto")
    slots = re["tiny"].get("workload", {}).get("max_slots", 32)
    warm = ordered[:64]  # bench.reallocation warms up on a quarter of the prompts
    for label, config, assignment, b in (("sorted_chunk/off", "adaptive", "chunk", None),
                                         ("sorted_chunk/two_stage", "adaptive+balancer", "chunk", bal),
                                         ("round_robin/off", "adaptive", "round_robin", None)):
        m = re["makespan_spread"][label]
        runs.append({"instances": 2, "config": f"{config} ({label.split('/')[0]})", "phase": "reallocation",
                     "measured_s": m["median"], "measured_runs": m["n"],
                     "source": f"bench/results/reallocation.json ({label})",
                     "measured_migrations": re["migrations"][label],
                     "sim": dict(samples=ordered if assignment == "chunk" else samples, instances=2,
                                 workload="reallocation", config=config, max_slots=slots, assignment=assignment,
                                 balancer=b, warm=warm)})
    return runs


def validate(trees: Trees, model: StepModel, log) -> tuple[list[dict], float]:
    """Simulated vs measured makespans. The calibration was profiled at another time than the benchmarks ran (on
    a shared machine speed varies by 2x), so one machine-speed factor is fitted: the median of measured / simulated
    over the `none` runs (plain decoding, 4 phases); every drafting and 2-instance configuration is then a
    prediction. Raw errors (factor 1) are kept."""
    runs = validation_runs(trees)
    raw = {}
    for i, r in enumerate(runs):
        raw[i] = simulate(model=model, trees=trees, **r["sim"])
    plain = [i for i, r in enumerate(runs) if r["sim"]["config"] == "none"]
    scale_ = statistics.median(runs[i]["measured_s"] / raw[i]["makespan_s"] for i in plain)
    scaled = copy.copy(model)
    scaled.time_scale = scale_
    rows = []
    for i, r in enumerate(runs):
        sim = simulate(model=scaled, trees=trees, **r["sim"])
        row = {"instances": r["instances"], "config": r["config"], "phase": r["phase"], "source": r["source"],
               "measured_runs": r["measured_runs"], "measured_s": round(r["measured_s"], 4),
               "simulated_s": round(sim["makespan_s"], 4), "error": round(sim["makespan_s"] / r["measured_s"] - 1, 4),
               "simulated_raw_s": round(raw[i]["makespan_s"], 4),
               "error_raw": round(raw[i]["makespan_s"] / r["measured_s"] - 1, 4), "steps": sim["steps"],
               "fitted": i in plain}
        if "measured_migrations" in r:
            row.update({"migrations": sim["migrations"], "measured_migrations": r["measured_migrations"]})
        rows.append(row)
        log(row)
    return rows, scale_


# ---- scale -------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """The batch each instance gets at scale (weak scaling: requests grow with instances)."""

    name: str
    requests_per_instance: int
    max_slots: int
    lengths: dict = field(default_factory=dict)  # {} = the recording's lengths, else log-normal parameters
    assignment: str = "round_robin"

    def samples(self, trees: Trees, instances: int, seed: int) -> list[Sample]:
        rng = np.random.default_rng(seed)
        n = self.requests_per_instance * instances
        if not self.lengths:  # bootstrap the recorded samples, whole GRPO groups
            rec = recorded_samples(trees, "reallocation")
            groups = rng.integers(len(rec) // 4, size=n // 4)
            out = []
            for g_new, g in enumerate(groups):
                for s in range(4):
                    x = copy.copy(rec[g * 4 + s])
                    x.rid, x.group = (g_new, s), g_new
                    out.append(x)
            return out
        L = self.lengths
        return synthetic_samples(trees, "reallocation", n, rng, L["median"], L["sigma"], L["max_new"], L["prompt"])


LENGTH_MEDIAN, LENGTH_SIGMA, LENGTH_CAP = 96, 1.0, 768  # --lengths


def cluster_workload(quick: bool) -> Workload:
    """configs/cluster_8b.yaml: 512 prompts x 4 over 8 instances of 96 slots (quick: 1.5 x slots per instance);
    response lengths log-normal (median 96, sigma 1.0: a long tail), capped at 768 of the config's 2048 new
    tokens so that the 64-instance runs finish in minutes here; prompts 64-256 tokens."""
    from configs.schema import load_config

    cfg = load_config(str(ROOT / "configs/cluster_8b.yaml"))
    g, t = cfg.generation, cfg.trainer
    per = t.prompts_per_iteration * t.samples_per_prompt // g.num_instances
    per = min(per, int(1.5 * g.max_slots)) if quick else per
    return Workload("cluster_8b", per, g.max_slots, {"median": LENGTH_MEDIAN, "sigma": LENGTH_SIGMA,
                                                     "max_new": min(g.max_new_tokens, LENGTH_CAP), "prompt": (64, 256)},
                    g.assignment)


def tiny_workload(quick: bool) -> Workload:
    """The tiny world's reallocation batch (recorded lengths), 32 slots, 128 requests per instance."""
    return Workload("tiny", 64 if quick else 128, 32)


def best_static(trees, model, work: Workload, candidates, log) -> str:
    """bench.rollout's fixed strategies, each simulated on one instance of the workload: the best is `static`."""
    samples = work.samples(trees, 1, 1)
    times = {c: simulate(samples, 1, model, trees, "reallocation", "static", work.max_slots, static=c)["makespan_s"]
             for c in candidates}
    best = min(times, key=times.get)
    log({"step_model": model.name, "static_candidates_s": {k: round(v, 4) for k, v in times.items()}, "best": best})
    return best


def scale(trees: Trees, model: StepModel, work: Workload, sizes, static: str, log, seed: int = 0,
          configs=CONFIGS) -> list[dict]:
    rows = []
    for n in sizes:
        samples = work.samples(trees, n, seed + n)
        warm = work.samples(trees, 1, seed + 10_000)[:work.max_slots]
        base = None
        for config in ("none",) + tuple(c for c in configs if c != "none"):  # none: the speed-ups' base
            bal = Balancer() if config == "adaptive+balancer" else None
            r = simulate(samples, n, model, trees, "reallocation", config, work.max_slots, work.assignment, static,
                         bal, warm)
            base = base or r
            row = {"step_model": model.name, "workload": work.name, "instances": n, "config": config,
                   "static": static if config == "static" else None,
                   "makespan_s": round(r["makespan_s"], 4), "tokens_per_s": round(r["tokens_per_s"], 1),
                   "speedup": round(base["makespan_s"] / r["makespan_s"], 4), "migrations": r["migrations"],
                   "requests_moved": r["requests_moved"], "samples_moved": r["samples_moved"],
                   "bytes_moved": r["bytes_moved"], "batch_s": round(r["batch_s"], 4), "tail_s": round(r["tail_s"], 4),
                   "gain_batch_s": round(base["batch_s"] - r["batch_s"], 4),
                   "gain_tail_s": round(base["tail_s"] - r["tail_s"], 4),
                   "accepted_per_step": round(r["accepted_per_step"], 3), "thresholds": r["thresholds"]}
            rows.append(row)
            log(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["step_model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for c in CONFIGS[1:]:
            pts = sorted((r["instances"], r["speedup"]) for r in rows if r["step_model"] == m and r["config"] == c)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="none")
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(r["instances"] for r in rows) / 1.5, max(r["instances"] for r in rows) * 1.5)
        ax.set_xlabel("generation instances")
        ax.set_ylabel("rollout speed-up over none")
        ax.set_title(f"{m} ({next(r['workload'] for r in rows if r['step_model'] == m)})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- what-if -----------------------------------------------------------------------------------------------
def what_if(trees: Trees, model: StepModel, work: Workload, instances: list[int], slots: list[int],
            thresholds: list, static: str, log) -> dict:
    """For the user's step model and workload: makespan of adaptive+balancer per (instances, max_slots,
    threshold), the total batch fixed (requests = requests_per_instance x the first instance count)."""
    total = work.requests_per_instance * instances[0]
    samples = work.samples(trees, instances[0], 7)[:total]
    rows = []
    for n in instances:
        for sl in slots:
            for th in thresholds:
                r = simulate(samples, n, model, trees, "reallocation", "adaptive+balancer", sl, work.assignment,
                             static, Balancer(threshold=th), samples[:sl])
                rows.append({"instances": n, "max_slots": sl, "threshold": th, "makespan_s": round(r["makespan_s"], 3),
                             "tokens_per_s": round(r["tokens_per_s"], 1),
                             "tokens_per_s_per_instance": round(r["tokens_per_s"] / n, 1),
                             "migrations": r["migrations"]})
                log(rows[-1])
    best = min(rows, key=lambda r: r["makespan_s"])
    per = max(rows, key=lambda r: r["tokens_per_s_per_instance"])
    return {"rows": rows, "fastest": best, "most_efficient": per, "requests": total}


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/simulate.json", help="JSON to write (PNG beside it)")
    ap.add_argument("--quick", action="store_true", help="8 and 16 instances, a quarter of the batch")
    ap.add_argument("--validate", action="store_true", help="validation (1 and 2 instances) and the scale tables")
    ap.add_argument("--what-if", action="store_true", help="sweep instances, max_slots and threshold")
    ap.add_argument("--step-model", action="append", default=None,
                    help="cpu | h200-old | h200-new | roofline:h200:8b | a calibration file (repeatable)")
    ap.add_argument("--trees", default=str(TREES), help="bench.sim_record's recording")
    ap.add_argument("--instances", default="8,16,32,64")
    ap.add_argument("--slots", default="32,64,96,128", help="--what-if: max_slots to try")
    ap.add_argument("--thresholds", default="auto,16,48", help="--what-if: balancer thresholds to try")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="configurations to simulate at scale")
    ap.add_argument("--static", default="auto", help="the static strategy: auto (the best of bench.rollout's "
                                                     "fixed strategies on one instance) or a strategy")
    ap.add_argument("--no-validation", action="store_true", help="with --validate: the scale tables only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    trees = Trees(args.trees)

    def log(r):
        print(json.dumps(r), flush=True)

    sizes = [int(x) for x in args.instances.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 16]
    specs = args.step_model or (["h200-new", "h200-old", "cpu"] if args.validate else ["h200-new"])
    models = []
    for spec in specs:
        try:
            models.append(load_step_model(spec, trees))
        except (FileNotFoundError, ValueError) as e:
            print(f"[simulate] step model {spec}: skipped ({e})", flush=True)
    for m in models:
        print(f"[simulate] step model {m.name}: {m.note}; saturation point {m.cal.saturation_live} live; "
              f"K/V {m.kv_bytes_per_token} B/token; prefill {m.prefill}", flush=True)
    def save(res):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**res, "seconds": round(time.time() - t0, 1)}, indent=1))

    result = {"config": {"quick": args.quick, "seed": args.seed, "threads": 1, "machine": platform.machine(),
                         "cpus": os.cpu_count(), "trees": args.trees,
                         "step_models": {m.name: m.note for m in models},
                         "notes": "makespan = simulated wall time of one rollout (prefill + steps + migrations); "
                                  "speedup = none's makespan / this one's; batch_s = until the last request was "
                                  "admitted anywhere, tail_s = the rest; gain_* = none's phase time - this one's"}}
    if args.validate:
        if not args.no_validation:
            cpu = next((m for m in models if m.name == "cpu"), None) or load_step_model("cpu", trees)
            result["validation"], result["cpu_time_scale"] = validate(trees, cpu, log)
            checked = [r for r in result["validation"] if not r["fitted"]]
            worst = max(checked, key=lambda r: abs(r["error"]))
            result["targets"] = {"every validation error <= 15% (the fitted none rows excluded)":
                                 all(abs(r["error"]) <= 0.15 for r in checked),
                                 "largest_error": {k: worst[k] for k in ("instances", "config", "phase", "error")}}
        result["scale"] = []
        save(result)
        for m in models:
            work = tiny_workload(args.quick) if m.name == "cpu" else cluster_workload(args.quick)
            static = args.static if args.static != "auto" else best_static(
                trees, m, work, ["chain:2", "tree:3,2,6"] if args.quick else
                ["chain:2", "chain:4", "tree:3,2,6", "tree:4,2,10", "tree:6,3,24"], log)
            for n in sizes:  # saved after each size: a long run leaves what it finished
                result["scale"] += scale(trees, m, work, [n], static, log, args.seed, args.configs.split(","))
                save(result)
        png = Path(args.out).with_suffix(".png")
        plot(result["scale"], png)
        result["plots"] = [str(png)]
        print(table(result.get("validation", []), ["instances", "config", "measured_s", "simulated_s", "error"]))
        print(table(result["scale"], ["step_model", "instances", "config", "makespan_s", "tokens_per_s", "speedup",
                                      "migrations", "bytes_moved", "gain_batch_s", "gain_tail_s"]))
    if args.what_if:
        result["what_if"] = {}
        for m in models:
            work = tiny_workload(args.quick) if m.name == "cpu" else cluster_workload(args.quick)
            th = [t if t == "auto" else int(t) for t in args.thresholds.split(",")]
            w = what_if(trees, m, work, sizes, [int(s) for s in args.slots.split(",")], th, "chain:2", log)
            result["what_if"][m.name] = w
            print(f"[what-if {m.name}] {w['requests']} requests: fastest {w['fastest']}; "
                  f"most tokens/s per instance {w['most_efficient']}")
    result["seconds"] = round(time.time() - t0, 1)
    save(result)
    print(f"[simulate] wrote {args.out} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
