"""The rollout fleet: N generation instances, one request split, one gather, nothing lost.

With the load balancer on, queued requests and running samples (with their KV) move between instances while
they decode; the fleet's record of which instance holds each request follows every confirmed move. A request
whose instance dies goes to a live one and restarts from its prompt; its per-request seed makes the restarted
sample the one the dead instance would have produced. A new instance is made in the dead one's place; it joins
the weight and K/V groups, and takes work, from the next weight push on (it decodes with pushed weights only), or,
with the balancer on, joins the rollout under way with a live instance's weights.
"""
from __future__ import annotations

import time

import ray
from tqdm import tqdm

from actors.generation import GenerationInstanceActor
from actors.load_balancer import LoadBalancerActor, OrderResult, order_line
from actors.weight_sync import ACTOR_SRC, DRAFT_SRC
from configs.schema import BalancerConfig, GenerationConfig, rollout_drafts_on
from migration.planner import MigrationOrder
from trainer.loop.deadline import Stuck, wait
from trainer.loop.recovery import probe, ray_reason


class RolloutError(RuntimeError):
    pass


def assign(n: int, workers: int, assignment: str, group_size: int = 1, whole_groups: bool = False) -> list[list[int]]:
    """Request positions per worker; the `group_size` samples of one prompt are adjacent. round_robin: request k to
    worker k % workers, or with `whole_groups` (rollout drafts on: siblings draft from each other, so a group stays
    on one instance) group g to worker g % workers. chunk: contiguous slices of whole groups (the samples of one
    prompt stay together, as Verl splits a batch), sizes differing by one group."""
    groups = [list(range(g, min(g + group_size, n))) for g in range(0, n, max(group_size, 1))]
    if assignment == "round_robin":
        if not whole_groups or group_size <= 1:
            return [list(range(w, n, workers)) for w in range(workers)]
        return [[i for grp in groups[w::workers] for i in grp] for w in range(workers)]
    if assignment != "chunk":
        raise ValueError(f"generation.assignment: {assignment!r} is not one of round_robin, chunk")
    base, extra = divmod(len(groups), workers)
    out, g = [], 0
    for w in range(workers):
        take = base + (w < extra)
        out.append([i for grp in groups[g:g + take] for i in grp])
        g += take
    return out


def balance_totals(report: dict) -> dict:
    """One rollout's reallocation, as tracker metrics."""
    orders = report.get("orders", [])
    running = [r for r in orders if r["order"]["kind"] == "running" and r["moved"]]
    return {"balance/migrations": sum(bool(r["moved"]) for r in orders),  # orders that moved something
            "balance/samples_moved": sum(len(r["moved"]) for r in running),
            "balance/requests_moved": sum(len(r["moved"]) for r in orders if r["order"]["kind"] == "queued"),
            "balance/bytes": sum(r["bytes"] for r in orders),
            "balance/frozen_s": sum(r["frozen_ms"] or 0.0 for r in running) / 1000,
            "balance/failed_orders": sum(r["outcome"] == "aborted" for r in orders)}


def order_deadline_s(cfg: BalancerConfig) -> float:
    """The longest a migration order may stay open (a reservation, two stages of collective ops each bounded by
    the transfer timeout, the verdict) before the fleet takes its balancer for stuck."""
    return 4 * cfg.transfer_timeout_s + 10


def merge_reports(parts: list[dict]) -> dict:
    """One rollout's balancer report from the reports of the balancers it ran (a new one after a replacement
    joined): orders and moves in order, the latest thresholds, every quarantined instance."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else {}
    return {"orders": [o for p in parts for o in p["orders"]], "moves": [m for p in parts for m in p["moves"]],
            "thresholds": {k: v for p in parts for k, v in p["thresholds"].items()},
            "quarantined": sorted({q for p in parts for q in p["quarantined"]})}


def kv_settings(gen: GenerationConfig) -> dict:
    """The engine's K/V cache arguments from the generation config."""
    GiB = 1 << 30
    return {"kv_cache": gen.kv_cache, "kv_block": gen.kv_block, "swap_bytes": int(gen.kv_swap_gb * GiB),
            "kv_bytes": None if gen.kv_memory_gb is None else int(gen.kv_memory_gb * GiB)}


def suffix_config(gen: GenerationConfig):
    """The engine's rollout drafts (`drafting.spec.suffix.SuffixConfig`) from the generation config; None when
    generation.rollout_drafts resolves to off."""
    if not rollout_drafts_on(gen):
        return None
    from drafting.spec.suffix import SuffixConfig

    r = gen.rollout
    return SuffixConfig(min_match=r.min_match, max_match=r.max_match, max_depth=r.max_depth, min_count=r.min_count,
                        history_per_prompt=r.history_per_prompt,
                        history_bytes=int(r.history_mb * (1 << 20))).validate("generation.rollout")


def history_store(gen: GenerationConfig):
    """The run's HistoryStore (earlier epochs' responses per prompt, kept by the driver across iterations and
    checkpoints, never by an instance), or None when rollout drafts are off."""
    cfg = suffix_config(gen)
    if cfg is None:
        return None
    from drafting.spec.suffix import HistoryStore

    return HistoryStore(cfg)


SOURCES = ("self", "sibling", "history")  # drafting.spec.suffix.SOURCES: where a rollout chain came from


def rollout_draft_metrics(sums: dict, sample_steps: int, seconds: float, instances: int) -> dict:
    """`rollout/*` of the rollout drafts from the instances' summed windows (`GenerationInstance.rollout_summary`):
    the counts as they are, chain tokens accepted per sample-step (in all and by source), the hit rates of the
    lookups (any chain, a history chain), the index's peak size, and the share of the instances' rollout time spent
    in lookups and index updates."""
    if not sums:
        return {}
    out = {f"rollout/{k.replace('index_index_', 'index_')}": v for k, v in sums.items()}
    steps = max(sums.get("sample_steps") or sample_steps, 1)  # the engines' own count, else the outputs'
    if "chain_tokens" in sums:
        out["rollout/chain_tokens_per_step"] = sums["chain_tokens"] / steps
    for src in SOURCES:
        if f"chain_tokens_{src}" in sums:
            out[f"rollout/chain_tokens_per_step_{src}"] = sums[f"chain_tokens_{src}"] / steps
    lookups = sums.get("index_lookups", 0)
    if lookups:
        out["rollout/hit_rate"] = sums.get("index_hits", 0) / lookups
        out["rollout/history_hit_rate"] = sums.get("chains_history", 0) / lookups
    if "index_lookup_s" in sums and seconds > 0:
        out["rollout/lookup_frac"] = sums["index_lookup_s"] / (seconds * max(instances, 1))
    return out


class RolloutFleet:
    def __init__(self, gen: GenerationConfig, actor_path: str, draft_path: str, dtype: str = "float32",
                 balancer: BalancerConfig | None = None, restarts=None, sync_timeout_s: float = 120.0,
                 call_timeout_s: float | None = None):
        """restarts: the run's Restarts (a replaced instance spends one); sync_timeout_s: the weight group's op
        timeout; call_timeout_s: the deadline of every wait on an instance."""
        device = "cuda" if gen.gpus_per_instance > 0 else "cpu"
        self.rollout_drafts = suffix_config(gen)  # None: off; on, a request group stays on one instance
        # threads for collect, the balancer's polls, and both ends of migration orders beside the step loop
        cls = GenerationInstanceActor.options(num_cpus=gen.cpus_per_instance, num_gpus=gen.gpus_per_instance,
                                              max_concurrency=8)
        self._make = lambda i: cls.remote(i, actor_path, draft_path, gen.strategy, gen.max_slots, gen.max_len,  # noqa: E731
                                          device, gen.threads_per_instance, dtype, gen.calibration, gen.attention,
                                          gen.cuda_graphs, gen.compile, gen.profile_budget_s, gen.profile_fallback,
                                          kv_settings(gen), self.rollout_drafts)
        self.restarts, self.sync_timeout_s, self.timeout_s = restarts, sync_timeout_s, call_timeout_s
        self.instances = [self._make(i) for i in range(gen.num_instances)]
        wait([inst.ping.remote() for inst in self.instances], self.timeout_s, "generation instance start-up")
        self.alive = list(range(len(self.instances)))
        self.joining: list[int] = []  # replacements of dead instances, alive from the next weight push
        self._join_pings: dict = {}  # their start-up pings
        self._reports: list[dict] = []
        self.backend = "nccl" if device == "cuda" else "gloo"
        self._weight_group_ready = False
        self._weight_senders = 0  # policy rank 0, plus the draft trainer when the draft adapts online
        self.assignment = gen.assignment
        self.balancer_cfg = balancer if balancer is not None else BalancerConfig()
        self.balancer = None  # the LoadBalancer actor, made on first use
        self._kv_ranks: dict[int, int] | None = None  # instance -> rank in the KV group; None = to (re)build
        self._kv_epoch = 0
        self._saturation_read = False
        self.last_balance: dict = {}  # the last rollout's balancer report (orders, moves, thresholds)
        if self.balancer_cfg.enabled:
            self._ready_balancer()

    def restart(self, gen: GenerationConfig, balancer: BalancerConfig) -> None:
        """Start the next run on these instances as on new ones (benchmarks run many short runs on one set of
        actors): every instance makes a new engine from the model files with this run's strategy and slots, the
        split and the balancer take its settings, and the next weight push forms the group anew. The model
        paths, instance count and devices stay those the fleet was made with."""
        if not self.alive or len(self.alive) != gen.num_instances:
            raise RolloutError(f"restart: {len(self.alive)} live instances, the run wants {gen.num_instances}")
        self.rollout_drafts = suffix_config(gen)
        ray.get([self.instances[i].restart.remote(gen.strategy, gen.max_slots, self.rollout_drafts)
                 for i in self.alive])
        self.assignment = gen.assignment
        self._weight_group_ready = False
        self._saturation_read = False
        self.last_balance = {}
        self.set_balancer(balancer)

    def set_balancer(self, cfg: BalancerConfig) -> None:
        """Balancer settings for the next rollouts (e.g. off / two-stage / stop-and-copy in one benchmark)."""
        self.balancer_cfg = cfg
        if self.balancer is not None:
            ray.get(self.balancer.configure.remote(cfg))
        if cfg.enabled:
            self._ready_balancer()

    def run(self, requests: list, progress: bool = False, group_size: int = 1) -> list:
        """Split the requests over the instances (generation.assignment; `group_size` samples of one prompt are
        adjacent) and return every output exactly once, in request order."""
        by_id = {r.request_id: r for r in requests}
        if len(by_id) != len(requests):
            raise RolloutError("duplicate request ids in one rollout")
        owner = {}  # request id -> the instance that holds it, until its output is in
        # (positional: bench/faults.py swaps `assign` for a split of its own)
        split = assign(len(requests), len(self.alive), self.assignment, group_size, self.rollout_drafts is not None)
        for inst, positions in zip(self.alive, split):
            owner.update({requests[k].request_id: inst for k in positions})
        balancing = self.balancer_cfg.enabled and len(self.alive) > 1
        self._moves_applied = 0
        self._reports = []  # balancer reports of this rollout before a replacement joined it
        if balancing:
            self._start_balancer()
        wait([self.instances[i].submit.remote([requests[k] for k in positions])
              for i, positions in zip(self.alive, split) if positions], self.timeout_s, "rollout submit")
        outputs = {}
        try:
            with tqdm(total=len(requests), desc="rollout", unit="sample", leave=False, disable=not progress) as bar:
                while len(outputs) < len(requests):
                    if balancing and (reason := self._balancer_died()):
                        self._settle_without_balancer(owner, by_id, reason)
                        balancing = False  # a new balancer from the next rollout on
                    if balancing and self._joining_ready():
                        self._join_rollout(owner)
                    polls = {i: self.instances[i].collect.remote(0.2) for i in self.alive}
                    for i, ref in polls.items():
                        try:
                            done = wait(ref, self.timeout_s, f"generation instance {i}")
                        except (ray.exceptions.RayActorError, Stuck) as e:
                            self._reassign(i, owner, by_id, balancing, ray_reason(e))
                            balancing = balancing and self.balancer is not None  # (it died too)
                            continue
                        for out in done:
                            if out.request_id in outputs or out.request_id not in by_id:
                                raise RolloutError(f"instance {i} returned {out.request_id!r} twice or unasked")
                            outputs[out.request_id] = out
                            owner.pop(out.request_id, None)
                        bar.update(len(done))
        finally:
            self.last_balance = merge_reports(self._reports + [self._stop_balancer()]) if balancing else {}
        return [outputs[r.request_id] for r in requests]

    def _joining_ready(self) -> bool:
        """Every replacement started (one ping each in flight, checked without waiting)."""
        if not self.joining:
            return False
        pings = [self._join_pings[i] for i in self.joining]
        return len(ray.wait(pings, num_returns=len(pings), timeout=0)[0]) == len(pings)

    def _join_rollout(self, owner: dict) -> None:
        """Replacements join the rollout under way (the balancer is on, so they get work by its moves): the
        balancer stops (its orders end, its moves go into the ownership record), the KV group re-forms with
        them, a live instance sends them its weights (and draft) over it, and a new balancer starts over all."""
        report = self._stop_balancer()
        self._apply_moves(owner, report.get("moves", []))
        self._reports.append(report)
        self._moves_applied = 0
        new, donor = list(self.joining), self.alive[0]
        self._admit_joining()
        ranks = self._ensure_kv_group()
        st = wait(self.instances[donor].stats.remote(), self.timeout_s, f"generation instance {donor}")
        for i in new:  # one at a time: the donor's sends to one peer are one ordered stream
            wait([self.instances[donor].send_weights_to.remote(ranks[i]),
                  self.instances[i].receive_weights_from.remote(ranks[donor], st.weight_version, st.draft_version)],
                 self.timeout_s, "weights for a new instance")
        print(f"generation instance{'s' * (len(new) > 1)} {', '.join(map(str, new))} (new) joined the rollout "
              f"with instance {donor}'s weights", flush=True)
        self._start_balancer()

    def _apply_moves(self, owner: dict, moves: list) -> None:
        """The balancer's moves (request id, source, destination) not yet in the ownership record, into it."""
        for rid, _, destination in moves[self._moves_applied:]:
            if rid in owner:
                owner[rid] = destination
        self._moves_applied = len(moves)

    def _balancer_died(self) -> str | None:
        """Ray's reason when the balancer died during this rollout, or why it counts as stuck: its ping (one in
        flight at a time) or an order of its open longer than an order can take (`order_deadline_s`). Else None.
        Either way the fleet settles its orders itself."""
        now, limit = time.monotonic(), order_deadline_s(self.balancer_cfg)
        ping = getattr(self, "_balancer_ping", None)
        if ping is not None and ray.wait([ping], timeout=0)[0]:
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError as e:
                self._balancer_ping = None
                return ray_reason(e)
            ping = None
        if ping is None:
            self._balancer_ping, self._ping_sent = self.balancer.__ray_ready__.remote(), now
        elif now - self._ping_sent > limit:
            return f"stuck: no answer for {now - self._ping_sent:.0f} s"
        if now - getattr(self, "_orders_checked", 0.0) >= 1.0:  # the instances' open orders, once a second
            self._orders_checked = now
            try:
                held = wait([self.instances[i].open_orders.remote() for i in self.alive], self.timeout_s, "orders")
            except (ray.exceptions.RayActorError, Stuck):
                return None  # a dead instance: the rollout loop's poll of it deals with that first
            oldest = max(((o["age_s"], o["order_id"]) for orders in held for o in orders), default=None)
            if oldest is not None and oldest[0] > limit:
                return f"stuck: its order {oldest[1]} open for {oldest[0]:.0f} s"
        return None

    def _settle_without_balancer(self, owner: dict, by_id: dict, reason: str) -> None:
        """The balancer died (or is stuck), maybe with orders open: a source holding frozen samples and reserved
        slots, a destination holding imported samples whose outputs wait for the verdict, a source holding queued
        requests on loan. The fleet gives the verdict the balancer would have (a sample moved iff the destination
        imported or queued it) once both sides' transfers have ended (they fail within the KV timeout without a
        peer), so each sample lives on in exactly one place; then the ownership record is read back from the
        instances. Instances that died too are left out of the verdicts, then their samples are resubmitted."""
        ray.kill(self.balancer)
        self.balancer, self._balancer_ping = None, None
        dead = probe({i: self.instances[i] for i in self.alive})
        self.alive = [i for i in self.alive if i not in dead]  # (back below, each then reassigned)
        deadline = time.monotonic() + 4 * self.balancer_cfg.transfer_timeout_s + 60
        while True:
            held = dict(zip(self.alive, wait([self.instances[i].open_orders.remote() for i in self.alive],
                                             self.timeout_s, "open migration orders")))
            if not any(o["transferring"] for orders in held.values() for o in orders):
                break
            if time.monotonic() > deadline:
                raise RolloutError("migration orders of the dead load balancer did not end")
            time.sleep(0.05)
        sides: dict[int, dict] = {}  # order id -> {"in"/"out": (instance, order)}
        for i, orders in held.items():
            for o in orders:
                sides.setdefault(o["order_id"], {})[o["side"]] = (i, o)
        moved_n = resumed_n = 0
        for oid, both in sorted(sides.items()):
            moved = both["in"][1]["request_ids"] if "in" in both else []
            if "out" in both:
                src, o = both["out"]
                wait(self.instances[src].finish_out.remote(oid, moved), self.timeout_s, "migration verdict")
                resumed_n += len(set(o["request_ids"]) - set(moved))
            if "in" in both:
                wait(self.instances[both["in"][0]].finish_in.remote(oid), self.timeout_s, "migration verdict")
            moved_n += len(moved)
            if "lent" in both:  # a queued order: moved iff an instance queued them; the rest go back to the source
                src, o = both["lent"]
                ids = o["request_ids"]
                there = {r for i in self.alive if i != src
                         for r in wait(self.instances[i].close_lent.remote(oid, ids), self.timeout_s, "queued order")}
                back = [r for r in ids if r not in there]
                wait(self.instances[src].finish_lent.remote(oid, back), self.timeout_s, "migration verdict")
                moved_n, resumed_n = moved_n + len(ids) - len(back), resumed_n + len(back)
        loads = wait([self.instances[i].load.remote() for i in self.alive], self.timeout_s, "instance loads")
        for i, load in zip(self.alive, loads):  # moves the dead balancer confirmed are in here too
            for rid in [s.request_id for s in load.samples] + list(load.queued_ids):
                if rid in owner:
                    owner[rid] = i
        self._kv_ranks = None  # fresh KV channels with the next balancer
        then = (f"its {len(sides)} open order{'s' * (len(sides) != 1)} settled by the fleet ({moved_n} samples moved, {resumed_n} resumed "
                f"at their source); a new balancer from the next rollout on")
        if self.restarts is not None:
            self.restarts.take("load balancer", reason, then)
        else:
            print(f"load balancer died ({reason}); {then}", flush=True)
        for i, why in sorted(dead.items()):
            self.alive = sorted(self.alive + [i])
            self._reassign(i, owner, by_id, False, why)

    def _reassign(self, dead: int, owner: dict, by_id: dict, balancing: bool, reason: str = "") -> None:
        if balancing:  # orders in flight with the dead instance end first; then the record has every move
            try:
                moves = wait(self.balancer.settle.remote(dead), self.timeout_s, "load balancer settle")
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, Stuck) as e:  # it died or is stuck too
                self._settle_without_balancer(owner, by_id, ray_reason(e))
                return
        self.alive.remove(dead)
        self._weight_group_ready = False  # the old groups counted the dead instance
        self._kv_ranks = None
        if balancing:
            self._apply_moves(owner, moves)
        orphans = [rid for rid in by_id if owner.get(rid) == dead]  # request order: a reproducible schedule
        if not self.alive:
            raise RolloutError(f"every generation instance died; {len(orphans)} samples could not finish")
        joins = "joins this rollout once started" if balancing else "takes work from the next weight push on"
        self._replace(dead, reason, f"its {len(orphans)} samples resubmitted to the live instances; a new instance "
                                    f"{joins}")
        for n, rid in enumerate(orphans):
            target = self.alive[n % len(self.alive)]
            wait(self.instances[target].submit.remote([by_id[rid]]), self.timeout_s, "rollout resubmit")
            owner[rid] = target

    def _replace(self, dead: int, reason: str, then: str) -> None:
        """One restart line, and a new instance in the dead one's place (it joins at the next weight push)."""
        if self.restarts is not None:
            self.restarts.take(f"generation instance {dead}", reason, then)
        else:
            print(f"generation instance {dead} died ({reason}); {then}", flush=True)
        ray.kill(self.instances[dead])  # a stuck one; a dead one is gone already
        self.instances[dead] = self._make(dead)
        self.joining.append(dead)
        self._join_pings[dead] = self.instances[dead].ping.remote()  # ready when it answers

    def _admit_joining(self) -> None:
        """Replacements join before a weight push: the push forms the groups anew and gives them the weights."""
        if not self.joining:
            return
        wait([self.instances[i].ping.remote() for i in self.joining], self.timeout_s, "new generation instance")
        self.alive, self.joining, self._join_pings = sorted(self.alive + self.joining), [], {}
        self._weight_group_ready = False
        self._kv_ranks = None
        self._saturation_read = False

    def reset_weight_group(self) -> None:
        """The next weight push forms the group anew (new senders after a restart)."""
        self._weight_group_ready = False

    # --- sample reallocation ----------------------------------------------------------------------
    def _ensure_kv_group(self) -> dict[int, int]:
        """The live instances' own collective group for KV (not the weight-sync group), rebuilt after a death
        or a failed transfer."""
        if self._kv_ranks is None:
            self._kv_epoch += 1
            host, port = ray.get(self.instances[self.alive[0]].kv_group_address.remote())
            world, timeout = len(self.alive), self.balancer_cfg.transfer_timeout_s
            ray.get([self.instances[i].join_kv_group.remote(host, port, rank, world, self.backend,
                                                            f"kv{self._kv_epoch}", timeout)
                     for rank, i in enumerate(self.alive)])
            self._kv_ranks = {i: rank for rank, i in enumerate(self.alive)}
        return self._kv_ranks

    def _ready_balancer(self) -> None:
        """The balancer actor, the KV group and (threshold auto) the instances' saturation points, made before a
        rollout needs them (each takes seconds; a saturation point may need a profile of the model pair)."""
        if len(self.alive) > 1:
            self._ensure_kv_group()
        if self.balancer_cfg.threshold == "auto" and not self._saturation_read:
            points = ray.get([self.instances[i].resolve_saturation.remote() for i in self.alive])
            self._saturation_read = None not in points  # a first-use profile still running: read again next time
        if self.balancer is None:
            ray.get([self.instances[i].clear_closed.remote() for i in self.alive])  # its order ids start at 1
            self.balancer = LoadBalancerActor.remote(self.balancer_cfg)
            # a first start connects the balancer to every instance (seconds under load): not in a rollout
            handles = {i: self.instances[i] for i in self.alive}
            ray.get(self.balancer.start.remote(handles, self._kv_ranks or {}, False))
            ray.get(self.balancer.stop.remote())

    def _stop_balancer(self) -> dict:
        """The rollout's balancer report; a dead balancer (its orders had ended: the rollout did) is replaced."""
        try:
            return wait(self.balancer.stop.remote(), self.timeout_s, "load balancer")
        except (ray.exceptions.RayActorError, Stuck) as e:
            then = "a new balancer from the next rollout on; this rollout's orders are not reported"
            if self.restarts is not None:
                self.restarts.take("load balancer", ray_reason(e), then)
            ray.kill(self.balancer)
            self.balancer = None
            return {}

    def _start_balancer(self, auto: bool = True) -> None:
        self._balancer_ping = None  # a ping of an earlier balancer says nothing about this one
        if self.last_balance.get("quarantined"):
            self._kv_ranks = None  # a transfer failed last time: fresh channels
        self._ready_balancer()
        ray.get(self.balancer.start.remote({i: self.instances[i] for i in self.alive}, self._kv_ranks or {}, auto))

    def migrate(self, source: int, destination: int, request_ids: list, reason: str = "manual",
                kind: str = "running") -> OrderResult:
        """Carry out one order now, outside a rollout's loop (benchmarks; the samples were submitted directly)."""
        self._start_balancer(auto=False)
        result = ray.get(self.balancer.execute.remote(MigrationOrder(source, destination, list(request_ids),
                                                                     reason, kind)))
        self.last_balance = ray.get(self.balancer.stop.remote())
        return result

    def balance_metrics(self) -> dict:
        """The last rollout's reallocation totals for the tracker (empty when the balancer is off)."""
        return balance_totals(self.last_balance) if self.last_balance else {}

    def balance_log(self) -> list[str]:
        """The last rollout's thresholds and orders, one line each, every order with its reason."""
        if not self.last_balance:
            return []
        thresholds = [f"instance {i}: threshold {value} live samples ({source})"
                      for i, (value, source) in sorted(self.last_balance["thresholds"].items())]
        return thresholds + [order_line(r) for r in self.last_balance["orders"]]

    def drafting_metrics(self) -> dict:
        """The draft strategy's per-rollout figures (`drafting.steplog.summarize`), averaged over live instances,
        as tracker metrics `drafting/*`."""
        summaries = [s for s in ray.get([self.instances[i].drafting_summary.remote() for i in self.alive]) if s]
        keys = sorted({k for s in summaries for k in s})
        return {f"drafting/{k}": sum(s[k] for s in summaries if k in s) / sum(k in s for s in summaries)
                for k in keys}

    def kv_metrics(self) -> dict:
        """`rollout/*` of the K/V memory over the instances: preemptions and resumes, prompt tokens prefilled and
        shared by request groups (summed), and the fullest pool's peak occupancy."""
        parts = wait([self.instances[i].kv_summary.remote() for i in self.alive], self.timeout_s, "K/V summaries")
        out = {f"rollout/{k}": sum(p[k] for p in parts) for k in ("preemptions", "resumed", "prefill_tokens",
                                                                  "shared_tokens")}
        out["rollout/kv_peak_frac"] = max((p["kv_peak_frac"] for p in parts), default=0.0)
        return out

    def rollout_summaries(self) -> dict:
        """The rollout drafts' windows since the last call (`GenerationInstance.rollout_summary`), summed over the
        live instances ({} when they are off); `rollout_draft_metrics` makes the tracker's `rollout/*` of them."""
        if self.rollout_drafts is None:
            return {}
        parts = wait([self.instances[i].rollout_summary.remote() for i in self.alive], self.timeout_s,
                     "rollout draft summaries")
        sums: dict = {}
        for part in parts:
            for k, v in part.items():
                sums[k] = sums.get(k, 0) + v
        return sums

    def stats(self) -> list:
        return ray.get([self.instances[i].stats.remote() for i in self.alive])

    def shutdown(self) -> None:
        for handle in self.instances + ([self.balancer] if self.balancer is not None else []):
            ray.kill(handle)

    def sync_weights_from(self, policy, version: int = 0, draft=None) -> dict:
        """One weight push over the weight group to all live instances (and new ones in dead ones' places): trainer
        rank 0 broadcasts every actor parameter, then the draft trainer (if given; rank 1 of the group) every draft
        parameter. `version` labels the push; instances report it. Returns the slowest instance's seconds per part.
        An instance that dies during the push is replaced and the push redone; a dead sender is the caller's."""
        self._admit_joining()
        try:
            return self._push(policy, version, draft)
        except (ray.exceptions.RayError, Stuck):
            dead = probe({i: self.instances[i] for i in self.alive})
            if not dead:
                raise
            for i, reason in dead.items():
                self.alive.remove(i)
                self._replace(i, reason, "a new instance in its place; the weight push is redone")
            self._admit_joining()
            return self._push(policy, version, draft)

    def _push(self, policy, version: int, draft) -> dict:
        senders = [policy.actors[0]] + ([draft] if draft is not None else [])
        timeout = self.timeout_s
        if not self._weight_group_ready or self._weight_senders != len(senders):
            host, port = wait(senders[0].weight_group_address.remote(), timeout, "weight group address")
            world = len(senders) + len(self.alive)
            joins = [sender.join_weight_group.remote(host, port, rank, world, self.backend, self.sync_timeout_s)
                     for rank, sender in enumerate(senders)]
            joins += [self.instances[i].join_weight_group.remote(host, port, rank, world, self.backend,
                                                                 self.sync_timeout_s)
                      for rank, i in enumerate(self.alive, start=len(senders))]
            wait(joins, timeout, "weight group")
            self._weight_group_ready, self._weight_senders = True, len(senders)
            # names, shapes and dtypes never change during a run: asked once per group (under ZeRO-3 each ask
            # gathers every parameter)
            self._specs = wait(policy.call_all("weight_specs"), timeout, "weight specs")[0]
            self._draft_specs = wait(draft.weight_specs.remote(), timeout, "draft specs") if draft is not None else None
        specs, draft_specs = self._specs, self._draft_specs
        receives = [self.instances[i].receive_weights.remote(specs, version, draft_specs, version) for i in self.alive]
        sends = policy.call_all("broadcast_weights")
        if draft is not None:  # each sender joins the other's broadcast; calls to one actor run in this order
            sends += [policy.actors[0].drop_broadcast.remote(draft_specs, DRAFT_SRC),
                      draft.drop_broadcast.remote(specs, ACTOR_SRC), draft.broadcast_weights.remote()]
        try:
            wait(sends, timeout, "weight push (senders)")
            times = wait(receives, timeout, "weight push (instances)")
        except BaseException:
            self._weight_group_ready = False  # a member failed: the group is not trusted again
            raise
        return {part: max(t[part] for t in times) for part in ("target_s", "draft_s")}
