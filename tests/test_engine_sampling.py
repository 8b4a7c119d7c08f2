"""Lossless, schedule-invariant sampling: emitted tokens follow the target's processed distribution (HF's own
warpers give the expected p), checked by chi-square on a 12-token vocabulary for chain and tree drafts through
both the accept and the reject paths, with one- and two-level Gumbel-max; and a seeded sample's tokens do not
depend on the strategy or the batch."""
from collections import Counter

import pytest
import torch
from scipy.stats import chi2
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from drafting import SamplingParams, SpeculativeEngine
from drafting.spec.noise import gumbel, position_keys
from drafting.spec.sampling import mix64, process_logits, sample_from

pytestmark = pytest.mark.usefixtures("one_thread")

V = 12
N = 3000
PROMPT = [3, 7, 1, 5]
SP = SamplingParams(temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=2, seed=123)


@pytest.fixture(scope="module")
def models():
    """Peaked random target; draft = target with noisy weights (accepts often, rejects often)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.12,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    target = LlamaForCausalLM(cfg).eval()
    draft = LlamaForCausalLM(cfg).eval()
    draft.load_state_dict(target.state_dict())
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return target, draft


def hf_processed(model, seq) -> torch.Tensor:
    """The target's next-token distribution after HF's warpers (what HF generate samples from)."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(SP.temperature), TopKLogitsWarper(SP.top_k),
                                 TopPLogitsWarper(SP.top_p)])
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float()
    return procs(ids, logits).softmax(-1)[0].double()


def chi_square(counts: Counter, p: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom; bins with expected count < 5 are pooled."""
    n = sum(counts.values())
    assert all(p[t] > 0 for t in counts), f"sampled a token the target forbids: {counts}, p={p}"
    obs = torch.tensor([counts.get(t, 0) for t in range(V)], dtype=torch.float64)
    exp = p * n
    big = exp >= 5
    stat = float((((obs[big] - exp[big]) ** 2) / exp[big]).sum())
    dof = int(big.sum()) - 1
    small_exp = float(exp[~big].sum())
    if small_exp > 0:
        stat += (float(obs[~big].sum()) - small_exp) ** 2 / small_exp
        dof += 1
    return stat, dof


@pytest.fixture(scope="module")
def calibration(models, calibrate):
    return calibrate.friendly(*models)


@pytest.mark.parametrize("strategy,block", [("chain:2", V), ("tree:3,3,8", V), ("tree:3,3,8", 4), ("adaptive", V)])
def test_emitted_tokens_have_target_distribution(models, calibration, strategy, block):
    """block 4 < V: two-level Gumbel-max (a block of the vocabulary by mass, then a token inside it)."""
    target, draft = models
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=N, max_len=16, calibration=calibration)
    eng.stages.block = block
    outs = eng.generate([PROMPT] * N, SP)
    # first emitted token: accepted draft or correction token, ~ p(. | prompt)
    stat, dof = chi_square(Counter(o.token_ids[0] for o in outs), hf_processed(target, PROMPT))
    assert chi2.sf(stat, dof) > 1e-3, (stat, dof)
    # one step finished the sample <=> its first token was an accepted draft; the next token (accepted
    # child, correction or bonus at that node) must be ~ p(. | prompt, x1)
    after_accept = [o for o in outs if o.stats["steps"] == 1]
    assert 0.1 * N < len(after_accept) < 0.9 * N, "both accept and reject paths must be exercised"
    stat = dof = 0
    for x1, c in Counter(o.token_ids[0] for o in after_accept).items():
        if c >= 100:
            s, d = chi_square(Counter(o.token_ids[1] for o in after_accept if o.token_ids[0] == x1),
                              hf_processed(target, PROMPT + [x1]))
            stat, dof = stat + s, dof + d
    assert dof >= 4 and chi2.sf(stat, dof) > 1e-3, (stat, dof)


def test_seeded_sampling_is_reproducible_and_seed_dependent(models):
    target, draft = models
    eng = SpeculativeEngine(target, draft, strategy="tree:3,2,6", max_slots=8, max_len=16)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    a = [o.token_ids for o in eng.generate([PROMPT] * 6, sp)]
    b = [o.token_ids for o in eng.generate([PROMPT] * 6, sp)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # one user seed, distinct derived seeds per prompt


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_seeded_tokens_do_not_depend_on_strategy_or_batch(models, calibration, temperature, top_k, top_p):
    """Every strategy, a batch of 64 and batches of 1 emit the same tokens for the same (prompt, seed)."""
    target, draft = models
    prompts = [[(3 * i + j) % V for j in range(1 + i % 5)] for i in range(64)]
    sp = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=1000 + i,
                         logprobs=True) for i in range(64)]
    runs = {}
    for strategy in ["none", "chain:1", "chain:4", "tree:3,2,6", "tree:4,2,10", "tree:6,3,24", "adaptive"]:
        eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=64, max_len=32, calibration=calibration)
        runs[strategy] = eng.generate(prompts, sp)
        if strategy != "none":
            assert eng.stats().mean_accepted > 0.3  # drafts really were accepted
    eng = SpeculativeEngine(target, draft, strategy="tree:3,2,6", max_slots=1, max_len=32)
    runs["batch of 1"] = [eng.generate([p], [s])[0] for p, s in zip(prompts[:16], sp[:16])]
    ref = [o.token_ids for o in runs["none"]]
    assert len({tuple(t) for t in ref}) > 32  # really sampled
    for name, outs in runs.items():
        assert [o.token_ids for o in outs] == ref[:len(outs)], name
        for o, r in zip(outs, runs["none"]):
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-5), name


def test_noise_is_splitmix64_keyed_and_gumbel_distributed():
    """Pinned to a pure-Python splitmix64 so draws are identical on every device and after migration."""
    M = (1 << 64) - 1

    def ref_mix(z):
        z &= M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    for x in [0, 1, 12345, (1 << 63) + 7, M]:
        signed = x - (1 << 64) if x >= (1 << 63) else x
        assert int(mix64(torch.tensor([signed]))) & M == ref_mix(x)
    keys = position_keys(torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5]))
    g = gumbel(keys, torch.arange(20000), stream=0)
    assert g.shape == (3, 20000)
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])  # other position, other seed
    assert torch.equal(g[0, 100:200], gumbel(keys[:1], torch.arange(100, 200), stream=0)[0])  # keyed by index
    assert abs(float(g.mean()) - 0.5772) < 0.02 and abs(float(g.var()) - 1.6449) < 0.05


def test_process_logits_matches_hf_warpers_and_inverse_cdf():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 3
    for temp, k, p in [(0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 12, 0.6), (1.0, 0, 1.0)]:
        procs = LogitsProcessorList(([TemperatureLogitsWarper(temp)] if temp != 1.0 else [])
                                    + ([TopKLogitsWarper(k)] if k else []) + ([TopPLogitsWarper(p)] if p < 1 else []))
        ref = procs(None, logits.clone()).softmax(-1)
        ours = process_logits(logits, torch.full((5,), temp), torch.full((5,), k),
                              torch.full((5,), p, dtype=torch.float64))
        torch.testing.assert_close(ours, ref)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    assert sample_from(probs, torch.tensor([0.0, 0.0])).tolist() == [1, 3]
    assert sample_from(probs, torch.tensor([0.9999999, 0.5])).tolist() == [3, 3]
