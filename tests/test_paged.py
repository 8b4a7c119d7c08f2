"""The paged K/V cache (the engine's default): the same tokens as the dense cache, when the pool is short enough to
preempt (swapped back bitwise, or recomputed), with a request group's prompt prefilled once, with the tree capped by
the blocks free; and what it refuses. Tiny random models; sampling at temperature 1 so that any K/V difference would
change tokens."""
import pytest
import torch

from drafting import GenRequest, SamplingParams, SpeculativeEngine
from drafting.runtime.engine import position_bytes
from tests.test_engine import PROMPTS, hf_greedy, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return tiny_lm("llama"), tiny_lm("llama", layers=1, hidden=32, seed=1)


def groups(n_prompts: int = 4, n: int = 4) -> list[list[int]]:
    """GRPO-style: each prompt n times (prompts of 7-30 tokens, so some end inside a block, some across two)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (7 + 8 * i,), generator=g).tolist() for i in range(n_prompts)]
    return [p for p in prompts for _ in range(n)]


def run(models, prompts, strategy="tree:3,2,6", **kw):
    target, draft = models
    eng = SpeculativeEngine(target, None if strategy == "none" else draft, strategy=strategy, max_slots=8,
                            max_len=96, **kw)
    outs = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=40, seed=11))
    return [o.token_ids for o in outs], eng


def pool_bytes(eng, positions: int) -> int:
    return positions * position_bytes(eng.target, eng.draft, eng.head, eng.dtype)


@pytest.mark.parametrize("strategy", ["none", "chain:3", "tree:3,2,6"])
def test_paged_equals_dense_greedy_and_hf(models, strategy):
    target, draft = models
    ref = hf_greedy(target, PROMPTS, 12)
    for kind in ("paged", "dense"):
        eng = SpeculativeEngine(target, None if strategy == "none" else draft, strategy=strategy, max_slots=3,
                                max_len=48, kv_cache=kind)
        assert [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))] == ref


@pytest.mark.parametrize("swap", [True, False])
def test_preempted_samples_resume_with_their_exact_tokens(models, swap):
    """A pool of 20 blocks for 8 slots of up to 96 tokens: samples are preempted mid-rollout and resume, their K/V
    swapped back bitwise (or, with no swap space, recomputed: in fp32 on CPU the same tokens too)."""
    prompts = groups()
    ref, _ = run(models, prompts, kv_cache="dense")
    probe = run(models, prompts[:1])[1]
    got, eng = run(models, prompts, kv_bytes=pool_bytes(probe, 20 * 16), swap_bytes=(1 << 30) if swap else 0)
    s = eng.stats()
    assert got == ref
    assert s.preemptions > 0 and s.resumed == s.preemptions
    assert s.kv_blocks == 20 and s.kv_blocks_peak <= 20
    if not swap:  # recomputed: their tokens prefilled again
        assert s.prefill_tokens > sum(len(p) - 1 for p in prompts[::4])


def test_a_group_prefills_its_prompt_once_and_shares_its_blocks(models):
    prompts = groups()
    shared, eng = run(models, prompts)
    unshared, eng_u = run(models, prompts, share_prompts=False)
    dense, _ = run(models, prompts, kv_cache="dense")
    assert shared == unshared == dense
    s, u = eng.stats(), eng_u.stats()
    assert u.prefill_tokens == sum(len(p) - 1 for p in prompts)
    assert s.prefill_tokens == u.prefill_tokens // 4  # one prefill per group of 4
    assert s.shared_tokens == u.prefill_tokens - s.prefill_tokens


def test_the_tree_is_capped_by_the_blocks_free(models):
    """One sample of up to 57 tokens, a pool of 4 blocks (64 positions): near its end the tree has room for only
    the positions left, so steps draft shallower; tokens are the dense engine's."""
    prompt = [list(range(3, 20))]
    ref, _ = run(models, prompt, strategy="tree:4,3,16", kv_cache="dense")
    probe = run(models, prompt[:1])[1]
    got, eng = run(models, prompt, strategy="tree:4,3,16", kv_bytes=pool_bytes(probe, 4 * 16))
    assert got == ref
    assert min(s["nodes"] for s in eng.step_log) < max(s["nodes"] for s in eng.step_log)


def test_a_pool_too_small_for_a_prompt_is_refused_by_name(models):
    target, _ = models
    per = position_bytes(SpeculativeEngine(target, None, strategy="none", max_slots=1, max_len=8).target, None,
                         False, torch.float32)
    eng = SpeculativeEngine(target, None, strategy="none", max_slots=2, max_len=96, kv_bytes=16 * per)
    eng.add(GenRequest("long", list(range(40)), SamplingParams(max_new_tokens=4)))
    with pytest.raises(RuntimeError, match=r"request 'long' cannot start: the K/V pool .* has no room for its prompt"):
        eng.step()


def test_an_import_the_pool_cannot_take_is_refused_and_nothing_is_held(models):
    target, draft = models
    src = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=96)
    src.add(GenRequest("r", list(range(3, 40)), SamplingParams(temperature=1.0, max_new_tokens=20, seed=1)))
    src.step()
    state = src.export_sample("r")
    dst = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=96,
                            kv_bytes=pool_bytes(src, 2 * 16))
    with pytest.raises(RuntimeError, match=r"import_sample 'r': no room in the K/V pool for 40 positions"):
        dst.import_sample(state)
    assert not dst.live and dst.stats().kv_blocks_used == 0


def test_a_migrations_reservation_holds_its_blocks_until_the_import(models):
    """Blocks set aside for a sample arriving by migration (its tokens and a block of margin): admission cannot
    take them (a request that needs them waits, with nothing live too: the slot held says a sample is coming), the
    import draws the row's blocks from them, what it did not take goes back, and the sample ends as at home."""
    target, draft = models
    sp = SamplingParams(temperature=1.0, max_new_tokens=20, seed=1)
    src = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=96)
    src.add(GenRequest("r", list(range(3, 40)), sp))
    src.step()
    state = src.export_sample("r")
    n = len(state.prompt_token_ids) + len(state.token_ids)  # 38 to 40 tokens: 3 blocks, 4 with the margin
    dst = SpeculativeEngine(target, draft, strategy="chain:2", max_slots=2, max_len=96,
                            kv_bytes=pool_bytes(src, 6 * 16))
    assert dst.reserve_slots(1)
    res = dst.reserve_kv([("r", state.prompt_token_ids, n, 37 + 20)], margin=16)
    assert len(res.blocks) == 4 and dst.stats().kv_blocks_used == 4 and res.skip == {"r": (0, None)}
    assert dst.reserve_kv([("x", [1] * 30, 30, 40)]) is None  # 2 more: not with 2 free and a sample coming
    dst.add(GenRequest("q", list(range(50)), SamplingParams(temperature=1.0, max_new_tokens=4, seed=2)))
    dst.step()  # its prompt needs 4 blocks of the 2 free: it waits
    assert [q.request_id for q in dst.queue] == ["q"] and not dst.live
    dst.release_slots(1)
    dst.import_sample(state, reservation=res)
    assert dst.stats().kv_blocks_used == 4 and len(res.blocks) == 1  # its 3 blocks came from the reservation
    dst.release_kv(res)
    assert dst.stats().kv_blocks_used == 3 and res.blocks == []
    moved = {}
    while dst.live or dst.queue:
        moved.update((o.request_id, o.token_ids) for o in dst.step())
    home = {}
    while src.live:
        home.update((o.request_id, o.token_ids) for o in src.step())
    assert moved["r"] == home["r"] and len(moved["q"]) == 4 and dst.stats().kv_blocks_used == 0


@pytest.mark.parametrize("strategy", ["none", "tree:3,2,6"])
def test_the_triton_kernel_reads_pages_through_the_table(models, strategy):
    """The GPU path's attention (here in Triton's interpreter) over the paged pool in place: HF's tokens."""
    pytest.importorskip("triton")
    target, draft = models
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=3, max_len=48, attention="triton")
    assert eng.tcache.pages(0, slice(0, 1)) is not None  # paged, no gather on this path
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert [o.token_ids for o in outs] == hf_greedy(target, PROMPTS, 8)
