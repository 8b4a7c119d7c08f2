"""bench.kv at toy sizes: the JSON's fields, paged holding more live samples than dense at equal bytes, and a GRPO
group's shared prompt prefilled once with the same tokens."""
import json

import pytest

from bench import kv


@pytest.fixture(scope="module")
def toy_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=18, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def test_workload_is_long_tailed_and_capped():
    prompts, lengths = kv.workload(256, 1024, 18, 0, 0.24)
    assert len(prompts) == len(lengths) == 256
    assert all(16 <= len(p) <= 32 and len(p) + n <= 1024 and n >= 1 for p, n in zip(prompts, lengths))
    mean = sum(lengths) / len(lengths)
    assert mean <= 1024 / 4 and max(lengths) > 3 * mean  # a heavy tail
    assert kv.workload(256, 1024, 18, 0, 0.24) == (prompts, lengths)  # seeded


def test_capacity_paged_holds_more_at_equal_bytes(toy_config, one_thread):
    rows, series = kv.capacity(toy_config, 128, 40, 0.24, seed=0, log=lambda r: None, dense_slots=4,
                               paged_slots=32)
    dense, paged = rows
    for r in rows:
        assert {"max_len", "cache", "kv_bytes", "peak_live", "steps", "tokens", "tokens_per_s",
                "preemptions"} <= set(r)
    assert (dense["cache"], paged["cache"]) == ("dense", "paged")
    assert dense["kv_bytes"] == paged["kv_bytes"] and paged["pool_bytes"] <= dense["kv_bytes"]
    assert paged["peak_live"] > dense["peak_live"] == 4
    assert paged["steps"] < dense["steps"] and paged["tokens"] == dense["tokens"]
    assert paged["tokens_match_dense"]  # position-keyed sampling: the same tokens, preempted or not
    assert paged["preemptions"] > 0 and paged["resumed"] == paged["preemptions"]  # the toy pool runs dry
    assert len(series["paged"]["kv_blocks_used"]) == paged["steps"]
    assert max(series["paged"]["kv_blocks_used"]) <= paged["kv_blocks"]
    targets = kv.capacity_targets(rows)["128"]
    assert targets["fewer_steps"] and targets["same_kv_bytes"] and targets["tokens_match"]


def test_sharing_counts(toy_config, one_thread):
    model = kv.random_model(toy_config, 80)
    prompts = kv.random_prompts(2, 40, toy_config.vocab_size, 1)
    row = kv.sharing_row("toy", model, None, "none", prompts, 6, [], seed=0)
    assert {"workload", "group_size", "block", "prompt_tokens_mean", "prefill_tokens_shared",
            "prefill_tokens_unshared", "prompt_kv_bytes_shared", "prompt_kv_bytes_unshared"} <= set(row)
    assert row["prefill_tokens_unshared"] == 2 * 4 * 39 and row["prefill_tokens_shared"] == 2 * 39
    t = kv.sharing_targets([row])["toy"]
    assert t["prefill_one_nth"] and t["kv_within_bound"] and t["tokens_identical"]


def test_main_writes_json_and_png(tmp_path, monkeypatch, toy_config, one_thread):
    monkeypatch.setattr(kv, "tiny_config", lambda: toy_config)
    out = tmp_path / "kv.json"
    result = kv.main(["--out", str(out), "--max-lens", "96", "--requests", "24", "--skip", "sharing"])
    assert result["config"]["threads"] == 1
    data = json.loads(out.read_text())
    assert [(r["max_len"], r["cache"]) for r in data["runs"]] == [(96, "dense"), (96, "paged")]
    assert {"threads", "seed", "machine", "torch", "quick"} <= set(data["config"]) and "seconds" in data
    assert (tmp_path / "kv.png").stat().st_size > 0
