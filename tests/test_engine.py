"""Speculative engine: lean forward == HF, greedy output of every strategy == HF greedy generate, queueing,
EOS / max_new_tokens inside an accepted run, clear errors. Tiny random models (hidden 64, 2 layers) of each
family the engine runs: Llama, Qwen2, Qwen3 (Mistral shares Llama's layout)."""
import functools

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from drafting import GenRequest, SamplingParams, SpeculativeEngine, parse_strategy
from drafting.runtime.kv_cache import KVCache
from drafting.model.decoder import LeanDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96
STRATEGIES = ["none", "chain:1", "chain:4", "tree:3,2,6", "tree:4,3,16"]


def tiny_lm(kind: str, layers: int = 2, hidden: int = 64, seed: int = 0, vocab: int = V, **kw):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, **kw)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "llama_yarn":  # rope scaling with attention scaling != 1, read from HF's rotary module
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        return LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common)).eval()
    if kind == "qwen2":  # GQA + q/k/v bias + tied embeddings
        m = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common)).eval()
        with torch.no_grad():  # HF inits biases to zero: make them matter
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.2)
        return m
    if kind == "qwen3":  # per-head q/k RMSNorm before RoPE
        m = Qwen3ForCausalLM(Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)).eval()
        with torch.no_grad():  # HF inits the q/k norms to ones: make them matter
            for n, p in m.named_parameters():
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.uniform_(0.5, 1.5)
        return m
    raise ValueError(kind)


@pytest.fixture(scope="module")
def models():
    return {"llama": (tiny_lm("llama"), tiny_lm("llama", layers=1, hidden=32, seed=1)),
            "qwen2": (tiny_lm("qwen2"), tiny_lm("qwen2", layers=1, hidden=32, seed=1)),
            "qwen3": (tiny_lm("qwen3"), tiny_lm("qwen3", layers=1, hidden=32, seed=1))}


PROMPTS = [[5], [7, 3, 9], [1, 2, 3, 4, 5, 6, 7], list(range(11, 23)), [40, 41, 42, 43, 44]]


def hf_greedy(model, prompts, max_new, eos=None):
    """Reference: HF greedy generate, one unpadded prompt at a time (cached per model)."""
    return [list(x) for x in _hf_greedy(model, tuple(map(tuple, prompts)), max_new, eos)]


@functools.lru_cache(maxsize=None)
def _hf_greedy(model, prompts, max_new, eos):
    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        outs.append(tuple(ids[0, len(p):].tolist()))
    return tuple(outs)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "llama_yarn"])
def test_lean_forward_matches_hf_logits(models, kind):
    model = models[kind][0] if kind in models else tiny_lm(kind)
    lean = LeanDecoder(model, "cpu", torch.float32, max_positions=64, max_len=64)
    assert (lean.layers[0]["q_norm"] is not None) == (kind == "qwen3")
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    T = ids.shape[1]
    cache = KVCache(2, 3, 2, 64, 16, "cpu", torch.float32)
    pos = torch.arange(T).expand(3, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(3, T, T)
    zero = torch.zeros(3, dtype=torch.long)
    out = lean.forward(ids, pos, cache, slice(0, 3), write_pos=pos, prefix=zero, tail=causal, kv_len=T)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the same logits token by token against the cache it filled (decode path: the whole prefix visible)
    cache2 = KVCache(2, 3, 2, 64, 16, "cpu", torch.float32)
    for t in range(T):
        step = lean.forward(ids[:, t:t + 1], pos[:, t:t + 1], cache2, slice(0, 3), write_pos=pos[:, t:t + 1],
                            prefix=zero + t + 1, tail=None, kv_len=t + 1)
        torch.testing.assert_close(step[:, 0], ref[:, t], atol=1e-4, rtol=1e-4)


def test_load_weights_by_hf_name(models):
    target, _ = models["llama"]
    lean = LeanDecoder(target, "cpu", torch.float32, max_positions=32, max_len=32)
    other = tiny_lm("llama", seed=7)
    lean.load_weights(other.state_dict())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = other(ids).logits
    cache = KVCache(2, 1, 2, 32, 16, "cpu", torch.float32)
    pos = torch.arange(4)[None]
    out = lean.forward(ids, pos, cache, slice(0, 1), write_pos=pos, prefix=torch.zeros(1, dtype=torch.long),
                       tail=torch.ones(4, 4, dtype=torch.bool).tril()[None], kv_len=4)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        lean.load_weights({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        lean.load_weights({"model.norm.weight": torch.zeros(3)})


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_equals_hf_generate(models, kind, strategy):
    target, draft = models[kind]
    ref = hf_greedy(target, PROMPTS, 12)
    # 3 slots for 5 prompts: samples join and leave between steps
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=3, max_len=48)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [o.token_ids for o in outs] == ref
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert all(o.finish_reason == "length" for o in outs)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_hf_generate_adaptive(models, kind, calibrate):
    """The adaptive strategy (plain steps, varying depth and nodes per sample) changes speed, not tokens."""
    target, draft = models[kind]
    ref = hf_greedy(target, PROMPTS, 12)
    eng = SpeculativeEngine(target, draft, strategy="adaptive", max_slots=3, max_len=48,
                            calibration=calibrate(target, draft))
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [o.token_ids for o in outs] == ref
    log = list(eng.step_log)
    assert len({(s["plain"], s["levels"], s["nodes"]) for s in log}) > 1  # decisions really varied
    assert all("plan_predicted_accepted" in s for s in log if not s["plain"])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", ["chain:4", "tree:4,3,16"])
def test_greedy_equals_hf_generate_draft_is_target(models, kind, strategy):
    """draft == target: every draft is accepted, long accepted runs, still == HF."""
    target, _ = models[kind]
    ref = hf_greedy(target, PROMPTS, 20)
    eng = SpeculativeEngine(target, target, strategy=strategy, max_slots=8, max_len=48)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=20))
    assert [o.token_ids for o in outs] == ref
    if strategy == "chain:4":  # all 4 drafts accepted every step
        assert all(o.stats["accepted"] == 4 * o.stats["steps"] for o in outs)
        assert eng.stats().mean_tokens_per_step == 5.0
    assert eng.stats().mean_accepted > 2


def test_eos_and_max_new_tokens_inside_accepted_run(models):
    target, _ = models["llama"]
    prompt = [7, 3, 9]
    full = hf_greedy(target, [prompt], 20)[0]
    # an EOS whose first occurrence is strictly inside a 5-token accepted run (chain:4, draft == target)
    idx = next(i for i, t in enumerate(full) if full.index(t) == i and i % 5 not in (4,) and i > 0)
    eos = full[idx]
    eng = SpeculativeEngine(target, target, strategy="chain:4", max_slots=2, max_len=48, eos_token_id=eos)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20))[0]
    assert out.token_ids == full[:idx + 1] == hf_greedy(target, [prompt], 20, eos=eos)[0]
    assert out.finish_reason == "stop"
    # max_new_tokens = 7 ends inside the second run of 5
    eng = SpeculativeEngine(target, target, strategy="chain:4", max_slots=2, max_len=48)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=7))[0]
    assert out.token_ids == full[:7] and out.finish_reason == "length"
    # max_len bounds the whole sequence: 3 prompt + 9 generated = 12
    eng = SpeculativeEngine(target, target, strategy="tree:4,3,16", max_slots=2, max_len=12)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20))[0]
    assert out.token_ids == full[:9] and out.finish_reason == "length"


def test_queue_more_requests_than_slots(models):
    target, draft = models["llama"]
    big = SpeculativeEngine(target, draft, strategy="tree:3,2,6", max_slots=16, max_len=48)
    small = SpeculativeEngine(target, draft, strategy="tree:3,2,6", max_slots=3, max_len=48)
    reqs = [GenRequest(f"r{i}", PROMPTS[i % 5] + [i], SamplingParams(temperature=0, max_new_tokens=3 + i % 7))
            for i in range(11)]
    for r in reqs:
        small.add(GenRequest(r.request_id, r.prompt_token_ids, SamplingParams(**vars(r.sampling))))
    assert small.stats().queued == 11
    seen = []
    for _ in range(200):
        outs = small.step()
        seen += outs
        assert small.stats().live <= 3
        if not small.live and not small.queue:
            break
    assert sorted(o.request_id for o in seen) == sorted(r.request_id for r in reqs)  # each exactly once
    by_id = {o.request_id: o.token_ids for o in seen}
    assert all(len(by_id[r.request_id]) == r.sampling.max_new_tokens for r in reqs)
    # same tokens whatever the slot count: batch composition must not leak between samples
    big_out = big.generate([r.prompt_token_ids for r in reqs], [r.sampling for r in reqs])
    assert [by_id[r.request_id] for r in reqs] == [o.token_ids for o in big_out]


def test_remove_frees_slot_and_queue(models):
    target, draft = models["llama"]
    eng = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=48)
    for i in range(3):
        eng.add(GenRequest(i, [1, 2, 3 + i], SamplingParams(temperature=0, max_new_tokens=10)))
    eng.step()
    assert eng.stats().live == 2 and eng.stats().queued == 1
    eng.remove(0)
    eng.remove(2)  # still queued
    assert eng.stats().live == 1 and eng.stats().queued == 0
    with pytest.raises(KeyError, match="'nope'"):
        eng.remove("nope")
    outs = []
    while eng.live:
        outs += eng.step()
    assert [o.request_id for o in outs] == [1]


def test_clear_errors(models):
    target, draft = models["llama"]
    eng = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=8)
    with pytest.raises(ValueError, match="request 'long'.*max_len - 1 = 7"):
        eng.add(GenRequest("long", list(range(8)), SamplingParams()))
    with pytest.raises(ValueError, match="top_p"):
        eng.add(GenRequest("p", [1], SamplingParams(top_p=0.0)))
    with pytest.raises(ValueError, match="draft vocab_size 50 != target vocab_size 96"):
        SpeculativeEngine(target, tiny_lm("llama", layers=1, hidden=32, vocab=50), strategy="chain:2")
    with pytest.raises(ValueError, match="sliding_window=16 < max_len=32"):
        torch.manual_seed(0)
        mistral = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=1, num_attention_heads=4,
                                                   num_key_value_heads=2, sliding_window=16))
        SpeculativeEngine(mistral, None, strategy="none", max_len=32)
    with pytest.raises(ValueError, match="'tree:2,2'"):
        parse_strategy("tree:2,2")
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeEngine(target, None, strategy="chain:2")
    assert parse_strategy("tree:4,2,16").depth == 4 and parse_strategy("chain:3").topk == 1
