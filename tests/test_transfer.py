"""The migration protocol without Ray: two engines (or two GenerationInstance objects) in one process joined by a
real two-rank gloo group, each side of an order in its own thread. A moved sample continues exactly as it would
have (two-stage with decoding between the stages, and stop-and-copy); when the destination fails the source
resumes its copy and nothing is lost; a destination with too few free slots, or a K/V pool that cannot set aside
the samples' blocks, refuses before any K/V is sent; a GRPO group's prompt blocks travel once; a moved sample's
output leaves the destination only once the move is confirmed."""
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafting import GenRequest, SamplingParams, SpeculativeEngine
from drafting.runtime.engine import position_bytes
from migration.collective import CollectiveGroup, free_port
from migration.transfer import DestState, Emigration, Immigration, SourceState, pack, unpack

pytestmark = pytest.mark.usefixtures("one_thread")
STRATEGY = "tree:3,2,6"


@pytest.fixture(scope="module")
def models():
    def lm(layers, hidden, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()

    return lm(2, 64, 0), lm(1, 32, 1)


@pytest.fixture
def groups():
    """Ranks 0 and 1 of one gloo group, both in this process; a short timeout so failures end fast. One per test:
    a send that timed out (a failure test) closes the pair for good."""
    port, out = free_port(), {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, CollectiveGroup(
        "127.0.0.1", port, r, 2, "kv-test", "gloo", timeout_s=1.0))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out[0], out[1]


def engine(models, slots=4, blocks=None, kv_cache="paged"):
    """blocks: a paged pool of that many 16-position blocks (else the dense rows' worth)."""
    kv = {} if blocks is None else {"kv_bytes": blocks * 16 * pos_bytes(models)}
    return SpeculativeEngine(*models, strategy=STRATEGY, max_slots=slots, max_len=64, kv_cache=kv_cache, **kv)


def pos_bytes(models) -> int:
    """K/V bytes of one position (target and draft)."""
    probe = SpeculativeEngine(*models, strategy=STRATEGY, max_slots=1, max_len=64, kv_cache="dense")
    return position_bytes(probe.target, probe.draft, probe.head, probe.dtype)


def reqs(temperature):
    return [GenRequest(f"r{k}", [1 + k, 2, 3 + k, 4][: 2 + k % 3],
                       SamplingParams(temperature=temperature, max_new_tokens=30, seed=50 + k)) for k in range(3)]


def run_out(eng) -> dict:
    outs = []
    while eng.live or eng.queue:
        outs += eng.step()
    return {o.request_id: o.token_ids for o in outs}


def straight(models, temperature) -> dict:
    eng = engine(models)
    for r in reqs(temperature):
        eng.add(r)
    return run_out(eng)


def side_by_side(src_fn, dst_fn):
    results, errors = {}, []

    def call(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call, args=("src", src_fn)), threading.Thread(target=call, args=("dst", dst_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results["src"], results["dst"]


def direct(fn):
    return fn()  # no step loop here: every call is at a step boundary


@pytest.mark.parametrize("two_stage", [True, False], ids=["two_stage", "stop_copy"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_moved_sample_continues_exactly(models, groups, two_stage, temperature):
    expected = straight(models, temperature)
    src, dst = engine(models), engine(models)
    for r in reqs(temperature):
        src.add(r)
    for _ in range(3):
        src.step()
    moving = ["r1", "r2"]
    # between the stages the source keeps decoding the samples (the fault hook runs right after stage 1)
    between = lambda point: [src.step() for _ in range(2)] if point == "source:after_stage1" else None  # noqa
    out = Emigration(7, moving, peer=1, two_stage=two_stage, group=groups[0], engine=src, at_boundary=direct,
                     fault=between)
    inc = Immigration(7, len(moving), peer=0, two_stage=two_stage, group=groups[1], engine=dst, at_boundary=direct)
    assert inc.reserve() and dst.reserved == 2
    sent, got = side_by_side(out.run, inc.run)
    assert got.state == DestState.IMPORTED.value and sorted(got.request_ids) == moving
    assert sent.state == SourceState.STAGE2_SENT.value and src.reserved == 2  # slots held until the verdict
    assert dst.reserved == 0 and sorted(r.request_id for r in dst.live) == moving
    if two_stage:
        assert sent.stage1_ms > 0 and got.stage1_ms > 0
    assert got.t_resume >= sent.t_freeze and sent.bytes == got.bytes > 0
    assert out.finish(got.request_ids).state == SourceState.RELEASED.value and src.reserved == 0
    outputs = {**run_out(src), **run_out(dst)}
    assert outputs == expected


def test_destination_failure_resumes_the_sample_at_the_source(models, groups):
    expected = straight(models, 1.0)
    src, dst = engine(models), engine(models)
    for r in reqs(1.0):
        src.add(r)
    src.step()

    def crash(point):
        if point == "destination:after_stage1":
            raise ConnectionError("destination went away")

    out = Emigration(8, ["r0"], peer=1, two_stage=True, group=groups[0], engine=src, at_boundary=direct)
    inc = Immigration(8, 1, peer=0, two_stage=True, group=groups[1], engine=dst, at_boundary=direct, fault=crash)
    assert inc.reserve()
    sent, got = side_by_side(out.run, inc.run)
    assert got.state == DestState.ABORTED.value and got.request_ids == [] and "destination went away" in got.error
    assert dst.reserved == 0 and not dst.live  # the reservation went back, nothing landed
    # stage 2 found no receiver: the send timed out (the group's 1 s), and the source waited for the verdict
    assert sent.state == SourceState.STAGE2_SENT.value and "Timed out" in sent.error
    assert "r0" not in src.slots and src.reserved == 1
    assert out.finish(got.request_ids).state == SourceState.RESUMED.value and src.reserved == 0
    assert run_out(src) == expected


def test_full_destination_refuses_before_sending(models, groups):
    dst = engine(models, slots=2)
    dst.add(GenRequest("busy", [1, 2], SamplingParams(max_new_tokens=8, seed=1)))
    dst.step()
    inc = Immigration(9, 2, peer=0, two_stage=True, group=groups[1], engine=dst, at_boundary=direct)
    assert not inc.reserve() and dst.reserved == 0
    assert inc.state is DestState.ABORTED and "fewer than 2 free slots" in inc.record.error


def test_pack_unpack_round_trip():
    ts = [torch.randn(2, 3, 4), None, torch.arange(6.0).view(3, 2)]
    header, payload = pack({"ids": ["a", ("b", 1)]}, ts, "cpu")
    assert payload.numel() == 24 + 6  # one contiguous buffer
    meta, back = unpack(header, payload)
    assert meta == {"ids": ["a", ("b", 1)]} and back[1] is None
    assert torch.equal(back[0], ts[0]) and torch.equal(back[2], ts[2])


def test_instances_hold_back_a_moved_sample_until_the_move_is_confirmed(models, tmp_path):
    """Two GenerationInstance objects in this process (no Ray) over their own gloo group: a moved sample that
    finishes at the destination before the move is confirmed stays there until it is, so a failure between
    import and confirmation can never return it twice."""
    import time

    from actors.generation import GenerationInstance

    for name, model in zip(("target", "draft"), models):
        model.save_pretrained(tmp_path / name)
    paths = (str(tmp_path / "target"), str(tmp_path / "draft"))
    src, dst = (GenerationInstance(i, *paths, STRATEGY, 4, 64, calibration=None) for i in (0, 1))
    host, port = src.kv_group_address()
    side_by_side(lambda: src.join_kv_group(host, port, 0, 2, "gloo", "kv-instances", 5.0),
                 lambda: dst.join_kv_group(host, port, 1, 2, "gloo", "kv-instances", 5.0))
    request = GenRequest("moved", [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=40, seed=3))
    expected = straight_one(models, request)
    src.submit([request])
    deadline = time.monotonic() + 30
    while not src.load().samples:  # decoding there
        assert time.monotonic() < deadline, "the sample never started decoding"
        time.sleep(0.001)
    assert dst.reserve(1, 1, peer=0, two_stage=True)
    sent, got = side_by_side(lambda: src.migrate_out(1, ["moved"], peer=1, two_stage=True),
                             lambda: dst.migrate_in(1))
    assert got.request_ids == ["moved"] and src.load().reserved == 1
    deadline = time.monotonic() + 30
    while dst.load().live:  # it finishes at the destination ...
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert dst.collect(0.05) == []  # ... and waits: the move is not recorded yet
    assert src.finish_out(1, got.request_ids).state == SourceState.RELEASED.value and src.load().reserved == 0
    assert dst.finish_in(1).state == DestState.CONFIRMED.value
    [out] = dst.collect(1.0)
    assert out.request_id == "moved" and out.token_ids == expected and out.stats["instance"] == 1
    assert src.collect(0.05) == []


def straight_one(models, request) -> list[int]:
    eng = engine(models)
    eng.add(GenRequest(request.request_id, list(request.prompt_token_ids), SamplingParams(**vars(request.sampling))))
    return run_out(eng)[request.request_id]


# ---- the K/V pool: blocks reserved before the transfer, a group's prompt blocks copied once ----------------------
def used(eng) -> int:
    return eng.stats().kv_blocks_used


def test_a_pool_that_cannot_take_the_sample_refuses_before_any_kv_is_copied(models, groups):
    """The destination has a free slot but its pool (4 blocks, 3 held by a 40-token prompt, 1 kept free as the
    reserve) cannot set aside the sample's blocks: it says so in its answer to the plan, nothing is copied, and the
    sample decodes on at the source to exactly its unmigrated tokens."""
    expected = straight(models, 1.0)
    src, dst = engine(models), engine(models, blocks=4)
    dst.add(GenRequest("busy", [k % 30 + 1 for k in range(40)], SamplingParams(max_new_tokens=4, seed=1)))
    dst.step()
    before = used(dst)
    for r in reqs(1.0):
        src.add(r)
    for _ in range(3):
        src.step()
    out = Emigration(10, ["r1"], peer=1, two_stage=True, group=groups[0], engine=src, at_boundary=direct)
    inc = Immigration(10, 1, peer=0, two_stage=True, group=groups[1], engine=dst, at_boundary=direct)
    assert inc.reserve() and dst.reserved == 1  # a slot is free: the pool is what refuses
    sent, got = side_by_side(out.run, inc.run)
    for record in (sent, got):
        assert record.state == "aborted" and record.error is None and record.request_ids == []
        assert "refused: the K/V pool" in record.refused and "cannot hold 1 samples" in record.refused
        assert record.kv_bytes == 0 and record.stage1_ms == 0  # only the plan and the answer went over
    assert sent.bytes == got.bytes > 0
    assert dst.reserved == 0 and used(dst) == before and [q.request_id for q in dst.live] == ["busy"]
    assert "r1" in src.slots.row_of and not src.slots.pinned and src.reserved == 0  # it never stopped
    assert out.finish([]) is sent and sent.state == "aborted"  # no verdict to apply
    assert run_out(src) == expected


def test_reserved_blocks_are_held_through_the_transfer_and_come_back_on_abort(models, groups):
    """From the plan on, the destination's pool holds the samples' blocks (admission cannot take them: a queued
    request that needs them waits); when the order fails they go back and the request starts; the source resumes
    its samples with their exact tokens."""
    expected = straight(models, 1.0)
    src, dst = engine(models), engine(models, blocks=7)
    for r in reqs(1.0):
        src.add(r)
    src.step()
    seen = {}

    def crash(point):
        if point == "destination:after_stage1":
            seen["used"] = used(dst)
            dst.add(GenRequest("late", [k % 30 + 1 for k in range(60)], SamplingParams(max_new_tokens=2, seed=2)))
            dst.step()  # 4 blocks for its prompt: fewer are left beside the reservation, so it waits
            seen["queued"] = [q.request_id for q in dst.queue]
            raise ConnectionError("destination went away")

    out = Emigration(11, ["r0", "r2"], peer=1, two_stage=True, group=groups[0], engine=src, at_boundary=direct)
    inc = Immigration(11, 2, peer=0, two_stage=True, group=groups[1], engine=dst, at_boundary=direct, fault=crash)
    assert inc.reserve()
    _, got = side_by_side(out.run, inc.run)
    assert seen["used"] >= 2 * 2 and seen["queued"] == ["late"]  # 2 samples, each its tokens + a block of margin
    assert got.state == DestState.ABORTED.value and "destination went away" in got.error
    assert used(dst) == 0 and dst.reserved == 0 and inc.kv is None  # every block back
    dst.step()
    assert not dst.queue  # the request started
    assert out.finish(got.request_ids).state == SourceState.RESUMED.value
    assert src.reserved == 0 and out.hold is None
    assert run_out(src) == expected


def test_the_source_holds_the_blocks_its_frozen_samples_gave_back_until_the_verdict(models, groups):
    """Frozen samples leave the source's batch, but the blocks they gave back stay set aside (with their slots)
    until the verdict, so a sample that did not move always has room to resume here, exactly."""
    expected = straight(models, 1.0)
    src, dst = engine(models), engine(models)
    for r in reqs(1.0):
        src.add(r)
    for _ in range(3):
        src.step()
    out = Emigration(13, ["r1", "r2"], peer=1, two_stage=True, group=groups[0], engine=src, at_boundary=direct)
    inc = Immigration(13, 2, peer=0, two_stage=True, group=groups[1], engine=dst, at_boundary=direct)
    assert inc.reserve()
    sent, got = side_by_side(out.run, inc.run)
    assert sent.state == SourceState.STAGE2_SENT.value and got.request_ids == ["r1", "r2"]
    need = sum(-(-(len(f.prompt_token_ids) + len(f.token_ids)) // 16) for f in out.frozen)
    held = used(src)
    assert len(out.hold.blocks) == need >= 2  # the blocks their tokens fill: not free, held
    assert out.finish([]).state == SourceState.RESUMED.value  # (as if the import had not happened)
    assert out.hold is None and src.reserved == 0 and used(src) == held  # they resumed into them
    assert run_out(src) == expected


def siblings(prompt_len=37, n=4, short=None):
    """A GRPO group: one prompt (of 2 full blocks and a partial one at 37 tokens), its samples' own seeds."""
    prompt = [(7 * k) % 29 + 1 for k in range(prompt_len)]
    return [GenRequest(f"g{k}", list(prompt), SamplingParams(
        temperature=1.0, max_new_tokens=8 if k == short else 20, seed=70 + k)) for k in range(n)]


def straight_group(models, requests) -> dict:
    eng = engine(models, slots=8)
    for r in requests:
        eng.add(GenRequest(r.request_id, list(r.prompt_token_ids), SamplingParams(**vars(r.sampling))))
    return run_out(eng)


@pytest.mark.parametrize("case", ["two_stage", "stop_copy", "held_there", "bringer_finishes", "dense"])
def test_a_groups_prompt_blocks_travel_once(models, groups, case):
    """Four siblings moved in one order: the first brings the prompt's 2 full blocks, the other three share them
    at the destination (3 x 32 positions not copied); or (held_there) the destination holds a live sibling, and
    all moved ones share its blocks (4 x 32). bringer_finishes: the sibling meant to bring them finishes between
    the stages, so the others are sent whole after all; dense caches share nothing (slots only). Every sample ends
    with exactly its unmigrated tokens."""
    two_stage = case != "stop_copy"
    requests = siblings(n=5 if case == "held_there" else 4, short=0 if case == "bringer_finishes" else None)
    expected = straight_group(models, requests)
    kind = "dense" if case == "dense" else "paged"
    src, dst = engine(models, slots=8, kv_cache=kind), engine(models, slots=8, kv_cache=kind)
    moving = [r.request_id for r in requests[:4]]
    for r in requests[:4]:
        src.add(r)
    if case == "held_there":
        dst.add(requests[4])
        dst.step()
    for _ in range(2):
        src.step()
    done = {}

    def between(point):  # the source decodes on between the stages (until g0 is done, where it is to finish)
        steps, done["stage1_from"] = 0, dict(out.sent_from)
        while point == "source:after_stage1" and (steps < 2 or case == "bringer_finishes" and "g0" not in done):
            done.update((o.request_id, o.token_ids) for o in src.step())
            steps += 1

    out = Emigration(12, moving, peer=1, two_stage=two_stage, group=groups[0], engine=src, at_boundary=direct,
                     fault=between)
    inc = Immigration(12, 4, peer=0, two_stage=two_stage, group=groups[1], engine=dst, at_boundary=direct)
    assert inc.reserve()
    sent, got = side_by_side(out.run, inc.run)
    stage1_from = done.pop("stage1_from", {})
    if two_stage and case not in ("held_there", "dense"):  # stage 1: g0 whole, its siblings from its 3rd block
        assert stage1_from == {"g0": 0, "g1": 32, "g2": 32, "g3": 32}
    arrived = [rid for rid in moving if rid not in done]
    assert arrived == (moving[1:] if case == "bringer_finishes" else moving)
    assert got.state == DestState.IMPORTED.value and got.request_ids == arrived
    shared = {"two_stage": 3, "stop_copy": 3, "held_there": 4, "bringer_finishes": 0, "dense": 0}[case] * 32
    assert sent.skipped_positions == got.skipped_positions == shared
    assert sent.skipped_bytes == shared * pos_bytes(models)
    if shared:
        rows = [dst.pool.rows[dst.slots.row(rid)] for rid in arrived]
        assert all(r[:2] == rows[0][:2] for r in rows)  # one copy of the prompt's full blocks
        assert all(r[2] != rows[0][2] for r in rows[1:])  # each its own partial block
    if case == "held_there":
        assert rows[0][:2] == dst.pool.rows[dst.slots.row("g4")][:2]
    if case == "bringer_finishes":  # stage 1 left their prompt out; stage 2 sent it after all
        assert sent.kv_bytes > 0 and all(out.sent_from[rid] == 0 for rid in arrived)
    assert out.finish(got.request_ids).state == SourceState.RELEASED.value
    outputs = {**done, **run_out(src), **run_out(dst)}
    assert outputs == expected
    assert used(dst) == 0 and used(src) == 0  # every block back once all is done (dense: no blocks)
