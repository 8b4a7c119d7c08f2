"""Training-side actors on a real local Ray cluster with real DeepSpeed (gloo, CPU) and tiny random models."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from actors.critic import Critic
from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.trainer_group import create_trainer_group
from configs.schema import TrainerConfig
from trainer.core import algorithms as algo
from trainer.loop.data import Prompt
from trainer.core.experience import Experience, make_sequences, sequence_logprobs
from trainer.core.deepspeed_backend import load_scalar_head_model

PER_RANK = {"num_cpus": 0.5, "num_gpus": 0}


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    """The session's cluster (tests/conftest.py)."""
    yield


def _config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True,
                       **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(root / "actor")
    torch.manual_seed(1)
    LlamaForSequenceClassification(_config(num_labels=1)).save_pretrained(root / "reward")
    LlamaForSequenceClassification(_config(num_labels=2)).save_pretrained(root / "reward2")
    return {k: str(root / k) for k in ("actor", "reward", "reward2")}


def _batch(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    def words(lo: int, hi: int) -> list[list[int]]:  # `batch` random token lists of length lo..hi-1
        lengths = torch.randint(lo, hi, (batch,), generator=g).tolist()
        return [torch.randint(4, 32, (n,), generator=g).tolist() for n in lengths]

    prompts = [[1] + p for p in words(1, 5)]
    responses = words(1, 6)
    return make_sequences(prompts, responses, pad_id=0)


def _policy_cfg(**extra) -> dict:
    return {"lr": 3e-4, "zero_stage": 2, "micro_batch_size": 2, "ppo_epochs": 2, "clip_eps": 0.2, "max_norm": 1.0,
            "temperature": 0.8, "seed": 3, "device": "cpu", "threads": 1, **extra}


def _states_equal(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# --------------------------------------------------------------------------------------------- policy
def test_policy_group_update_sync_and_checkpoint_resume(ray_local, models, tmp_path):
    """W=2 ZeRO-2: ranks stay identical, loss falls on a repeated batch, a fresh group resumes exactly."""
    seqs, attn, action = _batch(4)
    num_actions = action.shape[1]
    cfg = _policy_cfg(use_kl_loss=True, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)  # GRPO-style terms
    group = create_trainer_group(PolicyTrainer, 2, PER_RANK, models["actor"], cfg)
    try:
        init_state = ray.get(group.actors[0].get_state_dict.remote())
        old_logp = torch.cat(ray.get(group.call_split("compute_logprobs", seqs, attn, num_actions)))
        with torch.no_grad():  # the trainer's log-probs are the HF model's at the rollout temperature
            hf_model = AutoModelForCausalLM.from_pretrained(models["actor"])
            local = sequence_logprobs(hf_model, seqs, attn, num_actions, 0.8)
        torch.testing.assert_close(old_logp * action, local * action, atol=1e-5, rtol=0)

        adv = algo.expand_to_tokens(torch.tensor([1.0, -1.0, 0.5, -0.5]), action)
        exp = Experience(seqs, attn, action, num_actions, old_logprobs=old_logp, ref_logprobs=old_logp - 0.1,
                         advantages=adv)
        losses = []
        for it in range(3):
            metrics = ray.get(group.call_sharded("update", exp, it))
            assert metrics[0] == metrics[1]  # all-reduced
            losses.append(metrics[0]["policy_loss"])
        assert set(metrics[0]) == {"policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm", "kl_loss"}
        assert losses[0] > losses[1] > losses[2], losses
        assert metrics[0]["grad_norm"] > 0 and metrics[0]["approx_kl"] > 0, metrics

        s0, s1 = ray.get(group.call_all("get_state_dict", all_ranks=True))
        assert _states_equal(s0, s1)
        assert not _states_equal(s0, init_state, atol=1e-4)

        specs = ray.get(group.actors[0].named_parameters_for_sync.remote())
        assert [(n, tuple(t.shape)) for n, t in s0.items()] == [(n, s) for n, s, _ in specs]

        ray.get(group.actors[0].save_hf.remote(str(tmp_path / "hf")))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
        assert all(torch.equal(saved[k], v) for k, v in s0.items())

        ray.get(group.call_all("save_checkpoint", str(tmp_path / "ckpt")))
        expected_metrics = ray.get(group.call_sharded("update", exp, 3))[0]
        expected_state = ray.get(group.actors[0].get_state_dict.remote())
    finally:
        group.shutdown()

    fresh = create_trainer_group(PolicyTrainer, 2, PER_RANK, models["actor"], cfg)
    try:
        ray.get(fresh.call_all("load_checkpoint", str(tmp_path / "ckpt")))
        assert _states_equal(ray.get(fresh.actors[0].get_state_dict.remote()), s0)
        resumed_metrics = ray.get(fresh.call_sharded("update", exp, 3))[0]
        resumed_state = ray.get(fresh.actors[0].get_state_dict.remote())
    finally:
        fresh.shutdown()
    # Same loss and the same weights after the step: only true if Adam's moments came back too.
    assert resumed_metrics == pytest.approx(expected_metrics, abs=1e-6)
    assert _states_equal(resumed_state, expected_state, atol=1e-6)


def test_trainer_group_bad_model_path_fails_fast(ray_local, tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(Exception, match=r"policy model path '.*no_such_model' is not a directory"):
        create_trainer_group(PolicyTrainer, 1, PER_RANK, missing, _policy_cfg())


# --------------------------------------------------------------------------------------------- critic
def test_critic_update_reduces_value_loss(ray_local, models):
    seqs, attn, action = _batch(4, seed=1)
    num_actions = action.shape[1]
    cfg = {"lr": 5e-3, "zero_stage": 1, "micro_batch_size": 2, "ppo_epochs": 2, "value_clip": 0.2, "seed": 0}
    group = create_trainer_group(Critic, 1, PER_RANK, models["reward"], cfg, init_from="reward")
    try:
        returns = torch.linspace(-1.0, 1.0, num_actions).expand(4, -1) * action
        losses = []
        for it in range(4):  # PPO style: old values refreshed each round, targets fixed
            values = torch.cat(ray.get(group.call_split("values", seqs, attn, num_actions)))
            exp = Experience(seqs, attn, action, num_actions, values=values, returns=returns)
            losses.append(ray.get(group.call_sharded("update", exp, it))[0]["value_loss"])
        assert losses[-1] < 0.5 * losses[0], losses
    finally:
        group.shutdown()


def test_critic_from_actor_keeps_backbone_with_fresh_head(models):
    critic = load_scalar_head_model(models["actor"], "critic", init_from="actor")
    actor = AutoModelForCausalLM.from_pretrained(models["actor"])
    torch.testing.assert_close(critic.model.layers[0].mlp.up_proj.weight, actor.model.layers[0].mlp.up_proj.weight)
    assert critic.score.weight.shape == (1, 32) and critic.score.weight.abs().sum() > 0


# ------------------------------------------------------------------------------------ reward, reference
TINY_REWARD = "trainer/tiny/reward.py:compute_score"


def test_reward_padding_invariance_and_weighted_sum(models):
    prompts = [Prompt(i, "", [], "p.jsonl", "tiny/sort", answer) for i, answer in enumerate(["2 1", "3", "6 5 4"])]
    responses_text = ["2 1", "7", "6 5"]
    seqs, attn, _ = make_sequences([[1, 5, 6, 7], [1, 8], [1, 9, 10]], [[11, 12], [13, 14, 15, 2], [16]], pad_id=0)
    rm_only = RewardActor(models["reward"], TrainerConfig(rm_weight=1.0))
    batch = rm_only.score(seqs, attn, prompts, responses_text)
    assert batch.fn is None
    batch = batch.total
    for i in range(3):
        alone = attn[i].bool()
        single = rm_only.score(seqs[i : i + 1, alone], attn[i : i + 1, alone], prompts[i : i + 1],
                               responses_text[i : i + 1]).total
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=0)
    assert batch.std() > 0  # the scores really depend on the tokens

    both = RewardActor(models["reward"], TrainerConfig(reward_fn=TINY_REWARD, reward_fn_weight=2.0, rm_weight=0.5))
    scored = both.score(seqs, attn, prompts, responses_text)
    fn = torch.tensor([1.0, 0.0, 0.5 * 2 / 3])  # exact; wrong digit; 2 of 3 positions right
    torch.testing.assert_close(scored.total, 0.5 * batch + 2.0 * fn)
    assert scored.fn.scores == pytest.approx(fn.tolist()) and scored.fn.extra == {"exact": [1.0, 0.0, 0.0]}


def test_reward_model_errors_name_the_path(models, tmp_path):
    with pytest.raises(ValueError, match=r"actor.*ForSequenceClassification"):
        RewardActor(models["actor"], TrainerConfig())
    with pytest.raises(FileNotFoundError, match="missing_rm"):
        RewardActor(str(tmp_path / "missing_rm"), TrainerConfig())
    with pytest.raises(ValueError, match="reward2.*num_labels=2"):
        RewardActor(models["reward2"], TrainerConfig())
    with pytest.raises(ValueError, match="rm_weight is 0 and there is no reward_fn"):
        RewardActor(None, TrainerConfig(rm_weight=0.0))


def test_reference_logprobs(models):
    seqs, attn, action = _batch(3, seed=2)
    ref = ReferenceActor(models["actor"], batch_size=2)
    with torch.no_grad():
        expected = sequence_logprobs(AutoModelForCausalLM.from_pretrained(models["actor"]), seqs, attn,
                                     action.shape[1], 0.5)
    got = ref.logprobs(seqs, attn, action.shape[1], 0.5)
    torch.testing.assert_close(got * action, expected * action)  # padded positions carry no value
    assert not any(p.requires_grad for p in ref.model.parameters())
