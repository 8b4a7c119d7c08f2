"""Rollout drafts (chains from a sample's prompt, its group's siblings and earlier responses, verified in the same
tree as the draft model's nodes) change speed, never tokens: with them on, every strategy, batch size, a paged cache
that preempts and a migrated sample emit what plain decoding emits for the same seed; the emitted tokens follow the
target's distribution (chi-square); and the walk follows whichever of two equal-token branches accepts more."""
from collections import Counter

import pytest
import torch
from scipy.stats import chi2

from drafting import SamplingParams, SpeculativeEngine
from drafting.records import GenRequest
from drafting.spec.accept import walk
from drafting.spec.suffix import SuffixConfig
from drafting.spec.tree import VerifyTree
from tests.test_engine_sampling import PROMPT, SP, V, chi_square, hf_processed, models  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
GROUP = 4
ROLLOUT = SuffixConfig(min_match=1, max_match=6, max_depth=6)


@pytest.fixture(scope="module")
def calibration(models, calibrate):  # noqa: F811
    return calibrate.friendly(*models)


def requests(prompts, sp, history=None):
    """Groups of GROUP samples per prompt (one seed each), with the prompt's earlier responses as history."""
    out = []
    for i, p in enumerate(prompts):
        for j in range(GROUP):
            s = SamplingParams(**{**vars(sp), "seed": 1000 * i + j})
            out.append(GenRequest((i, j), list(p), s, group=i, history=None if history is None else history[i]))
    return out


def run(engine, reqs, steps_before=None):
    """Every request to completion: {request id: (tokens, logprobs)}."""
    for r in reqs:
        engine.add(GenRequest(r.request_id, list(r.prompt_token_ids), SamplingParams(**vars(r.sampling)),
                              group=r.group, history=r.history))
    done = {}
    while len(done) < len(reqs):
        done.update((o.request_id, (o.token_ids, o.logprobs)) for o in engine.step())
    return done


PROMPTS = [[(3 * i + j) % V for j in range(2 + i % 4)] for i in range(12)]


@pytest.fixture(scope="module")
def history(models):  # noqa: F811
    """An earlier rollout of the same prompts with other seeds: two responses per prompt."""
    target, _ = models
    eng = SpeculativeEngine(target, None, strategy="none", max_slots=64, max_len=32)
    sp = SamplingParams(temperature=1.0, max_new_tokens=14, seed=77)
    outs = eng.generate([p for p in PROMPTS for _ in range(2)], sp)
    return [[outs[2 * i].token_ids, outs[2 * i + 1].token_ids] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)])
def test_tokens_do_not_depend_on_strategy_batch_or_rollout_drafts(models, calibration, history,  # noqa: F811
                                                                 temperature, top_k, top_p):
    target, draft = models
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=14, logprobs=True)
    reqs = requests(PROMPTS, sp, history)
    ref = run(SpeculativeEngine(target, None, strategy="none", max_slots=64, max_len=32), reqs)
    configs = [("none", None, 64), ("chain:4", draft, 64), ("tree:3,2,6", draft, 64), ("adaptive", draft, 64),
               ("chain:4", draft, 1), ("none", None, 1)]
    for strategy, d, slots in configs:
        eng = SpeculativeEngine(target, d, strategy=strategy, max_slots=slots, max_len=32, calibration=calibration,
                                rollout_drafts=ROLLOUT)
        got = run(eng, reqs)
        name = f"{strategy} draft={d is not None} slots={slots}"
        for rid, (tokens, lp) in ref.items():
            assert got[rid][0] == tokens, (name, rid)
            assert got[rid][1] == pytest.approx(lp, abs=1e-5), (name, rid)
        summary = eng.rollout_summary()
        assert summary["chain_accepted"] > 0, (name, summary)  # chains really were accepted


def test_a_chain_never_costs_the_model_its_nodes(models):  # noqa: F811
    """Rows with short chains or none beside rows with long ones: each still verifies all of the model's chain."""
    target, draft = models
    reqs = requests(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=14))  # no history: chains vary
    alone = SpeculativeEngine(target, draft, strategy="chain:4", max_slots=64, max_len=32)
    both = SpeculativeEngine(target, draft, strategy="chain:4", max_slots=64, max_len=32, rollout_drafts=SuffixConfig())
    assert run(both, reqs) == run(alone, reqs)
    assert 0 < both.rollout_summary()["chain_accepted"]
    assert both.stats().mean_tokens_per_step >= alone.stats().mean_tokens_per_step


def test_sampled_tokens_have_target_distribution_with_chains(models):  # noqa: F811
    """The chain drafts a fixed token (from the history) at the first position: accepted when the target samples
    it, rejected otherwise; the first token is ~ p either way, and so is the one after an accepted chain node."""
    target, _ = models
    p0 = hf_processed(target, PROMPT)
    x = int(p0.argmax())  # a likely token: both paths get exercised
    N = 3000
    eng = SpeculativeEngine(target, None, strategy="none", max_slots=N, max_len=16, rollout_drafts=ROLLOUT)
    for i in range(N):
        eng.add(GenRequest(i, list(PROMPT), SamplingParams(**{**vars(SP), "seed": 5000 + i}), group=i,
                           history=[[x, x]]))
    outs = []
    while len(outs) < N:
        outs += eng.step()
    stat, dof = chi_square(Counter(o.token_ids[0] for o in outs), p0)
    assert chi2.sf(stat, dof) > 1e-3, (stat, dof)
    hits = [o for o in outs if o.token_ids[0] == x]
    assert 0.1 * N < len(hits) < 0.95 * N and eng.rollout_summary()["chain_accepted"] >= len(hits)
    stat, dof = chi_square(Counter(o.token_ids[1] for o in hits), hf_processed(target, PROMPT + [x]))
    assert chi2.sf(stat, dof) > 1e-3, (stat, dof)


def test_paged_preemption_and_migration_keep_tokens_and_group_drafts(models, history):  # noqa: F811
    """A pool too small for every sample preempts (swap and recompute); a sample migrated mid-rollout carries its
    group's documents and drafts from them at the destination. Tokens equal plain decoding's throughout."""
    target, draft = models
    sp = SamplingParams(temperature=1.0, max_new_tokens=14, logprobs=True)
    reqs = requests(PROMPTS, sp, history)
    ref = run(SpeculativeEngine(target, None, strategy="none", max_slots=64, max_len=32), reqs)
    # preemption: a pool of a few blocks for 48 samples, some swapped to host, the rest recomputed
    eng = SpeculativeEngine(target, draft, strategy="chain:4", max_slots=64, max_len=32, kv_block=4,
                            kv_bytes=300 * 1024, swap_bytes=20000, rollout_drafts=ROLLOUT)
    got = run(eng, reqs)
    assert eng.stats().preemptions > 0
    assert {r: t for r, (t, _) in got.items()} == {r: t for r, (t, _) in ref.items()}
    # migration: group 0's samples start on `src`; after 3 steps one moves to `dst`, which holds none of its group
    src, dst = (SpeculativeEngine(target, draft, strategy="chain:4", max_slots=64, max_len=32,
                                  rollout_drafts=ROLLOUT) for _ in range(2))
    for r in reqs[:GROUP]:
        src.add(r)
    for _ in range(3):
        src.step()
    moving = src.live[0].request_id
    state = src.export_sample(moving)
    assert state.group == 0 and state.drafts
    dst.import_sample(state)
    src.remove(moving)
    assert dst.rollout.index.draft(moving) is not None or len(state.token_ids) + 1 >= 14  # drafts from its group
    done = {}
    while len(done) < GROUP:
        done.update((o.request_id, o.token_ids) for e in (src, dst) for o in e.step())
    assert done == {r: ref[r][0] for r in done}
    assert dst.rollout_summary()["chains_per_step"] > 0


def test_walk_follows_the_longer_of_two_equal_token_branches():
    """Root children: node 1 (a chain: tokens 5, 6, 7) and node 4 (the model: token 5, then 9). The target's tokens
    follow the chain for three positions: the walk must take the chain, although the model's branch matches too."""
    tokens = torch.tensor([[0, 5, 6, 7, 5, 9]])
    children = torch.full((1, 6, 2), -1)
    children[0, 0] = torch.tensor([1, 4])
    children[0, 1, 0], children[0, 2, 0], children[0, 4, 0] = 2, 3, 5
    vt = VerifyTree(tokens, torch.tensor([[0, 1, 2, 3, 1, 2]]), torch.ones(1, 6, 6, dtype=torch.bool),
                    torch.ones(1, 6, dtype=torch.bool), children, torch.arange(5)[None], torch.tensor([5]))
    target = torch.tensor([[5, 6, 7, 8, 6, 1]])  # the target's token at each node (node 4 says 6, not 9)
    acc = walk(vt, target, 3, longest=True)
    assert acc.tokens[0].tolist() == [5, 6, 7, 8] and int(acc.count) == 4
    first = walk(vt, target, 3, longest=False)  # the old rule (the first matching child) happens to agree here
    swapped = VerifyTree(vt.tokens, vt.depth, vt.mask, vt.valid, children[:, :, [1, 0]], vt.node, vt.counts)
    assert walk(swapped, target, 3, longest=True).tokens[0].tolist() == [5, 6, 7, 8]
    shorter = walk(swapped, target, 3, longest=False)  # the model's branch first: the old rule stops sooner
    assert shorter.tokens[0, :int(shorter.count)].tolist() == [5, 6]
    assert first.tokens[0].tolist() == [5, 6, 7, 8]


def test_graft_puts_the_chain_after_the_model_prefix_it_repeats():
    """Chain [5, 6, 7] (nodes 0-2) and the model's nodes 3 (token 5, a root child) and 4 (token 6, its child): the
    model spells the chain's first two tokens, so the chain goes on from node 4: node 2's parent is 4, and its
    ancestors are 3, 4 and itself (not the chain's own 0 and 1, which are the model's nodes again)."""
    from drafting.spec.tree import TreeDrafter, graft_chain

    drafter = TreeDrafter(None, 1, 8, chain=3, device=torch.device("cpu"))
    drafter.place_chain(1, torch.tensor([[5, 6, 7]]), torch.tensor([[0.9, 0.8, 0.7]]))
    drafter.parents[0, 3:5] = torch.tensor([-1, 3])
    drafter.anc[0, 3, 3] = drafter.anc[0, 4, 3] = drafter.anc[0, 4, 4] = True
    tree = drafter.view(1, 5)
    graft_chain(tree, torch.tensor([4]), torch.tensor([2]), 3)
    assert drafter.parents[0, :5].tolist() == [-1, 0, 4, -1, 3]
    assert drafter.anc[0, 2, :5].tolist() == [False, False, True, True, True]
    assert drafter.anc[0, 1, :5].tolist() == [True, True, False, False, False]  # untouched
    drafter.place_chain(1, torch.tensor([[5, 6, 7]]), torch.tensor([[0.9, 0.8, 0.7]]))  # the next step: reset
    assert drafter.parents[0, :3].tolist() == [-1, 0, 1] and drafter.anc[0, 2, :5].tolist() == [True] * 3 + [False] * 2


def test_chain_predictor_learns_per_source_from_the_first_verified_node():
    from drafting.policy.chain_predictor import PRIOR, ChainPredictor

    p = ChainPredictor(3, 6)
    assert p.cond(1, 4, 2, 3).tolist() == pytest.approx([PRIOR] * 3)
    for _ in range(50):  # siblings: nodes 2.. verified (0, 1 were the model's), the first two of them right
        p.observe(1, 4, 2, verified=3, matched=2, first=2)
    cond = p.cond(1, 4, 2, 6)
    assert cond[2] > 0.9 and cond[3] > 0.9 and cond[4] < 0.1  # accepted, accepted, rejected
    assert cond[0] == pytest.approx(PRIOR) and cond[5] == pytest.approx(PRIOR)  # never tested
    assert p.cond(2, 4, 2, 3).tolist() == pytest.approx([PRIOR] * 3)  # another source learns apart
    # an untried cell of the same source starts from the source's rates at each depth, not the optimistic prior
    other = p.cond(1, 1, 1, 6)
    assert other[2] > 0.8 and other[4] < 0.1 and other[0] == pytest.approx(PRIOR)


def test_a_step_that_verifies_no_node_reports_no_chain(models):  # noqa: F811
    """An adaptive step may choose no node at all (width 1) while rows have chains: the outcome is all zeros."""
    from drafting.spec.accept import Acceptance

    target, _ = models
    st = SpeculativeEngine(target, None, strategy="none", max_slots=2, max_len=16, rollout_drafts=ROLLOUT).stages
    st.ensure_drafter()
    vt = VerifyTree(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                    torch.ones(2, 1, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool),
                    torch.full((2, 1, 1), -1), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    acc = Acceptance(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long),
                     torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                     torch.ones(2, 1, dtype=torch.bool))
    out = st._chain_outcome(st.drafter.view(2, ROLLOUT.max_depth), vt, torch.zeros(2, 1, dtype=torch.long), acc,
                            torch.ones(2, dtype=torch.long))
    assert out.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_chain_predictor_observe_many_equals_one_by_one():
    import numpy as np

    from drafting.policy.chain_predictor import ChainPredictor

    rng = np.random.default_rng(0)
    chains = [(int(rng.integers(3)), int(rng.integers(1, 12)), int(rng.integers(1, 7)), int(v), int(rng.integers(0, v + 2)),
               int(rng.integers(0, 6 - v + 1))) for v in rng.integers(1, 6, size=40)]
    one, many = ChainPredictor(3, 6), ChainPredictor(3, 6)
    for c in chains:
        one.observe(*c)
    many.observe_many(*(np.array(v) for v in zip(*chains)))
    for a, b in ((one.accepted, many.accepted), (one.tested, many.tested),
                 (one.pooled_accepted, many.pooled_accepted), (one.pooled_tested, many.pooled_tested)):
        assert np.array_equal(a, b)
    src, m, c = np.array([c[0] for c in chains]), np.array([c[1] for c in chains]), np.array([c[2] for c in chains])
    assert np.allclose(many.path_rates(src, m, c)[:, :4], [np.cumprod(one.cond(*k, 4)) for k in zip(src, m, c)])
