"""bench.e2e's arithmetic on hand-made numbers: phase means, the Amdahl bound, the overhead outside the rollout,
the first differing token, the summary rows and targets. No RLHF run."""
import pytest

from bench import e2e


def history(*iterations, final=None):
    rows = [{"iteration": i, "time/iteration": it, "time/generate": gen, "time/update": it - gen}
            for i, (it, gen) in enumerate(iterations)]
    return rows + ([{"iteration": len(iterations), **final}] if final else [])


def test_phase_means_skip_warmup_and_the_closing_evaluation():
    h = history((9.0, 5.0), (4.0, 1.0), (6.0, 2.0), final={"eval/score": 0.5})
    assert e2e.phase_means(h, warmup=1) == {"iteration": 5.0, "generate": 1.5, "update": 3.5}
    with pytest.raises(ValueError, match="no timed iterations after the first 3"):
        e2e.phase_means(h, warmup=3)


def test_amdahl_bound_and_overhead():
    # none: 10 s per iteration, 2 s of it rollout (p = 0.2); a 2x faster rollout allows 10 / 9
    assert e2e.amdahl_bound(10.0, 2.0, 2.0) == pytest.approx(10 / 9)
    assert e2e.amdahl_bound(10.0, 2.0, 1.0) == pytest.approx(1.0)
    # rollout 1 s: 9 s expected; 9.27 s measured = 3% outside the rollout; 9 s = none
    assert e2e.outside_rollout_overhead(9.27, 1.0, 10.0, 2.0) == pytest.approx(0.03)
    assert e2e.outside_rollout_overhead(9.0, 1.0, 10.0, 2.0) == pytest.approx(0.0)
    assert e2e.outside_rollout_overhead(8.1, 1.0, 10.0, 2.0) == pytest.approx(-0.1)


def test_token_differences_count_and_first():
    ref = [[[1, 2, 3], [4, 5]], [[6, 7, 8], [9]]]
    assert e2e.token_differences(ref, ref) == (0, None)
    other = [[[1, 2, 3], [4, 5]], [[6, 0, 0, 8], [9]]]  # iteration 1, sample 0 flips at position 1
    assert e2e.token_differences(ref, other) == (3, {"iteration": 1, "sample": 0, "position": 1})
    shorter = [[[1, 2, 3], [4]], [[6, 7, 8], [9, 9]]]  # a length difference counts, at the shorter's end
    assert e2e.token_differences(ref, shorter) == (2, {"iteration": 0, "sample": 1, "position": 1})
    with pytest.raises(ValueError, match="runs differ in iterations: 2 vs 1"):
        e2e.token_differences(ref, ref[:1])


def run(name, workload, it, gen, rep=0, differing=0):
    return {"name": name, "workload": workload, "repeat": rep, "phase_s": {"iteration": it, "generate": gen,
            "update": it - gen}, "final_score": 0.4, "final_sampled_score": 0.3, "tokens_differing": differing,
            "first_difference": None, "rollout_tokens": 100}


def test_summary_rows_use_medians_and_the_workloads_none():
    runs = [run("none", "default", 10.0, 2.0), run("none", "default", 12.0, 2.0, rep=1),
            run("none", "default", 11.0, 2.0, rep=2), run("all", "default", 9.0, 1.0),
            run("all", "default", 9.5, 1.0, rep=1), run("all", "default", 20.0, 1.0, rep=2),
            run("none", "sorted", 10.0, 4.0), run("static", "sorted", 10.0, 5.0, differing=7),
            run("all", "sorted", 8.0, 2.0)]
    rows = {(r["workload"], r["name"]): r for r in e2e.summarize(runs)}
    a = rows["default", "all"]  # medians: none 11 / 2, all 9.5 / 1
    assert (a["iteration_s"], a["rollout_s"], a["rollout_speedup"]) == (9.5, 1.0, 2.0)
    assert a["iteration_speedup"] == pytest.approx(11 / 9.5)
    assert a["amdahl_bound"] == pytest.approx(11 / 10)
    assert a["outside_rollout_overhead"] == pytest.approx(9.5 / 10 - 1)
    assert a["phase_s"] == {"generate": 1.0, "update": 8.5} and a["repeats"] == 3
    s = rows["sorted", "static"]
    assert s["rollout_speedup"] == pytest.approx(0.8) and s["tokens_differing"] == 7
    assert rows["sorted", "all"]["outside_rollout_overhead"] == pytest.approx(0.0)
    assert e2e.check_targets(list(rows.values())) == {
        "outside_rollout_overhead <= 0.03 (all)": True, "default: all rollout < none rollout": True,
        "sorted: all rollout <= static rollout": True, "sorted: all rollout < none rollout": True,
        "same tokens as none (all)": False}  # sorted/static drew 7 other tokens
    slow = e2e.summarize(runs + [run("adaptive", "default", 11.0, 1.0)])  # 1 s more than 11 - 2 + 1: +10%
    assert next(r for r in slow if r["name"] == "adaptive")["outside_rollout_overhead"] == pytest.approx(0.1)
    assert not e2e.check_targets(slow)["outside_rollout_overhead <= 0.03 (all)"]


def test_config_overrides_name_what_differs():
    assert e2e.config_overrides("none", "chain:2") == ["generation.strategy=none", "balancer.enabled=false",
                                                       "draft.online=false", "generation.rollout_drafts=off"]
    assert e2e.config_overrides("static", "chain:2")[0] == "generation.strategy=chain:2"
    assert e2e.config_overrides("adaptive+balancer", "x") == ["generation.strategy=adaptive",
                                                              "balancer.enabled=true", "draft.online=false",
                                                              "generation.rollout_drafts=off"]
    assert e2e.config_overrides("all", "x") == ["generation.strategy=adaptive", "balancer.enabled=true",
                                                "draft.online=true", "generation.rollout_drafts=off"]
    assert e2e.config_overrides("rollout_drafts", "x") == ["generation.strategy=none", "balancer.enabled=false",
                                                           "draft.online=false", "generation.rollout_drafts=on"]
    assert e2e.config_overrides("adaptive+rollout_drafts", "x")[-1] == "generation.rollout_drafts=on"


def test_runs_on_one_set_of_actors_may_differ_only_in_what_a_restart_resets():
    """Every configuration and workload restarts one set of actors; a run that changed anything a
    restart keeps (the algorithm, the models, the instance count) would measure the actors' run, not its own."""
    from configs.schema import load_config

    base = load_config(None, e2e.config_overrides("all", "chain:2") + ["trainer.output_dir=a"]).to_dict()
    for name in e2e.CONFIGS:
        for workload in e2e.WORKLOADS:
            run = load_config(None, e2e.config_overrides(name, "chain:2") + ["trainer.output_dir=b"]
                              + e2e.workload_overrides(workload, "sorted.jsonl", 32)).to_dict()
            assert e2e.restart_differences(base, run) == []
    run = load_config(None, ["trainer.algorithm=ppo", "generation.num_instances=3", "model.dtype=bfloat16"])
    assert e2e.restart_differences(base, run.to_dict()) == ["generation.num_instances", "model.dtype",
                                                            "trainer.algorithm"]


def test_static_strategy_reads_the_rollout_oracle(tmp_path):
    path = tmp_path / "rollout.json"
    path.write_text('{"rows": [{"phase": "live=4", "name": "oracle", "oracle_of": "tree:4,2,10"},'
                    ' {"phase": "rollout", "name": "oracle", "oracle_of": "chain:2"}]}')
    assert e2e.static_strategy(path) == "chain:2"
    path.write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="no rollout-phase oracle row"):
        e2e.static_strategy(path)


def test_sorted_workload_reads_its_file_in_order_and_splits_in_chunks():
    assert e2e.workload_overrides("default", "x.jsonl", 32) == []
    # a quarter of each instance's chunk in slots, as bench.reallocation: 32 x 4 / 2 instances / 4 = 16
    assert e2e.workload_overrides("sorted", "x.jsonl", 32) == [
        "data.train.path=x.jsonl", "data.shuffle=false", "generation.assignment=chunk", "generation.max_slots=16"]
