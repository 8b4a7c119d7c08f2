"""CPU guards of the engine's GPU properties (CI has no GPU): a step reads the device once, its stages read it
never; no forward copies committed K/V; every stage compiles into one graph (torch.compile(fullgraph=True) is the
CPU proxy for CUDA-graph capture), and tokens stay those of plain decoding while it does."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from drafting import GenRequest, SamplingParams, SpeculativeEngine
from drafting.runtime.engine import Engine
from tests.test_engine import PROMPTS, hf_greedy, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

# ops that make the host wait for the device on CUDA: a scalar read, or an output whose size depends on values
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.repeat_interleave.Tensor", "aten.unique_consecutive.default", "aten._unique2.default",
            "aten.equal.default", "aten.is_nonzero.default", "aten.item.default"}


class SyncCounter(TorchDispatchMode):
    """Counts device reads by op while `on`; also bool-mask indexing (its shape depends on the mask's values)."""

    def __init__(self):
        super().__init__()
        self.on, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            name = str(func)
            bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                if i is not None)
            if name in SYNC_OPS or bool_index:
                self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models():
    return tiny_lm("llama"), tiny_lm("llama", layers=1, hidden=32, seed=1)


def counted_engine(monkeypatch, engine: Engine, counter: SyncCounter) -> dict:
    """Count, per step: the engine's one read (`_fetch`), device reads inside stages, device reads elsewhere in the
    step before the read (after it the host works on its own copies)."""
    counts = {"fetch": 0, "stage": [], "host": []}
    runner = engine.graphs
    run, fetch = runner.run, engine._fetch

    def run_counted(stage, *args, capturable=True):
        before = len(counter.seen)
        run(stage, *args, capturable=capturable)
        counts["stage"] += counter.seen[before:]
        del counter.seen[before:]

    def fetch_counted(*a):
        counts["fetch"] += 1
        counter.on = False  # the read itself, and the host's work on its copies after it
        return fetch(*a)

    monkeypatch.setattr(runner, "run", run_counted)
    monkeypatch.setattr(engine, "_fetch", fetch_counted)
    step = engine.step

    def step_counted():
        counter.on = True
        try:
            return step()
        finally:
            counter.on = False
            counts["host"] += counter.seen
            counter.seen.clear()

    monkeypatch.setattr(engine, "step", step_counted)
    return counts


@pytest.mark.parametrize("strategy", ["none", "tree:3,2,6", "adaptive"])
def test_a_step_reads_the_device_once_and_its_stages_never(models, monkeypatch, calibrate, strategy):
    target, draft = models
    cal = calibrate.friendly(target, draft) if strategy == "adaptive" else None
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=3, max_len=48, calibration=cal,
                            adaptive_mode="device")
    eng.generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=2))  # admission paths warmed, not counted
    eng.reset_stats()
    counter = SyncCounter()
    with counter:
        counts = counted_engine(monkeypatch, eng, counter)
        outs = eng.generate(PROMPTS, SamplingParams(temperature=0.8, max_new_tokens=10, seed=3))
    steps = eng.stats().steps
    assert steps >= 3 and len(outs) == len(PROMPTS)
    assert counts["fetch"] == steps  # one read per step...
    assert counts["stage"] == []  # ... none inside a stage (a graph replay cannot read the device)
    assert counts["host"] == []  # ... and none on the host before the read: the policy decides without one
    if strategy == "adaptive":
        assert any(not s["plain"] for s in eng.step_log)


def test_host_decisions_are_what_reads_the_device(models, monkeypatch, calibrate):
    """The counter sees reads: the host-mode adaptive strategy reads the tree between levels (free on a CPU)."""
    target, draft = models
    eng = SpeculativeEngine(target, draft, strategy="adaptive", max_slots=3, max_len=48,
                            calibration=calibrate.friendly(target, draft), adaptive_mode="host")
    counter = SyncCounter()
    with counter:
        counts = counted_engine(monkeypatch, eng, counter)
        eng.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=6))
    assert counts["stage"] or counts["host"]


class CacheCopies(TorchDispatchMode):
    """Ops that read a cache tensor and write a new tensor at least `limit` elements big (a copy of committed
    K/V). In-place writes into the cache and views of it are not copies."""

    def __init__(self, caches: dict, min_rows: int):
        """caches: {tensor: elements of one row's committed K/V in one layer}; a copy of min_rows such rows'
        worth is flagged."""
        super().__init__()
        self.limit = {c.untyped_storage().data_ptr(): n * min_rows for c, n in caches}
        self.ptrs, self.copies = set(self.limit), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in args if isinstance(a, torch.Tensor)] + [
            t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        read = [self.limit[p] for p in (t.untyped_storage().data_ptr() for t in flat) if p in self.limit]
        outs = out if isinstance(out, (list, tuple)) else [out]
        for o in outs:
            if (read and isinstance(o, torch.Tensor) and o.numel() >= min(read)
                    and o.untyped_storage().data_ptr() not in self.ptrs):
                self.copies.append((str(func), tuple(o.shape)))
        return out


@pytest.mark.parametrize("strategy", ["none", "chain:3", "tree:3,2,6"])
def test_no_forward_copies_committed_kv(models, strategy):
    """The dense layout, which attention reads in place (a paged cache is gathered per forward)."""
    target, draft = models
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=2, max_len=400, kv_cache="dense")
    prompts = [list(np.random.default_rng(0).integers(0, 96, 300)), list(range(50, 96)) * 6]
    for i, p in enumerate(prompts):
        eng.add(GenRequest(i, [int(t) for t in p], SamplingParams(temperature=0, max_new_tokens=40)))
    eng.step()  # admission (prefill writes the prompts in place too) and a first step
    # a row's committed K/V of one layer: Hkv x 300+ x D elements; a copy of 200 positions' worth is flagged (the
    # tree's own K/V, moved to their committed columns, are a few positions)
    ts, ds = eng.target.shape, eng.draft.shape
    watch = CacheCopies([(c, m.kv_heads * 200 * m.head_dim) for m, cache in ((ts, eng.tcache), (ds, eng.dcache))
                         for c in (cache.k, cache.v)], min_rows=1)
    with watch:
        for _ in range(4):
            eng.step()
    assert eng.stats().steps == 5
    assert watch.copies == []


def static_graph(gm, example_inputs):
    """A torch.compile backend that refuses a graph with a data-dependent value (a shape or a scalar read from
    a tensor): CUDA-graph capture cannot hold one either."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    bad = [n.format_node() for n in gm.graph.nodes if free_unbacked_symbols(n.meta.get("example_value"))]
    assert not bad, f"data-dependent values in a stage: {bad[:3]}"
    return gm.forward


@pytest.mark.parametrize("strategy", ["none", "tree:3,2,6", "adaptive"])
def test_every_stage_compiles_into_one_graph(models, monkeypatch, calibrate, strategy):
    """torch.compile(fullgraph=True) raises on a graph break (Python the tracer cannot follow), and the backend
    on a data-dependent value: what breaks CUDA-graph capture. The traced stages run the real steps, so the
    tokens must still be HF's."""
    target, draft = models
    cal = calibrate.friendly(target, draft) if strategy == "adaptive" else None
    eng = SpeculativeEngine(target, draft, strategy=strategy, max_slots=3, max_len=48, calibration=cal,
                            adaptive_mode="device")
    compiled = set()
    run = eng.graphs.run

    def run_traced(stage, *args, capturable=True):
        if stage.__name__ not in compiled:  # (on CPU nothing is captured: every device-path stage is traced here)
            compiled.add(stage.__name__)
            torch._dynamo.reset()
            torch.compile(lambda: stage(*args), fullgraph=True, backend=static_graph)()
        else:
            run(stage, *args, capturable=capturable)

    monkeypatch.setattr(eng.graphs, "run", run_traced)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [o.token_ids for o in outs] == hf_greedy(target, PROMPTS, 12)
    assert compiled == ({"plain"} if strategy == "none" else {"root", "level", "verify"} | (
        {"plain"} if strategy == "adaptive" and any(s["plain"] for s in eng.step_log) else set()))


def test_bench_gpu_rollout_drafts_smoke(tiny_world, tmp_path, monkeypatch):
    """bench.gpu's rollout_drafts section (--smoke: CPU, live 1 and 4) on the tiny world: it is in the run order,
    runs without error, every row emits plain decoding's tokens, and the rollout rows verify chains."""
    import argparse
    from pathlib import Path

    from bench import gpu

    monkeypatch.setattr(gpu, "tiny_dir", lambda: Path(tiny_world.root))
    assert "rollout_drafts" in [name for name, _, _ in gpu.SECTIONS]
    args = argparse.Namespace(smoke=True, quick=False, out=str(tmp_path / "gpu.json"), budget_s=600.0,
                              compile=None, kv_cache="paged")
    b = gpu.Bench(args)
    b.section("rollout_drafts", gpu.section_rollout_drafts)
    assert not b.res["errors"], b.res["errors"]
    table = b.res["rollout_drafts"]["table"]
    assert [(r["live"], r["row"]) for r in table] == [(L, n) for L in (1, 4) for n in gpu.ROLLOUT_ROWS]
    assert all(r["identical"] for r in table)
    for r in table:
        assert r["tokens"] > 0 and r["tok_s"] > 0 and r["live_mean"] <= r["live"]
        if r["row"] == "none":
            assert r["mean_tokens_per_step"] == 1.0 and r["chains_per_step"] == 0
        if r["row"] == "rollout_drafts":  # chains verified every step, and the history gives them something to match
            assert r["chains_per_step"] > 0 and r["chain_tokens_per_step"] > 0
            assert 0 <= r["lookup_share"] < 1
    assert "rollout live" in gpu.summary_table(b.res)
