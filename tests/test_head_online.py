"""A draft head's online adaptation (trainer/head_online.py, actors/draft_trainer.py): the old-logprob pass hands
over exactly the features the engine keeps, the draft trainer's head learns a rollout (held-out KL falls) and
resumes exactly from its checkpoint, its weights load into an engine's head by name, it keeps the actor's
embedding from the weight push, and the preflight takes draft.online with a head. On the tiny world, no Ray."""
import pytest
import torch

from configs.schema import DraftConfig
from drafting import SamplingParams, SpeculativeEngine
from drafting.model.head import DraftHead, load_head
from trainer.core.experience import Experience, make_sequences, sequence_logprobs, sequence_logprobs_features
from trainer.draft.head_online import head_batch_of

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[1, 4, 5, 10 + i % 8, 11, 7 + i % 3][: 3 + i % 4] for i in range(24)]


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The tiny actor, a head made from it (its last layer, `DraftHead.from_actor`), and an engine over the pair
    that keeps the actor's features on its outputs."""
    from trainer.core.deepspeed_backend import load_causal_lm

    actor = load_causal_lm(tiny_world.actor_path, "actor").eval()
    head_dir = DraftHead.from_actor(actor, seed=0).save(tmp_path_factory.mktemp("head") / "head")
    engine = SpeculativeEngine(tiny_world.actor_path, str(head_dir), strategy="none", max_slots=24, max_len=48)
    engine.keep_features = True
    return actor, head_dir, engine


def rollout(world, seed: int) -> tuple[Experience, list]:
    """Sampled actor continuations as the driver packs them, with the old-logprob pass's features."""
    actor, _, engine = world
    outs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, seed=seed))
    seqs, attn, action = make_sequences(PROMPTS, [o.token_ids for o in outs], pad_id=0)
    R = action.shape[1]
    with torch.no_grad():
        logp, feats = sequence_logprobs_features(actor, seqs, attn, R, 1.0)
    return Experience(seqs, attn, action, R, old_logprobs=logp, features=feats), outs


def test_old_logprob_pass_hands_over_the_engines_features(world):
    actor = world[0]
    exp, outs = rollout(world, seed=1)
    with torch.no_grad():  # the same log-probs as the plain pass
        torch.testing.assert_close(exp.old_logprobs, sequence_logprobs(actor, exp.sequences, exp.attention_mask,
                                                                        exp.num_actions, 1.0))
    for i, o in enumerate(outs):  # the engine keeps positions [0, n - 1) of each sample (the last is never read)
        keep = exp.attention_mask[i].bool()
        n = len(o.prompt_token_ids) + len(o.token_ids)
        assert o.features.shape == (n - 1, actor.config.hidden_size)
        torch.testing.assert_close(exp.features[i, keep][:n - 1], o.features.float(), atol=1e-5, rtol=1e-5)
        assert not exp.features[i, ~keep].any()  # padding: zeros
    batch = head_batch_of(exp)  # the head learns where the next token is a response token
    assert batch.learn.sum() == exp.action_mask.sum()
    P = exp.sequences.shape[1] - exp.num_actions
    assert torch.equal(batch.learn[:, P - 1:-1], exp.action_mask.bool())
    with pytest.raises(ValueError, match="features has shape"):
        Experience(exp.sequences, exp.attention_mask, exp.action_mask, exp.num_actions, features=exp.features[:, 1:])


def held_out_kl(trainer, batch) -> float:
    with torch.no_grad():
        return trainer.learner.learner.loss(batch)[1]["kl"]


def test_draft_trainer_head_learns_a_rollout_and_resumes_exactly(world, tiny_world, tmp_path):
    from actors.draft_trainer import DraftTrainer

    cfg = DraftConfig(lr=1e-3, steps=12, batch_size=8)
    make = lambda: DraftTrainer(str(world[1]), cfg, 1.0, actor_path=tiny_world.actor_path)  # noqa: E731
    trainer = make()
    assert trainer.kind() == "head"
    train, _ = rollout(world, seed=2)
    held = head_batch_of(rollout(world, seed=3)[0])
    before = held_out_kl(trainer, held)
    m = trainer.train(train, 0)  # no update window: the whole budget
    assert (m["steps"], m["carried"]) == (12, 0) and m["tokens"] > 0
    after = held_out_kl(trainer, held)
    assert after < 0.9 * before, (before, after)

    m = trainer.train(train, 1, updates=[])  # the updates are done: one step, the rest carries over
    assert (m["steps"], m["carried"]) == (1, 11)
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    assert load_head(tmp_path / "ckpt" / "hf") is not None  # the head itself, loadable as model.draft
    resumed = make()
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.carried == 11 and resumed.learner.updates == trainer.learner.updates == 13
    a, b = trainer.train(train, 2), resumed.train(train, 2)
    for k in ("loss", "kl", "feature", "steps", "carried"):  # the same steps only if AdamW's moments came back
        assert a[k] == b[k], k
    for (name, x), (_, y) in zip(trainer.sync_tensors(), resumed.sync_tensors()):
        assert torch.equal(x, y), name


def test_head_weights_reach_an_engine_by_name_and_the_actor_embedding_is_kept(world, tiny_world):
    from actors.draft_trainer import DraftTrainer

    trainer = DraftTrainer(str(world[1]), DraftConfig(), 1.0, actor_path=tiny_world.actor_path)
    names = [n for n, _ in trainer.sync_tensors()]
    assert names[:2] == ["fc.weight", "fc.bias"] and all(n.startswith(("fc.", "layer.")) for n in names)
    with torch.no_grad():
        for _, p in trainer.learner.model.named_parameters():
            p.add_(0.01)
    engine = SpeculativeEngine(tiny_world.actor_path, str(world[1]), strategy="chain:2", max_slots=2, max_len=32)
    assert engine.load_draft_weights(trainer.sync_tensors()) == len(names)  # every name maps on the receiving side
    for name, t in trainer.sync_tensors():
        torch.testing.assert_close(engine.draft.views[name], t)

    # from the actor's weight push the trainer keeps what the head borrows (tied: embedding = LM head)
    shell = trainer.learner.shell
    new = torch.randn_like(shell.model.embed_tokens.weight)
    assert trainer.learner.load_actor_tensor("model.embed_tokens.weight", new)
    assert not trainer.learner.load_actor_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(1))
    assert torch.equal(shell.get_input_embeddings().weight, new) and torch.equal(shell.lm_head.weight, new)
    assert trainer.learner.model._lent[1].weight is shell.lm_head.weight  # the head reads the kept tensors


def test_preflight_takes_draft_online_with_a_head(world):
    from configs.schema import ConfigError, load_config
    from trainer.loop.preflight import preflight

    lines = []
    cfg = load_config(None, [f"model.draft={world[1]}", "draft.online=true", "generation.strategy=tree:3,2,6"])
    assert preflight(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a)))).paths.draft == str(world[1])
    assert any("EAGLE-style draft head" in line and "adapts online" in line for line in lines), lines
    with pytest.raises(ConfigError, match="draft.loss: 'ce_sampled' is a draft model's"):
        preflight(load_config(None, [f"model.draft={world[1]}", "draft.loss=ce_sampled",
                                     "generation.strategy=tree:3,2,6"]), log=lambda *a, **k: None)
