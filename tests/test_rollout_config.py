"""Rollout drafts above the engine (issue 27): generation.rollout_drafts resolved against the strategy and its
verdict line, whole GRPO groups on one instance, the requests the driver builds (a group and the prompt's
history for training, neither for evaluation), the history through a checkpoint and a rewind, and the
instances' summaries turned into `rollout/*` metrics. No Ray, no models."""
import json

import pytest

from configs.schema import load_config, rollout_drafts_on
from trainer.loop.rollout import assign


@pytest.mark.parametrize("strategy, setting, on", [
    ("adaptive", "auto", True), ("chain:4", "auto", False), ("tree:3,2,6", "auto", False), ("none", "auto", False),
    ("chain:4", "on", True), ("adaptive", "off", False), ("adaptive", "on", True), ("none", "off", False),
    ("none", "on", True),  # plain decoding that verifies every chain found (a draft model or not)
])
def test_auto_is_on_for_adaptive_only(strategy, setting, on):
    cfg = load_config(None, [f"generation.strategy={strategy}", f"generation.rollout_drafts={setting}"])
    assert rollout_drafts_on(cfg.generation) is on
    from trainer.loop.rollout import history_store, suffix_config

    assert (suffix_config(cfg.generation) is not None) is on and (history_store(cfg.generation) is not None) is on


def test_yaml_booleans_read_as_on_and_off(tmp_path):
    """YAML reads a bare on/off as a boolean: the key keeps the word."""
    assert load_config(None, ["generation.rollout_drafts=on"]).generation.rollout_drafts == "on"
    assert load_config(None, ["generation.rollout_drafts=false"]).generation.rollout_drafts == "off"
    from configs.schema import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text().replace("rollout_drafts: auto", "rollout_drafts: off")
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").generation.rollout_drafts == "off"


def test_the_knobs_reach_the_engine_config():
    from drafting.spec.suffix import SuffixConfig
    from trainer.loop.rollout import suffix_config

    cfg = load_config(None, ["generation.rollout.min_match=3", "generation.rollout.max_match=5",
                             "generation.rollout.max_depth=4", "generation.rollout.min_count=2",
                             "generation.rollout.history_per_prompt=2", "generation.rollout.history_mb=1.5"])
    assert suffix_config(cfg.generation) == SuffixConfig(3, 5, 4, 2, 2, 3 << 19)
    assert suffix_config(load_config(None, []).generation) == SuffixConfig()  # the schema's defaults are the engine's


def test_the_preflight_says_which_and_why():
    from trainer.loop.preflight import rollout_drafts_line

    line = rollout_drafts_line(load_config(None, []))
    assert line.startswith("generation.rollout_drafts: on (auto, strategy adaptive: a chain is verified only where "
                           "its predicted acceptance pays")
    assert "the last 8 responses per prompt (history up to 64 MiB)" in line
    assert rollout_drafts_line(load_config(None, ["generation.strategy=none"])) == (
        "generation.rollout_drafts: off (auto, strategy none: plain decoding; generation.rollout_drafts=on verifies "
        "every chain found)")
    assert rollout_drafts_line(load_config(None, ["generation.strategy=chain:4"])).startswith(
        "generation.rollout_drafts: off (auto, strategy chain:4: a static strategy would verify every chain found")
    assert rollout_drafts_line(load_config(None, ["generation.rollout_drafts=off"])) == (
        "generation.rollout_drafts: off (as set)")
    assert rollout_drafts_line(load_config(None, ["model.draft=null"])).endswith(
        "; no draft model: speculating from the rollout alone")


def test_round_robin_keeps_groups_together_when_rollout_drafts_are_on():
    # 5 groups of 4 over 2 instances: groups 0, 2, 4 and 1, 3 (the plain deal splits every group)
    split = assign(20, 2, "round_robin", group_size=4, whole_groups=True)
    assert split == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert assign(20, 2, "round_robin", group_size=4) == [list(range(0, 20, 2)), list(range(1, 20, 2))]
    for n, workers, k in [(32, 3, 4), (7, 2, 3), (12, 5, 2), (8, 1, 8)]:
        split = assign(n, workers, "round_robin", group_size=k, whole_groups=True)
        assert sorted(i for part in split for i in part) == list(range(n))  # each request once
        owner = {i: w for w, part in enumerate(split) for i in part}
        assert all(len({owner[i] for i in range(g, min(g + k, n))}) == 1 for g in range(0, n, k))
        sizes = [len(part) for part in split]
        assert max(sizes) - min(sizes) <= k
    assert assign(6, 4, "round_robin", group_size=1, whole_groups=True) == [[0, 4], [1, 5], [2], [3]]
    # chunk keeps groups together either way
    assert assign(12, 2, "chunk", group_size=4, whole_groups=True) == assign(12, 2, "chunk", group_size=4)


def _prompts(n):
    from trainer.loop.data import Prompt

    return [Prompt(index=10 + i, text=f"p{i}", token_ids=[1, 2 + i, 3]) for i in range(n)]


def test_training_requests_carry_their_group_and_history_eval_requests_neither():
    from drafting.spec.suffix import HistoryStore, SuffixConfig
    from trainer.loop.driver import eval_requests, prompt_id, training_requests

    cfg = load_config(None, ["trainer.samples_per_prompt=3"])
    store = HistoryStore(SuffixConfig())
    prompts = _prompts(2)
    store.add(prompt_id(prompts[1]), [7, 8, 9])
    requests, owners = training_requests(cfg, prompts, 5, store)
    assert [r.request_id for r in requests] == ["5:0:0", "5:0:1", "5:0:2", "5:1:0", "5:1:1", "5:1:2"]
    assert [r.group for r in requests] == ["5:0"] * 3 + ["5:1"] * 3
    assert [r.history for r in requests] == [[]] * 3 + [[[7, 8, 9]]] * 3
    assert owners["5:1:2"] == (prompts[1], 2)
    assert len({r.sampling.seed for r in requests}) == 6
    off, _ = training_requests(cfg, prompts, 5, None)
    assert all(r.history is None for r in off)
    assert [r.sampling.seed for r in off] == [r.sampling.seed for r in requests]  # drafts change no seed
    evals = eval_requests(cfg, prompts)
    assert len(evals) == 4 and all(r.group is None and r.history is None for r in evals)
    assert [r.sampling.temperature for r in evals] == [0.0, 0.0, 1.0, 1.0]


class _Sampler:
    def __init__(self, cursor=0):
        self.cursor = cursor

    def state(self):
        return {"cursor": self.cursor}

    def load_state(self, state):
        self.cursor = state["cursor"]


def test_history_round_trips_through_a_checkpoint_and_a_rewind(tmp_path):
    """The store is saved beside driver.json and restored as it was at that checkpoint, so a rewound iteration
    drafts from the same history; the run's start (a JSON copy, as train() keeps it) restores too; a checkpoint
    saved without rollout drafts restores an empty history."""
    from drafting.spec.suffix import HistoryStore, SuffixConfig
    from trainer.core.algorithms import RunningMoments
    from trainer.loop.checkpoint import (HISTORY, driver_state, load_driver_state, read_driver_state,
                                         write_driver_state)

    store = HistoryStore(SuffixConfig(history_per_prompt=2))
    for pid, resp in [(3, [1, 2]), (5, [4]), (3, [6, 7, 8]), (3, [9])]:
        store.add(pid, resp)
    origin = json.loads(json.dumps(driver_state(0, _Sampler(), RunningMoments(), None, HistoryStore(SuffixConfig()))))
    write_driver_state(tmp_path, driver_state(4, _Sampler(7), RunningMoments(), "run", store))
    assert (tmp_path / HISTORY).is_file() and "history" not in json.loads((tmp_path / "driver.json").read_text())
    saved = store.state_dict()
    store.add(5, [0, 0, 0])  # the iterations after the checkpoint, to be redone
    sampler = _Sampler()
    load_driver_state(read_driver_state(tmp_path), sampler, RunningMoments(), store)
    assert sampler.cursor == 7 and store.state_dict() == saved
    assert store.get(3) == [[6, 7, 8], [9]] and store.get(5) == [[4]]
    load_driver_state(origin, _Sampler(), RunningMoments(), store)  # a rewind to the run's start
    assert store.stats()["prompts"] == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    write_driver_state(plain, driver_state(4, _Sampler(7), RunningMoments(), "run"))
    store.add(1, [1])
    load_driver_state(read_driver_state(plain), _Sampler(), RunningMoments(), store)
    assert not (plain / HISTORY).exists() and store.stats()["prompts"] == 0


def test_instance_windows_add_up_to_rollout_metrics():
    """An instance's window of the engine's summary (counts as differences, per-step ratios as counts, the
    index's size as its peak) adds over instances; the fleet's metrics divide by the sample-steps."""
    from actors.generation import rollout_window
    from trainer.loop.rollout import rollout_draft_metrics

    def summary(ss, acc, by_src, chains, lookups, hits, index_tokens, lookup_s):
        out = {"chain_tokens_per_step": acc / ss, "chains_per_step": sum(chains) / ss, "chain_accepted": acc,
               "lookup_ms_per_step": 1.0, "history_hit_rate": chains[2] / ss, "index_docs": 3,
               "index_index_tokens": index_tokens, "index_lookups": lookups, "index_hits": hits,
               "index_lookup_s": lookup_s}
        for name, a, c in zip(("self", "sibling", "history"), by_src, chains):
            out[f"chain_tokens_per_step_{name}"], out[f"chains_{name}"] = a / ss, c
        return out

    first = summary(10, 6, (1, 2, 3), (2, 2, 2), 10, 6, 50, 0.01)
    second = summary(30, 20, (2, 8, 10), (4, 6, 8), 30, 18, 0, 0.03)
    w = rollout_window(second, first, peaks={"index_index_tokens": 120})
    assert w["sample_steps"] == pytest.approx(20)
    assert w["chain_accepted"] == 14 and w["chain_tokens"] == pytest.approx(14)
    assert (w["chain_tokens_self"], w["chain_tokens_sibling"], w["chain_tokens_history"]) == pytest.approx((1, 6, 7))
    assert (w["chains_history"], w["index_lookups"], w["index_hits"]) == (6, 20, 12)
    assert w["index_index_tokens"] == 120 and "history_hit_rate" not in w and "lookup_ms_per_step" not in w
    assert rollout_window(first, {})["chain_tokens_history"] == pytest.approx(3)
    sums = {k: w[k] + v for k, v in rollout_window(first, {}).items()}  # two instances' windows
    m = rollout_draft_metrics(sums, 0, seconds=2.0, instances=2)
    assert m["rollout/chain_tokens_per_step"] == pytest.approx(20 / 30)
    assert m["rollout/chain_tokens_per_step_history"] == pytest.approx(10 / 30)
    assert m["rollout/history_hit_rate"] == pytest.approx(8 / 30) and m["rollout/hit_rate"] == pytest.approx(18 / 30)
    assert m["rollout/index_tokens"] == 170 and m["rollout/lookup_frac"] == pytest.approx(0.03 / 4)
    assert rollout_draft_metrics({}, 10, 1.0, 2) == {}
