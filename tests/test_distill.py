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
from trainer.draft.distill import DraftLearner, acceptance_probability, draft_loss
from trainer.core.experience import Experience, make_sequences, sequence_logprobs, sequence_logprobs_topk


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
    from trainer.draft.cli import main

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


def test_the_teacher_from_the_sampled_features_is_the_teacher_pass(tiny_world, one_thread):
    """distill_draft's layer cut reads its teacher off the features the engine kept while sampling: the same top-k
    as a second forward over the samples gives."""
    from transformers import AutoTokenizer

    from trainer.draft.teacher import feature_teacher_batch, teacher_batch
    from trainer.draft.distill_head import load_actor, sample_with_features
    from trainer.tiny.task import read_prompts_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.actor_path)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in read_prompts_jsonl(tiny_world.eval_prompts)[:3]]
    outs = sample_with_features(tiny_world.actor_path, prompts, 0.8, 12, seed=3, max_len=64, progress=False)
    actor = load_actor(tiny_world.actor_path)
    with torch.no_grad():
        got = feature_teacher_batch(actor, prompts, outs, 0, 0.8, 5)
        want = teacher_batch(actor, prompts, [o.token_ids for o in outs], 0, 0.8, 5, desc=None)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.action_mask, want.action_mask)
    m = want.action_mask.bool()
    assert m.sum() > 10
    torch.testing.assert_close(got.topk_logprobs[m], want.topk_logprobs[m], atol=1e-4, rtol=0)
    assert torch.equal(got.topk_ids[m][:, 0], want.topk_ids[m][:, 0])
    assert not got.topk_logprobs[~m].any()  # padding stays empty


def test_draft_weights_ride_the_weight_group_with_a_version(ray_cluster, tiny_world, tmp_path, one_thread):
    """Policy rank 0 and the draft trainer both send on one group; the instance decodes with what they sent."""
    from actors.draft_trainer import DraftTrainer
    from actors.policy_trainer import PolicyTrainer
    from actors.trainer_group import create_trainer_group
    from configs.schema import GenerationConfig
    from drafting import GenRequest, SamplingParams, SpeculativeEngine
    from trainer.loop.rollout import RolloutFleet

    gen = GenerationConfig(num_instances=1, max_slots=16, strategy="tree:3,2,6")
    fleet = RolloutFleet(gen, tiny_world.actor_path, tiny_world.draft_path)
    policy = create_trainer_group(PolicyTrainer, 1, {"num_cpus": 0.5}, tiny_world.actor_path,
                                  {"lr": 1e-4, "zero_stage": 1, "micro_batch_size": 16, "temperature": 1.0})
    # steps large enough that the new draft's acceptances differ on any build of the tiny world (at 3e-3 one build
    # of this machine's kind drafted exactly as before, which left nothing to compare)
    draft = ray.remote(DraftTrainer).options(num_cpus=0.5).remote(tiny_world.draft_path,
                                                                  DraftConfig(lr=3e-2, steps=4), 1.0)
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


class _StepCosts:
    """A hand-made step-time model (ms): plain 10; the draft's root and each level 1; verify 10 plus `per_node`
    per drafted node of a sample."""

    def __init__(self, per_node: float = 1.0):
        self.per_node = per_node

    def plain_ms(self, live, ctx):
        return 10.0

    def root_ms(self, live, lag, ctx):
        return 1.0

    def level_ms(self, live, width, ctx):
        return 1.0

    def verify_ms(self, live, tokens, width, ctx):
        import numpy as np

        return 10.0 + self.per_node * (np.asarray(width, dtype=float) - 1)


def test_verdict_by_hand():
    from drafting.policy.verdict import committed_per_step, judge

    assert committed_per_step(0.5, 2) == pytest.approx(1.75)
    # acceptance 0.8: a chain of d costs 10 + 2d ms for 1 + 0.8 + ... + 0.8^d tokens; d = 4 is best:
    # 3.3616 tokens / 18 ms against plain's 1 / 10 ms
    good = judge(0.8, _StepCosts(), live=32, ctx=100)
    assert good.speedup == pytest.approx(3.3616 / 18 * 10) and good.depth == 4 and good.pays
    # break-even: d = 1 pays 1.05 at (1 + a) / 12 ms = 1.05 / 10 ms, a = 0.26
    assert good.break_even == pytest.approx(0.26, abs=1e-4)
    assert good.line() == ("draft verdict: acceptance 0.80 per drafted token: drafting pays x1.87 (chain of 4, "
                           "32 live samples, context 100) -> keep drafting (generation.strategy=adaptive)")
    assert good.metrics() == {"draft/verdict_acceptance": 0.8, "draft/verdict_speedup": good.speedup,
                              "draft/verdict_pays": 1.0, "draft/verdict_break_even": good.break_even}

    low = judge(0.19, _StepCosts(), live=32, ctx=100)
    assert not low.pays and low.speedup == pytest.approx(1.19 / 12 * 10)
    assert low.line().endswith("drafting cannot pay (best x0.99, chain of 1, 32 live samples, context 100) -> "
                               "decode plain (generation.strategy=none), or train the draft longer: it needs "
                               "acceptance >= 0.26")
    # verifying a node costs as much as a plain step: no acceptance pays
    hopeless = judge(0.9, _StepCosts(per_node=10.0))
    assert hopeless.break_even is None and not hopeless.pays
    assert "use another kind of draft" in hopeless.line() and "decode plain" in hopeless.line()
    assert math.isnan(hopeless.metrics()["draft/verdict_break_even"])
    # a calibration only a near-perfect draft beats
    costly = judge(0.5, _StepCosts(per_node=7.5))  # (1 + a) / 18.5 ms = 1.05 / 10 ms: a = 0.9425
    assert costly.break_even == pytest.approx(0.9425, abs=1e-4)
    assert "or use another kind of draft: it needs acceptance >= 0.94" in costly.line()
    blind = judge(0.4)  # no calibration: the number, and how to get the speed verdict
    assert blind.line().startswith("draft verdict: acceptance 0.40 per drafted token; no step-time calibration")
    assert blind.metrics() == {"draft/verdict_acceptance": 0.4} and not blind.pays


def test_sampled_softmax_is_the_full_loss_when_the_sample_covers_the_vocabulary():
    from trainer.draft.distill import sample_candidates

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 24, generator=g) * 2, torch.randn(4, 24, generator=g) * 2
    top = teacher.log_softmax(-1).topk(3, -1)  # at most 12 of the 24 tokens
    full = draft_loss(student, "kl_topk", topk_logprobs=top.values, topk_ids=top.indices)
    ids, log_w, local = sample_candidates(top.indices, 24, 24, torch.Generator().manual_seed(1))
    assert sorted(ids.tolist()) == list(range(24)) and torch.equal(ids[local], top.indices)
    assert torch.count_nonzero(log_w) == 0  # every token scored: each stands for itself
    sampled = draft_loss(student[:, ids] + log_w, "kl_topk", topk_logprobs=top.values, topk_ids=local)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-5)
    # a part of the rest: each sampled token stands for (V - u) / m of them
    ids, log_w, local = sample_candidates(top.indices, 24, 4, torch.Generator().manual_seed(1))
    u = len(top.indices.unique())
    assert len(ids) == u + 4 and torch.allclose(log_w[u:], torch.full((4,), math.log((24 - u) / 4)))
    assert not set(ids[u:].tolist()) & set(top.indices.flatten().tolist())


def test_learner_with_sampled_softmax_learns_and_stops_when_asked(one_thread):
    actor, draft = _tiny_lm(0), _tiny_lm(1, layers=1)
    seqs, attn, action = _rollout(16)
    R = action.shape[1]
    with torch.no_grad():
        _, top_logp, top_ids = sequence_logprobs_topk(actor, seqs, attn, R, 1.0, k=4)
    batch = Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)
    learner = DraftLearner(draft, DraftConfig(lr=1e-2, steps=4, batch_size=4, vocab_sample=8), temperature=1.0)
    assert not learner.sampled  # 24 tokens are not over 4 x 8: the full softmax
    learner.sampled = True  # as on a large vocabulary
    first = learner.train(batch, seed=0)
    for it in range(1, 6):
        last = learner.train(batch, seed=it)
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert 0 < first["acceptance"] < last["acceptance"] <= 1  # measured on the first pass, before its steps
    asked = []
    stopped = learner.train(batch, seed=9, steps=10, should_stop=lambda: asked.append(1) or len(asked) > 3)
    assert stopped["steps"] == 3 and len(asked) == 4 and learner.updates == 27


def test_draft_trainer_stops_with_the_updates_and_carries_the_rest(tiny_world, one_thread):
    from actors.draft_trainer import DraftTrainer
    from trainer.core.deepspeed_backend import load_causal_lm

    actor = load_causal_lm(tiny_world.actor_path, "actor").eval()
    seqs, attn, action = _rollout(16)
    seqs = seqs % actor.config.vocab_size  # the tiny world's vocabulary is smaller than _rollout's
    R = action.shape[1]
    with torch.no_grad():
        _, top_logp, top_ids = sequence_logprobs_topk(actor, seqs, attn, R, 1.0, k=4)
    batch = Experience(seqs, attn, action, R, topk_logprobs=top_logp, topk_ids=top_ids)
    trainer = DraftTrainer(tiny_world.draft_path, DraftConfig(steps=4, batch_size=4), 1.0)
    m = trainer.train(batch, 0, updates=[])  # the updates are done already: one step, the rest carries over
    assert (m["steps"], m["budget"], m["carried"]) == (1, 4, 3)
    m = trainer.train(batch, 1, updates=[])
    assert (m["steps"], m["budget"], m["carried"]) == (1, 7, 4)  # at most one budget carries
    m = trainer.train(batch, 2, updates=[object()], deadline_s=0.0)  # the next step would end past the deadline
    assert (m["steps"], m["budget"], m["carried"]) == (1, 8, 4)
    m = trainer.train(batch, 3)  # no update window: the whole budget
    assert (m["steps"], m["budget"], m["carried"]) == (8, 8, 0) and m["step_seconds"] > 0


def test_a_hopeless_distilled_draft_skips_the_first_use_profile(tiny_world, tmp_path, capsys):
    """adaptive with no profile here would profile on first use; a draft whose distill.json acceptance cannot pay
    on any hardware makes the run decode plain instead, with one line; a good one, or no record, changes nothing."""
    import json
    import shutil

    from trainer.loop.preflight import resolve_paths
    from trainer.loop.run import skip_hopeless_profile

    draft = tmp_path / "draft"
    shutil.copytree(tiny_world.draft_path, draft)
    over = [f"model.draft={draft}", "generation.strategy=adaptive", "generation.calibration=auto"]
    cfg = load_config("configs/tiny.yaml", over)
    assert not skip_hopeless_profile(cfg, resolve_paths(cfg)) and cfg.generation.strategy == "adaptive"  # no record
    for acceptance, skipped in ((0.95, False), (0.0, True)):  # the tiny draft is cheap: 0 cannot pay
        (draft / "distill.json").write_text(json.dumps({"history": [{"epoch": 0, "acceptance": 0.01},
                                                                    {"epoch": 1, "acceptance": acceptance}]}))
        cfg = load_config("configs/tiny.yaml", over)
        assert skip_hopeless_profile(cfg, resolve_paths(cfg)) == skipped
        assert cfg.generation.strategy == ("none" if skipped else "adaptive")
    line, = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"draft verdict: acceptance 0.00 per drafted token ({draft}/distill.json): drafting "
                           "cannot pay on any hardware (at most x") and "skips the first-use profile" in line


def test_verdict_without_a_calibration_bounds_the_gain_on_any_hardware():
    from drafting.policy.verdict import forward_cost, judge, upper_bound

    # a draft costing a quarter of the target per token: at 0.5 one drafted token is best, 1.5 / 1.25
    assert upper_bound(0.5, 0.25) == pytest.approx(1.2)
    assert upper_bound(0.19, 0.25) == pytest.approx(1.19 / 1.25)
    low = judge(0.19, cost_ratio=0.25)
    assert low.line() == ("draft verdict: acceptance 0.19 per drafted token: drafting cannot pay on any hardware "
                          "(at most x0.95) -> decode plain (generation.strategy=none), or train the draft longer, "
                          "or use another kind of draft (fewer layers, or a head)")
    assert low.metrics() == {"draft/verdict_acceptance": 0.19, "draft/verdict_bound": pytest.approx(0.952)}
    assert "(at most x1.20 on ideal hardware); no step-time calibration" in judge(0.5, cost_ratio=0.25).line()
    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    # per layer: q, o 8 x 8 each, k, v 8 x 4 each (head_dim 4), MLP 3 x 8 x 16; the head 8 x 100
    assert forward_cost(cfg) == 2 * (2 * 64 + 2 * 32 + 3 * 128) + 800
