"""Split-KV decoding (flash-decoding): a Triton kernel over a contiguous or paged KV cache, its
host launcher (the combine of the splits is in combine.py).

The grid is (num_splits, B · Hkv, query tiles). A program packs the query rows of all
``GROUP = H / Hkv`` heads that share its KV head, for all Tq queries, into one M tile (row
``r = t · GROUP + g`` is query t of head ``hkv · GROUP + g``), so each K/V tile is read once for
the whole group instead of once per head: at Tq = 1 that is what makes decoding with GQA
memory-bound on the cache alone. The program walks its share of the sequence's visible keys with
the online softmax in exp2 (as the flash forward does) and writes a partial output and its lse;
with one split these are the final results, with more, combine.py merges them by lse.

Sequence b sees keys ``[leftpad[b], seqlens[b])`` of its cache, ``seqlens`` counting the keys
after the append; query t sits on the diagonal ``t + seqlens[b] - Tq`` (bottom-right), which
causal, the window and ALiBi are relative to. Key tiles are aligned to multiples of BLOCK_N in
the sequence, so a paged cache gathers each key row's page from the block table (any page size:
one page per tile when BLOCK_N <= page, several when it is smaller).
"""
import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import cdiv, empty, sm_count
from ..launch import address, launch_site
from ..flash.config import padded_head_dim
from ..flash.fwd import _scores, device_guard, dot_precision, score_args
from .combine import combine_splits, gdc_launch_dependents, use_pdl
from .config import (FULL_GRID_MIN_KEYS, LONG_SPLIT_MIN_KEYS, PAGED_PREFETCH_MIN_KEYS, DecodeConfig,
                     get_decode_config, get_num_splits, resident_per_sm)


@triton.jit
def _splitkv_kernel(Q, K, V, O, LSE, SEQLENS, LEFTPAD, BATCH_IDX, BLOCK_TABLE,
                    stride_qb, stride_qt, stride_qh,
                    stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh,
                    stride_os, stride_ob, stride_ot, stride_oh,
                    stride_ls, stride_lb, stride_lt, stride_lh,
                    stride_bt, T_q, H_kv, GROUP, diag_lo, diag_hi, qk_scale, softcap2, ALIBI, stride_ab,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, PREFETCH_PAGES: tl.constexpr,
                    IS_PAGED: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:
        # The combine (a programmatic dependent launch) may start once every program has begun:
        # it waits for this kernel's writes itself (combine.py).
        gdc_launch_dependents()
    i_s, i_bh, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_splits = tl.num_programs(0)
    i_b, i_hkv = (i_bh // H_kv).to(tl.int64), (i_bh % H_kv).to(tl.int64)

    # Packed rows: r = t * GROUP + g is query t of head i_hkv * GROUP + g.
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_t = o_r // GROUP
    o_h = i_hkv * GROUP + o_r % GROUP
    m_r = o_r < GROUP * T_q
    o_d = tl.arange(0, HEAD_DIM)
    # HEAD_DIM pads D to a power of two; the tail columns load as 0 and are never stored.
    m_d = o_d < D

    seqlen = tl.load(SEQLENS + i_b)
    if HAS_LEFTPAD:
        leftpad = tl.load(LEFTPAD + i_b)
    else:
        leftpad = 0
    # Query t's diagonal: key t + seqlen - T_q (bottom-right in the sequence's keys).
    o_diag = o_t + seqlen - T_q
    # Keys [n_lo, n_hi) are visible to some row of the tile: the first row has the lowest
    # bounds, the last real row the highest.
    t_first = (i_m * BLOCK_M) // GROUP
    t_last = (tl.minimum(i_m * BLOCK_M + BLOCK_M, GROUP * T_q) - 1) // GROUP
    n_lo = leftpad
    n_hi = seqlen
    if HAS_LEFT:
        n_lo = tl.maximum(n_lo, t_first + seqlen - T_q + diag_lo)
    if HAS_RIGHT:
        n_hi = tl.minimum(n_hi, t_last + seqlen - T_q + diag_hi + 1)
    # Blocks of BLOCK_N keys aligned in the sequence, dealt out to the splits in equal runs.
    n_start = n_lo // BLOCK_N * BLOCK_N
    n_blocks = tl.where(n_hi > n_lo, tl.cdiv(n_hi - n_start, BLOCK_N), 0)
    per_split = tl.cdiv(n_blocks, num_splits)
    start_n = n_start + i_s * per_split * BLOCK_N
    end_n = tl.minimum(start_n + per_split * BLOCK_N, n_hi)

    if HAS_ALIBI:
        # One slope per row: the rows of a tile belong to GROUP different heads.
        b_slope2 = (tl.load(ALIBI + i_b * stride_ab + o_h, mask=m_r, other=0.0) * 1.4426950408889634)[:, None]
    else:
        b_slope2 = 0.0

    p_q = Q + i_b * stride_qb + o_t.to(tl.int64)[:, None] * stride_qt + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if IS_PAGED:
        k_base = K + i_hkv * stride_kh
        v_base = V + i_hkv * stride_vh
        p_table = BLOCK_TABLE + i_b * stride_bt
    else:
        if HAS_BATCH_IDX:
            i_row = tl.load(BATCH_IDX + i_b).to(tl.int64)
        else:
            i_row = i_b
        k_base = K + i_row * stride_kb + i_hkv * stride_kh
        v_base = V + i_row * stride_vb + i_hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    o_n0 = tl.arange(0, BLOCK_N)
    if IS_PAGED and PREFETCH_PAGES:
        # The K and V loads wait on their pages' numbers: fetched one tile ahead, the table's
        # latency overlaps the previous tile's work instead of adding to every tile's.
        b_next = tl.load(p_table + (start_n + o_n0) // PAGE_SIZE, mask=start_n + o_n0 < end_n, other=0)
    for start in range(start_n, end_n, BLOCK_N):
        o_n = start + o_n0
        m_n = o_n < end_n
        if IS_PAGED:
            # Page of each key row, then its row inside the page (int64: pages can be many).
            if PREFETCH_PAGES:
                b_page = b_next.to(tl.int64)
                b_next = tl.load(p_table + (o_n + BLOCK_N) // PAGE_SIZE, mask=o_n + BLOCK_N < end_n, other=0)
            else:
                b_page = tl.load(p_table + o_n // PAGE_SIZE, mask=m_n, other=0).to(tl.int64)
            o_kv = b_page * stride_kb + (o_n % PAGE_SIZE) * stride_kt
            o_vv = b_page * stride_vb + (o_n % PAGE_SIZE) * stride_vt
        else:
            o_kv = o_n.to(tl.int64) * stride_kt
            o_vv = o_n.to(tl.int64) * stride_vt
        m_kv = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k_base + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_s, _ = _scores(b_qk, o_diag[:, None], o_n[None, :], qk_scale, softcap2, b_slope2,
                         HAS_SOFTCAP, HAS_ALIBI)
        # Decoding streams few blocks per program and is bound by memory, so every block is
        # masked rather than split into masked and unmasked loops as in the flash forward.
        m_s = (m_n & (o_n >= leftpad))[None, :]
        if HAS_RIGHT:
            m_s = m_s & (o_n[None, :] <= o_diag[:, None] + diag_hi)
        if HAS_LEFT:
            m_s = m_s & (o_n[None, :] >= o_diag[:, None] + diag_lo)
        b_s = tl.where(m_s, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # A row that has seen no visible key keeps m = -inf; shifting by 0 instead makes its
        # alpha and p exactly 0 rather than exp2(-inf - (-inf)) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        b_p = tl.exp2(b_s - m_shift[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_vv[:, None] + o_d[None, :], mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        m_i = m_new

    # Rows (or splits) that saw no key have l_i = 0 and acc = 0: output 0 and lse -inf.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_t64 = o_t.to(tl.int64)
    p_o = (O + i_s * stride_os + i_b * stride_ob + o_t64[:, None] * stride_ot + o_h[:, None] * stride_oh
           + o_d[None, :])
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    p_lse = LSE + i_s * stride_ls + i_b * stride_lb + o_t64 * stride_lt + o_h * stride_lh
    tl.store(p_lse, lse, mask=m_r)


def kvcache_fwd_triton(q, k_cache, v_cache, seqlens, softmax_scale: float, causal: bool, *,
                       leftpad=None, batch_idx=None, block_table=None, window=(-1, -1),
                       softcap: float = 0.0, alibi_slopes=None, num_splits: int = 0,
                       max_seqlen_k: int | None = None, config: DecodeConfig | None = None):
    """Attention of q over a KV cache, split over the keys; inputs already validated.

    Args:
        q: ``[B, Tq, H, D]``, last dim contiguous.
        k_cache, v_cache: ``[B_cache, Tcache, Hkv, D]``, or ``[num_blocks, page_size, Hkv, D]``
            with ``block_table`` int32 ``[B, max_blocks]`` (sequence b's key j lives in page
            ``block_table[b, j // page_size]``, row ``j % page_size``).
        seqlens: int32 ``[B]``: keys of each sequence (after any append).
        leftpad: None or int32 ``[B]``: keys before ``leftpad[b]`` are hidden.
        batch_idx: None or int32 ``[B]``: sequence b is row ``batch_idx[b]`` of a contiguous cache.
        causal, window, softcap, alibi_slopes: as in :func:`ioattn.flash.fwd.flash_fwd_triton`,
            with each sequence's diagonal at ``t + seqlens[b] - Tq``.
        num_splits: splits of the key range; 0 picks one with :func:`get_num_splits`.
        max_seqlen_k: the longest sequence if known (sizes the heuristic), else the capacity.

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype, lse fp32 ``[B, H, Tq]``.
    """
    B, T_q, H, D = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    paged = block_table is not None
    default_config = config is None
    if default_config:
        # The variants for the grid (below) keep BLOCK_M, so the split count can be chosen first.
        config = get_decode_config(group * T_q, D, q.dtype, interpret=_env.interpret())
    m_tiles = cdiv(group * T_q, config.BLOCK_M)
    if max_seqlen_k is None:
        max_seqlen_k = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    sms = sm_count(q.device.index or 0) if q.is_cuda else 4
    if num_splits == 0:
        num_splits = get_num_splits(B * H_kv * m_tiles, max_seqlen_k, config.BLOCK_N, sms,
                                    resident_per_sm(config, D, q.dtype) if q.is_cuda else 0,
                                    split_full_grid=not paged and T_q == 1)
    num_splits = max(1, min(num_splits, cdiv(max(max_seqlen_k, 1), config.BLOCK_N)))
    paged_split = paged and num_splits > 1 and max_seqlen_k >= PAGED_PREFETCH_MIN_KEYS
    full_grid = not paged and (
        (num_splits == 1 and B * H_kv * m_tiles >= sms and max_seqlen_k >= FULL_GRID_MIN_KEYS)
        or (num_splits > 1 and cdiv(max_seqlen_k, num_splits) >= LONG_SPLIT_MIN_KEYS))
    if default_config and (paged_split or full_grid):
        config = get_decode_config(group * T_q, D, q.dtype, interpret=_env.interpret(),
                                   paged_split=paged_split, full_grid=full_grid)

    if num_splits == 1:
        # One split: the program's results are final; write them in place.
        out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
        lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)
        out_parts, lse_parts = out, lse
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, lse.stride(0), lse.stride(2), lse.stride(1))
    else:
        # The partials in one allocation (each allocation is host time on a decoding step);
        # combine_splits allocates the final out and lse. The lse part starts on a 16-byte
        # boundary, as its own allocation would.
        rows = num_splits * B * T_q * H
        lse_at = cdiv(rows * D, 4) * 4
        parts = empty((lse_at + rows,), dtype=torch.float32, device=q.device)
        out_parts = parts[:rows * D].view(num_splits, B, T_q, H, D)
        lse_parts = parts[lse_at:].view(num_splits, B, T_q, H)
        o_strides = out_parts.stride()[:4]
        l_strides = lse_parts.stride()
    band = _band(causal, window)
    mods = score_args(softmax_scale, softcap, alibi_slopes, H, 0)
    mods.pop("diag_offset")
    grid = (num_splits, B * H_kv, m_tiles)
    pdl = num_splits > 1 and use_pdl(q)
    # Everything the launch's arguments depend on (launch_site): the partials' strides follow
    # from q's shape and num_splits, the band and score arguments from the scalars named here.
    alibi = mods["ALIBI"]
    key = ("splitkv", q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out_parts.data_ptr(),
           lse_parts.data_ptr(), seqlens.data_ptr(), address(leftpad), address(batch_idx), address(block_table),
           None if alibi is None else (alibi.data_ptr(), alibi.dim()), q.shape, q.stride(), k_cache.shape,
           k_cache.stride(), v_cache.stride(), None if block_table is None else block_table.stride(0),
           q.dtype, k_cache.dtype, v_cache.dtype, num_splits, causal, window, softmax_scale, softcap, config, pdl)
    with device_guard(q):
        launch_site(key, lambda: (
            _splitkv_kernel, grid,
            (q, k_cache, v_cache, out_parts, lse_parts, seqlens, leftpad, batch_idx, block_table,
             q.stride(0), q.stride(1), q.stride(2),
             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
             *o_strides, *l_strides, block_table.stride(0) if paged else 0,
             T_q, H_kv, group),
            dict(**band, **mods,
                 D=D, HEAD_DIM=padded_head_dim(D), PAGE_SIZE=k_cache.shape[1] if paged else 1,
                 PREFETCH_PAGES=paged and config.prefetch_pages,
                 IS_PAGED=paged, HAS_LEFTPAD=leftpad is not None, HAS_BATCH_IDX=batch_idx is not None,
                 BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, DOT_PRECISION=dot_precision(q.dtype),
                 LAUNCH_DEPENDENTS=pdl, num_warps=config.num_warps, num_stages=config.num_stages)))
    if num_splits == 1:
        return out, lse
    return combine_splits(out_parts, lse_parts, q.dtype, pdl=pdl)


def _band(causal: bool, window) -> dict:
    """Visible diagonals ``diag_lo <= j - diag(t) <= diag_hi`` (causal forces right = 0)."""
    left, right = window
    if causal:
        right = 0
    # Wider than any cache is unbounded in effect; the clamp keeps the kernel's sums in int32.
    left, right = min(left, 2**30), min(right, 2**30)
    return dict(diag_lo=-left if left >= 0 else 0, diag_hi=right if right >= 0 else 0,
                HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)
