"""Attention over a KV cache in place (Triton), for decoding on GPU.

Row b of the batch sees cache columns [0, prefix[b]) from every query, plus a tail [prefix[b], prefix[b] + Tt)
masked per query by `tail` (a draft tree's ancestor mask, or a causal block when prefilling). The kernel reads one
layer's cache through its strides (no gather, no concatenation, no [B, T, S] mask) and only up to each row's own
end, so a short row in a long cache costs little.

Flash-decoding layout: the G = Hq // Hkv query heads of one KV head are packed into the rows of one tile, so each
K/V block is loaded once per KV head, not G times; and each row's key range is split into `splits` chunks whose
partial softmax states a second small kernel combines, so that B = 1 with 8 KV heads still fills 132 SMs. Host code
is sync-free and sizes grids from static shapes only (CUDA-graph capturable)."""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from drafting.model.mask import visible

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
MAX_BLOCK_M = 128  # query rows (G * T packed) per program; more rows are tiled over the grid's first axis


def _fix_interpreter_scalar_index() -> None:
    """Make `range(lo, hi, step)` over runtime scalars work under TRITON_INTERPRET=1.

    Triton 3.6's interpreter holds scalars as 1-element 1-d numpy arrays and converts them with int(array), which
    numpy >= 2.4 rejects, so any loop with data-dependent bounds fails there (triton-lang/triton#9171). Only the
    interpreter's conversion is patched; compiled kernels are untouched."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "scalar_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.scalar_index_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
    _fix_interpreter_scalar_index()


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, hi, pre, n_tail, tail_base,
                  stride_tt, stride_tu, t, row_ok, qk_scale, table_base, stride_kpage, stride_vpage,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_TAIL: tl.constexpr,
                  PREC: tl.constexpr, PAGE: tl.constexpr):
    """One key block [start, start + BLOCK_N) folded into the online softmax (log2 domain).

    Unmasked blocks lie wholly inside the shared prefix: plain loads, no mask. Masked blocks (the one straddling
    prefix[b], the tail, the row's end) mask loads past `hi` and scores by prefix / tail bits. PAGE > 0: the
    cache is a pool of pages of PAGE positions, column c of this row in page table[c // PAGE] at c % PAGE."""
    cols = start + tl.arange(0, BLOCK_N)  # [BN]
    d = tl.arange(0, D)
    inside = cols < hi  # never read past the row's end (or this split's chunk)
    if PAGE > 0:
        if MASKED:
            page = tl.load(table_base + cols // PAGE, mask=inside, other=0).to(tl.int64)  # [BN]
        else:
            page = tl.load(table_base + cols // PAGE).to(tl.int64)
        at = cols % PAGE
        k_ptrs = k_base + page[:, None] * stride_kpage + at[:, None] * stride_kn + d[None, :]  # [BN, D]
        v_ptrs = v_base + page[:, None] * stride_vpage + at[:, None] * stride_vn + d[None, :]
    else:
        k_ptrs = k_base + cols[:, None] * stride_kn + d[None, :]  # [BN, D]
        v_ptrs = v_base + cols[:, None] * stride_vn + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=inside[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=inside[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BM, BN]
    if MASKED:
        vis = tl.broadcast_to(((cols < pre) & inside)[None, :], s.shape)  # [BM, BN]
        if HAS_TAIL:
            u = cols - pre  # tail column index
            in_tail = (u >= 0) & (u < n_tail) & inside
            bits = tl.load(tail_base + t[:, None] * stride_tt + u[None, :] * stride_tu,
                           mask=row_ok[:, None] & in_tail[None, :], other=0)
            vis = vis | (bits != 0)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: keep exp2 finite
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)  # [BM, D]
    return acc, m_new, l_i


@triton.jit
def _tree_attention_fwd(q_ptr, k_ptr, v_ptr, prefix_ptr, tail_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                        table_ptr, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_tb, stride_tt, stride_tu,
                        stride_pb, stride_kpage, stride_vpage,
                        Hq, Hkv, G, T, n_tail, chunk, n_rows, kv_len, qk_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TAIL: tl.constexpr,
                        DIRECT: tl.constexpr, PREC: tl.constexpr, PAGE: tl.constexpr):
    """Grid (M tiles, B * Hkv, splits). Packed query row r = g * T + t is query head hk * G + g at position t.

    DIRECT (splits == 1): normalise and write the output. Otherwise write the unnormalised partial state
    (max m, sum l in log2 units, acc) of this split's chunk [sid * chunk, (sid + 1) * chunk) for the combine."""
    pid_m, pid_bh, sid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = r < G * T
    g, t = r // T, r % T
    h = hk * G + g  # query head
    d = tl.arange(0, D)
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    q = tl.load(q_base + h[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :], mask=row_ok[:, None],
                other=0.0)  # [BM, D]

    pre = tl.load(prefix_ptr + b).to(tl.int32)
    lo = sid * chunk
    hi = tl.minimum(tl.minimum(lo + chunk, pre + n_tail), kv_len)  # this split's keys of row b: [lo, hi)
    mid = lo + (tl.maximum(tl.minimum(pre, hi) - lo, 0) // BLOCK_N) * BLOCK_N  # blocks before mid: all prefix
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    tail_base = tail_ptr + b.to(tl.int64) * stride_tb
    table_base = table_ptr + b.to(tl.int64) * stride_pb  # this row's page table (PAGE > 0)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, hi, pre,
                                      n_tail, tail_base, stride_tt, stride_tu, t, row_ok, qk_scale, table_base,
                                      stride_kpage, stride_vpage, D, BLOCK_N, False, HAS_TAIL, PREC, PAGE)
    for start in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, hi, pre,
                                      n_tail, tail_base, stride_tt, stride_tu, t, row_ok, qk_scale, table_base,
                                      stride_kpage, stride_vpage, D, BLOCK_N, True, HAS_TAIL, PREC, PAGE)

    row = (b * Hq + h).to(tl.int64) * T + t  # [BM] flat index of (b, h, t) in the [B, Hq, T] output
    if DIRECT:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot  # [BM]
        tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = sid.to(tl.int64) * n_rows + row  # [BM] index into [splits, B * Hq * T]
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        # an empty split writes only (m = -inf, l = 0); the combine never reads its acc
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & (hi > lo))


@triton.jit
def _combine_splits(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, n_rows, splits, Hq, T, stride_ob, stride_oh,
                    stride_ot, D: tl.constexpr,
                    SPLITS: tl.constexpr):
    """Grid (B * Hq * T,): merge one query row's split partials, rescaled to their common max."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)  # [S], SPLITS = next power of two >= splits
    d = tl.arange(0, D)
    part = s.to(tl.int64) * n_rows + row  # [S]
    m = tl.load(part_m_ptr + part, mask=s < splits, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s < splits, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits
    has = m > float("-inf")
    acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=has[:, None], other=0.0)  # [S, D]
    den = tl.sum(w * l, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)  # [D]
    b, h, t = row // (Hq * T), (row // T) % Hq, row % T
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t * stride_ot + d, o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 / H200; only shapes the split count when not on a GPU (interpreter)


def _blocks(G: int, T: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from static shapes only.

    BLOCK_M >= 16 for tl.dot; decoding (G * T = 4) wastes MMA rows but is bound by K/V bytes, not FLOPs. Three
    stages keep K/V loads in flight (~70 KB of shared memory at D = 128, bf16, BLOCK_N = 64: two programs fit an
    SM); two for the verify / prefill tiles at D = 128, whose Q tile would otherwise leave room for only one."""
    block_m = min(max(16, triton.next_power_of_2(G * T)), MAX_BLOCK_M)
    block_n = 64 if D >= 64 else 32
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 2 if block_m >= 64 and D >= 128 else 3
    return block_m, block_n, num_warps, num_stages


def auto_splits(programs: int, kv_len: int, block_n: int, device: torch.device) -> int:
    """Split-K factor: about two programs per SM, each split at least two key blocks of kv_len long, and no
    split that kv_len could never reach."""
    want = triton.cdiv(2 * _sm_count(device), programs)
    splits = max(1, min(want, kv_len // (2 * block_n)))
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    return triton.cdiv(kv_len, chunk)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix: torch.Tensor,
                   tail: torch.Tensor | None, kv_len: int, scale: float | None = None,
                   splits: int | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over rows 0..B-1 of one layer's cache k_cache, v_cache [slots, Hkv, P, D], or,
    with `table` [B, pages] (row b's page ids), over one layer's page pool k_cache, v_cache [pages, PAGE, Hkv, D]
    read through the table in place.

    Row b's query t sees columns [0, prefix[b]) and column prefix[b] + u iff tail[b, t, u] (tail [B, T, Tt] bool
    or uint8, None = Tt 0; prefix [B] int32 / int64 on q's device). kv_len (static) sizes the split-K chunks and
    caps the columns read; each row reads only its own min(prefix[b] + Tt, kv_len) columns. Returns [B, Hq, T, D] in q's dtype (fp32 accumulation)."""
    B, Hq, T, D = q.shape
    page = 0
    if table is not None:  # the pool as [pages, PAGE, Hkv, D]: as the rows' caches of P = pages x PAGE columns
        page, Hkv = k_cache.shape[1], k_cache.shape[2]
        slots, P = table.shape[0], table.shape[1] * page
        k_rows, v_rows = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # strides for head and column
    else:
        slots, Hkv, P = k_cache.shape[:3]
        k_rows, v_rows = k_cache, v_cache
    n_tail = 0 if tail is None else tail.shape[2]
    if D not in HEAD_DIMS or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"head_dim {D} with cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} is not "
                         f"supported (head_dim one of {HEAD_DIMS}, same K and V shapes)")
    if Hq % Hkv or slots < B or not 0 < kv_len <= P or n_tail > kv_len:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, kv_len {kv_len}, "
                         f"tail width {n_tail}")
    if q.stride(3) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    if tail is not None and tuple(tail.shape[:2]) != (B, T):
        raise ValueError(f"tail {tuple(tail.shape)} does not match q's [B, T] = {[B, T]}")
    G = Hq // Hkv
    block_m, block_n, num_warps, num_stages = _blocks(G, T, D)
    m_tiles = triton.cdiv(G * T, block_m)
    if splits is None:
        splits = auto_splits(m_tiles * B * Hkv, kv_len, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n  # whole key blocks per split
    qk_scale = (1.0 / math.sqrt(D) if scale is None else scale) * LOG2E
    has_tail = n_tail > 0
    tail_t = tail.view(torch.uint8) if has_tail and tail.dtype == torch.bool else (tail if has_tail else prefix)
    tail_strides = tail_t.stride() if has_tail else (0, 0, 0)
    n_rows = B * Hq * T
    # [B, Hq, T, D] viewed from a [B, T, Hq, D] buffer: the caller's transpose back to tokens-major is free
    out = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    direct = splits == 1
    if direct:
        part_m = part_l = part_acc = out  # unused
    else:
        part_m = torch.empty(splits, n_rows, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(splits, n_rows, D, device=q.device, dtype=torch.float32)
    _tree_attention_fwd[(m_tiles, B * Hkv, splits)](
        q, k_cache, v_cache, prefix, tail_t, out, part_m, part_l, part_acc, prefix if table is None else table,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        0 if page else k_rows.stride(0), k_rows.stride(1), k_rows.stride(2),
        0 if page else v_rows.stride(0), v_rows.stride(1), v_rows.stride(2), *tail_strides,
        table.stride(0) if page else 0, k_cache.stride(0) if page else 0, v_cache.stride(0) if page else 0,
        Hq, Hkv, G, T, n_tail, chunk, n_rows, kv_len, qk_scale,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, HAS_TAIL=has_tail,
        DIRECT=direct, PREC="ieee" if q.dtype == torch.float32 else "tf32", PAGE=page,
        num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _combine_splits[(n_rows,)](part_m, part_l, part_acc, out, n_rows, splits, Hq, T, out.stride(0),
                                   out.stride(1), out.stride(2), D=D,
                                   SPLITS=triton.next_power_of_2(splits), num_warps=4 if D >= 64 else 2)
    return out


def tree_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix: torch.Tensor,
                             tail: torch.Tensor | None, kv_len: int, scale: float | None = None) -> torch.Tensor:
    """The same attention in torch (fp32 math, dense [B, T, kv_len] mask), for tests."""
    B, Hq, T, _ = q.shape
    mask = visible(prefix.long(), tail, T, kv_len)
    k, v = k_cache[:B, :, :kv_len].float(), v_cache[:B, :, :kv_len].float()
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=Hq != k.shape[1])
    return out.to(q.dtype)
