"""The migration protocol without Ray: two engines (or two GenerationInstance objects) in one process joined by a
real two-rank gloo group, each side of an order in its own thread. A moved sample continues exactly as it would
have (two-stage with decoding between the stages, and stop-and-copy); when the destination fails the source
resumes its copy and nothing is lost; a destination with too few free slots refuses before anything is sent; a
moved sample's output leaves the destination only once the move is confirmed."""
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafting import GenRequest, SamplingParams, SpeculativeEngine
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


@pytest.fixture(scope="module")
def groups():
    """Ranks 0 and 1 of one gloo group, both in this process; a short timeout so failures end fast."""
    port, out = free_port(), {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, CollectiveGroup(
        "127.0.0.1", port, r, 2, "kv-test", "gloo", timeout_s=1.0))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out[0], out[1]


def engine(models, slots=4):
    return SpeculativeEngine(*models, strategy=STRATEGY, max_slots=slots, max_len=64)


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
