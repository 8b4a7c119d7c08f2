"""The Triton tree-attention kernel against a dense-mask SDPA reference.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported), so shapes are tiny.
With TRITON_INTERPRET=0 and a GPU, the same cases run compiled on the GPU, plus the real model shapes in bf16."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from drafting.model.attention import visible as visibility_mask  # noqa: E402
from drafting.model.triton_attention import auto_splits, tree_attention, tree_attention_reference  # noqa: E402

ON_GPU = os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")


def ancestor_tail(B: int, T: int, Tt: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T, Tt] random draft trees over Tt nodes (parent[i] < i), the queries being the last T nodes: each
    sees its ancestors and itself."""
    tails = []
    for _ in range(B):
        anc = torch.eye(Tt, dtype=torch.bool)
        for i in range(1, Tt):
            anc[i] |= anc[int(torch.randint(0, i, (1,), generator=gen))]
        tails.append(anc[Tt - T:])
    return torch.stack(tails)


def make_case(B, Hq, Hkv, T, D, P, kv_len, prefix, tail, seed, dtype=torch.float32, q_strided=False,
              v_strided=False):
    """Inputs in one layer of [L, slots, Hkv, P, D] caches (slots > B); the clean cache for the reference and a
    copy with NaN wherever the kernel must not read: columns past each row's prefix + Tt, and rows >= B."""
    gen = torch.Generator().manual_seed(seed)
    L, slots = 2, B + 2
    q = torch.randn(B, T, Hq, D, generator=gen).transpose(1, 2) if q_strided else torch.randn(B, Hq, T, D,
                                                                                             generator=gen)
    k_all = torch.randn(L, slots, Hkv, P, D, generator=gen)
    v_all = (torch.randn(L, slots, P, Hkv, D, generator=gen).transpose(2, 3) if v_strided
             else torch.randn(L, slots, Hkv, P, D, generator=gen))
    prefix = torch.as_tensor(prefix)
    n_tail = 0 if tail is None else tail.shape[2]
    k_bad, v_bad = k_all.clone(), v_all.clone()
    for b in range(slots):
        end = int(prefix[b]) + n_tail if b < B else 0
        k_bad[:, b, :, end:] = float("nan")
        v_bad[:, b, :, end:] = float("nan")
    to = lambda x: x.to(DEV, dtype) if x.is_floating_point() else x.to(DEV)  # noqa: E731
    tail = None if tail is None else tail.to(DEV)
    return (to(q), to(k_all[1]), to(v_all[1]), to(k_bad[1]), to(v_bad[1]), to(prefix), tail)


def check(B, Hq, Hkv, T, D, P, kv_len, prefix, tail, splits_list, seed, scale=None, **kw):
    q, k, v, k_bad, v_bad, prefix, tail = make_case(B, Hq, Hkv, T, D, P, kv_len, prefix, tail, seed, **kw)
    ref = tree_attention_reference(q, k, v, prefix, tail, kv_len, scale=scale)
    for splits in splits_list:
        out = tree_attention(q, k_bad, v_bad, prefix, tail, kv_len, scale=scale, splits=splits)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"splits={splits}: {m}")


def test_visibility_mask_matches_definition():
    gen = torch.Generator().manual_seed(0)
    prefix, kv_len = torch.tensor([0, 3, 6]), 10
    tail = torch.rand(3, 2, 4, generator=gen) < 0.5
    mask = visibility_mask(prefix, tail, 2, kv_len)
    for b in range(3):
        for t in range(2):
            for c in range(kv_len):
                u = c - int(prefix[b])
                assert bool(mask[b, t, c]) == (u < 0 or (u < 4 and bool(tail[b, t, u])))
    assert not visibility_mask(prefix, None, 2, kv_len)[:, :, 6:].any()


def test_decoding_gqa4_ragged_prefixes():
    """T = 1, no tail, G = 4, D = 64: a 1-column row, a middle one and one at kv_len; split 3 is empty."""
    check(3, 8, 2, 1, 64, 96, 96, [1, 50, 96], None, [None, 1, 3], seed=1, q_strided=True, v_strided=True)


def test_decoding_empty_tail_b1_g1():
    """T = 1 with a [B, 1, 0] tail, G = 1, B = 1, int32 prefix, kv_len < P, explicit scale."""
    tail = torch.zeros(1, 1, 0, dtype=torch.bool)
    check(1, 2, 2, 1, 16, 96, 70, torch.tensor([70], dtype=torch.int32), tail, [1, 2], seed=2, scale=0.3)


@pytest.mark.parametrize("T,Tt", [(6, 6), (4, 7)])
def test_tree_tail_ragged(T, Tt):
    """Draft-tree tails (G = 2, D = 16) on prefixes 0, middle and up to kv_len; splits 8 leaves 5 empty."""
    gen = torch.Generator().manual_seed(T)
    kv_len = 80
    tail = ancestor_tail(3, T, Tt, gen)
    check(3, 4, 2, T, 16, 96, kv_len, [0, 37, kv_len - Tt], tail, [1, 2, 3, 8], seed=3 + T, q_strided=True)


def test_causal_prefill():
    """Causal tail (prefill chunk, G = 1): one row from prefix 0, one continuing after a prefix of 20."""
    T = 40
    tail = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
    check(2, 2, 2, T, 16, 64, 64, [0, 20], tail, [1, 2], seed=5, v_strided=True)


def test_query_rows_tiled():
    """G * T = 4 * 36 = 144 packed rows: two M tiles, the second mostly padding."""
    T = 36
    tail = torch.ones(T, T, dtype=torch.bool).tril().expand(1, T, T)
    check(1, 4, 1, T, 16, 64, 64, [20], tail, [1, 3], seed=6)


@pytest.mark.parametrize("page", [16, 32])
def test_paged_pool_read_through_the_page_table(page):
    """The same rows scattered over a pool of pages in shuffled order (the paged K/V cache): read through the table
    in place, the result is the dense reference's; pages no row names hold NaN, so a wrong read shows."""
    gen = torch.Generator().manual_seed(7 + page)
    B, Hq, Hkv, T, D, P, kv_len = 3, 4, 2, 4, 16, 96, 96
    tail = ancestor_tail(B, T, 6, gen)
    q, k, v, _, _, prefix, tail = make_case(B, Hq, Hkv, T, D, P, kv_len, [5, 40, 90], tail, seed=page)
    ref = tree_attention_reference(q, k, v, prefix, tail, kv_len)
    per_row = P // page
    pages = B * per_row + 5  # spare pages: never named by a row
    order = torch.randperm(pages, generator=gen)[:B * per_row].view(B, per_row)
    k_pool = torch.full((pages, page, Hkv, D), float("nan"), device=DEV)
    v_pool = torch.full_like(k_pool, float("nan"))
    for b in range(B):
        for j in range(per_row):
            k_pool[order[b, j]] = k[b, :, j * page:(j + 1) * page].transpose(0, 1)
            v_pool[order[b, j]] = v[b, :, j * page:(j + 1) * page].transpose(0, 1)
    for splits in (1, 3):
        out = tree_attention(q, k_pool, v_pool, prefix, tail, kv_len, splits=splits, table=order.to(DEV))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"splits={splits}: {m}")


def test_auto_splits_from_static_shapes():
    cpu = torch.device("cpu")  # 132 SMs assumed off-GPU
    assert auto_splits(8, 4096, 64, cpu) == 32  # B = 1, 8 KV heads: chunks of 2 blocks
    assert auto_splits(8, 256, 64, cpu) == 2  # short cache: capped by 2 blocks a chunk
    assert auto_splits(64 * 8, 4096, 64, cpu) == 1  # B = 64 fills the GPU without splitting
    assert auto_splits(8, 100, 64, cpu) == 1


@pytest.mark.skipif(not ON_GPU, reason="compiled kernel: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,T", [(1, 1), (8, 1), (2, 16), (1, 64)])
def test_model_shapes_bf16_gpu(B, T, D):
    """Llama-3 8B (D 128) and 1B (D 64) shapes, 32 / 8 heads, bf16, auto splits, long ragged rows."""
    gen = torch.Generator().manual_seed(B * 100 + T)
    P = kv_len = 2048
    tail = ancestor_tail(B, T, T, gen) if T > 1 else None
    prefix = [kv_len - T - 7 * b for b in range(B)]
    q, k, v, k_bad, v_bad, prefix, tail = make_case(B, 32, 8, T, D, P, kv_len, prefix, tail, seed=B + T,
                                                    dtype=torch.bfloat16)
    ref = tree_attention_reference(q, k, v, prefix, tail, kv_len)
    out = tree_attention(q, k_bad, v_bad, prefix, tail, kv_len)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=5e-3)
