"""Rollout drafts from token matches: a draft source with no forward pass, fed by the rollout itself.

Under the engine's position-keyed sampling the token at a position is a fixed function of the target's logits
there and of that position's noise, so verification only asks "is the drafted token the one the target picks?".
Any deterministic draft is therefore exact: a wrong guess costs the verify slots it used, never the output's
distribution, and no residual sampling (no draft probabilities) is needed. That lets the engine draft from plain
token matches against text it already has:
- `self`: the sample's own prompt and response so far (quotes of the prompt, its own repetitions);
- `sibling`: the responses of its GRPO group siblings (same prompt, other seeds), live or finished on this
  instance;
- `history`: earlier epochs' responses to the same prompt (`HistoryStore`, kept by the driver).

The index is per group: one dict from the `min_match`-gram (a tuple of ints) to its occurrences, in insertion
order, each a pair of ints (the position after the gram, the document's slot in its group: pairs of ints drop out
of the garbage collector's tracking, which tuples holding the lists would not, one per token). Every committed
token is one insert; nothing is ever rebuilt. A lookup takes the context's last `min_match` tokens, reads the
most recent `CANDIDATES` occurrences, extends each match backwards up to `max_match` tokens, and drafts the
`max_depth` tokens that follow the best one: the longest match, and among equally long ones the first token most
of them continue with (`_vote`).

Knobs, against vLLM's n-gram and suffix-decoding speculators (`speculative_config`):
- `min_match` = ngram's `prompt_lookup_min`, `max_match` = `prompt_lookup_max` (here the longest match wins, not
  the first one found trying n from the largest down);
- `max_depth` = `num_speculative_tokens` (suffix decoding: also bounded by `suffix_decoding_max_tree_depth`);
- `min_count` ~ suffix decoding's `suffix_decoding_min_token_prob`, as a count rather than a frequency: the
  drafted next token must follow at least that many of the (capped) matching occurrences;
- suffix decoding's global cache of earlier responses (`suffix_decoding_max_cached_requests`) is, here, the
  group's siblings live and `HistoryStore` across iterations: `history_per_prompt` per prompt id, `history_bytes`
  in all.

Pure host-side Python: imports nothing from the project, no torch."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

SOURCES = ("self", "sibling", "history")   # source ids 0, 1, 2: a drafted node's feature
SELF, SIBLING, HISTORY = 0, 1, 2
# Occurrences of a gram read per lookup, newest first: bounds a lookup's cost on hot grams (a loop, a common
# phrase) while keeping the recent ones, which are the live siblings' and the sample's own latest text.
CANDIDATES = 16
# Every document's list starts with this pad (no token): a backward match stops there without a bounds check.
_PAD = -1
# The winner among a lookup's occurrences: the longest match, then the source (sibling over history over self),
# then the later position in its document, then the newer document. A sibling or an earlier epoch shows what the
# policy wrote after this very context for this prompt; an equally long match in the sample's own text is more
# often the start of a degenerate loop. Not insertion order, on purpose: a migrated sample drafts the same at its
# destination, where the index was filled in another order. Rank and position are one int (rank << _RANK |
# position, a fast single-digit int below 2**30), so a tie costs one comparison.
_RANK_OF = {SELF: 0, HISTORY: 1, SIBLING: 2}
_SOURCE_OF = (SELF, HISTORY, SIBLING)           # rank -> source
_RANK = 28                                      # (positions past 2**28 would only blur the tie order)
_OWN = (_RANK_OF[SIBLING] - _RANK_OF[SELF]) << _RANK   # a sample's own document is a sibling's to the others


def _vote(best: list, slots: list) -> tuple:
    """Of the equally long matches (`best`: (tie, slot, toks, pos) each), the occurrence whose chain is drafted: the
    first token most of them continue with (on a tie in votes, the best-ranked occurrence's), and among those the
    best-ranked (tie rank, then the newer document). The first token is where a chain is most often accepted or
    not: voting there takes most of what voting token by token gives (SmolLM2's arithmetic rollout replayed by
    `bench.rollout_drafts_ceiling`: 1.216 tokens per step this way, 1.234 voting at every depth over every
    occurrence) at a fraction of the host time."""
    counts: dict = {}
    for o in best:
        t = o[2][o[3]]
        counts[t] = counts.get(t, 0) + 1
    top = max(counts.values())
    return max((o for o in best if counts[o[2][o[3]]] == top), key=lambda o: (o[0], slots[o[1]].seq))


@dataclass(frozen=True)
class SuffixConfig:
    min_match: int = 1        # shortest context suffix that may match (vLLM ngram: prompt_lookup_min)
    max_match: int = 8        # longest suffix compared; the longest match wins (prompt_lookup_max)
    max_depth: int = 6        # tokens per drafted chain (num_speculative_tokens)
    min_count: int = 1        # a continuation must have been seen at least this often among the matches
    history_per_prompt: int = 8     # earlier responses kept per prompt id (used by HistoryStore)
    history_bytes: int = 64 << 20   # global cap of HistoryStore, tokens counted as 4 bytes (int32)

    def validate(self, where: str = "generation.rollout") -> SuffixConfig:
        """Raises ValueError naming the field (`{where}.{field}`); returns self."""
        for name in ("min_match", "max_match", "max_depth", "min_count", "history_per_prompt", "history_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{where}.{name} must be an int, got {v!r}")
        if self.min_match < 1:
            raise ValueError(f"{where}.min_match must be >= 1, got {self.min_match}")
        if self.max_match < self.min_match:
            raise ValueError(f"{where}.max_match must be >= min_match ({self.min_match}), got {self.max_match}")
        if not 1 <= self.max_depth <= 16:
            raise ValueError(f"{where}.max_depth must be in 1..16, got {self.max_depth}")
        if self.min_count < 1:
            raise ValueError(f"{where}.min_count must be >= 1, got {self.min_count}")
        if self.history_per_prompt < 0:
            raise ValueError(f"{where}.history_per_prompt must be >= 0, got {self.history_per_prompt}")
        if self.history_bytes < 0:
            raise ValueError(f"{where}.history_bytes must be >= 0, got {self.history_bytes}")
        return self


@dataclass
class Draft:
    tokens: list[int]   # 1..max_depth tokens
    source: int         # index into SOURCES of the document matched
    match: int          # matched suffix length (min_match..max_match)
    count: int          # how many matching occurrences agree on tokens[0]


class _Doc:
    """A document: `toks` (a list the index points into), what it is, where its own text starts, its slot.

    A sample's document is _PAD, its prompt's last `max_match` tokens, then its response (from `tail` on): the
    prompt's tail lets a match near the response's start extend back into the prompt, and the prompt itself is
    indexed once per group (the group's prompt document, slot 0: _PAD + prompt, `tail` 1), not once per sample.
    `seq` orders documents for ties (newer wins)."""

    __slots__ = ("id", "seq", "slot", "source", "tail", "toks")

    def __init__(self, id, source: int, toks: list[int], tail: int, seq: int, slot: int):
        self.id, self.source, self.toks, self.tail, self.seq, self.slot = id, source, toks, tail, seq, slot


class _Group:
    """A GRPO group on this drafter: its index, its prompt, its samples' documents (live or finished) and history.

    Documents by slot: `lists` (their token lists), `ties` (rank << _RANK), `slots` (the documents; None once
    dropped). The index's ints point into them."""

    __slots__ = ("docs", "history", "history_keys", "index", "key", "lists", "live", "next_seq", "prompt", "slots",
                 "ties")

    def __init__(self, key, prompt: list[int]):
        self.key, self.index = key, {}
        self.lists, self.ties, self.slots = [], [], []
        self.docs: dict = {}                   # sample id -> its document (stays while the group lives)
        self.history: list[_Doc] = []
        self.history_keys: set[tuple] = set()  # responses already in, to skip a second sibling's copy
        self.live: set = set()
        self.next_seq = 0
        self.prompt = self.new_doc(None, SELF, [_PAD, *prompt], 1, None)

    def new_doc(self, id, source: int, toks: list[int], tail: int, seq: int | None) -> _Doc:
        if seq is None:
            seq = self.next_seq
        self.next_seq = max(self.next_seq, seq + 1)
        doc = _Doc(id, source, toks, tail, seq, len(self.slots))
        self.lists.append(toks)
        self.ties.append(_RANK_OF[source] << _RANK)
        self.slots.append(doc)
        return doc


class _Sample:
    __slots__ = ("doc", "group", "key")

    def __init__(self, doc: _Doc, group: _Group, key):
        self.doc, self.group, self.key = doc, group, key   # key: the context's last min_match tokens (or None)


class _Solo:
    """The group of a request with no group id: itself (hashable, never equal to a user's group id)."""

    __slots__ = ("rid",)

    def __init__(self, rid):
        self.rid = rid

    def __hash__(self):
        return hash(("_Solo", self.rid))

    def __eq__(self, other):
        return isinstance(other, _Solo) and other.rid == self.rid


class RolloutDrafter:
    """One per engine instance. Groups are keyed by the request's group id (None: the request is its own group)."""

    def __init__(self, cfg: SuffixConfig):
        self.cfg = cfg.validate()
        self._mn = cfg.min_match
        self._samples: dict = {}
        self._groups: dict = {}
        self._lookups = self._hits = 0
        self._hits_by_source = [0, 0, 0]
        self._lookup_s = 0.0

    # ---- documents and the index --------------------------------------------------------------------------------
    def _index(self, g: _Group, doc: _Doc, start: int, stop: int | None = None) -> None:
        """Insert the grams of doc.toks ending at index start..stop-1, each as (the position after it, the slot): an
        int pair, which the garbage collector stops tracking (a tuple holding the list would stay tracked, one per
        token indexed)."""
        m, toks, index, slot = self._mn, doc.toks, g.index, doc.slot
        for end in range(max(start, m), len(toks) if stop is None else stop):  # (index 0 is the pad)
            key = tuple(toks[end + 1 - m:end + 1])
            entry = (end + 1, slot)
            lst = index.get(key)
            if lst is None:
                index[key] = [entry]
            else:
                lst.append(entry)

    def _new_doc(self, g: _Group, id, source: int, response: list[int], seq: int | None = None) -> _Doc:
        """A sample's or a history response's document: prompt tail + response, indexed from the tail's last gram
        (the one whose continuation is the response's first token; the tail's other grams are the prompt's)."""
        prompt = g.prompt.toks
        tail = prompt[max(1, len(prompt) - self.cfg.max_match):]
        doc = g.new_doc(id, source, [_PAD, *tail, *response], 1 + len(tail), seq)
        self._index(g, doc, len(tail))
        return doc

    def _drop_doc(self, g: _Group, doc: _Doc) -> None:
        """Take a document out of the index (a rare path: a sample id coming back over a stale copy of itself)."""
        for key in list(g.index):
            kept = [e for e in g.index[key] if e[1] != doc.slot]
            if kept:
                g.index[key] = kept
            else:
                del g.index[key]
        g.lists[doc.slot] = g.slots[doc.slot] = None
        if g.docs.get(doc.id) is doc:
            del g.docs[doc.id]

    def _extend(self, g: _Group, doc: _Doc, tokens: list[int]) -> None:
        start = len(doc.toks)
        doc.toks.extend(tokens)
        self._index(g, doc, start)

    def _add_history(self, g: _Group, response: list[int], seq: int | None = None) -> None:
        key = tuple(response)
        if key in g.history_keys:
            return
        g.history_keys.add(key)
        g.history.append(self._new_doc(g, None, HISTORY, response, seq))

    def _key(self, toks: list[int]):
        m = self._mn
        return tuple(toks[len(toks) - m:]) if len(toks) > m else None   # (toks[0] is the pad)

    def _join(self, rid, group, prompt: list[int]) -> tuple[_Group, _Doc | None, bool]:
        """The sample joins its group (created if new here): (group, a document already under this id, created)."""
        if rid in self._samples:
            raise ValueError(f"sample {rid!r} is already live on this drafter")
        gkey = _Solo(rid) if group is None else group
        g = self._groups.get(gkey)
        created = g is None
        if created:
            g = self._groups[gkey] = _Group(gkey, prompt)
            # the prompt's grams that have a continuation inside it (all but its last)
            self._index(g, g.prompt, 0, len(g.prompt.toks) - 1)
        g.live.add(rid)
        return g, g.docs.get(rid), created

    # ---- the engine's calls ---------------------------------------------------------------------------------------
    def add(self, rid, group, prompt: list[int], history: list[list[int]] | None = None) -> None:
        """A new sample: its own document (prompt), its group joined or created; `history` (earlier responses to
        this prompt) becomes documents of the group, once per group however many siblings bring it."""
        g, stale, _ = self._join(rid, group, prompt)
        if stale is not None:  # an earlier sample of this id, finished in this group: it starts again
            self._drop_doc(g, stale)
        for response in history or ():
            self._add_history(g, response)
        doc = g.docs[rid] = self._new_doc(g, rid, SIBLING, [])
        self._samples[rid] = _Sample(doc, g, self._key(doc.toks))

    def commit(self, rid, tokens: list[int]) -> None:
        """Tokens newly committed to the sample's response: one index insert each."""
        t0 = time.perf_counter()
        s = self._samples[rid]
        if tokens:
            doc, m = s.doc, self._mn
            toks, index, slot = doc.toks, s.group.index, doc.slot
            key = s.key
            for t in tokens:
                toks.append(t)
                n = len(toks)
                if n <= m:  # (toks[0] is the pad)
                    continue
                key = (toks[-2], t) if m == 2 else tuple(toks[n - m:])
                lst = index.get(key)
                if lst is None:
                    index[key] = [(n, slot)]
                else:
                    lst.append((n, slot))
            s.key = key
        self._lookup_s += time.perf_counter() - t0

    def finish(self, rid) -> None:
        """The sample is done or removed: its response stays a sibling document while any member of its group is
        live here; the group (index, documents, history) is dropped when its last member leaves."""
        s = self._samples.pop(rid)
        g = s.group
        g.live.discard(rid)
        if not g.live:
            del self._groups[g.key]

    def draft(self, rid) -> Draft | None:
        """The chain for the sample's current context (prompt + its response so far), or None."""
        return self.drafts([rid])[0]

    def drafts(self, rids: list) -> list[Draft | None]:
        """`draft` for each sample (the hot path: every engine step, every live sample).

        Per sample: the occurrences of the context's last min_match tokens (the newest CANDIDATES), skipping those
        with no continuation yet (which includes the context's own end); each match extended backwards up to
        max_match; the best one wins (longest first, then see _RANK_OF); count = the occurrences whose next token
        is the winner's. Every rid must be live here (added or loaded, not finished): KeyError otherwise."""
        t0 = time.perf_counter()
        cfg = self.cfg
        mn, mx, depth, min_count = cfg.min_match, cfg.max_match, cfg.max_depth, cfg.min_count
        samples, hits_by_source = self._samples, self._hits_by_source
        OWN, CAP = _OWN, CANDIDATES   # locals: cheaper than globals in the loop
        out = []
        hits = 0
        for rid in rids:
            s = samples[rid]
            g = s.group
            cands = g.index.get(s.key) if s.key is not None else None
            if not cands:
                out.append(None)
                continue
            if len(cands) > CAP:
                cands = cands[-CAP:]
            lists, ties = g.lists, g.ties
            ctx = s.doc.toks
            n = len(ctx)
            lim = mx if n > mx else n - 1        # (ctx[0] is the pad)
            k0 = n - mn - 1                      # the context's token before the gram
            c1 = ctx[k0] if lim > mn else None   # (None: no extension possible)
            bm = 0
            best = []   # (tie, slot, toks, pos) of the occurrences with the longest match so far
            nexts = []
            nexts_append = nexts.append
            for pos, slot in cands:
                toks = lists[slot]
                try:
                    nexts_append(toks[pos])
                except IndexError:
                    continue  # no continuation yet: the context's own end, or a sibling's
                j = pos - mn - 1  # >= 0: the pad at worst, which matches no token and stops the match
                m = mn
                if toks[j] == c1:  # extend backwards, up to lim tokens
                    m += 1
                    while m < lim and toks[j - 1] == ctx[k0 - 1 - (m - mn - 1)]:
                        m += 1
                        j -= 1
                if m < bm:
                    continue
                tie = ties[slot] | pos
                if toks is ctx:
                    tie -= OWN
                if m > bm:
                    bm, best = m, []
                best.append((tie, slot, toks, pos))
            if not bm:
                out.append(None)
                continue
            btie, _, bt, bp = best[0] if len(best) == 1 else _vote(best, g.slots)
            chain = bt[bp:bp + depth]
            count = nexts.count(chain[0])
            if count < min_count:
                out.append(None)
                continue
            source = _SOURCE_OF[btie >> _RANK]
            out.append(Draft(chain, source, bm, count))
            hits += 1
            hits_by_source[source] += 1
        self._lookups += len(rids)
        self._hits += hits
        self._lookup_s += time.perf_counter() - t0
        return out

    # ---- migration --------------------------------------------------------------------------------------------------
    def export(self, rid) -> dict:
        """What the migrated sample needs to keep drafting from its group at the destination: the group's other
        samples' responses (id = their sample id) and its history (deduplicated by content), each with its source
        id and tie order (`seq`); plain lists and ints (the sample's own response travels with the sample).

        The destination drafts the same while no gram has more than CANDIDATES occurrences (its index lists the
        same occurrences in another order, and the cap keeps the newest)."""
        s = self._samples[rid]
        g = s.group
        docs = [{"id": d.id, "source": SIBLING, "seq": d.seq, "tokens": d.toks[d.tail:]}
                for d in g.docs.values() if d is not s.doc]
        docs += [{"id": None, "source": HISTORY, "seq": d.seq, "tokens": d.toks[d.tail:]} for d in g.history]
        return {"version": 1, "own_seq": s.doc.seq, "docs": docs}

    def load(self, rid, group, prompt: list[int], response: list[int], payload: dict) -> None:
        """The migrated sample arrives with its response so far and its source's `export`. Payload documents join
        the group unless present (siblings by sample id, history by content); a sibling's copy from an earlier
        arrival is extended when this one is longer. A group new here keeps the source's tie order."""
        g, stale, new = self._join(rid, group, prompt)
        response = list(response)
        if stale is not None and stale.toks[stale.tail:] == response[:len(stale.toks) - stale.tail]:
            doc = stale  # a copy of this very sample, from a sibling's payload: it continues it
            self._extend(g, doc, response[len(doc.toks) - doc.tail:])
        else:
            if stale is not None:
                self._drop_doc(g, stale)
            doc = g.docs[rid] = self._new_doc(g, rid, SIBLING, response, payload.get("own_seq") if new else None)
        for d in payload.get("docs", ()):
            seq = d.get("seq") if new else None
            if d["source"] == HISTORY:
                self._add_history(g, d["tokens"], seq)
                continue
            have = g.docs.get(d["id"])
            if have is None:
                g.docs[d["id"]] = self._new_doc(g, d["id"], SIBLING, d["tokens"], seq)
            elif d["id"] not in g.live and len(d["tokens"]) > len(have.toks) - have.tail \
                    and have.toks[have.tail:] == list(d["tokens"][:len(have.toks) - have.tail]):
                self._extend(g, have, d["tokens"][len(have.toks) - have.tail:])
        self._samples[rid] = _Sample(doc, g, self._key(doc.toks))

    # ---- figures -----------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Documents (prompts, samples' responses, history), tokens held by them, index entries, groups; lookups,
        hits (by source) and the seconds spent in drafts() + commit()."""
        docs = tokens = entries = 0
        for g in self._groups.values():
            all_docs = [d for d in g.slots if d is not None]
            docs += len(all_docs)
            tokens += sum(len(d.toks) - 1 for d in all_docs)
            entries += sum(len(v) for v in g.index.values())
        return {"docs": docs, "index_tokens": tokens, "index_entries": entries, "groups": len(self._groups),
                "live": len(self._samples), "lookups": self._lookups, "hits": self._hits,
                "hits_by_source": list(self._hits_by_source), "lookup_s": self._lookup_s}


class HistoryStore:
    """Kept by the driver/fleet across iterations (not by instances): earlier responses per prompt id, newest last.

    Capped per prompt (`history_per_prompt`, the oldest dropped) and in all (`history_bytes`, tokens counted as
    int32): over the cap, the prompts added to least recently go first."""

    def __init__(self, cfg: SuffixConfig):
        self.cfg = cfg.validate()
        self._by_prompt: OrderedDict = OrderedDict()   # prompt id -> [response, ...], least recently added first
        self._tokens = 0

    def get(self, prompt_id) -> list[list[int]]:
        """Copies of the prompt's kept responses, newest last ([] if none)."""
        return [list(r) for r in self._by_prompt.get(prompt_id, ())]

    def add(self, prompt_id, response: list[int]) -> None:
        kept = self._by_prompt.get(prompt_id)
        if kept is None:
            kept = self._by_prompt[prompt_id] = []
        else:
            self._by_prompt.move_to_end(prompt_id)
        kept.append(list(response))
        self._tokens += len(response)
        while len(kept) > self.cfg.history_per_prompt:
            self._tokens -= len(kept.pop(0))
        if not kept:
            del self._by_prompt[prompt_id]
        while self._by_prompt and self._tokens * 4 > self.cfg.history_bytes:
            _, evicted = self._by_prompt.popitem(last=False)
            self._tokens -= sum(len(r) for r in evicted)

    def state_dict(self) -> dict:
        """Plain lists (json-able, prompt ids as they are), in eviction order."""
        return {"version": 1, "prompts": [[pid, [list(r) for r in rs]] for pid, rs in self._by_prompt.items()]}

    def load_state_dict(self, d: dict) -> None:
        """Replaces the contents; this store's caps apply to what is loaded."""
        self._by_prompt.clear()
        self._tokens = 0
        for pid, responses in d["prompts"]:
            for r in responses:
                self.add(pid, r)

    def stats(self) -> dict:
        responses = sum(len(rs) for rs in self._by_prompt.values())
        return {"prompts": len(self._by_prompt), "responses": responses, "tokens": self._tokens,
                "bytes": self._tokens * 4}
