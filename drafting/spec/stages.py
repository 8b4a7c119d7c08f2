"""The step's stages: device work only, with shapes fixed by their arguments. On CUDA each runs as a captured graph
(`drafting.runtime.graphs`, keyed by the arguments themselves), on CPU as the eager call of the same function.

- `plain`: one target token per row.
- `root`: the draft catches up on committed tokens it has not seen, then the tree's first level.
- `level`: one more level of the draft tree.
- `verify`: one target forward over the chosen nodes of every row, the lossless walk, the commit, and the
  accepted nodes' K/V moved to their committed columns.

`Stages` owns every static buffer a stage reads or writes: the rows' device state, the draft tree (through its
`TreeDrafter`), the host mode's chosen nodes, the step's outputs and the verified nodes' records. Rows 0..B-1 hold
the live samples; the others are inert (one committed token, nothing left to generate), so that a stage run over
a bucket of rows larger than the live ones commits nothing there.

Cache invariants per row with n committed tokens: the target cache holds K/V of tokens[:n-1] (the last committed
token is the root of the next verify); the draft cache holds tokens[:dlen], dlen <= n, and catches up on
tokens[dlen:n] in the next `root`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from drafting.spec.accept import walk
from drafting.spec.noise import GumbelScheme, block_size, position_keys
from drafting.spec.sampling import process_logits
from drafting.spec.sources import HeadDraft, ModelDraft
from drafting.spec.tree import TreeDrafter, close_under_ancestors, top_per_sample, verify_tree

if TYPE_CHECKING:  # passed in: the models and their caches belong to the runtime
    from drafting.model.decoder import LeanDecoder
    from drafting.runtime.kv_cache import KVCache

MAX_DEPTH = 64  # RoPE table headroom beyond max_len for draft/verify node positions
# per-row output columns after the emitted tokens: drafted, accepted, emitted, finish code, then the rollout chain's
# nodes verified, matched (its leading nodes that equal the target's tokens), accepted on the emitted path, and the
# depth - 1 of its first verified node (past the prefix the model's nodes spelled: `graft_chain`)
OUT_EXTRA = 8
RECORD_FEATURES = 6  # a verified node's record: path value, own probability, margin, depth, sibling rank, temperature


@dataclass(frozen=True)
class Flags:
    """What the live rows' sampling needs this step (a stage argument, so part of its graph key)."""

    sampled: bool  # some row samples (Gumbel noise needed)
    top_k: bool
    top_p: bool


class Stages:
    """The stages and the buffers they work in, for `slots` rows of a target (and optional draft) decoder."""

    def __init__(self, target: LeanDecoder, draft: LeanDecoder | None, tcache: KVCache, dcache: KVCache | None,
                 slots: int, max_len: int, scratch: int, eos: torch.Tensor | None, head: bool, chain: int = 0):
        """chain: nodes of a rollout draft's chain in every tree (`TreeDrafter.place_chain`; 0: none)."""
        self.target, self.draft, self.tcache, self.dcache = target, draft, tcache, dcache
        self.chain = chain
        self.max_len, self.scratch, self.eos = max_len, scratch, eos
        self.device = dev = target.device
        self.scheme = GumbelScheme()
        self.block = block_size(target.shape.vocab_size)  # noise block of two-level Gumbel-max
        self.slots = S = slots
        self.policy = None  # the strategy's in-stage hooks (score_nodes, summarize); set with the strategy
        self.source = None if draft is None else (
            HeadDraft(draft, dcache, tcache) if head else ModelDraft(draft, dcache))  # what proposes the tree
        self.drafter: TreeDrafter | None = None  # made when a strategy first drafts
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=dev)  # noqa: E731
        self.rows = {  # per-row device state
            "tokens": z(S, max_len + 1), "n": z(S), "dlen": z(S), "plen": z(S), "max_new": z(S),
            "temp": z(S, dt=torch.float32), "top_k": z(S), "top_p": z(S, dt=torch.float64),
            "greedy": z(S, dt=torch.bool), "seed": z(S),
        }
        # what a step hands back: emitted tokens then OUT_EXTRA counts per row, and the tokens' log-probs
        self.out_tok, self.out_lp = z(S, MAX_DEPTH + 1 + OUT_EXTRA), z(S, MAX_DEPTH + 1, dt=torch.float32)
        self.chosen = z(S, scratch, dt=torch.bool)  # host-mode selection, handed to the verify stage
        self.tree_size = z(1)  # nodes in this step's draft tree, written by the drafting stages
        # the verify stage's node records: the acceptance predictor's data
        self.rec_feats = z(S, scratch, RECORD_FEATURES, dt=torch.float32)
        self.rec_pred = z(S, scratch, dt=torch.float32)
        self.rec_acc, self.rec_tested = z(S, scratch, dt=torch.bool), z(S, scratch, dt=torch.bool)
        # each row's rollout chain for this step, written by the host before the step (`RolloutDrafts.stage`)
        self.chain_tok, self.chain_score = z(S, max(chain, 1)), z(S, max(chain, 1), dt=torch.float32)
        self.chain_len = z(S)
        self.make_inert(slice(None))

    def to_device(self, x) -> torch.Tensor:
        """A host array onto the device without a host sync (pinned, asynchronous) on CUDA."""
        x = torch.as_tensor(x)
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)

    def ensure_drafter(self) -> None:
        if self.drafter is None:
            self.drafter = TreeDrafter(self.source, self.slots, self.scratch, self.scheme, self.chain, self.device)

    def make_inert(self, row: int | slice) -> None:
        """A free row's device state: one committed token and nothing left to generate."""
        r = self.rows
        r["n"][row], r["dlen"][row], r["plen"][row], r["max_new"][row] = 1, 0, 1, 0
        r["greedy"][row], r["temp"][row], r["top_k"][row], r["top_p"][row] = True, 0.0, 0, 1.0

    # ---- the stages ----------------------------------------------------------------------------------------
    def plain(self, B: int, kv_len: int, flags: Flags) -> None:
        """One target token per row; the draft cache catches up at the next drafting step."""
        r = self.rows
        n = r["n"][:B]
        root = r["tokens"][:B].gather(1, (n - 1)[:, None])  # [B, 1]
        logits = self.append(self.target, self.tcache, slice(0, B), n - 1, torch.ones_like(n), root, kv_len,
                             want_logits=True)[:, 0]
        tok, lp = self._target_tokens(logits, torch.arange(B, device=self.device), n, flags)
        allowed, finish = self._commit(tok[:, None], torch.ones_like(n), lp[:, None])
        zero = torch.zeros_like(n)
        self._write_outputs(tok[:, None], lp[:, None], zero, zero, allowed, finish)

    def root(self, B: int, W: int, kv_len: int, k: int, flags: Flags, policy: str, chained: bool = True) -> None:
        """The rows' rollout chains (chained: some row has one this step; else the chain's nodes only score 0),
        then the draft's catch-up on up to W pending tokens per row and the tree's first level (k nodes; 0: the
        chain alone). policy: the strategy kind whose `score_nodes` runs in here."""
        D = self.chain
        if D and chained:
            self.drafter.place_chain(B, self.chain_tok[:B], self.chain_score[:B])
        elif D:
            self.drafter.score[:B, :D] = 0.0
        self.tree_size.fill_(D + k)
        if k:
            self._root_level(B, W, kv_len, k, flags)

    def _root_level(self, B: int, W: int, kv_len: int, k: int, flags: Flags) -> None:
        r, D = self.rows, self.chain
        n, dlen = r["n"][:B], r["dlen"][:B]
        pend_idx = (dlen[:, None] + torch.arange(W, device=self.device)).clamp(max=self.max_len)
        pending = r["tokens"][:B].gather(1, pend_idx)  # [B, W]
        root_logits, state = self.append(self.draft, self.dcache, slice(0, B), dlen, n - dlen, pending, kv_len,
                                         want_logits=True)  # [B, 1, V]
        if state is not None:  # the source's state at the root (position n - 1): what its children read
            self.drafter.feat[:B, 0] = state
        r["dlen"][:B] = n
        self.drafter.start(B, self._draft_probs(root_logits, B, flags), n, r["seed"][:B], r["greedy"][:B], k,
                           self.block, flags.sampled)
        self.policy.score_nodes(self.drafter, B, D, D + k, r["temp"][:B])

    def level(self, B: int, size: int, newest: int, level: int, width: int, k: int, kv_len: int, flags: Flags,
              policy: str) -> None:
        """Expand the `width` best of the newest level's nodes into k children each."""
        r = self.rows
        self.drafter.grow(B, size, newest, level, width, k, r["n"][:B], r["seed"][:B],
                          r["greedy"][:B], lambda lg: self._draft_probs(lg, B, flags), self.block, flags.sampled,
                          kv_len)
        self.tree_size.fill_(size + width * k)
        self.policy.score_nodes(self.drafter, B, size, size + width * k, r["temp"][:B])

    def verify(self, B: int, T: int, size: int | None, depth: int, k: int, kv_len: int, flags: Flags,
               policy: str, chained: bool = True) -> None:
        """Verify the chosen nodes of every row in one target forward (tree K/V right after each row's committed
        columns), walk the tree on the target's own tokens, commit, and move the accepted nodes' K/V to their
        committed columns. size: the tree's nodes, with the host's selection in `chosen`; None: every node slot,
        those past the tree's size (on the device) masked, each row verifying its T - 1 best nodes. depth: the
        deepest level the walk may accept. chained: some row has a rollout chain this step (else the chain's nodes
        are never chosen, and the walk and the outcome skip them)."""
        r, dev = self.rows, self.device
        D = self.chain if chained else 0  # (the chain's nodes stay in the buffers, never chosen)
        n = r["n"][:B]
        host = size is not None
        if host:
            tree, chosen = self.drafter.view(B, size), self.chosen[:B, :size]
        else:
            tree = self.drafter.view(B, self.drafter.max_nodes)
            stale = torch.arange(tree.size, device=dev) >= self.tree_size  # slots past this step's tree
            tree.score.masked_fill_(stale, float("-inf"))
            chosen = self._device_choice(tree, B, T, policy, chained)
        root = r["tokens"][:B].gather(1, (n - 1)[:, None]).squeeze(1)
        # the root has the chain's first node beside the model's k children
        vt = verify_tree(tree, chosen, root, k + (1 if D else 0), width=T)
        t = torch.arange(T, device=dev)
        logits = self.target.forward(vt.tokens, (n - 1)[:, None] + vt.depth, self.tcache, slice(0, B),
                                     write_pos=(n - 1)[:, None] + t, prefix=n - 1, tail=vt.mask, kv_len=kv_len,
                                     valid=vt.valid if host else None)
        # the target's own token at every verified node (noise keyed by position), then the walk
        if host:  # packed: real nodes only, row-major
            rows, nodes = vt.valid.nonzero(as_tuple=True)
        else:
            rows = torch.arange(B, device=dev).repeat_interleave(T, output_size=B * T)
            nodes, logits = t.repeat(B), logits.reshape(B * T, -1)
        ch = vt.children[rows, nodes]
        ch_tok = torch.where(ch >= 0, vt.tokens[rows].gather(1, ch.clamp(min=0)), -1)
        tok, lp = self._target_tokens(logits, rows, n[rows] + vt.depth[rows, nodes], flags, ch_tok)
        target = torch.zeros_like(vt.tokens)
        target[rows, nodes] = tok
        node_logp = torch.zeros(B, T, device=dev)
        node_logp[rows, nodes] = lp
        acc = walk(vt, target, depth, longest=D > 0)
        logp = node_logp.gather(1, acc.at)
        n_old = n.clone()
        allowed, finish = self._commit(acc.tokens, acc.count, logp)
        # the accepted path's target K/V: node path[j] sits at column n - 1 + path[j], belongs at n + j
        j = torch.arange(acc.path.shape[1], device=dev)
        dst = torch.where(j < (allowed - 1)[:, None], n_old[:, None] + j, self.tcache.trash)
        self.tcache.move_columns(torch.arange(B, device=dev)[:, None], n_old[:, None] - 1 + acc.path, dst)
        self._record(tree, vt, acc)
        self.policy.summarize(tree, vt, acc, r["max_new"][:B] > 0, depth)
        self._write_outputs(acc.tokens, logp, vt.counts, acc.count - 1, allowed, finish,
                            self._chain_outcome(tree, vt, target, acc, allowed) if D else None)

    def _device_choice(self, tree, B: int, T: int, policy: str, chained: bool) -> torch.Tensor:
        """Each row's nodes on the device path: its T - 1 best by score; a static strategy verifies its whole chain
        and fills the rest of the width with its best model nodes (T - 1 = the strategy's nodes and the longest
        chain). A chain's nodes are verified only where a chain was staged this step, up to its length."""
        if not self.chain:
            return close_under_ancestors(tree, top_per_sample(tree.score, T - 1))
        j = torch.arange(tree.size, device=self.device)[None, :]
        chain_len = self.chain_len[:B] if chained else torch.zeros_like(self.chain_len[:B])
        in_chain = j < chain_len[:, None]
        if policy == "static":
            model = tree.score.masked_fill(j < self.chain, float("-inf"))
            chosen = top_per_sample(model, (T - 1 - chain_len).clamp(min=0)) & (model > float("-inf")) | in_chain
        else:
            score = tree.score.masked_fill((j < self.chain) & ~in_chain, float("-inf"))
            chosen = top_per_sample(score, T - 1) & (score > float("-inf"))
        return close_under_ancestors(tree, chosen)

    def _chain_outcome(self, tree, vt, target: torch.Tensor, acc, allowed: torch.Tensor) -> torch.Tensor:
        """[B, 4]: the chain's nodes verified, matched (the leading ones whose tokens are the target's at their
        parents), accepted on the emitted path, and the first one's index in the chain. Chosen nodes sort by tree
        index, so the chain's verified nodes are verify indices 1..verified."""
        D, dev = self.chain, self.device
        B, T = vt.tokens.shape
        c = T - 1
        if not c:  # the root alone (no node chosen this step)
            return torch.zeros(B, 4, dtype=torch.long, device=dev)
        is_chain = vt.valid[:, 1:] & (vt.node < D)
        verified = is_chain.sum(1)
        inv = torch.zeros(B, tree.size + 1, dtype=torch.long, device=dev)  # tree index -> verify index
        inv.scatter_(1, torch.where(vt.valid[:, 1:], vt.node, tree.size),
                     torch.arange(1, T, device=dev).expand(B, c).contiguous())
        par = tree.parents.gather(1, vt.node)  # [B, c]
        pv = torch.where(par < 0, torch.zeros_like(par), inv.gather(1, par.clamp(min=0)))
        ok = (vt.tokens[:, 1:] == target.gather(1, pv)) & is_chain
        matched = ok.long().cumprod(1).sum(1)
        p = torch.arange(acc.path.shape[1], device=dev)
        on_path = (acc.path >= 1) & (acc.path <= verified[:, None]) & (p[None, :] < (allowed - 1)[:, None])
        first = torch.where(verified > 0, vt.node[:, 0], 0)
        return torch.stack([verified, matched, on_path.sum(1), first], 1)

    def prefill(self, row0: int, widths: list[int]) -> None:
        """Rows row0.. take their prompts' K/V in both caches (all but the last token: the next step's root), in
        ragged groups of similar widths so that padding stays small. Eager: prompts come in every length."""
        g0 = 0
        for g1 in range(1, len(widths) + 1):
            if g1 < len(widths) and widths[g1] * (g1 + 1 - g0) <= 1.25 * sum(widths[g0:g1 + 1]) + 256:
                continue  # row g1 joins the group: padding stays small
            W = max(widths[g1 - 1], 1)
            width = self.to_device(torch.tensor(widths[g0:g1]))
            toks = self.rows["tokens"][row0 + g0:row0 + g1, :W]
            for model, cache in ((self.target, self.tcache), (self.draft, self.dcache)):
                if model is not None:
                    self.append(model, cache, slice(row0 + g0, row0 + g1), torch.zeros_like(width), width, toks,
                            kv_len=W)
            g0 = g1

    # ---- pieces of the stages ------------------------------------------------------------------------------
    def append(self, model: LeanDecoder, cache: KVCache, rows: slice, start: torch.Tensor, width: torch.Tensor,
               tokens: torch.Tensor, kv_len: int, want_logits: bool = False):
        """Ragged forward (prefill, catch-up, plain): row b appends tokens[b, :width[b]] at cache columns start[b]..;
        padded tokens go to the trash column. Returns logits at each row's last real token [B, 1, V] if asked (the
        draft: with the source's state there, `DraftSource.catch_up`)."""
        B, W = tokens.shape
        t = torch.arange(W, device=self.device)[None, :]
        real = t < width[:, None]
        positions = torch.where(real, start[:, None] + t, torch.zeros_like(t))
        write_pos = torch.where(real, start[:, None] + t, torch.full_like(t, cache.trash))
        # a real token sees its row's earlier tokens and itself; a padded one what the row's last real one sees
        # (an empty row sees one column, so that no query attends to nothing)
        last = torch.minimum(t, (width - 1).clamp(min=0)[:, None])  # [B, W]
        tail = torch.arange(W, device=self.device)[None, None, :] <= last[:, :, None]  # [B, W, W]
        at = (width - 1).clamp(min=0)[:, None] if want_logits else None
        if cache is self.dcache:  # the draft source catches up (a head also keeps its feature at the root)
            return self.source.catch_up(rows, tokens, positions, write_pos, start, tail, kv_len, at, want_logits)
        return model.forward(tokens, positions, cache, rows, write_pos=write_pos, prefix=start, tail=tail,
                             kv_len=kv_len, logits_at=at, want_logits=want_logits)

    def _target_tokens(self, logits: torch.Tensor, rows: torch.Tensor, position: torch.Tensor, flags: Flags,
                       children: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's token and its log-prob for M distributions: logits [M, V] of rows `rows` [M] for token
        index position [M] (children [M, K]: the drafted candidates there). Greedy rows take the argmax;
        sampled rows the position-keyed Gumbel-max of the processed distribution."""
        r = self.rows
        probs = process_logits(logits, r["temp"][rows], r["top_k"][rows], r["top_p"][rows],
                               use_top_k=flags.top_k, use_top_p=flags.top_p)  # [M, V]
        tok = logits.argmax(-1)
        if flags.sampled:
            keys = position_keys(r["seed"][rows], position)
            tok = torch.where(r["greedy"][rows], tok, self.scheme.token(probs, keys, children, self.block))
        return tok, probs.gather(1, tok[:, None]).squeeze(1).log()

    def _draft_probs(self, logits: torch.Tensor, B: int, flags: Flags) -> torch.Tensor:
        """The draft's distributions [B * w, V] for logits [B, w, V], processed with each row's sampling params
        (the draft mimics what the target samples from, which is what couples their choices)."""
        r, w = self.rows, logits.shape[1]
        rep = (lambda x: x[:B].repeat_interleave(w, output_size=B * w)) if w > 1 else (lambda x: x[:B])  # noqa
        return process_logits(logits.reshape(B * w, -1), rep(r["temp"]), rep(r["top_k"]), rep(r["top_p"]),
                              use_top_k=flags.top_k, use_top_p=flags.top_p)

    def _commit(self, new_tok: torch.Tensor, count: torch.Tensor, logp: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append up to count[b] tokens of new_tok [B, W], cut after the first EOS, at max_new_tokens and at
        max_len. Returns the number appended per row [B] and its finish code (0 running, 1 EOS, 2 length)."""
        B, W = new_tok.shape
        r = self.rows
        n = r["n"][:B]
        limit = torch.minimum(r["max_new"][:B] - (n - r["plen"][:B]), self.max_len - n)
        allowed = torch.minimum(count, limit)
        j = torch.arange(W, device=self.device)[None, :]
        stop = torch.zeros_like(n, dtype=torch.bool)
        if self.eos is not None:
            is_eos = torch.isin(new_tok, self.eos) & (j < allowed[:, None])
            stop = is_eos.any(1)
            allowed = torch.where(stop, is_eos.to(torch.int8).argmax(1) + 1, allowed)
        pos = torch.where(j < allowed[:, None], n[:, None] + j, self.max_len)  # max_len = trash column
        r["tokens"][torch.arange(B, device=self.device)[:, None], pos] = new_tok
        n_new = n + allowed
        r["n"][:B] = n_new
        length = (n_new - r["plen"][:B] >= r["max_new"][:B]) | (n_new >= self.max_len)
        finish = torch.where(stop, 1, torch.where(length, 2, 0))
        return allowed, finish

    def _write_outputs(self, tokens: torch.Tensor, logp: torch.Tensor, drafted: torch.Tensor,
                       accepted: torch.Tensor, emitted: torch.Tensor, finish: torch.Tensor,
                       chain: torch.Tensor | None = None) -> None:
        B, W = tokens.shape
        self.out_tok[:B, :W] = tokens
        self.out_tok[:B, -OUT_EXTRA:-4] = torch.stack([drafted, accepted, emitted, finish], dim=1)
        self.out_tok[:B, -4:] = 0 if chain is None else chain
        self.out_lp[:B, :W] = logp

    def _record(self, tree, vt, acc) -> None:
        """Every verified node's features, whether it was accepted, and whether it was tested (its parent
        accepted): the acceptance predictor's data, read by the host only when it wants them."""
        B, T = vt.tokens.shape
        node = vt.node  # [B, T - 1] draft-tree index
        par = tree.parents.gather(1, node)  # [B, T - 1], -1 = root
        on_path_by_node = torch.zeros(B, tree.size + 1, dtype=torch.bool, device=self.device)
        on_path_by_node.scatter_(1, torch.where(vt.valid[:, 1:], node, tree.size), acc.on_path[:, 1:])
        parent_ok = torch.where(par < 0, torch.ones_like(par, dtype=torch.bool),
                                on_path_by_node.gather(1, par.clamp(min=0)))
        temp = self.rows["temp"][:B, None].expand_as(node)
        self.rec_feats[:B, :T - 1] = torch.stack(
            [tree.value.gather(1, node), tree.q.gather(1, node), tree.margin.gather(1, node),
             tree.depth[node].float(), tree.rank[node].float(), temp.float()], dim=-1)
        self.rec_acc[:B, :T - 1] = acc.on_path[:, 1:]
        # the draft's acceptance predictor learns from its own nodes: a chain's (`_chain_outcome`) are learnt apart
        self.rec_tested[:B, :T - 1] = vt.valid[:, 1:] & parent_ok & (node >= self.chain)
        self.rec_pred[:B, :T - 1] = tree.cond.gather(1, node)
