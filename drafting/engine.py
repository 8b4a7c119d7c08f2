"""The speculative generation engine: continuous batching over per-sample KV slots, tree drafting,
one-pass tree verification and lossless acceptance. No Ray inside; `actors/` wraps it.

Cache invariants per live sample with n committed tokens: the target cache holds K/V of tokens[:n-1] (the
last committed token is the root of the next verify); the draft cache holds tokens[:dlen], dlen <= n, and
catches up on tokens[dlen:n] at the start of each drafting step."""
from __future__ import annotations

import collections
import time
from typing import Hashable, Iterable, Mapping, Sequence

import torch

from drafting.accept import walk
from drafting.kv_store import KVCache
from drafting.model import LeanDecoder
from drafting.noise import GumbelScheme, block_size, position_keys
from drafting.records import EngineStats, GenOutput, GenRequest, KVRange, SampleState, SamplingParams
from drafting.sampling import as_int64, derive_seed, process_logits
from drafting.strategy import DraftStrategy, StepView, parse_strategy
from drafting.tree import TreeDrafter, close_under_ancestors, verify_tree

MAX_DEPTH = 64  # RoPE table headroom beyond max_len for draft/verify node positions


class SpeculativeEngine:
    """Target + draft decoders with `max_slots` KV slots each; requests beyond capacity wait in a FIFO."""

    def __init__(self, target, draft=None, strategy: str | DraftStrategy = "tree:4,2,16", max_slots: int = 64,
                 max_len: int = 256, device="cpu", dtype: torch.dtype = torch.float32,
                 eos_token_id: int | Sequence[int] | None = None, node_log_steps: int = 256,
                 calibration=None, step_log_steps: int = 100000):
        """calibration (needed by strategy 'adaptive'): a calibration file path, 'auto' (the cached profile of
        this model pair here, profiled on first use), or a `Calibration`."""
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.device = torch.device(device)
        self.max_slots, self.max_len = max_slots, max_len
        self.target = LeanDecoder(target, self.device, dtype, max_len + MAX_DEPTH, max_len, what="target")
        self.draft = None if draft is None else LeanDecoder(draft, self.device, dtype, max_len + MAX_DEPTH, max_len,
                                                             what="draft")
        V = self.target.shape.vocab_size
        if self.draft is not None and self.draft.shape.vocab_size != V:
            raise ValueError(f"draft vocab_size {self.draft.shape.vocab_size} != target vocab_size {V}: "
                             f"target and draft must share one vocabulary")
        self.eos = self._eos_tensor(eos_token_id)
        self.block = block_size(V)  # noise block of two-level Gumbel-max (the whole vocabulary when small)
        self.scheme = GumbelScheme()
        ts = self.target.shape
        self.tcache = KVCache(ts.layers, max_slots, ts.kv_heads, max_len, ts.head_dim, self.device, dtype)
        self.dcache = None
        if self.draft is not None:
            ds = self.draft.shape
            self.dcache = KVCache(ds.layers, max_slots, ds.kv_heads, max_len, ds.head_dim, self.device, dtype)
        self.drafter: TreeDrafter | None = None
        self.dtype = dtype
        self.calibration_spec, self.calibration = calibration, None
        self.strategy = parse_strategy("none")

        S, L, dev = max_slots, max_len + 1, self.device
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        # per-row state; rows 0..B-1 are the live samples
        self.rows = {
            "tokens": z(S, L), "logp": z(S, L, dt=torch.float32), "n": z(S), "dlen": z(S), "plen": z(S),
            "max_new": z(S), "temp": z(S, dt=torch.float32), "top_k": z(S), "top_p": z(S, dt=torch.float64),
            "greedy": z(S, dt=torch.bool), "seed": z(S),
            "steps": z(S), "drafted": z(S), "accepted": z(S),
        }
        self.live: list[GenRequest] = []  # request of each live row
        self.row_of: dict[Hashable, int] = {}
        self.queue: collections.deque[GenRequest] = collections.deque()
        self.queued_ids: set = set()
        self.reserved = 0  # slots held for incoming migrations: admission of queued requests leaves them free
        self.node_log: collections.deque = collections.deque(maxlen=node_log_steps)
        self.step_log: collections.deque = collections.deque(maxlen=step_log_steps)  # one dict per step
        self.reset_stats()
        self.set_strategy(strategy)

    # ---- configuration -------------------------------------------------------------------------------------
    def _eos_tensor(self, eos) -> torch.Tensor | None:
        if eos is None:
            eos = getattr(self.target.generation_config, "eos_token_id", None)
            if eos is None:
                eos = getattr(self.target.config, "eos_token_id", None)
        if eos is None:
            return None
        ids = [eos] if isinstance(eos, int) else list(eos)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def set_strategy(self, strategy: str | DraftStrategy) -> None:
        """Switch the draft strategy between steps (live samples carry on)."""
        if isinstance(strategy, str) and strategy.strip().lower() == "adaptive":
            from drafting.adaptive import AdaptiveStrategy

            if self.draft is None:
                raise ValueError("strategy 'adaptive' needs a draft model (draft=None)")
            strategy = AdaptiveStrategy(self.load_calibration())
        s = parse_strategy(strategy)
        if s.max_depth > 0 and self.draft is None:
            raise ValueError(f"strategy {s.name!r} needs a draft model (draft=None)")
        if s.max_depth >= MAX_DEPTH:
            raise ValueError(f"strategy {s.name!r}: depth {s.max_depth} must be < {MAX_DEPTH}")
        if s.max_depth > 0 and s.topk > self.target.shape.vocab_size:
            raise ValueError(f"strategy {s.name!r}: topk {s.topk} exceeds the vocabulary size")
        self.strategy = s
        if s.max_depth > 0:
            pool = s.topk + (s.max_depth - 1) * s.max_width * s.topk
            if self.drafter is None or self.drafter.max_nodes < pool:
                self.drafter = TreeDrafter(self.draft, self.max_slots, pool, self.scheme)

    @torch.inference_mode()
    def load_target_weights(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """New actor weights by HF parameter name (RLHF weight sync). Call between rollouts: live samples' KV
        were computed with the old weights."""
        return self.target.load_weights(named)

    @torch.inference_mode()
    def load_draft_weights(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        if self.draft is None:
            raise ValueError("load_draft_weights: this engine has no draft model")
        return self.draft.load_weights(named)

    def on_draft_update(self) -> None:
        """The draft's weights changed: acceptance records made with the old draft no longer describe it, and
        the acceptance predictor refits on new ones."""
        self.node_log.clear()
        self.strategy.reset()

    # ---- calibration ---------------------------------------------------------------------------------------
    def calibration_key(self) -> dict:
        from drafting.calibration import calibration_key

        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return calibration_key(self.target.config, self.draft.config if self.draft else None, str(self.dtype),
                               device, torch.get_num_threads())

    def load_calibration(self):
        """The calibration this engine's adaptive strategy and the load balancer use (see __init__)."""
        if self.calibration is None:
            if self.calibration_spec is None:
                raise ValueError("strategy 'adaptive' needs a calibration: a file from `python -m drafting.profile`"
                                 " or calibration='auto'")
            from drafting.profile import resolve_calibration

            self.calibration = resolve_calibration(self, self.calibration_spec)
        return self.calibration

    @property
    def saturation_live(self) -> int | None:
        """Live samples where plain decoding's throughput stops growing (the roofline's saturation point)."""
        if self.calibration is None and self.calibration_spec is not None:
            self.load_calibration()
        return None if self.calibration is None else self.calibration.saturation_live

    # ---- requests ------------------------------------------------------------------------------------------
    def add(self, request: GenRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        rid = request.request_id
        if rid in self.row_of or rid in self.queued_ids:
            raise ValueError(f"request {rid!r} is already in this engine")
        p = request.prompt_token_ids
        if len(p) == 0:
            raise ValueError(f"request {rid!r}: empty prompt")
        if len(p) > self.max_len - 1:
            raise ValueError(f"request {rid!r}: prompt has {len(p)} tokens, more than max_len - 1 = {self.max_len - 1}")
        V = self.target.shape.vocab_size
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"request {rid!r}: prompt token ids must be in [0, {V})")
        request.sampling.validate(f"request {rid!r} sampling")
        if request.sampling.seed is None:
            request.sampling.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.queue.append(request)
        self.queued_ids.add(rid)

    def remove(self, request_id: Hashable) -> None:
        """Drop a queued or live request (e.g. after a migration was confirmed); its slot frees at once."""
        if request_id in self.row_of:
            self._free_row(self.row_of[request_id])
            return
        if request_id in self.queued_ids:
            self.queue.remove(next(r for r in self.queue if r.request_id == request_id))
            self.queued_ids.discard(request_id)
            return
        raise KeyError(f"request {request_id!r} is not in this engine")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenOutput]:
        """Run prompts to completion; outputs in prompt order. One shared SamplingParams with a seed gives each
        prompt its own derived seed (equal prompts then still sample independently)."""
        sampling = sampling if sampling is not None else SamplingParams()
        if isinstance(sampling, SamplingParams):
            params = [SamplingParams(**{**vars(sampling),
                                        "seed": None if sampling.seed is None else derive_seed(sampling.seed, i)})
                      for i in range(len(prompts))]
        else:
            if len(sampling) != len(prompts):
                raise ValueError(f"sampling: {len(sampling)} SamplingParams for {len(prompts)} prompts")
            params = [SamplingParams(**vars(s)) for s in sampling]
        self._gen_calls = getattr(self, "_gen_calls", 0) + 1
        ids = [("generate", self._gen_calls, i) for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, params):
            self.add(GenRequest(rid, list(p), sp))
        done: dict = {}
        wanted = set(ids)
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in wanted:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    # ---- the step loop -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[GenOutput]:
        """Admit queued requests into free slots, advance every live sample by one draft/verify step (or one
        plain token); returns the samples that finished (their slots are already free)."""
        t0 = time.perf_counter()
        self._admit()
        if not self.live:
            return []
        B, r = len(self.live), self.rows
        view = StepView(B, int(r["n"][:B].max()), int((r["n"][:B] - r["dlen"][:B]).max()), r["temp"][:B])
        self._log = {"live": B, "ctx": view.context, "lag": view.draft_lag, "t_admit": time.perf_counter() - t0}
        t1 = time.perf_counter()
        draft = self.strategy.plan(view)
        self._log["t_policy"] = time.perf_counter() - t1
        out = self._step_speculative(view) if draft else self._step_plain()
        dt = time.perf_counter() - t0
        self._time += dt
        self._log["t_total"] = dt
        decision = getattr(self.strategy, "decision", None)
        if decision:
            self._log.update({f"plan_{k}": v for k, v in decision.items()})
        self.step_log.append(self._log)
        self.strategy.step_done(self._log)
        return out

    def _step_plain(self) -> list[GenOutput]:
        """One target token per sample; the draft cache catches up at the next drafting step."""
        B, r = len(self.live), self.rows
        n = r["n"][:B]
        root = r["tokens"][:B].gather(1, (n - 1)[:, None])  # [B, 1]
        logits = self._append(self.target, self.tcache, n - 1, torch.ones_like(n), root, want_logits=True)[:, 0]
        tok, lp = self._target_tokens(logits, torch.arange(B, device=self.device), n)
        allowed = self._commit(tok[:, None], torch.ones_like(n), lp[:, None])
        self._bookkeep(B, torch.zeros_like(n), torch.zeros_like(n), allowed)
        self._log.update({"plain": True, "levels": 0, "nodes": 0, "accepted": 0})
        return self._finish(allowed)

    def _target_tokens(self, logits: torch.Tensor, rows: torch.Tensor, position: torch.Tensor,
                       children: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's token and its log-prob for M distributions: logits [M, V] of live rows `rows` [M] for
        token index position [M] (children [M, K]: the drafted candidates there). Greedy rows take the argmax;
        sampled rows the position-keyed Gumbel-max of the processed distribution, with noise only for them."""
        r = self.rows
        probs = process_logits(logits, r["temp"][rows], r["top_k"][rows], r["top_p"][rows],
                               use_top_k=self._n_top_k > 0, use_top_p=self._n_top_p > 0)  # [M, V]
        greedy = r["greedy"][rows]
        tok = logits.argmax(-1)
        sampled = (~greedy).nonzero().squeeze(1)
        if sampled.numel():
            keys = position_keys(r["seed"][rows[sampled]], position[sampled])
            ch = None if children is None else children[sampled]
            tok[sampled] = self.scheme.token(probs[sampled], keys, ch, self.block)
        return tok, probs.gather(1, tok[:, None]).squeeze(1).log()

    def _draft_probs(self, logits: torch.Tensor, B: int) -> torch.Tensor:
        """The draft's distributions [B * w, V] for logits [B, w, V], processed with each row's sampling params
        (the draft mimics what the target samples from, which is what couples their choices)."""
        r, w = self.rows, logits.shape[1]
        rep = (lambda x: x[:B].repeat_interleave(w)) if w > 1 else (lambda x: x[:B])  # noqa: E731
        return process_logits(logits.reshape(B * w, -1), rep(r["temp"]), rep(r["top_k"]), rep(r["top_p"]),
                              use_top_k=self._n_top_k > 0, use_top_p=self._n_top_p > 0)

    def _step_speculative(self, view: StepView) -> list[GenOutput]:
        B, r, s = len(self.live), self.rows, self.strategy
        self._log["_t_spec"] = time.perf_counter()
        n, dlen, seed, greedy = r["n"][:B], r["dlen"][:B], r["seed"][:B], r["greedy"][:B]
        # 1. the draft catches up on committed tokens it has not seen, giving the root's child distribution
        width = n - dlen
        W = int(width.max())
        pend_idx = (dlen[:, None] + torch.arange(W, device=self.device)).clamp(max=self.max_len)
        pending = r["tokens"][:B].gather(1, pend_idx)  # [B, W]
        root_logits = self._append(self.draft, self.dcache, dlen, width, pending, want_logits=True)  # [B, 1, V]
        r["dlen"][:B] = n
        ctx = view.context
        # 2. draft tree, level by level while the strategy wants another level; then the nodes to verify
        tree = self.drafter.start(self._draft_probs(root_logits, B), n, seed, greedy, s.topk, s.width, self.block)
        log, clock = self._log, time.perf_counter
        t = clock()
        log["t_root"], levels, t_policy = t - log.pop("_t_spec", t), [], 0.0
        while True:
            t = clock()
            s.score(tree, view)
            more = s.deeper(tree, view)
            t_policy += clock() - t
            if not more:
                break
            t = clock()
            self.drafter.choose_frontier(tree, s.width)
            tree = self.drafter.grow(tree, self.dcache, n, ctx, seed, greedy, lambda lg: self._draft_probs(lg, B),
                                     s.topk, self.block)
            levels.append((s.width, clock() - t))
        t = clock()
        chosen = close_under_ancestors(tree, s.select(tree, view))
        log["t_policy"] += t_policy + clock() - t
        root = r["tokens"][:B].gather(1, (n - 1)[:, None]).squeeze(1)
        vt = verify_tree(tree, chosen, root, s.topk)
        t_verify = clock()
        # 3. verify all chosen nodes of all samples in one target forward; tree K/V stay out of the cache
        T = vt.tokens.shape[1]
        tctx = ctx - 1
        ctx_mask = (torch.arange(tctx, device=self.device)[None, :] < (n - 1)[:, None])[:, None, :].expand(B, T, tctx)
        positions = (n - 1)[:, None] + vt.depth
        logits, (nk, nv) = self.target.forward(vt.tokens, positions, torch.cat([ctx_mask, vt.mask], dim=2),
                                               self.tcache, slice(0, B), tctx, keep_kv=True, valid=vt.valid)
        # 4. the target's own token at every verified node (one call: noise only for sampled rows' real nodes),
        # then walk the tree on them
        rows, nodes = vt.valid.nonzero(as_tuple=True)  # row-major, the order of the packed logits
        ch = vt.children[rows, nodes]
        ch_tok = torch.where(ch >= 0, vt.tokens[rows].gather(1, ch.clamp(min=0)), -1)
        tok, lp = self._target_tokens(logits, rows, n[rows] + vt.depth[rows, nodes], ch_tok)
        target = torch.zeros_like(vt.tokens)
        target[rows, nodes] = tok
        node_logp = torch.zeros(B, T, device=self.device)
        node_logp[rows, nodes] = lp
        acc = walk(vt, target, tree.levels)
        logp = node_logp.gather(1, acc.at)
        # 5. commit tokens (EOS / length truncation) and the accepted path's target K/V
        n_old = n.clone()
        allowed = self._commit(acc.tokens, acc.count, logp)
        src = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=self.device), acc.path], dim=1)  # root + path
        j = torch.arange(src.shape[1], device=self.device)
        dst = torch.where(j < allowed[:, None], (n_old - 1)[:, None] + j, self.tcache.trash)  # [B, D + 1]
        bidx = torch.arange(B, device=self.device)[:, None]
        self.tcache.k[:, bidx, :, dst] = nk[:, bidx, :, src]  # [B, D + 1, L, Hkv, D]
        self.tcache.v[:, bidx, :, dst] = nv[:, bidx, :, src]
        t_verify = clock() - t_verify
        self._record(tree, vt, acc, view)
        t = clock()
        self._bookkeep(B, vt.counts, acc.count - 1, allowed)
        out = self._finish(allowed)
        log.update({"plain": False, "levels": tree.levels, "level_widths": [w for w, _ in levels],
                    "t_levels": [dt for _, dt in levels], "nodes": int(vt.counts.sum()),
                    "width": int(vt.tokens.shape[1]), "accepted": int((acc.count - 1).sum()),
                    "t_verify": t_verify + clock() - t})
        return out

    def _record(self, tree, vt, acc, view: StepView) -> None:
        """Log every tested node (verified, parent accepted) with its features: the acceptance predictor's data."""
        B = vt.tokens.shape[0]
        node = vt.node  # [B, T - 1] draft-tree index
        par = tree.parents.gather(1, node)  # [B, T - 1], -1 = root
        on_path_by_node = torch.zeros(B, tree.size + 1, dtype=torch.bool, device=self.device)
        on_path_by_node.scatter_(1, torch.where(vt.valid[:, 1:], node, tree.size), acc.on_path[:, 1:])
        parent_ok = torch.where(par < 0, torch.ones_like(par, dtype=torch.bool),
                                on_path_by_node.gather(1, par.clamp(min=0)))
        tested = vt.valid[:, 1:] & parent_ok
        if not bool(tested.any()):
            return
        temp = view.temperature[:, None].expand_as(node)
        feats = torch.stack([tree.value.gather(1, node), tree.q.gather(1, node), tree.margin.gather(1, node),
                             tree.depth[node].float(), tree.rank[node].float(), temp.float()], dim=-1)[tested]
        accepted = acc.on_path[:, 1:][tested]
        self.node_log.append((feats.cpu(), accepted.cpu()))
        predicted = None if tree.cond is None else tree.cond.gather(1, node)[tested]
        t = time.perf_counter()
        self.strategy.observe({"features": feats, "accepted": accepted, "predicted": predicted})
        self._log["t_policy"] += time.perf_counter() - t

    def _append(self, model: LeanDecoder, cache: KVCache, start: torch.Tensor, width: torch.Tensor,
                tokens: torch.Tensor, rows: slice | None = None, want_logits: bool = False) -> torch.Tensor | None:
        """Ragged write-mode forward: row b appends tokens[b, :width[b]] at cache columns start[b]..; padded
        tokens go to the trash column. Returns logits at each row's last real token [B, 1, V] if asked."""
        B, W = tokens.shape
        rows = rows if rows is not None else slice(0, B)
        t = torch.arange(W, device=self.device)[None, :]
        real = t < width[:, None]
        ctx = int((start + width).max())
        if ctx == 0 or W == 0:
            return None
        positions = torch.where(real, start[:, None] + t, torch.zeros_like(t))
        write_pos = torch.where(real, start[:, None] + t, torch.full_like(t, cache.trash))
        # real token sees columns <= its own; padded ones see the row's real prefix (never an empty row)
        last = (start[:, None] + torch.minimum(t, (width - 1)[:, None])).clamp(min=0)  # [B, W]
        mask = torch.arange(ctx, device=self.device)[None, None, :] <= last[:, :, None]  # [B, W, ctx]
        at = (width - 1).clamp(min=0)[:, None] if want_logits else None
        logits, _ = model.forward(tokens, positions, mask, cache, rows, ctx, write_pos=write_pos, logits_at=at,
                                  want_logits=want_logits)
        return logits

    def _commit(self, new_tok: torch.Tensor, count: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Append up to count[b] tokens of new_tok [B, W], cut after the first EOS, at max_new_tokens and at
        max_len. Returns the number appended per sample [B]."""
        B, W = new_tok.shape
        r = self.rows
        n = r["n"][:B]
        limit = torch.minimum(r["max_new"][:B] - (n - r["plen"][:B]), self.max_len - n)
        allowed = torch.minimum(count, limit)
        j = torch.arange(W, device=self.device)[None, :]
        if self.eos is not None:
            is_eos = torch.isin(new_tok, self.eos) & (j < allowed[:, None])
            allowed = torch.where(is_eos.any(1), is_eos.to(torch.int8).argmax(1) + 1, allowed)
        pos = torch.where(j < allowed[:, None], n[:, None] + j, self.max_len)  # max_len = trash column
        bidx = torch.arange(B, device=self.device)[:, None]
        r["tokens"][bidx, pos] = new_tok
        r["logp"][bidx, pos] = logp
        r["n"][:B] = n + allowed
        return allowed

    def _bookkeep(self, B: int, drafted: torch.Tensor, accepted: torch.Tensor, emitted: torch.Tensor) -> None:
        r = self.rows
        r["steps"][:B] += 1
        r["drafted"][:B] += drafted
        r["accepted"][:B] += accepted
        self._steps += 1
        self._sample_steps += B
        self._accepted += int(accepted.sum())
        self._tokens += int(emitted.sum())

    def _finish(self, allowed: torch.Tensor) -> list[GenOutput]:
        """Collect finished samples (EOS emitted or a length limit reached) and free their slots."""
        B, r = len(self.live), self.rows
        n = r["n"][:B]
        last = r["tokens"][:B].gather(1, (n - 1)[:, None]).squeeze(1)
        stop = torch.zeros_like(n, dtype=torch.bool)
        if self.eos is not None:
            stop = torch.isin(last, self.eos) & (allowed > 0)
        length = (n - r["plen"][:B] >= r["max_new"][:B]) | (n >= self.max_len)
        done = (stop | length).nonzero().squeeze(1).tolist()
        if not done:
            return []
        stop_l = stop.tolist()
        outs = [self._output(b, "stop" if stop_l[b] else "length") for b in done]
        for b in sorted(done, reverse=True):  # descending: the row moved into a hole is never a finished one
            self._free_row(b)
        return outs

    def _output(self, row: int, reason: str) -> GenOutput:
        r, req = self.rows, self.live[row]
        n, plen = int(r["n"][row]), int(r["plen"][row])
        toks = r["tokens"][row, :n].tolist()
        stats = {k: int(r[k][row]) for k in ("steps", "drafted", "accepted")}
        lp = r["logp"][row, plen:n].tolist() if req.sampling.logprobs else None
        return GenOutput(req.request_id, toks[:plen], toks[plen:], reason, stats, lp)

    # ---- slots ---------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move queued requests into free slots (FIFO) and prefill them as one ragged batch."""
        new = []
        while self.queue and len(self.live) + len(new) + self.reserved < self.max_slots:
            new.append(self.queue.popleft())
            self.queued_ids.discard(new[-1].request_id)
        if not new:
            return
        # rows in prompt-length order, so prefill groups of similar lengths waste little on padding
        new.sort(key=lambda q: len(q.prompt_token_ids))
        B0 = len(self.live)
        for req in new:
            sp, row, p = req.sampling, len(self.live), req.prompt_token_ids
            self._set_row(row, p, [], sp, as_int64(sp.seed), (0, 0, 0), None, draft_len=len(p) - 1)
            self.live.append(req)
            self.row_of[req.request_id] = row
        widths = [len(q.prompt_token_ids) - 1 for q in new]
        g0 = 0
        for g1 in range(1, len(new) + 1):
            if g1 < len(new) and widths[g1] * (g1 + 1 - g0) <= 1.25 * sum(widths[g0:g1 + 1]) + 256:
                continue  # row g1 joins the group: padding stays small
            width = torch.tensor(widths[g0:g1], device=self.device)
            toks = self.rows["tokens"][B0 + g0:B0 + g1, :max(widths[g1 - 1], 1)]
            for model, cache in ((self.target, self.tcache), (self.draft, self.dcache)):
                if model is not None:
                    self._append(model, cache, torch.zeros_like(width), width, toks, rows=slice(B0 + g0, B0 + g1))
            g0 = g1

    def _set_row(self, row: int, prompt: list[int], response: list[int], sp: SamplingParams, seed: int,
                 counts: tuple[int, int, int], logprobs: list[float] | None, draft_len: int) -> None:
        r = self.rows
        seq = list(prompt) + list(response)
        r["tokens"][row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        r["logp"][row, :len(seq)] = 0.0
        if logprobs:
            r["logp"][row, len(prompt):len(seq)] = torch.tensor(logprobs, dtype=torch.float32)
        greedy = sp.temperature == 0
        vals = {"n": len(seq), "dlen": draft_len, "plen": len(prompt), "max_new": sp.max_new_tokens,
                "temp": sp.temperature, "top_k": 0 if greedy else sp.top_k, "top_p": 1.0 if greedy else sp.top_p,
                "greedy": greedy, "seed": seed,
                "steps": counts[0], "drafted": counts[1], "accepted": counts[2]}
        for k, v in vals.items():
            r[k][row] = v
        self._count_params(sp, +1)

    def _count_params(self, sp: SamplingParams, sign: int) -> None:
        """Live samples needing top-k / top-p, so the hot path skips the sorts when none do."""
        greedy = sp.temperature == 0
        self._n_top_k += sign * int(not greedy and sp.top_k > 0)
        self._n_top_p += sign * int(not greedy and sp.top_p < 1.0)

    def _free_row(self, row: int) -> None:
        """Free a slot by moving the last live row into it, keeping live rows dense in 0..B-1."""
        last = len(self.live) - 1
        req = self.live[row]
        self._count_params(req.sampling, -1)
        del self.row_of[req.request_id]
        if row != last:
            r = self.rows
            for t in r.values():
                t[row] = t[last]
            self.tcache.move_row(last, row, int(r["n"][row]))
            if self.dcache is not None:
                self.dcache.move_row(last, row, int(r["dlen"][row]))
            self.live[row] = self.live[last]
            self.row_of[self.live[row].request_id] = row
        self.live.pop()

    # ---- migration -----------------------------------------------------------------------------------------
    def _row(self, request_id: Hashable) -> int:
        if request_id not in self.row_of:
            raise KeyError(f"request {request_id!r} is not live in this engine")
        return self.row_of[request_id]

    def sample_loads(self) -> list[tuple[Hashable, int, int, int]]:
        """(request id, committed target KV positions, tokens generated, max_new_tokens) of each live sample:
        what the load balancer ranks samples by when it picks which to move."""
        B, r = len(self.live), self.rows
        n, plen, max_new = (r[k][:B].tolist() for k in ("n", "plen", "max_new"))
        return [(q.request_id, n[b] - 1, n[b] - plen[b], max_new[b]) for b, q in enumerate(self.live)]

    @torch.inference_mode()
    def export_kv(self, request_id: Hashable, start: int, end: int) -> KVRange:
        """Copy of a live sample's committed K/V for positions [start, end) (clipped to what is committed)."""
        row = self._row(request_id)
        tl, dl = int(self.rows["n"][row]) - 1, int(self.rows["dlen"][row])
        if not 0 <= start <= end:
            raise ValueError(f"export_kv {request_id!r}: bad range [{start}, {end})")
        tk, tv = self.tcache.read(row, start, max(start, min(end, tl)))
        dk = dv = None
        if self.dcache is not None:
            dk, dv = self.dcache.read(row, start, max(start, min(end, dl)))
        return KVRange(start, tk, tv, dk, dv)

    @torch.inference_mode()
    def export_sample(self, request_id: Hashable, kv_start: int = 0) -> SampleState:
        """Snapshot of a live sample between steps (KV from kv_start on); the sample stays here until removed."""
        row, r = self._row(request_id), self.rows
        req = self.live[row]
        n, plen = int(r["n"][row]), int(r["plen"][row])
        kv = self.export_kv(request_id, kv_start, n)
        toks = r["tokens"][row, :n].tolist()
        return SampleState(
            request_id=req.request_id, prompt_token_ids=toks[:plen], token_ids=toks[plen:],
            sampling=SamplingParams(**vars(req.sampling)), seed=int(r["seed"][row]),
            steps=int(r["steps"][row]), drafted=int(r["drafted"][row]), accepted=int(r["accepted"][row]),
            logprobs=r["logp"][row, plen:n].tolist() if req.sampling.logprobs else None,
            target_len=n - 1, draft_len=int(r["dlen"][row]), kv_start=kv_start,
            target_k=kv.target_k, target_v=kv.target_v, draft_k=kv.draft_k, draft_v=kv.draft_v)

    @torch.inference_mode()
    def import_sample(self, state: SampleState, prefix: Sequence[KVRange] = ()) -> None:
        """Continue an exported sample here; `prefix` ranges (stage 1 copies) plus the state's own KV must
        cover the target's committed positions. Draft K/V not covered is recomputed by the draft."""
        rid = state.request_id
        if rid in self.row_of or rid in self.queued_ids:
            raise ValueError(f"import_sample: request {rid!r} is already in this engine")
        if len(self.live) >= self.max_slots:
            raise RuntimeError(f"import_sample {rid!r}: no free slot (max_slots={self.max_slots})")
        n = len(state.prompt_token_ids) + len(state.token_ids)
        if n > self.max_len - 1:
            raise ValueError(f"import_sample {rid!r}: {n} tokens do not fit max_len={self.max_len}")
        if state.target_len != n - 1:
            raise ValueError(f"import_sample {rid!r}: target_len {state.target_len} != tokens - 1 = {n - 1}")
        ranges = list(prefix) + [KVRange(state.kv_start, state.target_k, state.target_v, state.draft_k, state.draft_v)]
        covered, d_cov = 0, 0
        row = len(self.live)
        for kr in sorted(ranges, key=lambda x: x.start):
            if kr.start > covered:
                raise ValueError(f"import_sample {rid!r}: target KV gap at positions [{covered}, {kr.start})")
            self.tcache.load(row, kr.start, kr.target_k, kr.target_v)
            covered = max(covered, kr.start + kr.target_k.shape[2])
            if self.dcache is not None and kr.draft_k is not None and kr.start <= d_cov:
                self.dcache.load(row, kr.start, kr.draft_k, kr.draft_v)
                d_cov = max(d_cov, kr.start + kr.draft_k.shape[2])
        if covered < state.target_len:
            raise ValueError(f"import_sample {rid!r}: target KV covers [0, {covered}), need [0, {state.target_len})")
        sp = SamplingParams(**vars(state.sampling))
        self._set_row(row, state.prompt_token_ids, state.token_ids, sp, state.seed,
                      (state.steps, state.drafted, state.accepted), state.logprobs,
                      draft_len=min(d_cov, state.draft_len, n - 1))
        self.live.append(GenRequest(rid, list(state.prompt_token_ids), sp))
        self.row_of[rid] = row

    # ---- stats ---------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._steps = self._sample_steps = self._accepted = self._tokens = 0
        self._time = 0.0
        self._n_top_k = getattr(self, "_n_top_k", 0)
        self._n_top_p = getattr(self, "_n_top_p", 0)

    def stats(self) -> EngineStats:
        ss = max(self._sample_steps, 1)
        return EngineStats(live=len(self.live), queued=len(self.queue), steps=self._steps, tokens=self._tokens,
                           tokens_per_s=self._tokens / self._time if self._time > 0 else 0.0,
                           mean_accepted=self._accepted / ss, mean_tokens_per_step=self._tokens / ss,
                           step_ms=1000.0 * self._time / max(self._steps, 1))

    def acceptance_records(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [M, 6], accepted [M]) of every tested node (verified with its parent accepted) over the last
        logged steps: what the acceptance predictor is fitted on. Features: path value, own draft probability,
        margin, depth, sibling rank, temperature."""
        if not self.node_log:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        vals, acc = zip(*self.node_log)
        return torch.cat(vals), torch.cat(acc)
