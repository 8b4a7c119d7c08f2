"""Which sample holds which row, in terms of samples and tokens held: the live samples (rows 0..B-1, kept dense),
the FIFO queue, slots and K/V blocks reserved for incoming migrations, and the host mirrors of per-row lengths and
tokens that the step decides its shapes from without reading the device.

The API speaks of samples (`admissible`, `place`, `release`, `reserve`, `unreserve`, `reserve_kv`, `release_kv`,
`tokens_held`) so that the storage behind a row (today a dense K/V row of `max_len` columns per model) can change
without its callers."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
import torch

from drafting.policy.strategy import StepView
from drafting.records import GenOutput, GenRequest, SampleState, SamplingParams
from drafting.runtime.memory import DenseMemory, PagedMemory
from drafting.spec.stages import Flags, Stages

HOST_COUNTS = ("n", "dlen", "plen", "max_new", "steps", "drafted", "accepted")


@dataclass
class Preempted(GenRequest):
    """A preempted sample queued to resume: its state, with its K/V swapped to host memory (or, over the swap
    budget, without K/V: recomputed by a prefill of its tokens when it resumes)."""

    state: SampleState | None = None


@dataclass
class Reservation:
    """The K/V memory a migration holds for the samples it brings (`Slots.reserve_kv`; empty for a dense cache).

    blocks: free blocks set aside from the pool (admission and growth cannot take them); the imports draw their
    rows' blocks from them first, and what is left goes back to the pool when the order ends. shared: by prompt,
    the prompt's full blocks pinned for the samples that share them (a live sample's here, or those of the first
    sample of the order that brings the prompt, once imported). skip: by request id, (positions [0, skip) the
    source need not send, the request id of the sample that brings them or None where they are here already)."""

    blocks: list = field(default_factory=list)
    shared: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    shared_positions: int = 0  # positions the imports took from shared blocks instead of copies
    open: bool = False  # held (until `Slots.release_kv`)


class Slots:
    """`max_slots` rows over the stages' device state and the target/draft caches."""

    def __init__(self, stages: Stages, caches: Sequence, max_slots: int, max_len: int,
                 memory: DenseMemory | PagedMemory):
        self.stages, self.caches = stages, caches  # caches: (target, draft or None); rows move together
        self.memory = memory
        self.by_prompt: dict[tuple, set] = {}  # a live sample's prompt -> the live requests that hold it
        self.pinned: set = set()  # live samples a migration is copying: preempted only when nothing else is left
        self.max_slots, self.max_len = max_slots, max_len
        S, L = max_slots, max_len + 1
        self.h = {k: np.zeros(S, dtype=np.int64) for k in HOST_COUNTS}
        self.h_tokens = np.zeros((S, L), dtype=np.int64)
        self.h_logp = np.zeros((S, L), dtype=np.float32)
        self.live: list[GenRequest] = []  # request of each live row
        self.row_of: dict[Hashable, int] = {}
        self.queue: collections.deque[GenRequest] = collections.deque()
        self.queued_ids: set = set()
        self.reserved = 0  # slots held for incoming migrations: admission of queued requests leaves them free
        self.holds = 0  # migrations' reservations of K/V blocks outstanding (`reserve_kv`)
        self._n_sampled = self._n_top_k = self._n_top_p = 0

    # ---- samples ---------------------------------------------------------------------------------------------
    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self.row_of or request_id in self.queued_ids

    def row(self, request_id: Hashable) -> int:
        if request_id not in self.row_of:
            raise KeyError(f"request {request_id!r} is not live in this engine")
        return self.row_of[request_id]

    def enqueue(self, request: GenRequest) -> None:
        self.queue.append(request)
        self.queued_ids.add(request.request_id)

    def dequeue(self, request_id: Hashable) -> None:
        self.queue.remove(next(r for r in self.queue if r.request_id == request_id))
        self.queued_ids.discard(request_id)

    def free(self) -> int:
        """Slots a new sample may take now."""
        return self.max_slots - len(self.live) - self.reserved

    def reserve(self, n: int) -> bool:
        """Hold n slots for samples arriving by migration (queued requests cannot take them); False if fewer
        are free."""
        if n > self.free():
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        if not 0 <= n <= self.reserved:
            raise ValueError(f"unreserve {n}: only {self.reserved} slots are reserved")
        self.reserved -= n

    def reserve_kv(self, plan: Sequence[tuple], margin: int = 0, share: bool = True, at_most: int | None = None
                   ) -> Reservation | None:
        """Set aside the blocks samples arriving by migration will hold: plan, per sample (request id, prompt
        tokens, committed tokens, most tokens it may reach), each rounded up to whole blocks after `margin` more
        tokens (what it may add while it is copied). With `share` (and shared prompts), the prompt's full blocks
        count once: a live sample here holding the prompt lends them (pinned until the order ends), else the first
        sample of the plan with the prompt brings them for its siblings. None, and nothing held, when the pool
        cannot spare them (leaving its reserve free while samples run or are coming). at_most: as many as are free
        up to that many instead (a source holding the blocks its frozen samples gave back)."""
        mem, res, need, brings = self.memory, Reservation(), 0, {}
        for rid, prompt, n, cap in plan:
            key, blocks = tuple(prompt), mem.blocks_for(min(n + margin, max(cap, n)))
            full = mem.full_blocks(len(key)) if share else 0
            if full and key not in brings:
                row = self.holder(key)  # a live sample here with the prompt's K/V (the draft's too)
                if row is not None and (self.caches[1] is None or self.h["dlen"][row] >= full * mem.block) \
                        and len(mem.blocks_of(row)) >= full:
                    res.shared[key], brings[key] = mem.blocks_of(row)[:full], None
                else:
                    brings[key], full = rid, 0  # this one brings the prompt
            res.skip[rid] = (full * mem.block, brings[key] if full else None)
            need += blocks - full
        if at_most is not None:
            taken = mem.take(min(need, at_most, mem.free_blocks()), reserve=False)
        else:
            taken = mem.take(need, reserve=bool(self.live or self.holds))
        if taken is None:
            return None
        res.blocks = taken
        for blocks in res.shared.values():
            mem.hold(blocks)
        self.holds, res.open = self.holds + 1, True
        return res

    def release_kv(self, res: Reservation) -> None:
        """The order is over: blocks no import took go back to the pool, pinned prompt blocks are let go."""
        if not res.open:
            return
        self.memory.give(res.blocks)
        for blocks in res.shared.values():
            self.memory.give(blocks)
        res.blocks, res.shared, res.open = [], {}, False
        self.holds -= 1

    def tokens_held(self) -> int:
        """Committed tokens of the live samples (what their K/V hold)."""
        return int(self.h["n"][:len(self.live)].sum())

    def admissible(self) -> list[GenRequest]:
        """Queued requests that fit now, FIFO, taken off the queue: a free slot each, and the blocks their K/V
        need with the pool's reserve left (a sibling of a live prompt needs only its last block)."""
        new, blocks, prompts = [], 0, set()
        while self.queue and len(new) < self.free():
            q = self.queue[0]
            if isinstance(q, Preempted):
                cost = self.memory.admit_cost(len(q.state.prompt_token_ids) + len(q.state.token_ids), False)
            else:
                key = tuple(q.prompt_token_ids)
                cost = self.memory.admit_cost(len(key), key in self.by_prompt or key in prompts)
                prompts.add(key)
            if not self.memory.affordable(blocks + cost, reserve=bool(self.live or new or self.holds)):
                break
            blocks += cost
            new.append(self.queue.popleft())
            self.queued_ids.discard(q.request_id)
        return new

    def holder(self, prompt: Sequence[int]) -> int | None:
        """A live row holding this prompt's K/V, if any (and the cache can share it)."""
        rids = self.by_prompt.get(tuple(prompt)) if self.memory.sharing else None
        return self.row_of[next(iter(rids))] if rids else None

    def victim(self) -> int:
        """The row to preempt when the pool runs dry: the least progressed sample (the least work to redo), not one
        a migration is copying unless only those are left."""
        B, h = len(self.live), self.h
        progress = (h["n"][:B] - h["plen"][:B]).astype(np.float64)
        progress[[b for b, q in enumerate(self.live) if q.request_id in self.pinned]] += np.inf
        return int(np.argmin(progress))

    def view(self, node_cap: int) -> StepView:
        B, h = len(self.live), self.h
        return StepView(B, int(h["n"][:B].max()), int((h["n"][:B] - h["dlen"][:B]).max()),
                        self.stages.rows["temp"][:B], node_cap)

    def flags(self) -> Flags:
        return Flags(self._n_sampled > 0, self._n_top_k > 0, self._n_top_p > 0)

    def loads(self) -> list[tuple[Hashable, int, int, int]]:
        """(request id, committed target KV positions, tokens generated, max_new_tokens) of each live sample."""
        h = self.h
        return [(q.request_id, int(h["n"][b]) - 1, int(h["n"][b] - h["plen"][b]), int(h["max_new"][b]))
                for b, q in enumerate(self.live)]

    def commit(self, out: np.ndarray, lp: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a step emitted (its one read: tokens [B, W] then the stages' OUT_EXTRA counts, log-probs [B, W]) into the
        host mirrors. Returns (accepted, emitted, finish code) per row."""
        B, h = len(out), self.h
        drafted, accepted, emitted, finish = (out[:, W + i] for i in range(4))
        rows, j = np.arange(B), np.arange(W)
        pos = np.where(j[None, :] < emitted[:, None], h["n"][:B, None] + j, self.max_len)
        self.h_tokens[rows[:, None], pos] = out[:, :W]
        self.h_logp[rows[:, None], pos] = lp
        h["n"][:B] += emitted
        h["steps"][:B] += 1
        h["drafted"][:B] += drafted
        h["accepted"][:B] += accepted
        return accepted, emitted, finish

    def output(self, row: int, reason: str, features=None) -> GenOutput:
        """A finished sample's output (features: the target cache, whose features of the row it carries)."""
        req, h = self.live[row], self.h
        n, plen = int(h["n"][row]), int(h["plen"][row])
        toks = self.h_tokens[row, :n].tolist()
        stats = {k: int(h[k][row]) for k in ("steps", "drafted", "accepted")}
        lp = self.h_logp[row, plen:n].tolist() if req.sampling.logprobs else None
        feats = features.read_features(row, 0, n - 1)[0, 0] if features is not None else None
        return GenOutput(req.request_id, toks[:plen], toks[plen:], reason, stats, lp, feats)

    # ---- rows ----------------------------------------------------------------------------------------------
    def place(self, requests: Sequence[GenRequest], samples: list[tuple], holders: Sequence[int] | None = None
              ) -> int:
        """The next free rows take these samples: (prompt, response, sampling, seed, (steps, drafted,
        accepted), logprobs, draft length). One copy per field, not per row. Each row gets blocks for its
        tokens, or shares its prompt's with the row `holders` names. Returns the first row."""
        row0 = len(self.live)
        for i, (p, resp, *_) in enumerate(samples):
            if holders is not None and holders[i] is not None:
                self.memory.share(row0 + i, holders[i], len(p))
            elif not self.memory.claim(row0 + i, len(p) + len(resp)):
                for j in range(i):
                    self.memory.release(row0 + j)
                raise RuntimeError(f"K/V pool: no room for {len(p) + len(resp)} positions of request "
                                   f"{requests[i].request_id!r}")
        self._set_rows(row0, samples)
        for req in requests:
            self.row_of[req.request_id] = len(self.live)
            self.live.append(req)
            self.by_prompt.setdefault(tuple(req.prompt_token_ids), set()).add(req.request_id)
        return row0

    def _set_rows(self, row0: int, samples: list[tuple]) -> None:
        r, h, k = self.stages.rows, self.h, len(samples)
        seqs = [list(p) + list(resp) for p, resp, *_ in samples]
        L = max(len(q) for q in seqs)
        tok = np.zeros((k, L), dtype=np.int64)
        for i, q in enumerate(seqs):
            tok[i, :len(q)] = q
        rows = slice(row0, row0 + k)
        r["tokens"][rows, :L] = self.stages.to_device(tok)
        self.h_tokens[rows, :L] = tok
        self.h_logp[rows] = 0.0
        greedy = [sp.temperature == 0 for _, _, sp, *_ in samples]
        vals = {"n": [len(q) for q in seqs], "dlen": [d for *_, d in samples],
                "plen": [len(p) for p, *_ in samples], "max_new": [sp.max_new_tokens for _, _, sp, *_ in samples],
                "temp": [sp.temperature for _, _, sp, *_ in samples],
                "top_k": [0 if g else sp.top_k for g, (_, _, sp, *_) in zip(greedy, samples)],
                "top_p": [1.0 if g else sp.top_p for g, (_, _, sp, *_) in zip(greedy, samples)],
                "greedy": greedy, "seed": [seed for _, _, _, seed, *_ in samples]}
        for name, v in vals.items():
            r[name][rows] = self.stages.to_device(torch.tensor(v, dtype=r[name].dtype))
            if name in h:
                h[name][rows] = v
        for i, (p, resp, sp, _, counts, logprobs, _) in enumerate(samples):
            h["steps"][row0 + i], h["drafted"][row0 + i], h["accepted"][row0 + i] = counts
            if logprobs:
                self.h_logp[row0 + i, len(p):len(p) + len(resp)] = logprobs
            self._count_params(sp, +1)

    def release(self, row: int) -> None:
        """Free a row by moving the last live row into it, keeping live rows dense in 0..B-1."""
        last = len(self.live) - 1
        req = self.live[row]
        self._count_params(req.sampling, -1)
        del self.row_of[req.request_id]
        self.pinned.discard(req.request_id)
        key = tuple(req.prompt_token_ids)
        self.by_prompt[key].discard(req.request_id)
        if not self.by_prompt[key]:
            del self.by_prompt[key]
        self.memory.release(row)
        if row != last:
            self.memory.move(last, row)
            h = self.h
            for t in self.stages.rows.values():
                t[row] = t[last]
            for a in (*h.values(), self.h_tokens, self.h_logp):
                a[row] = a[last]
            tcache, dcache = self.caches
            tcache.move_row(last, row, int(h["n"][row]))
            if dcache is not None:
                dcache.move_row(last, row, int(h["dlen"][row]))
            self.live[row] = self.live[last]
            self.row_of[self.live[row].request_id] = row
        self.stages.make_inert(last)
        self.live.pop()

    def rewind(self, n: Sequence[int], dlen: Sequence[int]) -> None:
        """Set the first len(n) live rows' committed and draft lengths (profiling reruns a step at one context)."""
        B = len(n)
        n, dlen = np.asarray(n, dtype=np.int64), np.asarray(dlen, dtype=np.int64)
        self.h["n"][:B], self.h["dlen"][:B] = n, dlen
        self.stages.rows["n"][:B] = self.stages.to_device(n)
        self.stages.rows["dlen"][:B] = self.stages.to_device(dlen)

    def _count_params(self, sp: SamplingParams, sign: int) -> None:
        """Live samples that sample, and that need top-k / top-p: the stages skip what no live row needs."""
        greedy = sp.temperature == 0
        self._n_sampled += sign * int(not greedy)
        self._n_top_k += sign * int(not greedy and sp.top_k > 0)
        self._n_top_p += sign * int(not greedy and sp.top_p < 1.0)
