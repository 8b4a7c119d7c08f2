"""drafting.spec.suffix: rollout drafts from token matches (self, siblings, history) and the history store.

Hand-made sequences pin the exact drafts; random streams check the incremental index against a brute-force
reading of the rules (over the full texts), the same drafts after migration, and memory dropped with the group."""
import json
import random
import re

import pytest

from drafting.spec.suffix import (CANDIDATES, HISTORY, SELF, SIBLING, SOURCES, Draft, HistoryStore, RolloutDrafter,
                                  SuffixConfig)


def drafter(**kw) -> RolloutDrafter:
    return RolloutDrafter(SuffixConfig(**kw))


def as_tuple(d: Draft | None):
    return None if d is None else (tuple(d.tokens), d.source, d.match, d.count)


# ---- exact drafts on hand-made sequences --------------------------------------------------------------------------
def test_own_prompt_quote():
    d = drafter()
    d.add("a", None, [10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    assert d.draft("a") is None  # the prompt's last gram occurs only at the context's own end
    d.commit("a", [5, 12, 13])
    assert d.draft("a") == Draft([14, 15, 16, 17, 18, 19], SELF, 2, 1)
    d.commit("a", [14])
    assert d.draft("a") == Draft([15, 16, 17, 18, 19], SELF, 3, 1)  # [12, 13, 14]: longer now


def test_own_repetition_and_never_the_context_itself():
    d = drafter(max_depth=3)
    d.add("a", None, [1, 2])
    d.commit("a", [7, 8, 9])
    assert d.draft("a") is None  # (8, 9) only at the context's end
    d.commit("a", [4, 7, 8])
    assert d.draft("a") == Draft([9, 4, 7], SELF, 2, 1)  # the earlier [7, 8], not the one just written
    d.commit("a", [9])
    # (8, 9) twice now: at the context's end (no continuation) and earlier, followed by [4, 7, 8, 9]
    assert d.draft("a") == Draft([4, 7, 8], SELF, 3, 1)


def test_sibling_continuation_from_the_first_token():
    prompt = [30, 31, 32, 33]
    d = drafter()
    d.add("a", "g", prompt)
    d.commit("a", [40, 41, 42, 43, 44, 45, 46, 47])
    d.add("b", "g", prompt)
    # b has no response yet: the prompt's last gram is followed, in a's document, by a's response
    assert d.draft("b") == Draft([40, 41, 42, 43, 44, 45], SIBLING, 4, 1)  # the whole prompt matched (4 tokens)
    d.commit("b", [40, 41, 99, 43, 44])
    assert d.draft("b") == Draft([45, 46, 47], SIBLING, 2, 1)  # [43, 44] in a; 99 != 42 stops the match
    assert d.stats()["hits_by_source"] == [0, 2, 0]


def test_history_documents_once_per_group():
    prompt = [5, 6, 7]
    history = [[8, 9, 10, 11], [20, 21]]
    d = drafter()
    d.add("a", "g", prompt, history)
    assert d.draft("a") == Draft([20, 21], HISTORY, 3, 1)  # both follow [5, 6, 7]: the newer one wins the tie
    d.add("b", "g", prompt, history)  # a sibling bringing the same history adds nothing
    assert d.stats()["docs"] == 1 + 2 + 2  # prompt, two history responses, two samples
    d.commit("a", [8, 9])
    assert d.draft("a") == Draft([10, 11], HISTORY, 5, 1)  # [5, 6, 7, 8, 9]: across the prompt's end


def test_history_draft_counts_agreement():
    d = drafter()
    d.add("a", "g", [5, 6, 7], [[8, 9], [8, 10], [3, 4]])
    # equally long matches vote on the first token: 8 (two of three); of those the newer wins the tie
    assert d.draft("a") == Draft([8, 10], HISTORY, 3, 2)
    d.add("b", "g", [5, 6, 7], [[8, 9], [8, 10], [3, 4]])
    d.commit("b", [8, 9])   # a sibling with [5, 6, 7] -> 8, 9
    assert d.draft("a") == Draft([8, 9], SIBLING, 3, 3)  # 8 again; the sibling is the best-ranked of its occurrences


def test_longest_match_wins_over_a_shorter_one():
    prompt = [1, 2, 3, 4, 5, 6]
    d = drafter()
    d.add("a", "g", prompt)
    d.commit("a", [50, 3, 4, 60, 61])          # sibling a: [.., 50, 3, 4] -> 60
    d.add("b", "g", prompt)
    d.commit("b", [70, 2, 3, 4])                # b's context ends [2, 3, 4]: the prompt has it (3), a has [3, 4] (2)
    assert d.draft("b") == Draft([5, 6], SELF, 3, 1)  # the longer self match beats the sibling's shorter one
    d.commit("b", [60, 9, 50, 3, 4])            # context ends [9, 50, 3, 4]: a has [50, 3, 4] (3), prompt [3, 4] (2)
    got = d.draft("b")
    assert got.match == 3 and got.source == SIBLING and got.tokens == [60, 61]
    # count: [3, 4] is followed by 60 (a), 5 (the prompt) and 60 (b's own earlier [3, 4, 60])
    assert got.count == 2


def test_ties_prefer_sibling_over_history_over_self():
    prompt = [1, 2, 3]
    d = drafter(max_depth=2)
    d.add("a", "g", prompt, [[7, 8, 20, 21]])   # history: [7, 8] -> 20
    d.commit("a", [7, 8, 30, 7, 8])            # own: [7, 8] -> 30; context ends [30, 7, 8]
    assert d.draft("a") == Draft([20, 21], HISTORY, 2, 1)   # [3, 7, 8] in history, [2, 7, 8] own: 2 each
    d.add("b", "g", prompt)
    d.commit("b", [9, 7, 8, 40])               # sibling: [7, 8] -> 40
    assert d.draft("a") == Draft([40], SIBLING, 2, 1)


def test_min_count_filters_and_counts_agreement():
    prompt = [1, 2, 3]
    d = drafter(min_count=2)
    d.add("a", "g", prompt)
    d.commit("a", [4, 5, 6])
    d.add("b", "g", prompt)
    d.commit("b", [4, 5, 7])
    d.add("c", "g", prompt)
    d.commit("c", [4, 5])
    assert d.draft("c") is None  # [4, 5] followed once by 6 (a) and once by 7 (b, newer: it wins the tie)
    d.add("d", "g", prompt)
    d.commit("d", [4, 5, 6, 8])
    assert d.draft("c") == Draft([6, 8], SIBLING, 5, 2)  # d (newest) and a agree
    d3 = drafter(min_count=3)
    d3.add("a", "g", prompt)
    d3.commit("a", [4, 5, 6])
    d3.add("c", "g", prompt)
    d3.commit("c", [4, 5])
    assert d3.draft("c") is None


def test_max_depth_truncates_and_min_match_is_respected():
    prompt = list(range(100, 120))
    d = drafter(max_depth=4)
    d.add("a", None, prompt)
    d.commit("a", [104, 105])
    assert d.draft("a") == Draft([106, 107, 108, 109], SELF, 2, 1)
    d3 = drafter(min_match=3, max_match=3)
    d3.add("a", None, prompt)
    d3.commit("a", [1, 104, 105])       # only 2 tokens match the prompt
    assert d3.draft("a") is None
    d3.commit("a", [106])               # [104, 105, 106]: 3 now
    assert d3.draft("a") == Draft([107, 108, 109, 110, 111, 112], SELF, 3, 1)


def test_max_match_caps_the_match_length():
    prompt = list(range(40))
    d = drafter(max_match=4)
    d.add("a", "g", prompt)
    d.commit("a", list(range(40)) + [1000])
    d.add("b", "g", prompt)
    d.commit("b", list(range(10)))      # the prompt matches b's context for 10+ tokens: reported as 4
    assert d.draft("b").match == 4


def test_solo_requests_share_nothing():
    d = drafter()
    d.add(1, None, [1, 2, 3])
    d.commit(1, [4, 5, 6])
    d.add(2, None, [1, 2, 3])
    assert d.draft(2) is None
    assert d.stats()["groups"] == 2


def test_adding_a_live_sample_twice_raises():
    d = drafter()
    d.add("a", "g", [1, 2])
    with pytest.raises(ValueError, match="already live"):
        d.add("a", "g", [1, 2])


def test_drafts_batched_equals_one_by_one_and_stats():
    d = drafter()
    prompt = [1, 2, 3, 4]
    for r in "abc":
        d.add(r, "g", prompt)
    d.commit("a", [5, 6, 7, 8, 1, 2])
    d.commit("b", [5, 6])
    d.commit("c", [9])
    batched = d.drafts(["a", "b", "c"])
    assert batched == [d.draft(r) for r in "abc"]
    st = d.stats()
    assert st["lookups"] == 6 and st["hits"] == 2 * sum(x is not None for x in batched)
    assert sum(st["hits_by_source"]) == st["hits"] and st["lookup_s"] > 0
    assert st["index_tokens"] == 4 + 3 * 4 + 6 + 2 + 1  # prompt, three prompt tails (max_match 8 > 4), responses
    assert len(SOURCES) == 3


# ---- the index against a brute-force reading of the rules ---------------------------------------------------------
def reference(cfg: SuffixConfig, prompt, samples: dict, history: list, rid):
    """The draft by the rules, from full texts: occurrences of the context's last min_match tokens in the prompt
    (with a continuation inside it) and in prompt + response of every sample and history response (the gram ending
    at the prompt's last token or later), the context's own end excluded; the longest match (up to max_match, over
    the full texts), ties by source rank, then position (in the drafter's document coordinates), then the newer
    document; None where more than CANDIDATES occurrences (the drafter keeps the newest, an order this does not
    track)."""
    mn, mx = cfg.min_match, cfg.max_match
    ctx = prompt + samples[rid]
    if len(ctx) < mn:
        return None, 0
    gram = ctx[-mn:]
    tail = min(mx, len(prompt))
    rank = {SELF: 0, HISTORY: 1, SIBLING: 2}
    docs = [(prompt, SELF, 0, lambda p: p + 1, range(mn, len(prompt)))]
    seq = 1
    for h in history:
        docs.append((prompt + h, HISTORY, seq, lambda p: p - len(prompt) + tail + 1, None))
        seq += 1
    for r, resp in samples.items():
        docs.append((prompt + resp, SELF if r == rid else SIBLING, seq, lambda p: p - len(prompt) + tail + 1, None))
        seq += 1
    occ = []
    for text, source, sq, coord, positions in docs:
        for p in positions or range(max(mn, len(prompt)), len(text) + 1):
            if text[p - mn:p] == gram:
                occ.append((text, p, source, sq, coord(p)))
    if len(occ) > CANDIDATES:
        return "skip", len(occ)
    found, nexts = [], []
    for text, p, source, sq, cp in occ:
        if p >= len(text):
            continue
        nexts.append(text[p])
        m = mn
        while m < mx and m < p and m < len(ctx) and text[p - m - 1] == ctx[-m - 1]:
            m += 1
        found.append((m, (rank[source], cp, sq), text, p, source))
    if not found:
        return None, len(occ)
    m = max(f[0] for f in found)
    agree = [f for f in found if f[0] == m]  # equally long: the first token most of them continue with
    votes = {}
    for f in agree:
        votes[f[2][f[3]]] = votes.get(f[2][f[3]], 0) + 1
    _, _, text, p, source = max((f for f in agree if votes[f[2][f[3]]] == max(votes.values())), key=lambda f: f[1])
    chain = text[p:p + cfg.max_depth]
    count = nexts.count(chain[0])
    if count < cfg.min_count:
        return None, len(occ)
    return (tuple(chain), source, m, count), len(occ)


def streams(rng, n, length, vocab, prompt, copy=0.3):
    """n responses in lockstep: random tokens, some copied from the prompt or another response (mostly at the same
    position: spans)."""
    outs = [[] for _ in range(n)]
    for _ in range(length):
        for o in outs:
            if rng.random() < copy:
                src = rng.choice([prompt] + [x for x in outs if x and x is not o])
                o.append(src[rng.randrange(len(src))] if rng.random() < 0.3 else src[min(len(src) - 1, len(o))])
            else:
                o.append(rng.randrange(vocab))
    return outs


@pytest.mark.parametrize("mn,mx,min_count,prompt_len", [(2, 8, 1, 24), (1, 4, 1, 12), (3, 5, 2, 30), (2, 8, 1, 3)])
def test_index_matches_the_brute_force_rules(mn, mx, min_count, prompt_len):
    rng = random.Random(mn * 100 + mx)
    cfg = SuffixConfig(min_match=mn, max_match=mx, max_depth=5, min_count=min_count)
    prompt = [rng.randrange(40) for _ in range(prompt_len)]
    history = [[rng.randrange(40) for _ in range(30)], list(prompt[5:20]) + [1, 2, 3]]
    full = streams(rng, 3, 60, 40, prompt)
    d = RolloutDrafter(cfg)
    samples = {}
    for i in range(3):
        d.add(i, "g", prompt, history)
        samples[i] = []
    checked = 0
    for step in range(40):
        for i in range(3):
            if step == 30 and i == 2:
                d.finish(2)  # a finished sibling's response stays a document
            want, _ = reference(cfg, prompt, samples, history, i) if i in d._samples else ("skip", 0)
            if i in d._samples and want != "skip":
                assert as_tuple(d.draft(i)) == want, (step, i)
                checked += 1
            if i in d._samples:
                k = rng.choice((1, 2))
                new = full[i][len(samples[i]):len(samples[i]) + k]
                d.commit(i, new)
                samples[i] += new
    assert checked > 60


# ---- incremental updates, memory, migration -------------------------------------------------------------------------
def test_incremental_commit_equals_adding_all_at_once():
    rng = random.Random(1)
    prompt = [rng.randrange(20) for _ in range(16)]
    resp = {r: [rng.randrange(20) for _ in range(50)] for r in "abc"}
    one_by_one, at_once, loaded = drafter(), drafter(), drafter()
    for r in "abc":
        one_by_one.add(r, "g", prompt, [[1, 2, 3, 4]])
        at_once.add(r, "g", prompt, [[1, 2, 3, 4]])
        for t in resp[r]:
            one_by_one.commit(r, [t])
        at_once.commit(r, resp[r])
    for r in "abc":  # a sample arriving with its response (load) indexes it the same way
        loaded.load(r, "g", prompt, resp[r], {"docs": [{"id": None, "source": HISTORY, "tokens": [1, 2, 3, 4]}]}
                    if r == "a" else {})
    for x in (at_once, loaded):
        assert [as_tuple(v) for v in x.drafts(list("abc"))] == [as_tuple(v) for v in one_by_one.drafts(list("abc"))]
        for key in ("docs", "index_tokens", "index_entries", "groups"):
            assert x.stats()[key] == one_by_one.stats()[key], key


def test_finish_keeps_sibling_docs_then_drops_the_group():
    d = drafter()
    d.add("a", "g", [1, 2, 3], [[4, 5]])
    d.add("b", "g", [1, 2, 3])
    d.commit("a", [7, 8, 9, 10])
    d.finish("a")
    d.commit("b", [6, 7, 8])
    assert d.draft("b") == Draft([9, 10], SIBLING, 2, 1)  # a's response outlives a while b is live
    d.add("c", "h", [1, 2])
    assert d.stats()["groups"] == 2
    d.finish("b")
    st = d.stats()
    assert st["groups"] == 1 and st["docs"] == 2 and st["live"] == 1  # h: prompt + c
    d.finish("c")
    st = d.stats()
    assert st["docs"] == st["groups"] == st["index_tokens"] == st["index_entries"] == st["live"] == 0
    with pytest.raises(KeyError):
        d.draft("b")


def group_run(seed=0, steps=40):
    rng = random.Random(seed)
    prompt = [rng.randrange(30) for _ in range(20)]
    history = [[rng.randrange(30) for _ in range(25)] for _ in range(2)]
    full = streams(rng, 3, steps * 2 + 40, 30, prompt, copy=0.8)
    d = drafter(min_match=2)  # (bigrams: few enough occurrences each for the round trip's exact check)
    for i in range(3):
        d.add(i, "g", prompt, history)
    done = [0, 0, 0]
    for _ in range(steps):
        for i in range(3):
            k = rng.choice((1, 2))
            d.commit(i, full[i][done[i]:done[i] + k])
            done[i] += k
    return d, prompt, full, done, rng


def test_export_load_round_trip_drafts_the_same():
    src, prompt, full, done, rng = group_run()
    payload = src.export(0)
    assert json.loads(json.dumps(payload)) == payload  # plain lists and ints
    dst = drafter(min_match=2)
    dst.load(0, "g", prompt, full[0][:done[0]], payload)
    assert dst.stats()["docs"] == src.stats()["docs"] and dst.stats()["index_tokens"] == src.stats()["index_tokens"]
    # the same drafts while no gram has more than CANDIDATES occurrences (export's docstring)
    assert max(len(v) for g in src._groups.values() for v in g.index.values()) <= CANDIDATES
    compared = 0
    for _ in range(30):  # the siblings stay where they are (their documents frozen at the source for this check)
        a, b = src.draft(0), dst.draft(0)
        assert as_tuple(a) == as_tuple(b)
        compared += a is not None
        k = rng.choice((1, 2))
        src.commit(0, full[0][done[0]:done[0] + k])
        dst.commit(0, full[0][done[0]:done[0] + k])
        done[0] += k
    assert compared > 10


def test_load_into_a_live_group_does_not_duplicate_docs():
    src, prompt, full, done, _ = group_run(seed=3)
    dst = drafter()
    dst.load(0, "g", prompt, full[0][:done[0]], src.export(0))
    src.finish(0)
    docs = dst.stats()["docs"]  # prompt + 2 history + 3 samples
    assert docs == 6
    dst.load(1, "g", prompt, full[1][:done[1]], src.export(1))  # 1's copy (from 0's payload) becomes its own
    assert dst.stats()["docs"] == docs
    src.commit(2, full[2][done[2]:done[2] + 5])
    dst.load(2, "g", prompt, full[2][:done[2] + 5], src.export(2))
    st = dst.stats()
    assert st["docs"] == docs and st["live"] == 3
    assert st["index_tokens"] == 20 + 2 * (8 + 25) + sum(8 + d for d in done) + 5


def test_load_extends_a_snapshot_with_a_longer_one():
    src, prompt, full, done, _ = group_run(seed=5)
    dst = drafter()
    dst.load(0, "g", prompt, full[0][:done[0]], src.export(0))  # brings 2's response so far
    src.commit(2, [1, 2, 3])
    src.finish(2)  # 2 is done at the source: 1's payload carries its longer response
    dst.load(1, "g", prompt, full[1][:done[1]], src.export(1))
    assert dst.export(0)["docs"][1]["tokens"] == full[2][:done[2]] + [1, 2, 3]


# ---- history store --------------------------------------------------------------------------------------------------
def test_history_store_caps_per_prompt_and_bytes_in_eviction_order():
    h = HistoryStore(SuffixConfig(history_per_prompt=2, history_bytes=4 * 10))
    h.add("p", [1, 2])
    h.add("p", [3, 4])
    h.add("p", [5, 6])
    assert h.get("p") == [[3, 4], [5, 6]]  # the newest two, newest last
    h.add(7, [1, 1, 1])
    h.add("q", [2, 2, 2])                   # 4 + 3 + 3 = 10 tokens: at the cap, nothing evicted
    assert h.stats() == {"prompts": 3, "responses": 4, "tokens": 10, "bytes": 40}
    h.add("p", [9])                         # p: [5, 6], [9]; p is now the most recently added
    h.add("r", [3, 3])                      # 3 + 3 + 3 + 2 = 11 > 10: evict 7 (least recently added)
    assert h.get(7) == [] and h.get("p") == [[5, 6], [9]]
    assert h.stats()["tokens"] == 8
    h.add("s", [4] * 6)                     # evicts q then p
    assert h.get("q") == h.get("p") == [] and h.get("r") == [[3, 3]] and h.stats()["tokens"] == 8
    h.add("t", [0] * 11)                    # alone over the cap: nothing can stay
    assert h.stats() == {"prompts": 0, "responses": 0, "tokens": 0, "bytes": 0}


def test_history_store_state_dict_round_trip():
    cfg = SuffixConfig(history_per_prompt=3)
    h = HistoryStore(cfg)
    for pid, r in [("b", [1]), (2, [2, 3]), ("b", [4]), ("a", [5, 6, 7])]:
        h.add(pid, r)
    state = json.loads(json.dumps(h.state_dict()))
    h2 = HistoryStore(cfg)
    h2.load_state_dict(state)
    assert h2.state_dict() == h.state_dict() and h2.stats() == h.stats()
    assert [p for p, _ in h2.state_dict()["prompts"]] == [2, "b", "a"]  # least recently added first, ids kept
    assert h2.get("b") == [[1], [4]]
    h3 = HistoryStore(SuffixConfig(history_per_prompt=1))  # a smaller store applies its caps to what it loads
    h3.load_state_dict(state)
    assert h3.get("b") == [[4]]
    got = h2.get("b")
    got[0].append(99)  # copies: the store is not changed through them
    assert h2.get("b") == [[1], [4]]


def test_history_per_prompt_zero_keeps_nothing():
    h = HistoryStore(SuffixConfig(history_per_prompt=0))
    h.add("p", [1, 2])
    assert h.get("p") == [] and h.stats()["prompts"] == 0


# ---- config ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"min_match": 0}, "generation.rollout.min_match must be >= 1, got 0"),
    ({"min_match": 4, "max_match": 3}, "generation.rollout.max_match must be >= min_match (4), got 3"),
    ({"max_depth": 0}, "generation.rollout.max_depth must be in 1..16, got 0"),
    ({"max_depth": 17}, "generation.rollout.max_depth must be in 1..16, got 17"),
    ({"min_count": 0}, "generation.rollout.min_count must be >= 1, got 0"),
    ({"history_per_prompt": -1}, "generation.rollout.history_per_prompt must be >= 0, got -1"),
    ({"history_bytes": -1}, "generation.rollout.history_bytes must be >= 0, got -1"),
    ({"max_depth": 2.5}, "generation.rollout.max_depth must be an int, got 2.5"),
    ({"min_count": True}, "generation.rollout.min_count must be an int, got True"),
])
def test_config_errors_name_the_field(kw, msg):
    with pytest.raises(ValueError) as e:
        SuffixConfig(**kw).validate()
    assert str(e.value) == msg
    with pytest.raises(ValueError, match=re.escape(msg.replace("generation.rollout", "x"))):
        SuffixConfig(**kw).validate("x")
    with pytest.raises(ValueError):
        RolloutDrafter(SuffixConfig(**kw))


def test_default_config_is_valid():
    assert SuffixConfig().validate() == SuffixConfig()
