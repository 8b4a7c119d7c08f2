"""Samples into rows, and out again when the K/V pool runs dry.

`admit`: queued requests take free rows. A preempted sample resumes (its K/V swapped back bitwise, or recomputed);
a request whose prompt a live sample (or one admitted with it) holds shares that prompt's blocks; every other
one is prefilled, in prompt-length order so that prefill groups of similar lengths waste little on padding.
`make_room`: before a step, every live row gets blocks for its committed positions (preempting the least
progressed samples while it cannot) and, as the pool allows, for the step's tree nodes."""
from __future__ import annotations

from typing import Callable

from drafting.records import GenRequest, SampleState
from drafting.runtime import sample_io
from drafting.runtime.slots import Preempted, Slots
from drafting.spec.sampling import as_int64
from drafting.spec.stages import Stages


def admit(slots: Slots, stages: Stages, carried) -> dict:
    """Admit what fits; returns the prefill work done (prompt tokens computed, those shared instead), the samples
    resumed and the swap space their K/V gave back."""
    new = sorted(slots.admissible(), key=lambda q: len(q.prompt_token_ids))
    counts = {"prefill_tokens": 0, "shared_tokens": 0, "resumed": 0, "swapped_bytes": 0}
    for q in [q for q in new if isinstance(q, Preempted)]:
        counts["swapped_bytes"] += q.state.nbytes()
        counts["prefill_tokens"] += resume(slots, stages, carried, q.state)
        counts["resumed"] += 1
    leaders, followers, held = [], [], set()
    for q in (q for q in new if not isinstance(q, Preempted)):
        key = tuple(q.prompt_token_ids)
        shared = slots.memory.sharing and (key in held or slots.holder(key) is not None)
        (followers if shared else leaders).append(q)
        held.add(key)
    if leaders:
        row0 = slots.place(leaders, [fresh_sample(q) for q in leaders])
        widths = [len(q.prompt_token_ids) - 1 for q in leaders]
        stages.prefill(row0, widths)
        counts["prefill_tokens"] += sum(widths)
    for q in followers:  # after the leaders: their prompts' K/V exist now
        slots.place([q], [fresh_sample(q)], holders=[slots.holder(q.prompt_token_ids)])
        counts["shared_tokens"] += len(q.prompt_token_ids) - 1
    return counts


def fresh_sample(q: GenRequest) -> tuple:
    return (q.prompt_token_ids, [], q.sampling, as_int64(q.sampling.seed), (0, 0, 0), None, len(q.prompt_token_ids) - 1)


def resume(slots: Slots, stages: Stages, carried, state: SampleState) -> int:
    """A preempted sample back into a row: its swapped K/V loaded (bitwise as it was), or, swapped without K/V,
    recomputed by a prefill of its prompt and tokens. Returns the tokens recomputed."""
    if state.target_k is not None:
        sample_io.import_sample(slots, carried, state)
        return 0
    n = len(state.prompt_token_ids) + len(state.token_ids)
    req = GenRequest(state.request_id, list(state.prompt_token_ids), state.sampling, group=state.group)
    row0 = slots.place([req], [(state.prompt_token_ids, state.token_ids, state.sampling, state.seed,
                                (state.steps, state.drafted, state.accepted), state.logprobs, n - 1)])
    stages.prefill(row0, [n - 1])
    return n - 1


def make_room(slots: Slots, want_nodes: int, preempt: Callable[[int], None]) -> int:
    """Blocks for every live row's committed positions, preempting the least progressed sample while some row
    has none; then room for up to `want_nodes` tree nodes a row. Returns the nodes every row has room for."""
    while True:
        B = len(slots.live)
        short = next((b for b in range(B) if not slots.memory.claim(b, int(slots.h["n"][b]))), None)
        if short is None:
            break
        if B == 1:
            raise RuntimeError(f"K/V pool: {slots.memory.stats()} cannot hold one sample of "
                               f"{int(slots.h['n'][0])} tokens: give the pool more memory")
        preempt(slots.victim())
    return slots.memory.node_cap(slots.h["n"][:len(slots.live)], want_nodes)


def preempt(slots: Slots, carried, row: int, swap_room: int) -> int:
    """The row's sample out of the pool until it has room: its state and K/V into host memory (without K/V, to be
    recomputed, when they do not fit `swap_room` bytes), back at the head of the queue. Returns the bytes swapped."""
    req = slots.live[row]
    state = sample_io.export_sample(slots, carried, req.request_id)
    state.group = req.group  # (its rollout drafts' documents stay in the engine's index, keyed by its id)
    state = state.to_host() if state.nbytes() <= swap_room else state.without_kv()
    slots.release(row)
    slots.queue.appendleft(Preempted(req.request_id, req.prompt_token_ids, req.sampling, req.group, None, state))
    slots.queued_ids.add(req.request_id)
    return state.nbytes()
