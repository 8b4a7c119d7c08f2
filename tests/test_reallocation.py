"""Sample reallocation: the planner's orders, the split of a batch, and on a real Ray cluster a fleet of two
instances whose load balancer moves queued requests and running samples (with their KV, over the instances'
own gloo group) while they decode: every request comes back once, with exactly the tokens it would have had
without the balancer, also when an instance dies in the middle of a migration."""
import dataclasses
import re
import threading
import time

import pytest
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from configs.schema import BalancerConfig, GenerationConfig
from drafting import GenRequest, SamplingParams, SpeculativeEngine
from migration.planner import InstanceLoad, SampleLoad, plan, rank_running, resolve_threshold
from trainer.loop.rollout import assign

STRATEGY, MAX_LEN = "tree:3,2,6", 160


# ---- the planner (pure) -------------------------------------------------------------------------------------
def load(index, live, queued=0, max_slots=8, reserved=0, samples=None, saturation=None):
    samples = samples if samples is not None else [SampleLoad(f"{index}:r{k}", 10 + k, k, 64) for k in range(live)]
    return InstanceLoad(index, live, queued, max_slots, reserved, sum(s.kv_tokens for s in samples), 0.0,
                        saturation, samples, [f"{index}:q{k}" for k in range(queued)])


def test_plan_moves_queued_first_then_the_running_samples_with_most_to_come_per_kv():
    busy = load(0, 8, queued=2, samples=[SampleLoad("long-kv", 100, 0, 64), SampleLoad("done", 5, 64, 64),
                                         *[SampleLoad(f"s{k}", 10, k, 64) for k in range(6)]])
    orders = plan([busy, load(1, 0)], {0: 4, 1: 4}, now=10.0, cooldown_s=1.0, last_order={})
    # load 10 > 4 and 0 < 4: move min(10 - 4, 10 // 2) = 5, the 2 queued first (from the back of the queue)
    assert [(o.kind, o.source, o.destination, o.request_ids) for o in orders] == [
        ("queued", 0, 1, ["0:q1", "0:q0"]), ("running", 0, 1, ["s0", "s1", "s2"])]
    assert "threshold 4" in orders[0].reason and "3 running, 30 KV tokens" in orders[1].reason


def test_plan_pairs_most_loaded_with_least_loaded():
    loads = [load(0, 6), load(1, 12), load(2, 1), load(3, 3), load(4, 8)]
    orders = plan(loads, {i: 5 for i in range(5)}, now=0.0, cooldown_s=0.0, last_order={})
    assert [(o.source, o.destination, len(o.request_ids)) for o in orders] == [(1, 2, 5), (4, 3, 2)]


@pytest.mark.parametrize("case", ["all below", "no destination", "cooldown", "excluded", "even already"])
def test_plan_no_move(case):
    loads, last, excluded = [load(0, 8), load(1, 0)], {}, ()
    if case == "all below":
        loads = [load(0, 3), load(1, 0)]
    elif case == "no destination":  # the other instance is busy too (a queue of its own)
        loads = [load(0, 8), load(1, 2, queued=1)]
    elif case == "cooldown":
        last = {1: 9.5}
    elif case == "excluded":
        excluded = (0,)
    elif case == "even already":  # above the threshold, but moving would only swap the imbalance
        loads = [load(0, 5), load(1, 4, reserved=0)]
    assert plan(loads, {0: 4, 1: 5}, now=10.0, cooldown_s=1.0, last_order=last, excluded=excluded) == []


def test_plan_respects_reserved_and_free_slots():
    # evening out would move 4, but the destination has 5 of its 6 slots taken or reserved: one sample fits
    orders = plan([load(0, 14, max_slots=16), load(1, 2, max_slots=6, reserved=3)], {0: 6, 1: 6}, 0.0, 0.0, {})
    assert [(o.kind, len(o.request_ids)) for o in orders] == [("running", 1)]
    # queued requests too: only as many as can start at once (a second queue there would only delay them)
    orders = plan([load(0, 8, queued=22), load(1, 6)], {0: 7, 1: 7}, 0.0, 0.0, {})
    assert [(o.kind, o.request_ids) for o in orders] == [("queued", ["0:q21", "0:q20"])]


def test_threshold_auto_reads_the_saturation_point_or_falls_back():
    assert resolve_threshold(12, load(0, 1)) == (12, "configured")
    assert resolve_threshold("auto", load(0, 1, max_slots=64, saturation=20)) == (20, "profiled saturation point")
    assert resolve_threshold("auto", load(0, 1, max_slots=16, saturation=20))[0] == 16  # never above the slots
    value, source = resolve_threshold("auto", load(0, 1, max_slots=64))
    assert value == 32 and "max_slots // 2" in source


def test_threshold_auto_follows_a_paged_pools_occupancy():
    """A full pool is a full instance: 4 live samples holding 900 of 1000 pool tokens bound the threshold at 4, below
    the saturation point; a number keeps meaning live samples; a destination takes what its pool has room for."""
    full = dataclasses.replace(load(0, 4, max_slots=64, saturation=20), kv_tokens=900, kv_capacity=1000, kv_free=100)
    assert resolve_threshold("auto", full) == (4, "K/V pool occupancy (900 of 1000 tokens held by 4)")
    assert resolve_threshold(12, full) == (12, "configured")
    roomy = dataclasses.replace(load(0, 4, max_slots=64, saturation=20), kv_tokens=100, kv_capacity=1000, kv_free=900)
    assert resolve_threshold("auto", roomy) == (20, "profiled saturation point")
    assert roomy.room(300) == 3 and dataclasses.replace(roomy, kv_capacity=0).room(300) == 60


def test_rank_running_skips_samples_with_nothing_left():
    ranked = rank_running([SampleLoad("a", 50, 0, 64), SampleLoad("b", 5, 60, 64), SampleLoad("c", 5, 64, 64)])
    assert [s.request_id for s in ranked] == ["a", "b"]  # 64 tokens to come per 50 KV beat 4 per 5; c is done


def test_assign_round_robin_and_chunk_keep_groups_together():
    assert assign(7, 2, "round_robin") == [[0, 2, 4, 6], [1, 3, 5]]
    assert assign(12, 2, "chunk", group_size=4) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]]
    assert assign(10, 3, "chunk") == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="generation.assignment: 'zigzag'"):
        assign(4, 2, "zigzag")


@pytest.mark.parametrize("override, message", [
    ("balancer.threshold=fast", "balancer.threshold: want auto or a positive number of live samples, got 'fast'"),
    ("balancer.threshold=0", "balancer.threshold: want auto or a positive number"),
    ("balancer.threshold=2.5", "balancer.threshold: expected str or int, got float 2.5"),
    ("balancer.interval_s=0", "balancer.interval_s: must be positive"),
    ("balancer.cooldown_s=-1", "balancer.cooldown_s: must not be negative"),
    ("balancer.transfer_timeout_s=0", "balancer.transfer_timeout_s: must be positive"),
    ("balancer.two_stage=maybe", "balancer.two_stage: expected bool"),
    ("balancer.speed=1", "balancer.speed: unknown key"),
    ("generation.assignment=zigzag", "generation.assignment: 'zigzag' is not one of round_robin, chunk"),
])
def test_balancer_config_errors_name_the_key(override, message):
    from configs.schema import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    cfg = load_config(None, ["balancer.enabled=true", "balancer.threshold=12", "generation.assignment=chunk"])
    assert (cfg.balancer.enabled, cfg.balancer.threshold, cfg.generation.assignment) == (True, 12, "chunk")


# ---- a fleet of two instances on the shared Ray cluster -----------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A small random target and draft on disk (the instances load them by path); no EOS, so each sample runs
    exactly max_new_tokens and the load is known."""
    root = tmp_path_factory.mktemp("models")

    def save(name, layers, hidden, seed):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval().save_pretrained(root / name)
        return str(root / name)

    return save("target", 4, 128, 0), save("draft", 1, 64, 1)


def requests(temperature, short, long, long_tokens=120):
    """`short` requests of 3 tokens, then `long` ones of long_tokens: a chunked split gives instance 0 the short
    ones and instance 1 the long ones."""
    out = []
    for k in range(short + long):
        prompt = [(7 * k + j) % 60 + 1 for j in range(4 + k % 5)]
        sp = SamplingParams(temperature=temperature, max_new_tokens=3 if k < short else long_tokens, seed=1000 + k)
        out.append(GenRequest(f"t{temperature}:{k}", prompt, sp))
    return out


def reference(model_dirs, reqs):
    """Each request's tokens from one engine in this process, no balancer, no migration."""
    eng = SpeculativeEngine(*model_dirs, strategy=STRATEGY, max_slots=16, max_len=MAX_LEN)
    for r in reqs:
        eng.add(GenRequest(r.request_id, list(r.prompt_token_ids), SamplingParams(**vars(r.sampling))))
    outs = []
    while eng.live or eng.queue:
        outs += eng.step()
    return {o.request_id: o.token_ids for o in outs}


def make_fleet(model_dirs, balancer: BalancerConfig, assignment="chunk"):
    from trainer.loop.rollout import RolloutFleet

    gen = GenerationConfig(num_instances=2, strategy=STRATEGY, max_slots=4, max_len=MAX_LEN, cpus_per_instance=1,
                           assignment=assignment)
    return RolloutFleet(gen, *model_dirs, balancer=balancer)


# threshold 1: an instance is a destination only when idle, so the orders below are known in advance
BALANCE = BalancerConfig(enabled=True, interval_s=0.05, threshold=1, cooldown_s=0.2, transfer_timeout_s=3.0)


@pytest.fixture(scope="module")
def shared_fleet(ray_cluster, model_dirs):
    """One fleet for the tests that leave it whole (instances take seconds to start); a test that kills an
    instance gets it last, or a fresh one."""
    fleets = []

    def get():
        if not fleets or len(fleets[-1].alive) < 2:
            fleets.append(make_fleet(model_dirs, BALANCE))
        fleets[-1].set_balancer(BALANCE)
        return fleets[-1]

    yield get
    for fleet in fleets:
        fleet.shutdown()


def check_outputs(outs, reqs, expected):
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]  # each exactly once, in request order
    assert {o.request_id: o.token_ids for o in outs} == expected


def test_balancer_moves_samples_and_outputs_are_unchanged(shared_fleet, model_dirs, one_thread):
    fleet = shared_fleet()
    for temperature in (0.0, 1.0):  # greedy, then seeded sampling
        reqs = requests(temperature, short=6, long=6)
        expected = reference(model_dirs, reqs)
        check_outputs(fleet.run(reqs), reqs, expected)
        report = fleet.last_balance
        moved = [r for r in report["orders"] if r["moved"]]
        kinds = {r["order"]["kind"] for r in moved}
        assert kinds == {"queued", "running"}, [r["outcome"] for r in report["orders"]]
        assert (moved[0]["order"]["source"], moved[0]["order"]["destination"]) == (1, 0)  # the loaded one first
        for r in moved:
            if r["order"]["kind"] == "running":  # KV went over the group; the freeze was short
                assert r["bytes"] > 0 and 0 <= r["frozen_ms"] < 5000 and r["stage1_ms"] > 0
        # the ownership record: every confirmed move, in order
        assert [m[0] for m in report["moves"]] == [rid for r in moved for rid in r["moved"]]
        log = fleet.balance_log()  # what the driver writes to balancer.log: thresholds, then each order's reason
        assert log[:2] == [f"instance {i}: threshold 1 live samples (configured)" for i in (0, 1)]
        assert "reason: instance 1 holds 4 live + 2 queued > threshold 1" in log[2]
        metrics = fleet.balance_metrics()
        assert metrics["balance/migrations"] >= 1 and metrics["balance/samples_moved"] >= 1
        assert metrics["balance/bytes"] > 0 and metrics["balance/frozen_s"] > 0


def test_destination_dies_between_stages_sample_finishes_on_source(ray_cluster, model_dirs, one_thread):
    fleet = make_fleet(model_dirs, BALANCE)
    try:
        destination = fleet.instances[0]
        ray.get(destination.crash_at.remote("destination:after_stage1"))
        reqs = requests(0.0, short=4, long=4)  # no queue: the only move is a running one
        expected = reference(model_dirs, reqs)
        outs = fleet.run(reqs)
        check_outputs(outs, reqs, expected)
        # the destination died (it held no sample of its own by then: whether the rollout ended before a poll saw it,
        # and the fleet put a new instance in its place, is timing, so ask the dead one itself)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(destination.ping.remote(), timeout=30)
        [order] = [r for r in fleet.last_balance["orders"] if r["order"]["kind"] == "running"]
        assert order["outcome"] == "aborted" and order["moved"] == [] and "destination failed" in order["error"]
        frozen = set(order["order"]["request_ids"])
        assert {o.request_id: o.stats["instance"] for o in outs if o.request_id in frozen} == {r: 1 for r in frozen}
    finally:
        fleet.shutdown()


def test_source_dies_after_stage1_sample_restarts_elsewhere(ray_cluster, model_dirs, one_thread):
    fleet = make_fleet(model_dirs, BALANCE)
    try:
        ray.get(fleet.instances[1].crash_at.remote("source:after_stage1"))
        reqs = requests(1.0, short=4, long=4)
        expected = reference(model_dirs, reqs)
        t0 = time.monotonic()
        outs = fleet.run(reqs)
        check_outputs(outs, reqs, expected)
        assert fleet.alive == [0] and all(o.stats["instance"] == 0 for o in outs)
        [order] = [r for r in fleet.last_balance["orders"] if r["order"]["kind"] == "running"]
        assert order["outcome"] == "aborted" and order["moved"] == []
        assert "Connection closed by peer" in order["error"] or "source failed" in order["error"]
        assert time.monotonic() - t0 < 60  # the dead peer was noticed in seconds, not the collective's minutes
    finally:
        fleet.shutdown()


def run_and_kill_instance_1(fleet, reqs):
    """fleet.run(reqs) in a thread; instance 1 killed once it has decoded 2 steps of them (far from done: under a
    loaded suite, 5 steps of 60-token samples once left too few for the kill). Returns the thread, the dict its
    outputs land in ("outs") and the killed handle."""
    steps0 = ray.get(fleet.instances[1].stats.remote()).steps
    result = {}
    runner = threading.Thread(target=lambda: result.update(outs=fleet.run(reqs)))
    runner.start()
    deadline = time.monotonic() + 60
    while ray.get(fleet.instances[1].stats.remote()).steps < steps0 + 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed = fleet.instances[1]
    ray.kill(killed)
    return runner, result, killed


def test_instance_dies_mid_rollout_balancer_off(shared_fleet, model_dirs, one_thread):
    fleet = shared_fleet()
    fleet.set_balancer(BalancerConfig(enabled=False))
    fleet.assignment = "round_robin"
    reqs = requests(1.0, short=0, long=12)
    expected = reference(model_dirs, reqs)
    runner, result, _ = run_and_kill_instance_1(fleet, reqs)
    runner.join(timeout=120)
    check_outputs(result["outs"], reqs, expected)
    assert fleet.alive == [0] and all(o.stats["instance"] == 0 for o in result["outs"])
    assert fleet.last_balance == {}  # the balancer took no part


def test_instance_dies_mid_rollout_replacement_joins_it_with_balancer(shared_fleet, model_dirs, one_thread, capsys):
    fleet = shared_fleet()  # balancer on: threshold 1, so an idle instance is a destination
    fleet.assignment = "round_robin"
    reqs = requests(1.0, short=0, long=12)
    expected = reference(model_dirs, reqs)
    ray.get(fleet.instances[0].slow_steps.remote(0.2))  # instance 0 still holds work when the replacement is up
    runner, result, killed = run_and_kill_instance_1(fleet, reqs)
    deadline = time.monotonic() + 120
    while fleet.instances[1] is killed or fleet.alive != [0, 1]:  # replaced, and the replacement joined this rollout
        assert runner.is_alive() and time.monotonic() < deadline, fleet.alive
        time.sleep(0.05)
    ray.get(fleet.instances[0].slow_steps.remote(0.0))
    runner.join(timeout=120)
    outs = result["outs"]
    check_outputs(outs, reqs, expected)  # every sample once, exactly the tokens of one engine
    assert "joined the rollout with instance 0's weights" in capsys.readouterr().out
    # it worked in this rollout: samples moved to it and finished there (the old instance 1 had run 2-3 steps)
    report = fleet.last_balance
    assert any(m[2] == 1 for m in report["moves"]), report["orders"]
    assert sum(o.stats["instance"] == 1 for o in outs) >= 1
    assert {o.stats["weight_version"] for o in outs} == {ray.get(fleet.instances[0].stats.remote()).weight_version}


@pytest.mark.parametrize("fate", ["killed", "stuck"])
def test_balancer_lost_holding_a_queued_order_no_request_is_lost(fate, shared_fleet, model_dirs, one_thread, capsys):
    """The queued requests were taken off the source's queue, the destination not yet asked: they were on loan at
    the source, and the fleet puts them back there. Killed: the fleet sees the death. Stuck (it never moves on):
    the order stays open past its deadline (4 transfer timeouts + 10 s), and the fleet kills it."""
    fleet = shared_fleet()
    cfg = BALANCE if fate == "killed" else dataclasses.replace(BALANCE, transfer_timeout_s=0.5)
    fleet.set_balancer(cfg)
    fleet.assignment = "chunk"  # instance 1 holds the long ones, 4 live + 2 queued; instance 0 idles soon
    reqs = requests(1.0, short=6, long=6)
    expected = reference(model_dirs, reqs)
    balancer = fleet.balancer
    ray.get(balancer.hold_at.remote("queued"))

    def kill_when_held():
        deadline = time.monotonic() + 60
        while not ray.get(balancer.held.remote()) and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(balancer)

    killer = threading.Thread(target=kill_when_held)
    if fate == "killed":
        killer.start()
    t0 = time.monotonic()
    outs = fleet.run(reqs)
    if fate == "killed":
        killer.join()
    check_outputs(outs, reqs, expected)  # each once: none lost, none twice
    out = capsys.readouterr().out
    reason = r"stuck: its order \d+ open for 1[2-9] s" if fate == "stuck" else r".+"
    assert re.search(rf"load balancer died \({reason}\); its 1 open order settled by the fleet \(0 samples moved, "
                     rf"2 resumed at their source\)", out), out
    assert fleet.balancer is None  # a new one from the next rollout on
    if fate == "stuck":
        assert time.monotonic() - t0 < 40
    fleet.set_balancer(BALANCE)


def test_balancer_and_source_die_together_with_an_order_open(shared_fleet, model_dirs, one_thread, capsys):
    """A running-sample order stops at its verdict (samples imported at the destination, neither side told); then
    its balancer and its source are killed together. The fleet settles the order with the source left out (the
    imported samples moved), then resubmits what the source still held: each sample once, exact."""
    fleet = shared_fleet()
    fleet.set_balancer(BALANCE)
    fleet.assignment = "chunk"  # instance 1 (the long samples) is the source, instance 0 the destination
    reqs = requests(1.0, short=6, long=6)
    expected = reference(model_dirs, reqs)
    balancer, source = fleet.balancer, fleet.instances[1]
    ray.get(balancer.hold_at.remote("verdict"))

    def kill_when_held():
        deadline = time.monotonic() + 60
        while not ray.get(balancer.held.remote()) and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(source)
        ray.kill(balancer)

    killer = threading.Thread(target=kill_when_held)
    killer.start()
    outs = fleet.run(reqs)
    killer.join()
    check_outputs(outs, reqs, expected)
    out = capsys.readouterr().out
    assert re.search(r"load balancer died \(.+\); its 1 open order settled by the fleet \([1-9]\d* samples moved, "
                     r"0 resumed at their source\)", out), out
    assert re.search(r"generation instance 1 died \(.+\); its \d+ samples resubmitted to the live instances", out), out
    assert fleet.alive == [0] and fleet.joining == [1]  # the replacement takes work from the next weight push
