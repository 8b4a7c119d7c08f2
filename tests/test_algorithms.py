"""PPO / GRPO maths against numbers worked out by hand, and the token layout of an experience batch."""

import math

import pytest
import torch

from trainer.core import algorithms as algo
from trainer.core.experience import Experience, make_sequences, sequence_logprobs

LN2 = math.log(2.0)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------- masking
def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(algo.masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(algo.masked_mean(x, mask, dim=1), [1.5, 4.0])


def test_masked_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var ((1)^2 + 0 + 1^2) / 2 = 1; the 100 is padding and comes out 0
    close(algo.masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(algo.masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


# ------------------------------------------------------------------------------------------------ KL
def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    close(algo.kl_penalty(logp, ref, "k1"), [LN2, -LN2])
    close(algo.kl_penalty(logp, ref, "k2"), [0.5 * LN2**2, 0.5 * LN2**2])  # 0.240227
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0.5 + ln2 - 1 = 0.193147; 2 - ln2 - 1 = 0.306853
    close(algo.kl_penalty(logp, ref, "k3"), [0.193147, 0.306853])
    with pytest.raises(ValueError, match="kl_estimator"):
        algo.kl_penalty(logp, ref, "k4")


def test_kl_loss_is_masked_token_mean_of_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.001]]))  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    close(algo.kl_loss(logp, ref, mask, "k3"), 0.25)  # (0.193147 + 0.306853) / 2


# --------------------------------------------------------------------------------- rewards and GAE
def test_compute_rewards_kl_per_token_and_clipped_score_at_last_token():
    score = torch.tensor([2.0, -5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = algo.compute_rewards(score, kl, mask, kl_coef=0.1, reward_clip=3.0)
    # row 0: -0.01, -0.02, -0.03 + 2.0;  row 1: -0.05, +0.05 + clip(-5) = -2.95, padding 0
    close(rewards, [[-0.01, -0.02, 1.97], [-0.05, -2.95, 0.0]])


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's third token is padding (its 9 and 7 are junk)
    adv, ret = algo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.3 = 0.7;  d1 = 0.9*0.3 - 0.4 = -0.13, A1 = -0.13 + 0.72*0.7 = 0.374;
    #        d0 = 0.9*0.4 - 0.5 = -0.14, A0 = -0.14 + 0.72*0.374 = 0.12928
    # row 1: V after the last token is 0: d1 = 2 - 0.5 = 1.5;  d0 = 0.9*0.5 - 1 = -0.55, A0 = -0.55 + 0.72*1.5 = 0.53
    close(adv, [[0.12928, 0.374, 0.7], [0.53, 1.5, 0.0]])
    close(ret, [[0.62928, 0.774, 1.0], [1.53, 2.0, 0.0]])


def test_grpo_group_normalisation():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = algo.grpo_advantages(scores, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.866025; group 2: all equal -> 0
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0, 0.0])
    close(algo.grpo_advantages(torch.tensor([0.0, 3.0, 6.0]), group_size=3), [-1.0, 0.0, 1.0])  # std 3
    # Dr. GRPO: only the group mean comes off, so a near-tie stays a small advantage
    close(algo.grpo_advantages(torch.tensor([0.01, 0.02, 1.0, 1.0]), group_size=2, norm_std=False),
          [-0.005, 0.005, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size=3"):
        algo.grpo_advantages(scores, group_size=3)
    tokens = algo.expand_to_tokens(torch.tensor([0.5, -2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    close(tokens, [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------- losses
def test_policy_loss_clipping_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5)
    logp = torch.log(ratios).requires_grad_(True)
    loss, clip_frac, approx_kl = algo.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token -min(r A, clip(r) A): 1.5,+1 -> -1.2 (clipped); 0.5,+1 -> -0.5; 0.5,-2 -> +1.6 (clipped);
    # 1.1,-1 -> +1.1; padding ignored.  mean = (-1.2 - 0.5 + 1.6 + 1.1) / 4 = 0.25
    close(loss, 0.25)
    close(clip_frac, 0.5)
    close(approx_kl, 0.5 * (math.log(1.5) ** 2 + 2 * LN2**2 + math.log(1.1) ** 2) / 4)  # 0.141799
    loss.backward()
    # clipped tokens get no gradient; d/dlogp of -r A / 4 elsewhere: -0.5/4 and +1.1/4
    close(logp.grad, [[0.0, -0.125, 0.0, 0.275, 0.0]])


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[0.5, 0.1, 0.0, 10.0]])
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # clip(v) = old + clamp(v - old, +-0.2) = 0.2, 0.1, 0.8
    # max((v-R)^2, (clip v - R)^2): max(0.25, 0.64), max(0.01, 0.01), max(0, 0.64) -> 0.5 * 1.29 / 3
    close(algo.value_loss(values, old, returns, mask, clip_eps=0.2), 0.215)
    close(algo.value_loss(values, old, returns, mask, clip_eps=None), 0.5 * 0.26 / 3)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]])
    # uniform over 4: ln 4;  p = (1/4, 3/4): 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    close(algo.entropy_from_logits(logits), [math.log(4.0), 0.562335])


def test_running_moments_and_reward_clip():
    rm = algo.RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    batch_mean, batch_std = rm.update(torch.tensor([4.0, 5.0]))
    close([batch_mean, batch_std], [4.5, math.sqrt(0.5)])
    close([rm.mean, rm.std], [3.0, math.sqrt(2.5)])  # all of 1..5: mean 3, unbiased var 10/4
    close(rm.normalize(torch.tensor([3.0, 6.0])), [0.0, 3.0 / math.sqrt(2.5)])
    restored = algo.RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert (restored.count, restored.mean, restored.std) == (5, rm.mean, rm.std)
    close(algo.clip_reward(torch.tensor([-7.0, 0.5, 7.0]), 2.0), [-2.0, 0.5, 2.0])


# --------------------------------------------------------------------------------- experience layout
def test_make_sequences_layout():
    seqs, attn, action = make_sequences([[1, 5, 6], [1, 7]], [[11, 12], [13, 14, 2]], pad_id=0)
    assert seqs.tolist() == [[1, 5, 6, 11, 12, 0], [0, 1, 7, 13, 14, 2]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert action.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert seqs.dtype == torch.long


def _experience(batch: int = 4) -> Experience:
    prompts, responses = [[1, i + 4] for i in range(batch)], [[5] * (i % 3 + 1) for i in range(batch)]
    seqs, attn, action = make_sequences(prompts, responses, 0)
    return Experience(seqs, attn, action, action.shape[1], advantages=torch.arange(batch * 3.0).view(batch, 3),
                      scores=torch.arange(float(batch)), info={"id": list(range(batch)), "total": 7})


def test_experience_split_and_minibatches():
    exp = _experience(4)
    shards = exp.split(2)
    assert [s.info["id"] for s in shards] == [[0, 1], [2, 3]]
    assert shards[1].sequences.tolist() == exp.sequences[2:].tolist() and shards[1].info["total"] == 7
    assert shards[1].scores.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="batch size 4 does not split evenly across 3"):
        exp.split(3)
    batches = list(exp.minibatches(3, shuffle_seed=0))
    assert [b.batch_size for b in batches] == [3, 1]
    seen = sorted(i for b in batches for i in b.info["id"])
    assert seen == [0, 1, 2, 3]
    for b in batches:  # rows stay aligned across fields
        assert b.scores.tolist() == [float(i) for i in b.info["id"]]
        assert b.advantages[:, 0].tolist() == [3.0 * i for i in b.info["id"]]
    assert [b.info["id"] for b in exp.minibatches(3, shuffle_seed=0)] == [b.info["id"] for b in batches]
    with pytest.raises(ValueError, match="advantages"):
        Experience(exp.sequences, exp.attention_mask, exp.action_mask, 3, advantages=torch.zeros(4, 2))


def test_sequence_logprobs_equal_unpadded_per_sequence():
    """Left-padded prompts + right-padded responses give each row exactly its unpadded log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    prompts, responses = [[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[11, 12], [13, 14, 15, 2], [16]]
    seqs, attn, action = make_sequences(prompts, responses, pad_id=0)
    with torch.no_grad():
        logp, entropy = sequence_logprobs(model, seqs, attn, action.shape[1], temperature=0.7, return_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7  # [len(r), V]
            expected = torch.log_softmax(logits, -1)[torch.arange(len(r)), torch.tensor(r)]
            close(logp[i, : len(r)], expected)
            close(entropy[i, : len(r)], algo.entropy_from_logits(logits))
    assert logp.shape == (3, 4)


def test_trim_padding_drops_columns_padded_in_every_row():
    from trainer.core.experience import make_sequences, trim_padding

    seqs, attn, action = make_sequences([[5, 6], [7]], [[8], [9, 10]], pad_id=0)
    wide_seqs = torch.nn.functional.pad(seqs, (2, 3))  # two more all-pad prompt columns, three response ones
    wide_attn = torch.nn.functional.pad(attn, (2, 3))
    trimmed, mask, kept = trim_padding(wide_seqs, wide_attn, num_actions=action.shape[1] + 3)
    assert kept == 2
    assert torch.equal(trimmed, seqs) and torch.equal(mask, attn)


def test_minibatches_grouped_by_length_cover_every_row_once():
    from trainer.core.experience import Experience, make_sequences

    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    seqs, attn, action = make_sequences([[1]] * 8, [[2] * n for n in lengths], pad_id=0)
    exp = Experience(sequences=seqs, attention_mask=attn, action_mask=action, num_actions=action.shape[1])
    batches = [mb.action_mask.sum(1).tolist() for mb in exp.minibatches(2, shuffle_seed=3, group_by_length=True)]
    assert sorted(n for b in batches for n in b) == sorted(lengths)
    assert sorted(sorted(b) for b in batches) == [[1, 2], [3, 4], [5, 7], [8, 9]]  # neighbours in length
    again = [mb.action_mask.sum(1).tolist() for mb in exp.minibatches(2, shuffle_seed=3, group_by_length=True)]
    assert again == batches
