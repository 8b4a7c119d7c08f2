"""LoadBalancer: a Ray actor that polls the generation instances' loads on an interval, plans migration orders
with `migration.planner` and carries them out. The policy lives in the planner, the transfer protocol in
`migration.transfer`; KV goes instance to instance over their collective group, never through here.

An order's verdict is decided here, once: a running sample moved iff the destination imported it. The source
holds its copy until told, so a failure anywhere leaves each sample in exactly one place. Every confirmed move
is recorded (in commit order) for the fleet, whose ownership record follows it."""
from __future__ import annotations

import concurrent.futures
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import ray

from configs.schema import BalancerConfig
from migration.planner import InstanceLoad, MigrationOrder, plan, resolve_threshold


@dataclass
class OrderResult:
    """One order as carried out: what moved and what it cost."""

    order: MigrationOrder
    outcome: str  # moved | partial | nothing | refused | aborted
    moved: list = field(default_factory=list)
    bytes: int = 0
    stage1_ms: float = 0.0  # source: export + send of the committed prefix (samples still decoding)
    stage2_ms: float = 0.0  # source: freeze + send of delta and state
    frozen_ms: float | None = None  # freeze at the source -> first step at the destination begins
    t_s: float = 0.0  # when the order was issued, seconds since the balancer started
    error: str | None = None

    def line(self) -> str:
        return order_line(asdict(self))


def order_line(r: dict) -> str:
    """One order of a report (an OrderResult as a dict) as a log line: what moved, its cost, the reason."""
    o = r["order"]
    cost = (f", {r['bytes'] / 1e6:.2f} MB, stage 1 {r['stage1_ms']:.1f} ms, stage 2 {r['stage2_ms']:.1f} ms, "
            f"frozen {r['frozen_ms']:.1f} ms" if r["frozen_ms"] is not None else "")
    err = f" ({r['error']})" if r["error"] else ""
    return (f"t={r['t_s']:.2f}s order {o['order_id']} {o['kind']} {o['source']} -> {o['destination']}: "
            f"{r['outcome']} {len(r['moved'])}/{len(o['request_ids'])}{cost}{err}; reason: {o['reason']}")


def _get(ref):
    """ray.get, with a dead actor (or a failed call) as None."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
        return None


class LoadBalancer:
    """`verbose` prints each order as it completes; either way every order, with its reason, is in `report()`
    (the fleet keeps the last rollout's, the driver writes them to <output_dir>/balancer.log)."""

    def __init__(self, cfg: BalancerConfig, verbose: bool = False):
        self.cfg, self.verbose = cfg, verbose
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_order = 0
        self._thresholds: dict[int, tuple[int, str]] = {}  # logged when first resolved or changed
        self._hold_point: str | None = None  # fault injection: an order stops here (hold_at)
        self._held = threading.Event()
        self._reset({}, {})

    def _reset(self, instances: dict, ranks: dict) -> None:
        self._instances, self._ranks = dict(instances), dict(ranks)
        self._dead: set = set()
        self._quarantined: set = set()  # took part in a failed transfer: their KV pair is not trusted again
        self._inflight: dict[int, MigrationOrder] = {}
        self._last_order: dict[int, float] = {}
        self._results: list[OrderResult] = []
        self._moves: list[tuple] = []  # (request id, source, destination) in commit order
        self._t0 = time.monotonic()

    # ---- control, called by the fleet ------------------------------------------------------------------------
    def configure(self, cfg: BalancerConfig) -> None:
        self.cfg = cfg

    def start(self, instances: dict, ranks: dict, auto: bool = True) -> None:
        """A rollout begins: `instances` {index: handle}, `ranks` {index: rank in the KV group}. With `auto` the
        polling loop runs; otherwise only `execute` moves samples."""
        self.stop()
        self._reset(instances, ranks)
        if auto:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="balancer")
            self._thread.start()

    def stop(self) -> dict:
        """Stop polling, wait for orders in flight; returns this rollout's report."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.report()

    def settle(self, dead: int) -> list[tuple]:
        """Instance `dead` died: wait until no order involving it is in flight (their transfers fail within the
        KV timeout), stop planning with it, and return every move so far."""
        deadline = time.monotonic() + 4 * self.cfg.transfer_timeout_s + 60
        with self._cv:
            self._dead.add(dead)
            while any(dead in (o.source, o.destination) for o in self._inflight.values()):
                if not self._cv.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"load balancer: orders with dead instance {dead} did not settle")
            return list(self._moves)

    def hold_at(self, point: str | None) -> None:
        """Fault injection for tests: the next order that reaches `point` stops there for good, so a test can kill
        this process with the order open; `held()` says when one is there. Points: "verdict" (a running order: both
        stages done, samples imported at the destination, the move recorded, neither side told), "queued" (a
        queued order: the requests taken off the source's queue, the destination not yet asked)."""
        self._hold_point = point

    def held(self) -> bool:
        return self._held.is_set()

    def _hold(self, point: str) -> None:
        if point == self._hold_point:
            self._hold_point = None
            self._held.set()
            threading.Event().wait()  # until the process is killed

    def report(self) -> dict:
        with self._cv:
            return {"orders": [asdict(r) for r in self._results], "moves": list(self._moves),
                    "thresholds": dict(self._thresholds), "quarantined": sorted(self._quarantined)}

    def execute(self, order: MigrationOrder) -> OrderResult:
        """Carry out one order now (the polling loop's orders come here too)."""
        with self._cv:
            self._next_order += 1
            order.order_id = self._next_order
            self._inflight[order.order_id] = order
        t = time.monotonic() - self._t0
        try:
            result = self._queued(order) if order.kind == "queued" else self._running(order)
        except Exception as e:  # noqa: BLE001 - a balancer bug must not take the rollout down; nothing moved
            result = OrderResult(order, "aborted", error=f"{type(e).__name__}: {e}")
        result.t_s = t
        with self._cv:
            del self._inflight[order.order_id]
            now = time.monotonic()
            self._last_order[order.source] = self._last_order[order.destination] = now
            self._results.append(result)
            self._cv.notify_all()
        if self.verbose:
            print(f"[balancer] {result.line()}", flush=True)
        return result

    # ---- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        window = max(2.0, 4 * self.cfg.interval_s)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            while not self._stop.wait(self.cfg.interval_s):
                try:
                    self._round(pool, window)
                except Exception:  # noqa: BLE001 - a bug shows in the log; the rollout goes on unbalanced
                    traceback.print_exc()

    def _round(self, pool, window: float) -> None:
        with self._cv:
            skip = self._dead | self._quarantined
        active = {i: h for i, h in self._instances.items() if i not in skip}
        if len(active) < 2:
            return
        loads = self._poll(active, window)
        thresholds = {ld.index: self._threshold(ld) for ld in loads}
        with self._cv:
            last = dict(self._last_order)
        orders = plan(loads, thresholds, time.monotonic(), self.cfg.cooldown_s, last, skip)
        pairs: dict[tuple, list] = {}
        for order in orders:  # one pair's orders in sequence (queued first), pairs side by side
            pairs.setdefault((order.source, order.destination), []).append(order)
        list(pool.map(lambda batch: [self.execute(o) for o in batch], pairs.values()))

    def _poll(self, active: dict, window: float) -> list[InstanceLoad]:
        refs = {i: h.load.remote(window) for i, h in active.items()}
        loads = []
        for i, ref in refs.items():
            try:
                loads.append(ray.get(ref, timeout=30))
            except ray.exceptions.RayActorError:
                with self._cv:
                    self._dead.add(i)
            except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
                pass  # a failing or stuck instance sits this round out
        return loads

    def _threshold(self, load: InstanceLoad) -> int:
        value, source = resolve_threshold(self.cfg.threshold, load)
        with self._cv:
            changed = self._thresholds.get(load.index) != (value, source)
            self._thresholds[load.index] = (value, source)
        if changed:
            if self.verbose:
                print(f"[balancer] instance {load.index}: threshold {value} live samples ({source})", flush=True)
        return value

    # ---- carrying out one order ------------------------------------------------------------------------------
    def _record(self, order: MigrationOrder, moved: list) -> None:
        with self._cv:
            self._moves += [(rid, order.source, order.destination) for rid in moved]

    def _queued(self, order: MigrationOrder) -> OrderResult:
        """Requests not yet admitted: taken off the source's queue and queued at the destination."""
        src, dst = self._instances[order.source], self._instances[order.destination]
        taken = _get(src.take_queued.remote(order.request_ids, order.order_id))  # on loan until the verdict
        if taken is None:
            return OrderResult(order, "aborted", error="source failed")
        if not taken:
            return OrderResult(order, "nothing")
        self._hold("queued")
        ids = [r.request_id for r in taken]
        if _get(dst.submit.remote(taken, order.order_id)) is None:
            if _get(src.finish_lent.remote(order.order_id, ids)) is None:  # both gone: the fleet resubmits them
                return OrderResult(order, "aborted", error="source and destination failed")
            return OrderResult(order, "aborted", error="destination failed; requests back at the source")
        moved = ids
        self._record(order, moved)
        _get(src.finish_lent.remote(order.order_id, []))  # (a dead source: its loan went with it)
        return OrderResult(order, "moved" if len(moved) == len(order.request_ids) else "partial", moved)

    def _running(self, order: MigrationOrder) -> OrderResult:
        """Running samples: reserve at the destination, both stages side by side, then the verdict."""
        src, dst = self._instances[order.source], self._instances[order.destination]
        src_rank, dst_rank = self._ranks[order.source], self._ranks[order.destination]
        two = self.cfg.two_stage
        reserved = _get(dst.reserve.remote(order.order_id, len(order.request_ids), src_rank, two))
        if not reserved:
            return OrderResult(order, "refused", error="destination has too few free slots or failed")
        out_ref = src.migrate_out.remote(order.order_id, order.request_ids, dst_rank, two)
        in_ref = dst.migrate_in.remote(order.order_id)
        got, sent = _get(in_ref), _get(out_ref)  # None: that side died (or its call failed)
        moved = list(got.request_ids) if got is not None else []
        self._record(order, moved)  # before the destination may release their outputs
        if moved:
            self._hold("verdict")
        if sent is not None:
            _get(src.finish_out.remote(order.order_id, moved))  # release, or resume what did not move
        if got is not None:
            _get(dst.finish_in.remote(order.order_id))
        errors = ["destination failed" if got is None else got.error and f"destination: {got.error}",
                  "source failed" if sent is None else sent.error and f"source: {sent.error}"]
        error = "; ".join(e for e in errors if e) or None
        if error:  # after a failed transfer the pair's channel is not trusted until the group is rebuilt
            with self._cv:
                self._quarantined |= {order.source, order.destination}
        result = OrderResult(order, "nothing", moved, error=error)
        if sent is not None:
            result.bytes, result.stage1_ms, result.stage2_ms = sent.bytes, sent.stage1_ms, sent.stage2_ms
        if moved:
            result.outcome = "moved" if len(moved) == len(order.request_ids) else "partial"
            if sent is not None and got.t_resume is not None and sent.t_freeze is not None:
                # wall clocks of two processes (one host here; NTP-close on a cluster)
                result.frozen_ms = 1000 * (got.t_resume - sent.t_freeze)
        elif error:
            result.outcome = "aborted"
        elif got is not None and getattr(got, "refused", None):  # the destination's K/V pool had no room
            result.outcome, result.error = "refused", f"destination: {got.refused}"
        return result


LoadBalancerActor = ray.remote(num_cpus=0, max_concurrency=8)(LoadBalancer)
