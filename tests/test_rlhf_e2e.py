"""The whole loop on a real local Ray cluster: rollouts on 2 speculative instances, a W=2 DeepSpeed
policy and critic, reward and reference actors, weight sync, W&B offline records, checkpoint/resume."""
import glob
import math
from pathlib import Path

import pytest
import torch

from configs.schema import load_config

SMALL = ["trainer.prompts_per_iteration=8", "trainer.samples_per_prompt=2", "trainer.micro_batch_size=4",
         "generation.max_slots=16", "tracking.progress=false", "generation.cpus_per_instance=1",
         "trainer.cpus_per_actor=0.5"]


def run_config(tmp_path, *overrides):
    from trainer.loop.run import run

    cfg = load_config(None, SMALL + [f"trainer.output_dir={tmp_path}", *overrides])
    return cfg, run(cfg)


def test_ppo_iterations_two_instances_two_ranks(ray_cluster, tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.loop.tracking import read_wandb_history

    cfg, history = run_config(tmp_path, "trainer.algorithm=ppo", "trainer.iterations=3", "trainer.world_size=2",
                              "generation.num_instances=2", "trainer.save_every=3", "trainer.rm_weight=0.5",
                              "data.eval.size=8", "trainer.eval_every=1", "trainer.critic_warmup=1",
                              "model.critic_init=reward")
    assert len(history) == 4  # three iterations and the closing evaluation
    final_eval = history.pop()
    assert final_eval["iteration"] == 3 and 0.0 <= final_eval["eval/exact"] <= 1.0
    for metrics in history:
        for key in ("score/mean", "reward/mean", "kl/mean", "loss/value", "response/length_mean",
                    "rollout/tokens_per_s", "rollout/mean_accepted", "time/generate", "time/make_experience",
                    "time/update", "time/weight_sync", "eval/score", "eval/reward", "eval/sampled_score",
                    "rollout/acceptance_rate", "draft/loss", "time/draft_sync", "time/draft_wait"):
            assert math.isfinite(metrics[key]), key
        assert metrics["response/length_mean"] > 0
        # the default strategy, adaptive, reports what it did per rollout
        for key in ("drafting/plain_frac", "drafting/nodes_per_sample_step", "drafting/step_ms",
                    "drafting/selection_overhead_frac", "drafting/accepted_per_sample_step"):
            assert math.isfinite(metrics[key]), key
        assert 0.0 <= metrics["drafting/plain_frac"] <= 1.0
        # the paged K/V memory's work: every prompt token prefilled or shared, no pool ran dry at these sizes
        assert metrics["rollout/prefill_tokens"] + metrics["rollout/shared_tokens"] > 0
        assert metrics["rollout/preemptions"] == metrics["rollout/resumed"] == 0
        assert 0.0 < metrics["rollout/kv_peak_frac"] <= 1.0
    # the draft adapts online (on by default): every push carries a version, the rollouts report theirs
    assert [(m["rollout/weight_version"], m["rollout/draft_version"]) for m in history] == [(0, 0), (1, 1), (2, 2)]
    # iteration 0 is critic warm-up: the critic learns, the policy does not
    assert "loss/policy" not in history[0]
    for metrics in history[1:]:
        for key in ("loss/policy", "policy/clip_frac", "policy/entropy"):
            assert math.isfinite(metrics[key]), key
    # so the policy is still the reference in iteration 1; the first policy update moves it away
    assert history[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5)
    assert history[1]["kl/mean"] == pytest.approx(0.0, abs=1e-5)
    assert history[2]["kl/mean"] != pytest.approx(0.0, abs=1e-7)

    # the checkpoint's actor loads on its own as a Hugging Face model
    ckpt = Path(tmp_path) / "checkpoints" / "iter_00003"
    assert (Path(tmp_path) / "checkpoints" / "latest").read_text() == "iter_00003"
    model = AutoModelForCausalLM.from_pretrained(ckpt / "actor_hf")
    initial = AutoModelForCausalLM.from_pretrained(tiny_world.actor_path)
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    draft = AutoModelForCausalLM.from_pretrained(ckpt / "draft" / "hf")
    initial_draft = AutoModelForCausalLM.from_pretrained(tiny_world.draft_path)
    assert not torch.equal(draft.model.embed_tokens.weight, initial_draft.model.embed_tokens.weight)

    # W&B recorded every iteration's metrics offline
    (run_file,) = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    rows = read_wandb_history(run_file)
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    assert rows[3]["eval/score"] == pytest.approx(final_eval["eval/score"])
    for row, metrics in zip(rows, history):
        assert row["score/mean"] == pytest.approx(metrics["score/mean"])
        assert row["loss/value"] == pytest.approx(metrics["loss/value"])
        assert ("loss/policy" in row) == ("loss/policy" in metrics)
        if "loss/policy" in metrics:
            assert row["loss/policy"] == pytest.approx(metrics["loss/policy"])


def test_resume_matches_uninterrupted_run(ray_cluster, tiny_world, tmp_path):
    # a static tree: adaptive's choices follow measured step times, so its accepted tokens per step (compared
    # below: the same draft weights decode the same) are not reproducible, though its tokens are
    common = ["generation.strategy=tree:3,2,6", "trainer.algorithm=grpo", "trainer.world_size=1",
              "generation.num_instances=1", "trainer.save_every=1", "tracking.wandb=false", "data.eval.path=null",
              "draft.full_budget=true"]  # the draft's steps otherwise end with the policy update: timing-dependent
    _, straight = run_config(tmp_path / "a", *common, "trainer.iterations=2")
    _, first = run_config(tmp_path / "b", *common, "trainer.iterations=1")
    _, resumed = run_config(tmp_path / "b", *common, "trainer.iterations=2", "trainer.resume=true")
    assert first[0]["score/mean"] == straight[0]["score/mean"]
    assert len(resumed) == 1  # only iteration 2 ran
    # the draft's weights and AdamW states come back too: the same draft decodes and learns the same
    for key in ("score/mean", "reward/mean", "response/length_mean", "kl/mean", "loss/policy", "policy/entropy",
                "rollout/mean_accepted", "draft/loss"):
        assert resumed[0][key] == pytest.approx(straight[1][key], rel=1e-4, abs=1e-6), key
