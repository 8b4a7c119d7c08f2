"""Adaptive drafting's pure parts on known inputs: the step-time model (family chosen by cross-validation,
roofline, refusal of a file made elsewhere), the acceptance predictor (fit, calibration, reset) and the
selection (ancestor-closed, many nodes for a long tail, few for a full batch, plain when drafting cannot pay)."""
import re

import numpy as np
import pytest
import torch

from drafting.policy.adaptive import AdaptiveHost
from drafting.policy.calibration import Calibration, CalibrationError, load_calibration
from drafting.policy.predictor import AcceptancePredictor, calibration_table
from drafting.policy.strategy import StepView
from drafting.spec.tree import DraftTree, close_under_ancestors

KEY = {"models": "abc", "dtype": "float32", "device": "cpu", "threads": 1, "version": 1}


def synthetic(token_ms=0.1, level_ms=0.2, step_ms=1.0, live=(1, 2, 4, 8, 16, 32, 64), ctx=(16, 64, 128)):
    """Timings from a known formula: every step pays `step_ms`, every verified token `token_ms`."""
    samples = {"plain": [], "root": [], "level": [], "verify": []}
    for B in live:
        for c in ctx:
            samples["plain"].append([B, c, step_ms + token_ms * B + 1e-4 * B * c])
            for w in (1, 2, 4):
                samples["root"].append([B, w, c, 0.1 + 0.01 * B * w])
                samples["level"].append([B, w, c, level_ms + 0.01 * B * w])
            for n in (0, 1, 2, 4, 8):
                samples["verify"].append([B, B * (1 + n), 1 + n, c, step_ms + token_ms * B * (1 + n)
                                          + 1e-5 * B * (1 + n) * c])
    return Calibration(dict(KEY), samples, meta={"max_slots": 64, "roofline_ctx": 64}).fit()


@pytest.fixture(scope="module")
def cal():
    return synthetic()


def test_step_model_family_by_cross_validation_and_roofline(cal):
    assert cal.families["verify"] == "linear"  # the formula is linear in the physics features
    assert cal.cv_error["verify"]["linear"] < 0.01
    assert cal.verify_ms(8, [16], [2], 64)[0] == pytest.approx(1.0 + 0.1 * 16 + 1e-5 * 8 * 2 * 64, rel=0.02)
    # plain throughput B / (1 + 0.1 B + 1e-4 B ctx) grows towards 1 / (0.1 + 0.0064): 90% of the best at 64 slots
    live = np.arange(1, 65)
    tps = live / (1.0 + 0.1 * live + 1e-4 * live * 64)
    assert cal.saturation_live == int(live[np.argmax(tps >= 0.9 * tps.max())])
    assert cal.roofline["tokens_per_s"][-1] == pytest.approx(1000 * tps[-1], rel=0.02)


def test_calibration_file_for_other_hardware_is_refused(cal, tmp_path):
    path = cal.save(tmp_path / "cal.json")
    again = load_calibration(path, KEY)
    assert again.families == cal.families and again.saturation_live == cal.saturation_live
    with pytest.raises(CalibrationError, match=r"cal.json was made for other models or hardware: threads 1 "
                                               r"\(here 2\)"):
        load_calibration(path, {**KEY, "threads": 2})
    with pytest.raises(CalibrationError, match="calibration file not found"):
        load_calibration(tmp_path / "missing.json", KEY)


def tree_of(cond: torch.Tensor, parents: torch.Tensor) -> DraftTree:
    """A hand-made tree whose nodes' draft probabilities are `cond`: before the predictor has records it
    predicts a node's acceptance by its draft probability, so path acceptance = the product of `cond`."""
    B, N = cond.shape
    depth = torch.ones(N, dtype=torch.long)
    anc = torch.eye(N, dtype=torch.bool).expand(B, N, N).clone()
    for i in range(N):
        p = int(parents[0, i])
        if p >= 0:
            depth[i] = depth[p] + 1
            anc[:, i] |= anc[:, p]
    return DraftTree(torch.zeros(B, N, dtype=torch.long), parents, cond.clone(), cond.clone(), torch.zeros(B, N),
                     depth, torch.zeros(N, dtype=torch.long), anc, torch.zeros(B, 0), cond.clone())


def view(B, ctx=64):
    return StepView(B, ctx, 1, torch.ones(B))


def scored(s: AdaptiveHost, tree: DraftTree, B: int) -> DraftTree:
    s.plan(view(B))
    s.score(tree, view(B))
    return tree


def test_selection_ranks_all_samples_together_and_closes_ancestors(cal):
    s = AdaptiveHost(cal)
    chain = torch.tensor([[-1, 0, 1, 2, 3, 4]])  # a chain of 6 nodes
    # sample 0 is confident, sample 1 hopeless
    cond = torch.tensor([[0.95, 0.95, 0.95, 0.95, 0.95, 0.95], [0.05, 0.05, 0.05, 0.05, 0.05, 0.05]])
    tree = scored(s, tree_of(cond, chain.expand(2, 6).clone()), 2)
    assert tree.score[0].tolist() == pytest.approx([0.95 ** (i + 1) for i in range(6)], rel=1e-5)
    chosen = s.select(tree, view(2))
    assert chosen[0].sum() >= 4 and chosen[1].sum() == 0
    # closure is enforced, not assumed: a child alone brings its whole path
    lone = torch.zeros(2, 6, dtype=torch.bool)
    lone[0, 3] = True
    assert close_under_ancestors(tree, lone)[0].tolist() == [True, True, True, True, False, False]


def test_long_tail_verifies_more_nodes_per_sample_than_a_full_batch(cal):
    per_sample = {}
    for B in (1, 64):
        s = AdaptiveHost(cal)
        tree = scored(s, tree_of(torch.full((B, 6), 0.8), torch.tensor([[-1, 0, 1, 2, 3, 4]]).expand(B, 6).clone()), B)
        per_sample[B] = float(s.select(tree, view(B)).sum()) / B
    assert per_sample[1] == 6 and per_sample[64] < 3


def test_plain_step_when_drafting_cannot_pay():
    costly = synthetic(level_ms=50.0)  # a draft level costs 50 plain tokens' worth
    assert not AdaptiveHost(costly).plan(view(64))
    assert AdaptiveHost(synthetic()).plan(view(1))


def test_depth_stops_when_another_level_cannot_raise_the_rate():
    for level_ms, expect in ((0.2, True), (500.0, False)):
        s = AdaptiveHost(synthetic(level_ms=level_ms))
        tree = scored(s, tree_of(torch.tensor([[0.9, 0.9]]), torch.tensor([[-1, 0]])), 1)
        assert s.deeper(tree, view(1)) is expect


def test_predictor_fits_online_and_is_calibrated():
    gen = torch.Generator().manual_seed(0)

    def records(n):
        q = torch.rand(n, generator=gen) * 0.98 + 0.01
        margin = torch.randn(n, generator=gen)
        p = torch.sigmoid(2.0 * (q.log() + 0.7) + 1.5 * margin)
        acc = torch.rand(n, generator=gen) < p
        feats = torch.stack([q, q, margin, torch.ones(n), torch.zeros(n), torch.ones(n)], dim=1)
        return feats.numpy(), acc.numpy(), p.numpy()

    pred = AcceptancePredictor(window=4000, refit_every=2000, min_records=1000)
    f, _, _ = records(5)
    assert pred.family is None and np.array_equal(pred.predict(f), np.clip(f[:, 1], 0.01, 0.99))  # the prior: q
    for _ in range(3):
        f, a, _ = records(1000)
        pred.observe(f, a, pred.predict(f))
    assert pred.family == "logistic" and pred.fits >= 1  # the margin matters: isotonic on q alone loses
    f, a, p = records(5000)
    rows, ece = calibration_table(pred.predict(f), a)
    assert ece < 0.05 and sum(r["count"] for r in rows) == 5000
    assert float(np.abs(pred.predict(f) - p).mean()) < 0.05
    pred.reset()
    assert pred._n == 0 and pred.family == "logistic"  # the old fit serves until new records arrive


# ---- first-use profiling: a grid that fits a budget, its progress, a fallback until it lands --------------------
def grid_cost(shape, B, ctx):
    """A synthetic per-step cost: 2 ms a step, 1 ms a target token (more at long contexts), 0.3 ms a draft token."""
    from drafting.calibrate.profile import step_tokens

    t, d = step_tokens(shape, B)
    return 0.002 + 0.001 * t * (1 + ctx / 1000) + 0.0003 * d


def test_profile_grid_is_the_richest_that_fits_the_budget():
    from drafting.calibrate.profile import CONFIGS, PLAIN, choose_grid, ladder

    full, full_s, fits = choose_grid(None, grid_cost, 64, 160)
    assert fits and full.live == [1, 2, 4, 8, 16, 32, 48, 64] and full.ctx == [16, 80, 136]
    assert full.configs == CONFIGS and full.repeats == 3 and full_s == pytest.approx(full.seconds(grid_cost))
    for share in (0.5, 0.2, 0.12):
        budget = share * full_s
        grid, est, fits = choose_grid(budget, grid_cost, 64, 160)
        rungs = ladder(64, 160, point_cap_s=0.02 * budget)
        assert fits and est == pytest.approx(grid.seconds(grid_cost)) and est <= budget
        assert all(r.seconds(grid_cost) > budget for r in rungs[:rungs.index(grid)])  # nothing richer fits
        assert 64 in grid.live and 1 in grid.live and len(grid.live) >= 3 and len(grid.ctx) >= 2
    # a costly point gets fewer repeats than a cheap one (one at least)
    big = (4, 4, 16, False)
    assert grid.reps(big, grid_cost(big, 64, 136)) < grid.reps(big, grid_cost(big, 1, 16)) == grid.repeats
    assert grid.reps(PLAIN, 1e9) == 1
    # a budget nothing fits: the leanest grid, and it says so
    grid, est, fits = choose_grid(0.01, grid_cost, 64, 160)
    assert not fits and grid == ladder(64, 160, point_cap_s=0.02 * 0.01)[-1] and est > 0.01


def test_profile_cost_model_scales_first_timings_by_flops():
    from drafting.calibrate.profile import PLAIN, CostModel, flops_per_token

    cfg = {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 2, "intermediate_size": 8, "vocab_size": 10}
    # qkv 4x(2+2)x2 + o 2x2x4 + mlp 3x4x8 = 144 per layer, LM head 40; attention 4 x 1 x 2 x 2 per context token
    assert flops_per_token(cfg, 0) == 2 * (144 + 40) and flops_per_token(cfg, 10) == 368 + 16 * 10
    shape = (2, 2, 4, False)  # target tokens B(1 + 4), draft tokens B x lag 3 + B x 2 x 1 level
    cost = CostModel({PLAIN: 0.01, shape: 0.05}, token_s=0.001, ctx0=10, target_flops=lambda c: 1 + c / 100,
                     draft_flops=lambda c: 0.5 * (1 + c / 100))
    assert cost(PLAIN, 9, 10) == pytest.approx(0.01 + 0.001 * 8)
    assert cost(shape, 3, 10) == pytest.approx(0.05 + 0.001 * (15 - 5) + 0.001 * 0.5 * (15 - 5))
    assert cost(PLAIN, 9, 110) == pytest.approx(0.01 + 0.001 * 8 * 2.1 / 1.1)


def test_profile_progress_line():
    from drafting.calibrate.profile import progress_line

    assert progress_line(0.42, 50.4, 68.2, 120, "live 16, ctx 80") == (
        "calibration: profiling  42% (live 16, ctx 80), 50 s so far, about 68 s left (budget 120 s)")
    assert progress_line(0.0, 3, None, None) == (
        "calibration: profiling   0%, 3 s so far, time left not known yet (no budget)")


def plain_greedy(world, prompts, n):
    from drafting import SpeculativeEngine
    from drafting.records import SamplingParams

    eng = SpeculativeEngine(world.actor_path, None, strategy="none", max_slots=4, max_len=48)
    return [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n))]


def rollout(inst, prompts, n, tag):
    import time

    from drafting.records import GenRequest, SamplingParams

    inst.submit([GenRequest((tag, i), p, SamplingParams(temperature=0, max_new_tokens=n))
                 for i, p in enumerate(prompts)])
    outs, deadline = {}, time.monotonic() + 120
    while len(outs) < len(prompts) and time.monotonic() < deadline:
        outs.update({o.request_id: o for o in inst.collect(0.5)})
    return [outs[(tag, i)] for i in range(len(prompts))]


def test_first_use_decodes_with_the_fallback_until_the_profile_lands(tiny_world, tmp_path, monkeypatch, capsys,
                                                                    one_thread, calibrate):
    """Another process holds the profile's lock: this instance decodes plain (the fallback) at once, loads the
    file when it lands and switches to adaptive; greedy tokens equal plain decoding's throughout."""
    import fcntl
    import time

    from actors.generation import GenerationInstance
    from drafting.policy.calibration import key_name

    monkeypatch.setenv("RLHFSPEC_CALIBRATION_DIR", str(tmp_path))
    prompts = [[5, 3, 9, 4], [7, 7, 1], [2, 8, 6, 1, 3]]
    want = plain_greedy(tiny_world, prompts, 10)
    probe = calibrate(tiny_world.actor_path, tiny_world.draft_path)  # keyed for one thread, as this instance
    path = tmp_path / f"{key_name(probe.key)}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another instance is profiling"
        inst = GenerationInstance(0, tiny_world.actor_path, tiny_world.draft_path, "adaptive", 4, 48,
                                  calibration="auto", profile_budget_s=30, profile_fallback="none")
        assert inst.profile_status() == {"state": "waiting", "progress": "", "strategy": "none"}
        first = rollout(inst, prompts, 10, "a")
        assert [o.token_ids for o in first] == want
        assert all(o.stats["drafted"] == 0 for o in first)  # plain decoding, nothing waited for a profile
        probe.save(path)
    deadline = time.monotonic() + 30
    while inst.profile_status()["state"] != "none" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inst.profile_status()["strategy"] == "adaptive"
    assert [o.token_ids for o in rollout(inst, prompts, 10, "b")] == want
    out = capsys.readouterr().out
    assert ("generation instance 0: calibration: no profile of this model pair here yet (another process is "
            "profiling it, budget 30 s); decoding with fallback strategy 'none' until it lands") in out
    assert "switching from 'none' to 'adaptive'" in out


def test_first_use_profiles_between_steps_and_switches(tiny_world, tmp_path, monkeypatch, capsys, one_thread):
    """No profile and no other process: the instance profiles the pair itself within a small budget, in slices
    between rollout steps, then says how good the fit is and decodes with adaptive; tokens unchanged."""
    import time

    from actors.generation import GenerationInstance

    monkeypatch.setenv("RLHFSPEC_CALIBRATION_DIR", str(tmp_path))
    prompts = [[5, 3, 9, 4], [7, 7, 1], [2, 8, 6, 1, 3]]
    want = plain_greedy(tiny_world, prompts, 10)
    inst = GenerationInstance(0, tiny_world.actor_path, tiny_world.draft_path, "adaptive", 4, 48,
                              calibration="auto", profile_budget_s=6, profile_fallback="chain:2")
    assert inst.profile_status()["state"] == "profiling"
    assert [o.token_ids for o in rollout(inst, prompts, 10, "a")] == want
    deadline = time.monotonic() + 120
    while inst.profile_status()["state"] != "none" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert inst.profile_status()["strategy"] == "adaptive" and list(tmp_path.glob("*.json"))
    assert [o.token_ids for o in rollout(inst, prompts, 10, "b")] == want
    out = capsys.readouterr().out
    assert "decoding with fallback strategy 'chain:2' until it lands" in out
    assert re.search(r"calibration: profiled in \d+ s \(budget 6 s\)( \(\d+ s wall, with decoding between its "
                     r"slices\))?, .*; step-time model cross-validated error [\d.]+%, plain decoding saturates at \d+ "
                     r"live samples; switching from 'chain:2' to 'adaptive'", out)


def test_a_restarted_instance_decodes_as_a_new_one_and_never_drops_a_sample(tiny_world, one_thread):
    """bench.e2e runs many short runs on one set of actors: a restart makes a new engine from the model files
    (pushed weights and versions gone, the new strategy and slots in use), and refuses while a sample waits."""
    from actors.generation import GenerationInstance
    from drafting.records import GenRequest, SamplingParams

    prompts = [[5, 3, 9, 4], [7, 7, 1], [2, 8, 6, 1, 3]]
    want = plain_greedy(tiny_world, prompts, 10)
    inst = GenerationInstance(0, tiny_world.actor_path, tiny_world.draft_path, "none", 4, 48, calibration=None)
    norm = inst.engine.target.views["model.norm.weight"]
    inst.engine.load_target_weights({"model.norm.weight": torch.zeros_like(norm)})  # a push: every output changes
    inst.weight_version = 3
    assert [o.token_ids for o in rollout(inst, prompts, 10, "pushed")] != want
    inst.submit([GenRequest("waiting", prompts[0], SamplingParams(temperature=0, max_new_tokens=10))])
    with pytest.raises(RuntimeError, match=r"generation instance 0: restart with 1 samples in flight"):
        inst.restart("chain:2", 2)
    assert [o.request_id for o in inst.collect(30.0)] == ["waiting"]  # still there, and it finishes
    inst.restart("chain:2", 2)
    assert (inst.weight_version, inst.engine.strategy.name, inst.engine.max_slots) == (0, "chain:2", 2)
    outs = rollout(inst, prompts, 10, "restarted")
    assert [o.token_ids for o in outs] == want and sum(o.stats["drafted"] for o in outs) > 0
