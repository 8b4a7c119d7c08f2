"""bench.simulate: the rollout simulator drives the real policy code; checked on hand-computed cases."""
import numpy as np
import pytest

from bench import simulate as sim
from drafting.policy.calibration import Calibration


def constant_model(plain_ms: float = 10.0) -> sim.StepModel:
    """Every plain step takes plain_ms whatever the batch; drafting stages take as long (never chosen by hand)."""
    s = {"plain": [], "root": [], "level": [], "verify": []}
    for B in (1, 2, 4, 8, 16):
        for c in (8, 64):
            s["plain"].append([B, c, plain_ms])
            for w in (1, 2, 4):
                s["root"].append([B, w, c, plain_ms])
                s["level"].append([B, w, c, plain_ms])
            for n in (0, 1, 3):
                s["verify"].append([B, B * (1 + n), 1 + n, c, plain_ms])
    key = {"models": "constant", "dtype": "float32", "device": "cpu", "threads": 1, "version": 1}
    cal = Calibration(key, s, families={c: "linear" for c in s}, meta={"max_slots": 16, "max_len": 64}).fit(False)
    return sim.StepModel("constant", cal, {"target": (0.0, 0.0), "target+draft": (0.0, 0.0)}, 1000, 1.0, 0.0)


@pytest.fixture(scope="module")
def trees():
    return sim.Trees()


def make(trees, lengths, prompt_len=10):
    rec = sim.recorded_samples(trees, "reallocation")
    return [sim.Sample(i, prompt_len, n, 64, rec[i].trees, group=i // 4) for i, n in enumerate(lengths)]


def test_plain_makespan_is_hand_computed(trees):
    # 2 slots, FIFO: A(3) B(5) run steps 1-3, C(2) joins at step 4 (both end at step 5), D(7) runs steps 6-12
    r = sim.simulate(make(trees, [3, 5, 2, 7]), 1, constant_model(10.0), trees, "reallocation", "none", 2)
    assert r["steps"] == 12
    assert r["makespan_s"] == pytest.approx(0.120, abs=1e-9)
    assert r["tokens"] == 17


def test_recorded_trees_replay_the_engine_step_counts(trees):
    # sim_record's trees reproduce bench.rollout's measured step counts (rollout phase): plain 92, chain:2 41
    samples = sim.recorded_samples(trees, "rollout")
    none = sim.simulate(samples, 1, constant_model(), trees, "rollout", "none", 64)
    chain = sim.simulate(samples, 1, constant_model(), trees, "rollout", "static", 64, static="chain:2")
    assert (none["steps"], chain["steps"], none["tokens"]) == (92, 41, 2813)


def test_balancer_moves_work_off_the_instance_holding_the_tail(trees):
    # chunk assignment: instance 0 holds 8 long samples (4 slots), instance 1 four 1-token samples
    lengths = [40] * 8 + [1] * 4
    model = constant_model(10.0)
    off = sim.simulate(make(trees, lengths), 2, model, trees, "reallocation", "none", 4, assignment="chunk",
                       group_size=4)
    bal = sim.Balancer(interval_s=0.05, cooldown_s=0.1, threshold=2)
    on = sim.simulate(make(trees, lengths), 2, model, trees, "reallocation", "none", 4, assignment="chunk",
                      balancer=bal, group_size=4)
    assert off["migrations"] == 0 and on["migrations"] >= 1
    assert on["requests_moved"] + on["samples_moved"] >= 2
    assert on["makespan_s"] < off["makespan_s"]


def test_running_samples_move_with_their_kv_bytes(trees):
    # one instance decodes 3 samples (threshold 1), the other is empty: the planner moves one running sample
    lengths = [60, 60, 60]
    model = constant_model(10.0)
    bal = sim.Balancer(interval_s=0.05, cooldown_s=10.0, threshold=1)
    r = sim.simulate(make(trees, lengths, prompt_len=10), 2, model, trees, "reallocation", "none", 4,
                     assignment="chunk", balancer=bal, group_size=3)
    assert r["samples_moved"] == 1 and r["migrations"] == 1
    # at the first poll (t=0.05 s, 5 steps done) its committed KV is 10 prompt + 5 response tokens - 1 = 14 positions
    assert r["bytes_moved"] == 14 * model.kv_bytes_per_token


def test_bad_roofline_spec_names_the_choices():
    with pytest.raises(ValueError, match="roofline:"):
        sim.load_step_model("roofline:tpu:70b")
