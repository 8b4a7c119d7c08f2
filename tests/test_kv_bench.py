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
    result = kv.main(["--out", str(out), "--max-lens", "96", "--requests", "24", "--skip", "sharing,blocks"])
    assert result["config"]["threads"] == 1
    data = json.loads(out.read_text())
    assert [(r["max_len"], r["cache"]) for r in data["runs"]] == [(96, "dense"), (96, "paged")]
    assert {"threads", "seed", "machine", "torch", "quick"} <= set(data["config"]) and "seconds" in data
    assert (tmp_path / "kv.png").stat().st_size > 0


# ---- the `blocks` part ------------------------------------------------------------------------------------------
def test_fragmentation_arithmetic():
    assert kv.internal_fragmentation(0, 16, 0) == 0.0
    assert kv.internal_fragmentation(4, 16, 48) == 0.25  # 64 positions allocated, 48 held
    assert kv.row_fragmentation([16, 32], 16) == 0.0
    assert kv.row_fragmentation([1], 8) == 7 / 8
    assert kv.row_fragmentation([17, 40], 16) == (15 + 8) / 80  # 2 + 3 blocks
    # a pool's rows: the blocks it hands out give the same share
    import torch

    from drafting.runtime.blocks import BlockPool

    lengths = [3, 16, 17, 40, 64, 65]
    for block in (8, 16, 32, 64):
        pool = BlockPool(64, block, len(lengths), 16, torch.device("cpu"))
        for r, n in enumerate(lengths):
            assert pool.grow(r, n)
        assert kv.internal_fragmentation(pool.used, block, sum(lengths)) == kv.row_fragmentation(lengths, block)
    # bigger blocks leave more of the last block empty
    fr = [kv.row_fragmentation(lengths, b) for b in (8, 16, 32, 64)]
    assert fr == sorted(fr) and fr[0] < fr[-1]


def test_shared_prompt_blocks_match_the_pool():
    import torch

    from drafting.runtime.blocks import BlockPool
    from drafting.runtime.memory import PagedMemory

    for block in (8, 16, 32, 64):
        for prompt_len in (1, 5, 16, 17, 33, 64, 65, 512):
            pool = BlockPool(1024, block, 4, -(-600 // block), torch.device("cpu"))
            mem = PagedMemory(pool, ())
            assert mem.claim(0, prompt_len)
            for row in (1, 2, 3):
                mem.share(row, 0, prompt_len)
            assert pool.used == kv.shared_prompt_blocks(prompt_len, 4, block)
            assert kv.shared_prompt_blocks(prompt_len, 4, block, share=False) == 4 * -(-prompt_len // block)
    # a 20-token prompt: blocks of 16 share one full block, blocks of 32 none
    assert kv.shared_prompt_blocks(20, 4, 16) == 2 + 3 and kv.shared_prompt_blocks(20, 4, 32) == 4


def test_block_sizes_toy(toy_config, one_thread):
    rows, runs, info = kv.block_sizes_capacity(toy_config, 128, 40, 0.24, [4, 8, 16], 2, seed=0,
                                               log=lambda r: None, dense_slots=4, paged_slots=32)
    assert [r["block"] for r in rows] == [4, 8, 16]
    assert [(r["repeat"], r["block"]) for r in runs] == [(0, 4), (0, 8), (0, 16), (1, 8), (1, 16), (1, 4)]
    for r in rows:
        assert {"median", "min", "max"} <= set(r["tokens_per_s"]) and len(r["tokens_per_s_runs"]) == 2
        assert r["tokens_identical"] and r["tokens"] == rows[0]["tokens"]
        assert 0.0 <= r["fragmentation_at_peak"] < 1.0 and r["blocks_used_peak"] <= r["pool_blocks"]
        assert r["pool_positions"] <= info["workload"]["kv_bytes"] // info["workload"]["position_bytes"]
        s = info["series"][str(r["block"])]
        assert all(u * r["block"] >= h >= 0 for u, h in zip(s["kv_blocks_used"], s["kv_held"]))
    assert any(r["preemptions"] > 0 for r in rows)  # the toy pool runs dry
    for r in rows:
        assert {"median", "min", "max"} <= set(r["tokens_per_cpu_s"]) and 0 <= r["contended_runs"] <= 2
    assert all(isinstance(x["contended"], bool) for x in runs)


def _row(block, cpu, steps, frag=0.1, preempt=0):
    t = {"median": cpu, "min": cpu, "max": cpu}
    return {"block": block, "tokens_per_cpu_s": t, "tokens_per_s": t, "tokens_per_s_runs": [cpu],
            "tokens_per_s_uncontended": {**t, "runs": 1}, "contended_runs": 0, "steps": steps,
            "fragmentation_at_peak": frag, "preemptions": preempt}


def test_block_choice_rule():
    # a tie on throughput: the largest block whose steps are within 3% of the fewest
    rows = [_row(8, 1000, 1000), _row(16, 990, 1020), _row(32, 1005, 1100), _row(64, 900, 1200)]
    c = kv.block_choice(rows, [], [])
    assert (c["block"], c["fastest_cpu"], c["tied"], c["near_fewest_steps"]) == (16, 32, [8, 16, 32], [8, 16])
    assert c["text"].startswith("Block 16") and "keep it" in c["text"]
    # one size clearly faster: it wins whatever its steps
    rows = [_row(8, 1000, 1000), _row(16, 1200, 1100)]
    assert kv.block_choice(rows, [], [])["block"] == 16
    rows = [_row(8, 1300, 1000), _row(16, 1000, 1000)]
    assert kv.block_choice(rows, [], [])["block"] == 8
    assert kv.contended({"cpu_seconds": 5.0, "seconds": 10.0}) and not kv.contended({"cpu_seconds": 9.5,
                                                                                      "seconds": 10.0})


def test_main_blocks_part(tmp_path, monkeypatch, toy_config, one_thread):
    monkeypatch.setattr(kv, "tiny_config", lambda: toy_config)
    monkeypatch.setattr(kv, "tiny_prompt_lengths", lambda: [5, 9, 17, 33, 12, 20, 7, 30])
    out = tmp_path / "kv_blocks.json"
    kv.main(["--out", str(out), "--blocks", "4,16", "--blocks-max-len", "96", "--requests", "24", "--quick",
             "--skip", "capacity,sharing", "--gather-context", "128", "--gather-rows", "2"])
    part = json.loads(out.read_text())["blocks"]
    assert [r["block"] for r in part["rows"]] == [4, 16] and part["tokens_identical"]
    assert [(r["cache"], r["block"]) for r in part["gather"]] == [("dense", 0), ("paged", 4), ("paged", 16)]
    assert {r["prompts"] for r in part["sharing"]} == {"tiny", "20-70", "512"}
    for r in part["sharing"]:  # a group of 4 shares: at most what it takes without, at least a quarter of it
        assert 0.25 <= r["kv_ratio"] <= 1.0
    assert part["choice_detail"]["block"] in (4, 16) and "GPU is unmeasured" in part["choice"]
    assert (tmp_path / "kv_blocks.png").stat().st_size > 0
    again = kv.main(["--out", str(tmp_path / "again.json"), "--blocks-from", str(out)])  # nothing is run
    assert again["blocks"]["choice_detail"] == part["choice_detail"] and "refinished" in again["blocks"]
    assert (tmp_path / "again.png").stat().st_size > 0
