"""The EAGLE-style draft head (drafting.head) as the engine's draft: its engine forward equals its training form,
it saves and loads without the actor's shared weights, training makes it agree with the actor, and every
lossless guarantee of the engine holds with it (greedy == HF generate, chi-square, seeded identity across
strategies and batches, migration). The guarantee tests are the engine's own, run with a head as the draft."""
import copy

import pytest
import test_engine as engine_tests
import test_engine_migration as migration_tests
import test_engine_sampling as sampling_tests
import torch

from drafting import SamplingParams, SpeculativeEngine
from drafting.model.head import DraftHead, HeadDecoder, draft_kind, is_head_dir, load_head
from trainer.draft.head_learner import HeadLearner, head_batch, head_scores
from drafting.runtime.kv_cache import KVCache
from drafting.model.decoder import LeanDecoder
from trainer.core.experience import make_sequences

pytestmark = pytest.mark.usefixtures("one_thread")


def fit_head(target, vocab: int, steps: int, seed: int = 0, lr: float = 3e-3, fresh: bool = False) -> DraftHead:
    """A head fitted for a few steps on the target's own sampled continuations (a real, imperfect draft)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (24,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    eng = SpeculativeEngine(target, None, strategy="none", max_slots=24, max_len=40)
    outs = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=20, seed=seed))
    seqs, attn, _ = make_sequences(prompts, [o.token_ids for o in outs], 0)
    if fresh:  # PyTorch's default init (seeded), not the actor's last layer
        torch.manual_seed(seed)
        head = DraftHead(target.config).bind(target)
    else:
        head = DraftHead.from_actor(target, seed=seed)
    if steps:
        HeadLearner(head, lr=lr, batch_size=8).train(head_batch(target, seqs, attn), seed=seed, steps=steps)
    return head


@pytest.fixture(scope="module")
def llama():
    target = engine_tests.tiny_lm("llama")
    return target, fit_head(target, engine_tests.V, steps=20)


def test_engine_forward_equals_training_form(llama):
    target, head = llama
    lean = LeanDecoder(target, "cpu", torch.float32, max_positions=64, max_len=48)
    hd = HeadDecoder(head, lean)
    assert hd.embed is lean.embed and hd.lm_head is lean.lm_head  # shared, not copied
    B, T = 2, 9
    g = torch.Generator().manual_seed(0)
    tok, feats = torch.randint(0, engine_tests.V, (B, T), generator=g), torch.randn(B, T, 64, generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    logits, h = hd.forward(tok, pos, KVCache(1, B, 2, 48, 16, "cpu", torch.float32, 8), slice(0, B), write_pos=pos,
                           prefix=torch.zeros(B, dtype=torch.long), tail=torch.ones(T, T, dtype=torch.bool).tril()[None]
                           .expand(B, T, T), kv_len=T, feats=feats, return_hidden=True)
    with torch.no_grad():
        ref = head(tok, feats, torch.ones(B, T, dtype=torch.long))
        torch.testing.assert_close(h, ref)
        torch.testing.assert_close(logits, head.logits(ref))


def test_save_load_and_kind(llama, tmp_path):
    target, head = llama
    head.save(tmp_path / "head")
    assert is_head_dir(tmp_path / "head") and draft_kind(str(tmp_path / "head")) == "head"
    assert draft_kind(str(tmp_path)) == "model"
    names = set(__import__("safetensors.torch").torch.load_file(str(tmp_path / "head" / "head.safetensors")))
    assert "fc.weight" in names and not any("embed" in n or "lm_head" in n for n in names)  # the actor's stay out
    loaded = load_head(tmp_path / "head", target)
    for (n, a), b in zip(head.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    # the engine takes the directory as model.draft would give it
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    a = SpeculativeEngine(target, str(tmp_path / "head"), strategy="chain:3", max_slots=2, max_len=32)
    b = SpeculativeEngine(target, head, strategy="chain:3", max_slots=2, max_len=32)
    assert a.head
    assert [o.token_ids for o in a.generate([[1, 2, 3]], sp)] == [o.token_ids for o in b.generate([[1, 2, 3]], sp)]
    (tmp_path / "head" / "head.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match=r"head\.json: kind 'other' is not 'eagle_head'"):
        load_head(tmp_path / "head")


def test_training_brings_the_head_to_the_actor():
    """On a peaked tiny actor, held-out KL to its next-token distribution falls and acceptance rises with a few
    training steps on its samples."""
    target = sampling_tests.models.__wrapped__()[0]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, sampling_tests.V, (4,), generator=g).tolist() for _ in range(8)]
    outs = SpeculativeEngine(target, None, strategy="none", max_slots=8, max_len=40).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=20, seed=3))
    held = head_batch(target, *make_sequences(prompts, [o.token_ids for o in outs], 0)[:2])
    kl, acc = {}, {}
    for steps in (0, 40):
        head = fit_head(target, sampling_tests.V, steps=steps, fresh=True)
        with torch.no_grad():
            kl[steps] = HeadLearner(head).loss(held)[1]["kl"]
        acc[steps] = head_scores(head, held, 1.0)["acceptance"]
    assert kl[40] < 0.6 * kl[0] and acc[40] > acc[0] + 0.1, (kl, acc)


def test_sampled_softmax_learns_the_full_distribution(llama):
    """On a vocabulary over 4x the sample, the head's student scores only the sampled rows (each position's top-1
    and 8 others a step, of 96 tokens), and training on that estimate still brings the full KL down."""
    target = copy.deepcopy(llama[0])
    with torch.no_grad():  # a peaked actor, so that minibatches' top tokens are a part of the vocabulary
        target.get_output_embeddings().weight.mul_(12)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, engine_tests.V, (4,), generator=g).tolist() for _ in range(16)]
    outs = SpeculativeEngine(target, None, strategy="none", max_slots=16, max_len=40).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=5))
    batch = head_batch(target, *make_sequences(prompts, [o.token_ids for o in outs], 0)[:2])
    torch.manual_seed(0)
    head = DraftHead(target.config).bind(target)
    learner = HeadLearner(head, lr=3e-3, top_k=1, batch_size=2, vocab_sample=8)
    one = batch.rows(torch.tensor([0]))
    with torch.no_grad():
        full = learner.loss(batch)[1]["kl"]
        assert learner.loss(one, torch.Generator().manual_seed(0))[1]["kl"] != pytest.approx(learner.loss(one)[1]["kl"])
    learner.train(batch, seed=0, steps=40)
    with torch.no_grad():
        assert learner.loss(batch)[1]["kl"] < 0.7 * full


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", engine_tests.STRATEGIES)
def test_greedy_equals_hf_generate(llama, kind, strategy):
    target, head = llama if kind == "llama" else (lambda t: (t, fit_head(t, engine_tests.V, steps=0)))(
        engine_tests.tiny_lm("qwen2"))
    eng = SpeculativeEngine(target, head, strategy=strategy, max_slots=3, max_len=48)
    out = eng.generate(engine_tests.PROMPTS, SamplingParams(temperature=0, max_new_tokens=14))
    assert [o.token_ids for o in out] == engine_tests.hf_greedy(target, engine_tests.PROMPTS, 14)
    if strategy != "none":
        assert eng.stats().mean_accepted > 0  # the head's proposals were used


def test_greedy_equals_hf_generate_adaptive(llama, calibrate):
    target, head = llama
    eng = SpeculativeEngine(target, head, strategy="adaptive", max_slots=3, max_len=48,
                            calibration=calibrate.friendly(target, head))
    out = eng.generate(engine_tests.PROMPTS, SamplingParams(temperature=0, max_new_tokens=14))
    assert [o.token_ids for o in out] == engine_tests.hf_greedy(target, engine_tests.PROMPTS, 14)


# ---- the sampling guarantees, on the sampling tests' peaked tiny vocabulary -------------------------------------
@pytest.fixture(scope="module")
def sampling_models():
    target = sampling_tests.models.__wrapped__()[0]
    return target, fit_head(target, sampling_tests.V, steps=30)


@pytest.fixture(scope="module")
def sampling_calibration(sampling_models, calibrate):
    return calibrate.friendly(*sampling_models)


@pytest.mark.parametrize("strategy,block", [("chain:2", sampling_tests.V), ("tree:3,3,8", 4)])
def test_emitted_tokens_have_target_distribution(sampling_models, sampling_calibration, strategy, block):
    sampling_tests.test_emitted_tokens_have_target_distribution(sampling_models, sampling_calibration, strategy,
                                                                block)


def test_seeded_tokens_do_not_depend_on_strategy_or_batch(sampling_models, sampling_calibration):
    sampling_tests.test_seeded_tokens_do_not_depend_on_strategy_or_batch(sampling_models, sampling_calibration,
                                                                         0.7, 5, 0.9)


# ---- migration: the head's state (its KV and the target's features) moves with the sample -----------------------
@pytest.fixture(scope="module")
def migration_models():
    target = migration_tests.models.__wrapped__()[0]
    return target, fit_head(target, migration_tests.V, steps=20)


@pytest.fixture(scope="module")
def migration_calibration(migration_models, calibrate):
    return calibrate(*migration_models)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("strategy", ["chain:3", "tree:3,2,6", "adaptive"])
def test_export_import_continues_identically(migration_models, migration_calibration, strategy, temperature):
    migration_tests.test_export_import_continues_identically(migration_models, migration_calibration, strategy,
                                                             temperature)


def test_two_stage_migration_prefix_then_delta(migration_models):
    migration_tests.test_two_stage_migration_prefix_then_delta(migration_models)


def test_sample_without_features_is_refused_by_a_head_engine(migration_models):
    target = migration_models[0]
    plain = SpeculativeEngine(target, None, strategy="none", max_slots=2, max_len=64)
    plain.add(migration_tests.requests(0.0)[1])
    plain.step()
    state = plain.export_sample("r1")
    assert state.target_h is None
    with pytest.raises(ValueError, match="draft head needs the target's features"):
        migration_tests.make(migration_models, "chain:2").import_sample(state)
