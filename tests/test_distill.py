"""Draft distillation: the loss against hand-computed values, the top-k handover, the learner's state,
`python -m trainer.distill_draft` on the tiny world, and the draft's weights riding the weight-sync group."""
import io
import math

import pytest
import ray
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from configs.schema import ConfigError, DraftConfig, load_config
from trainer.distill import DraftLearner, acceptance_probability, draft_loss
from trainer.experience import Experience, make_sequences, sequence_logprobs, sequence_logprobs_topk


def test_kl_topk_by_hand():
    # actor p = (0.5, 0.3, 0.2), draft q = (0.25, 0.25, 0.5); top-2 of p: tokens 0, 1, tail = {2}
    p, q = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.25, 0.25, 0.5]])
    loss = draft_loss(q.log(), "kl_topk", topk_logprobs=p[:, :2].log(), topk_ids=torch.tensor([[0, 1]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # k = 1: buckets {0} and {1, 2}
    loss1 = draft_loss(q.log(), "kl_topk", topk_logprobs=p[:, :1].log(), topk_ids=torch.tensor([[0]]))
    assert loss1.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-5)
    # cross-entropy of the sampled token
    ce = draft_loss(q.log(), "ce_sampled", tokens=torch.tensor([2]))
    assert ce.item() == pytest.approx(-math.log(0.5), rel=1e-6)
    with pytest.raises(ValueError, match="draft loss 'mse'"):
        draft_loss(q.log(), "mse", tokens=torch.tensor([2]))


def test_kl_topk_is_the_full_kl_at_k_equal_v_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(64, 11, generator=g) * 2, torch.randn(64, 11, generator=g) * 2
    logp = teacher.log_softmax(-1)
    full = F.kl_div(student.log_softmax(-1), logp, log_target=True, reduction="batchmean")
    losses = []
    for k in range(1, 12):
        top_logp, top_ids = logp.topk(k, -1)
        losses.append(draft_loss(student, "kl_topk", topk_logprobs=top_logp, topk_ids=top_ids).item())
    assert losses[-1] == pytest.approx(full.item(), rel=1e-5)
    assert all(0 <= a <= b + 1e-6 for a, b in zip(losses, losses[1:]))  # coarser buckets: less divergence
    top = logp.topk(4, -1)
    assert draft_loss(teacher, "kl_topk", topk_logprobs=top.values, topk_ids=top.indices).item() == \
        pytest.approx(0.0, abs=1e-6)  # a draft equal to the actor
    same = acceptance_probability(teacher, teacher)
    assert torch.allclose(same, torch.ones(64)) and (acceptance_probability(teacher, student) < 1).all()


def _tiny_lm(seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _rollout(batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(1, 6, (batch,), generator=g)
    response_lengths = torch.randint(1, 9, (batch,), generator=g)
    prompts = [[1] + torch.randint(4, 24, (int(n),), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(3, 24, (int(n),), generator=g).tolist() for n in response_lengths]
    return make_sequences(prompts, responses, pad_id=0)


def test_old_logprob_pass_hands_over_topk_of_its_own_logits(one_thread):
    actor = _tiny_lm(0)
    seqs, attn, action = _rollout()
    R = action.shape[1]
    with torch.no_grad():
        logp, top_logp, top_ids = sequence_logprobs_topk(actor, seqs, attn, R, 0.7, k=5)
        torch.testing.assert_close(logp, sequence_logprobs(actor, seqs, attn, R, 0.7))
        for i in range(len(seqs)):  # each row alone, unpadded: the top-5 of its full log-softmax
            keep = attn[i].bool()
            n = int(action[i].sum())
            full = (actor(seqs[i:i + 1, keep]).logits[0, -n - 1:-1] / 0.7).log_softmax(-1)
            ref = full.topk(5, -1)
            torch.testing.assert_close(top_logp[i, :n], ref.values, atol=1e-5, rtol=0)
            assert torch.equal(top_ids[i, :n], ref.indices)
    assert top_logp.shape == top_ids.shape == (len(seqs), R, 5)
    with pytest.raises(ValueError, match="topk_logprobs has shape"):
        Experience(seqs, attn, action, R, topk_logprobs=top_logp[:, :-1], topk_ids=top_ids[:, :-1])


@pytest.mark.parametrize("loss", ["kl_topk", "ce_sampled"])
def test_learner_moves_the_draft_toward_the_actor_and_resumes_exactly(one_thread, loss):
    actor, draft = _tiny_lm(0), _tiny_lm(1, layers=1)
    seqs, attn, action = _rollout(16)
    R = action.shape[1]
    with torch.no_grad():
        _, top_logp, top_ids = sequence_logprobs_topk(actor, seqs, attn, R, 1.0, k=6)
    batch = Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)
    learner = DraftLearner(draft, DraftConfig(loss=loss, lr=1e-2, steps=4, batch_size=4), temperature=1.0)
    first = learner.train(batch, seed=0)
    for it in range(1, 6):
        last = learner.train(batch, seed=it)
    assert first["steps"] == 4 and first["tokens"] == int(action.sum())
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert learner.updates == 24

    buffer = io.BytesIO()  # as the draft trainer's checkpoint file does
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    resumed = DraftLearner(_tiny_lm(1, layers=1), DraftConfig(loss=loss, lr=1e-2, steps=4, batch_size=4), temperature=1.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(learner.model.parameters(), resumed.model.parameters()))
    expected, got = learner.train(batch, seed=9), resumed.train(batch, seed=9)
    assert got == expected  # the same step only if AdamW's moments came back too
    assert all(torch.equal(a, b) for a, b in zip(learner.model.parameters(), resumed.model.parameters()))


def test_kl_topk_without_the_teacher_and_bad_config_are_errors():
    seqs, attn, action = _rollout(2)
    learner = DraftLearner(_tiny_lm(1, layers=1), DraftConfig(loss="kl_topk"), temperature=1.0)
    with pytest.raises(ValueError, match="top-k"):
        learner.train(Experience(seqs, attn, action, action.shape[1]), seed=0)
    with pytest.raises(ConfigError, match="^draft.loss: 'mse'"):
        load_config(None, ["draft.loss=mse"])
    with pytest.raises(ConfigError, match="^draft.top_k: must be positive"):
        load_config(None, ["draft.top_k=0"])
    with pytest.raises(ConfigError, match="^draft.lr: must not be negative"):
        load_config(None, ["draft.lr=-1"])


def test_distill_draft_command_fits_a_draft_cut_from_the_actor(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from drafting import SpeculativeEngine
    from trainer.distill_draft import main

    out = tmp_path / "draft"
    report = main(["--actor", "tiny", "--prompts", "tiny", "--out", str(out), "--layers", "1", "--num-prompts", "80",
                   "--held-out", "16", "--max-new-tokens", "24", "--epochs", "3", "--batch-size", "16",
                   "--lr", "1e-3", "--threads", "1"])
    before, after = report["history"][0], report["history"][-1]
    assert after["acceptance"] > before["acceptance"] + 0.03, report["history"]  # measured: 0.647 -> 0.706
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.num_hidden_layers == 1
    engine = SpeculativeEngine(tiny_world.actor_path, str(out), strategy="chain:2", max_slots=4, max_len=64)
    assert engine.generate([[1, 5, 6]])[0].token_ids  # the engine takes it as a draft


def test_draft_weights_ride_the_weight_group_with_a_version(ray_cluster, tiny_world, tmp_path, one_thread):
    """Policy rank 0 and the draft trainer both send on one group; the instance decodes with what they sent."""
    from actors.draft_trainer import DraftTrainer
    from actors.policy_trainer import PolicyTrainer
    from actors.trainer_group import create_trainer_group
    from configs.schema import GenerationConfig
    from drafting import GenRequest, SamplingParams, SpeculativeEngine
    from trainer.rollout import RolloutFleet

    gen = GenerationConfig(num_instances=1, max_slots=16, strategy="tree:3,2,6")
    fleet = RolloutFleet(gen, tiny_world.actor_path, tiny_world.draft_path)
    policy = create_trainer_group(PolicyTrainer, 1, {"num_cpus": 0.5}, tiny_world.actor_path,
                                  {"lr": 1e-4, "zero_stage": 1, "micro_batch_size": 16, "temperature": 1.0})
    draft = ray.remote(DraftTrainer).options(num_cpus=0.5).remote(tiny_world.draft_path,
                                                                  DraftConfig(lr=3e-3, steps=4), 1.0)
    try:
        prompts = [[1, 4, 5, 10 + i % 8, 11, 7] for i in range(16)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
        requests = lambda tag: [GenRequest(f"{tag}{i}", p, greedy) for i, p in enumerate(prompts)]  # noqa: E731
        first = fleet.run(requests("a"))
        assert {(o.stats["weight_version"], o.stats["draft_version"]) for o in first} == {(0, 0)}
        seqs, attn, action = make_sequences(prompts, [o.token_ids for o in first], pad_id=0)
        R = action.shape[1]
        logp, top_logp, top_ids = (torch.cat(x) for x in zip(*ray.get(
            policy.call_split("compute_logprobs_topk", seqs, attn, R, 8))))
        torch.testing.assert_close(logp, torch.cat(ray.get(policy.call_split("compute_logprobs", seqs, attn, R))))
        batch = Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)
        metrics = ray.get(draft.train.remote(batch, 0))
        assert metrics["steps"] == 4 and math.isfinite(metrics["loss"])

        seconds = fleet.sync_weights_from(policy, 5, draft)
        assert seconds["draft_s"] > 0
        assert (fleet.stats()[0].weight_version, fleet.stats()[0].draft_version) == (5, 5)
        second = fleet.run(requests("b"))
        assert {(o.stats["weight_version"], o.stats["draft_version"]) for o in second} == {(5, 5)}
        # the instance drafts with exactly the trainer's weights: same acceptances as a local engine with them
        ray.get(draft.save_checkpoint.remote(str(tmp_path / "ckpt")))
        local = SpeculativeEngine(tiny_world.actor_path, str(tmp_path / "ckpt" / "hf"), strategy=gen.strategy,
                                  max_slots=gen.max_slots, max_len=gen.max_len)
        expected = local.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20))
        assert [o.stats["accepted"] for o in second] == [o.stats["accepted"] for o in expected]
        assert [o.stats["accepted"] for o in second] != [o.stats["accepted"] for o in first]
        assert [o.token_ids for o in second] == [o.token_ids for o in first]  # greedy: the draft changes only speed

        fleet.sync_weights_from(policy, 6)  # draft.online off: the group re-forms with one sender
        assert (fleet.stats()[0].weight_version, fleet.stats()[0].draft_version) == (6, 5)
    finally:
        policy.shutdown()
        for handle in [draft, *fleet.instances]:
            ray.kill(handle)
