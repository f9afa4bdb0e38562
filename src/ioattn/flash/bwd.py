"""FlashAttention-2 backward: portable Triton kernels and their host launcher.

Deterministic and without atomics, in three launches:

1. ``delta = rowsum(dO ∘ O)`` (bwd_preprocess.py);
2. the dK/dV kernel: a program holds BLOCK_N1 keys of one KV head and visits, for each of the
   GROUP query heads sharing it, the query blocks that can see those keys;
3. the dQ kernel: a program holds BLOCK_M2 query rows and visits the key blocks they see.

Both recompute ``P = exp2(q·kᵀ · softmax_scale · log2(e) − lse · log2(e))`` from the forward's
saved lse, then ``dV += Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ∘ (dP − delta)``, ``dK += dSᵀ Q``,
``dQ += dS K``; dK and dQ take the softmax_scale factor once, at the end.

With dropout (``HAS_DROPOUT``) both regenerate the forward's keep mask Z from the same counters
(dropout.py), so ``dV += (P ∘ Z / (1 − p))ᵀ dO`` and ``dP = (dO Vᵀ) ∘ Z / (1 − p)``; delta is
still ``rowsum(dO ∘ O)``, since that equals ``rowsum(P ∘ dP)`` with the dropped output O.

The features are the forward's (fwd.py): the same band of diagonals limits the blocks each program
visits, the same ``_scores`` (and ``_attn_mask``) recompute the scores. Softcap's chain rule multiplies dS by
``1 − tanh²`` of the capped score; ALiBi's bias is a constant (no gradient to the slopes).
"""
import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import cdiv, empty
from ..launch import launch
from .bwd_preprocess import bwd_preprocess
from .config import BwdConfig, get_bwd_config, padded_head_dim
from .dropout import _dropout_keep, dropout_args
from .fwd import (_attn_mask, _key_range, _varlen_seq, _scores, device_guard, diag_band, dot_precision, mask_args,
                  score_args)


@triton.jit
def _load_lse2(p_lse, m_m):
    """Load lse in the log2 domain. A row with lse -inf sees no key; +inf in its place makes
    exp2(s - lse) exactly 0 for it (and for padded rows), where -inf would give inf or NaN."""
    b_lse = tl.load(p_lse, mask=m_m, other=float("inf"))  # [BLOCK_M]
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    return b_lse * 1.4426950408889634


@triton.jit
def _query_range(start_n, T_q, T_k, diag_lo, diag_hi, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows ``[m_lo, m_end)`` that keys ``[start_n, start_n + BLOCK_N)`` must visit, with
    ``[m_full_lo, m_full_hi)`` the row blocks that see every real key of the block, so need no
    band mask (rows past Tq are masked on load anyway, so that range may run to Tq). The mirror
    of ``_key_range``: row i sees key j iff ``j - diag_hi <= i <= j - diag_lo``. Everything is
    clamped at 0 before ``//``, which truncates toward zero."""
    # The first key has the lowest bounds, the last real key the highest.
    last_n = tl.minimum(start_n + BLOCK_N, T_k) - 1
    if HAS_RIGHT:
        m_first = tl.maximum(start_n - diag_hi, 0)
        m_lo = m_first // BLOCK_M * BLOCK_M
        m_full_lo = (tl.maximum(last_n - diag_hi, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
        m_full_lo = 0
    if HAS_LEFT:
        m_end = tl.maximum(tl.minimum(last_n - diag_lo + 1, T_q), 0)
        m_full_hi = tl.maximum(tl.minimum(start_n - diag_lo + 1, T_q), 0) // BLOCK_M * BLOCK_M
    else:
        m_end = T_q
        m_full_hi = T_q
    # Without a right bound m_lo = m_full_lo = 0 stay constants (the compiler then drops the
    # empty loop before them), and the order below holds already.
    if HAS_RIGHT:
        # Keys right of the band are seen by no row: m_first >= m_end. Flooring m_first to a
        # block start would still reach back into the last block of Tq; end there instead.
        m_end = tl.where(m_first < m_end, m_end, 0)
        # No unmasked block past the end, none before the start; keys no row sees get three
        # empty loops.
        m_full_hi = tl.minimum(m_full_hi, m_end)
        m_full_lo = tl.minimum(m_full_lo, m_end)
        m_lo = tl.minimum(m_lo, m_full_lo)
        m_full_hi = tl.maximum(m_full_hi, m_full_lo)
    return m_lo, m_full_lo, m_full_hi, m_end


@triton.jit
def _bwd_dkdv_inner(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, o_q, o_do,
                    start_m, end_m, o_n, o_nd, m_d, T_q, diag_lo, diag_hi, qk_scale, softcap2,
                    b_slope2, stride_qt, stride_dot, am_base, m_n, stride_amm, stride_amn,
                    seed, dropout_p, drop_row0, drop_cols,
                    MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
                    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Accumulate query blocks ``[start_m, end_m)`` of one head into dK/dV of the key block
    ``o_n``. The ``*_base`` scalar pointers point at row ``start_m`` and are returned advanced
    to ``end_m``; ``o_q``/``o_do`` are the tile's offsets from them; ``o_nd`` is ``o_n -
    diag_offset`` for ALiBi. ``MASK`` applies the band mask. Rows past Tq load q = dO = 0 and
    lse = +inf: they add nothing. Row i's dropout counters start at ``(drop_row0 + i) ·
    drop_cols``."""
    o_m0 = tl.arange(0, BLOCK_M)
    rp_keep = 1.0 / (1.0 - dropout_p)
    for start in range(start_m, end_m, BLOCK_M):
        o_m = start + o_m0
        m_m = o_m < T_q
        m_qd = m_m[:, None] & m_d[None, :]
        b_q = tl.load(q_base + o_q, mask=m_qd, other=0.0)  # [BLOCK_M, HEAD_DIM]
        b_do = tl.load(do_base + o_do, mask=m_qd, other=0.0)  # [BLOCK_M, HEAD_DIM]
        b_lse2 = _load_lse2(lse_base + o_m0, m_m)  # [BLOCK_M]
        b_delta = tl.load(delta_base + o_m0, mask=m_m, other=0.0)  # [BLOCK_M]
        b_qkT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        b_sT, b_tT = _scores(b_qkT, o_m[None, :], o_nd[:, None], qk_scale, softcap2, b_slope2,
                             HAS_SOFTCAP, HAS_ALIBI)
        if HAS_ATTN_MASK:
            # The mask's tile read transposed: keys down, query rows across.
            p_amT = am_base + o_m.to(tl.int64)[None, :] * stride_amm + o_n.to(tl.int64)[:, None] * stride_amn
            b_sT = _attn_mask(b_sT, p_amT, m_m[None, :] & m_n[:, None], MASK_IS_BOOL)
        b_pT = tl.exp2(b_sT - b_lse2[None, :])
        if MASK:
            if HAS_RIGHT:
                b_pT = tl.where(o_n[:, None] <= o_m[None, :] + diag_hi, b_pT, 0.0)
            if HAS_LEFT:
                b_pT = tl.where(o_n[:, None] >= o_m[None, :] + diag_lo, b_pT, 0.0)
        if HAS_DROPOUT:
            # The forward's counters (row, key), read in this tile's transposed orientation.
            o_dropT = (drop_row0 + o_m) * drop_cols  # [BLOCK_M], int64
            b_keepT = _dropout_keep(seed, o_dropT[None, :], o_n[:, None], dropout_p)
            b_pdT = tl.where(b_keepT, b_pT * rp_keep, 0.0)
        else:
            b_pdT = b_pT
        dv = tl.dot(b_pdT.to(b_do.dtype), b_do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        if HAS_DROPOUT:
            b_dpT = tl.where(b_keepT, b_dpT * rp_keep, 0.0)
        b_dsT = b_pT * (b_dpT - b_delta[None, :])
        if HAS_SOFTCAP:
            # s = softcap·tanh(softmax_scale·q·kᵀ / softcap) has ds/d(q·kᵀ) = softmax_scale·(1 - tanh²);
            # softmax_scale comes at the end, as without softcap.
            b_dsT = b_dsT * (1.0 - b_tT * b_tT)
        dk = tl.dot(b_dsT.to(b_q.dtype), b_q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        # Only scalar pointers are carried through the loop: a carried tensor of pointers costs
        # two registers per element and made the forward spill on the H200.
        q_base += BLOCK_M * stride_qt
        do_base += BLOCK_M * stride_dot
        lse_base += BLOCK_M
        delta_base += BLOCK_M
    return dk, dv, q_base, do_base, lse_base, delta_base


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qt, stride_qh,
                     stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh,
                     stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh,
                     stride_dvb, stride_dvt, stride_dvh,
                     T_q, T_k, H, H_kv, GROUP, softmax_scale, diag_lo, diag_hi, qk_scale, softcap2,
                     ALIBI, stride_ab, diag_offset, CU_SEQLENS_Q, CU_SEQLENS_K,
                     ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, seed, dropout_p,
                     D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
                     MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = (i_bh // H_kv).to(tl.int64), (i_bh % H_kv).to(tl.int64)

    start_n = i_n * BLOCK_N
    # As in the forward kernel: the dropout counters of lse's row r are [r·T_k, (r + 1)·T_k).
    drop_cols = T_k
    if IS_VARLEN:
        # As in the forward kernel: T_q arrives as total_q (the row stride of lse and delta
        # [H, total_q]), the band relative to each sequence's bottom-right diagonal.
        T_lse = T_q
        bos_q, bos_k, T_q, T_k, diag_offset, diag_lo, diag_hi = _varlen_seq(
            CU_SEQLENS_Q, CU_SEQLENS_K, i_b, diag_lo, diag_hi)
        if start_n >= T_k:
            return
        Q += bos_q * stride_qt
        DO += bos_q * stride_dot
        LSE += bos_q
        DELTA += bos_q
        K += bos_k * stride_kt
        V += bos_k * stride_vt
        DK += bos_k * stride_dkt
        DV += bos_k * stride_dvt
    o_n = start_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_d = o_d < D
    m_n = o_n < T_k
    m_kd = m_n[:, None] & m_d[None, :]
    p_k = K + i_b * stride_kb + i_hkv * stride_kh + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :]
    p_v = V + i_b * stride_vb + i_hkv * stride_vh + o_n.to(tl.int64)[:, None] * stride_vt + o_d[None, :]
    b_k = tl.load(p_k, mask=m_kd, other=0.0)  # [BLOCK_N, HEAD_DIM]
    b_v = tl.load(p_v, mask=m_kd, other=0.0)  # [BLOCK_N, HEAD_DIM]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    if HAS_ALIBI:
        # ALiBi's distance |i + diag_offset - j| = |i - (j - diag_offset)|: shift the keys, once.
        o_nd = o_n - diag_offset
    else:
        o_nd = o_n
    m_lo, m_full_lo, m_full_hi, m_end = _query_range(start_n, T_q, T_k, diag_lo, diag_hi,
                                                     HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    m_lo64 = tl.cast(m_lo, tl.int64)
    o_m0 = tl.arange(0, BLOCK_M)
    # Offsets inside one tile stay small (BLOCK_M rows), so int32 is enough for them.
    o_q = o_m0[:, None] * stride_qt + o_d[None, :]
    o_do = o_m0[:, None] * stride_dot + o_d[None, :]
    # The GROUP query heads that read this KV head add into the same dK/dV: no atomics needed.
    for g in range(GROUP):
        i_h = i_hkv * GROUP + g
        q_base = Q + i_b * stride_qb + i_h * stride_qh + m_lo64 * stride_qt
        do_base = DO + i_b * stride_dob + i_h * stride_doh + m_lo64 * stride_dot
        if IS_VARLEN:
            lse_base = LSE + i_h * T_lse + m_lo64
            delta_base = DELTA + i_h * T_lse + m_lo64
            drop_row0 = i_h * T_lse + bos_q
        else:
            lse_base = LSE + (i_b * H + i_h) * T_q + m_lo64
            delta_base = DELTA + (i_b * H + i_h) * T_q + m_lo64
            drop_row0 = (i_b * H + i_h) * T_q
        if HAS_ALIBI:
            b_slope2 = tl.load(ALIBI + i_b * stride_ab + i_h) * 1.4426950408889634
        else:
            b_slope2 = 0.0
        if HAS_ATTN_MASK:
            am_base = ATTN_MASK + i_b * stride_amb + i_h * stride_amh
        else:
            am_base = ATTN_MASK
        # Blocks crossing an edge of the band pay for its mask; the rows between run without.
        dk, dv, q_base, do_base, lse_base, delta_base = _bwd_dkdv_inner(
            dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, o_q, o_do, m_lo, m_full_lo,
            o_n, o_nd, m_d, T_q, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_qt,
            stride_dot, am_base, m_n, stride_amm, stride_amn, seed, dropout_p, drop_row0, drop_cols,
            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_M, DOT_PRECISION, HAS_ATTN_MASK,
            MASK_IS_BOOL, HAS_DROPOUT)
        dk, dv, q_base, do_base, lse_base, delta_base = _bwd_dkdv_inner(
            dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, o_q, o_do, m_full_lo, m_full_hi,
            o_n, o_nd, m_d, T_q, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_qt,
            stride_dot, am_base, m_n, stride_amm, stride_amn, seed, dropout_p, drop_row0, drop_cols,
            False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_M, DOT_PRECISION, HAS_ATTN_MASK,
            MASK_IS_BOOL, HAS_DROPOUT)
        if HAS_LEFT:
            dk, dv, q_base, do_base, lse_base, delta_base = _bwd_dkdv_inner(
                dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, o_q, o_do, m_full_hi, m_end,
                o_n, o_nd, m_d, T_q, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_qt,
                stride_dot, am_base, m_n, stride_amm, stride_amn, seed, dropout_p, drop_row0, drop_cols,
                True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_M, DOT_PRECISION, HAS_ATTN_MASK,
                MASK_IS_BOOL, HAS_DROPOUT)

    p_dk = DK + i_b * stride_dkb + i_hkv * stride_dkh + o_n.to(tl.int64)[:, None] * stride_dkt + o_d[None, :]
    p_dv = DV + i_b * stride_dvb + i_hkv * stride_dvh + o_n.to(tl.int64)[:, None] * stride_dvt + o_d[None, :]
    tl.store(p_dk, (dk * softmax_scale).to(DK.dtype.element_ty), mask=m_kd)
    tl.store(p_dv, dv.to(DV.dtype.element_ty), mask=m_kd)


@triton.jit
def _bwd_dq_inner(dq, b_q, b_do, b_lse2, b_delta, k_base, v_base, o_k, o_v, start_n, end_n,
                  o_m, o_md, m_d, T_k, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt,
                  stride_vt, am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop,
                  MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    """Accumulate key blocks ``[start_n, end_n)`` into dQ of the query rows ``o_m``. The scalar
    pointers ``k_base``/``v_base`` point at key ``start_n`` and are returned advanced to
    ``end_n``. ``MASK`` masks keys past Tk and outside the band of diagonals (so a padded
    key's P never reaches dQ, even as inf · 0). ``o_drop`` holds each row's first dropout
    counter."""
    o_n0 = tl.arange(0, BLOCK_N)
    rp_keep = 1.0 / (1.0 - dropout_p)
    for start in range(start_n, end_n, BLOCK_N):
        o_n = start + o_n0
        if MASK:
            m_kv = (o_n < T_k)[:, None] & m_d[None, :]
        else:
            m_kv = m_d[None, :]
        b_k = tl.load(k_base + o_k, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        b_v = tl.load(v_base + o_v, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_s, b_t = _scores(b_qk, o_md[:, None], o_n[None, :], qk_scale, softcap2, b_slope2,
                           HAS_SOFTCAP, HAS_ALIBI)
        if HAS_ATTN_MASK:
            p_am = am_base + o_am_m[:, None] + o_n.to(tl.int64)[None, :] * stride_amn
            b_s = _attn_mask(b_s, p_am, m_m[:, None] & (o_n < T_k)[None, :], MASK_IS_BOOL)
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if MASK:
            m_s = (o_n < T_k)[None, :]
            if HAS_RIGHT:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + diag_hi)
            if HAS_LEFT:
                m_s = m_s & (o_n[None, :] >= o_m[:, None] + diag_lo)
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            b_keep = _dropout_keep(seed, o_drop[:, None], o_n[None, :], dropout_p)
            b_dp = tl.where(b_keep, b_dp * rp_keep, 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        if HAS_SOFTCAP:
            # s = softcap·tanh(softmax_scale·q·kᵀ / softcap) has ds/d(q·kᵀ) = softmax_scale·(1 - tanh²);
            # softmax_scale comes at the end, as without softcap.
            b_ds = b_ds * (1.0 - b_t * b_t)
        dq = tl.dot(b_ds.to(b_k.dtype), b_k, dq, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt
    return dq, k_base, v_base


@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qt, stride_qh,
                   stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh,
                   stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh,
                   T_q, T_k, H, GROUP, softmax_scale, diag_lo, diag_hi, qk_scale, softcap2,
                   ALIBI, stride_ab, diag_offset, CU_SEQLENS_Q, CU_SEQLENS_K,
                   ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, seed, dropout_p,
                   D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
                   MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // GROUP
    i_b, i_h, i_hkv = i_b.to(tl.int64), i_h.to(tl.int64), i_hkv.to(tl.int64)

    start_m = i_m * BLOCK_M
    drop_cols = T_k
    if IS_VARLEN:
        # As in the forward kernel (T_q arrives as total_q, the row stride of lse and delta).
        p_lse_base = LSE + i_h * T_q
        p_delta_base = DELTA + i_h * T_q
        drop_row0 = i_h * T_q
        bos_q, bos_k, T_q, T_k, diag_offset, diag_lo, diag_hi = _varlen_seq(
            CU_SEQLENS_Q, CU_SEQLENS_K, i_b, diag_lo, diag_hi)
        if start_m >= T_q:
            return
        p_lse_base += bos_q
        p_delta_base += bos_q
        drop_row0 += bos_q
        Q += bos_q * stride_qt
        DO += bos_q * stride_dot
        DQ += bos_q * stride_dqt
        K += bos_k * stride_kt
        V += bos_k * stride_vt
    else:
        drop_row0 = (i_b * H + i_h) * T_q
    o_m = start_m + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < T_q
    m_d = o_d < D
    m_qd = m_m[:, None] & m_d[None, :]
    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m.to(tl.int64)[:, None] * stride_qt + o_d[None, :]
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m.to(tl.int64)[:, None] * stride_dot + o_d[None, :]
    b_q = tl.load(p_q, mask=m_qd, other=0.0)  # [BLOCK_M, HEAD_DIM]
    b_do = tl.load(p_do, mask=m_qd, other=0.0)  # [BLOCK_M, HEAD_DIM]
    if IS_VARLEN:
        b_lse2 = _load_lse2(p_lse_base + o_m, m_m)  # [BLOCK_M]
        b_delta = tl.load(p_delta_base + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
    else:
        b_lse2 = _load_lse2(LSE + (i_b * H + i_h) * T_q + o_m, m_m)  # [BLOCK_M]
        b_delta = tl.load(DELTA + (i_b * H + i_h) * T_q + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
    if HAS_DROPOUT:
        o_drop = (drop_row0 + o_m) * drop_cols  # [BLOCK_M], int64
    else:
        o_drop = 0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_ALIBI:
        # ALiBi's distance |i + diag_offset - j| is taken from the row's aligned diagonal.
        o_md = o_m + diag_offset
        b_slope2 = tl.load(ALIBI + i_b * stride_ab + i_h) * 1.4426950408889634
    else:
        o_md = o_m
        b_slope2 = 0.0
    if HAS_ATTN_MASK:
        am_base = ATTN_MASK + i_b * stride_amb + i_h * stride_amh
        o_am_m = o_m.to(tl.int64) * stride_amm
    else:
        am_base = ATTN_MASK
        o_am_m = o_m

    k_base = K + i_b * stride_kb + i_hkv * stride_kh
    v_base = V + i_b * stride_vb + i_hkv * stride_vh
    # Offsets inside one tile stay small (BLOCK_N rows), so int32 is enough for them.
    o_k = o_n[:, None] * stride_kt + o_d[None, :]
    o_v = o_n[:, None] * stride_vt + o_d[None, :]
    n_lo, n_full_lo, n_full_hi, n_end = _key_range(start_m, T_q, T_k, diag_lo, diag_hi,
                                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # As in the forward: keys before n_lo are never loaded, only the band's edges are masked.
    if HAS_LEFT:
        k_base += tl.cast(n_lo, tl.int64) * stride_kt
        v_base += tl.cast(n_lo, tl.int64) * stride_vt
        dq, k_base, v_base = _bwd_dq_inner(
            dq, b_q, b_do, b_lse2, b_delta, k_base, v_base, o_k, o_v, n_lo, n_full_lo, o_m, o_md,
            m_d, T_k, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
            am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop, True, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK, MASK_IS_BOOL, HAS_DROPOUT)
    dq, k_base, v_base = _bwd_dq_inner(
        dq, b_q, b_do, b_lse2, b_delta, k_base, v_base, o_k, o_v, n_full_lo, n_full_hi, o_m, o_md,
        m_d, T_k, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
        am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop, False, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK, MASK_IS_BOOL, HAS_DROPOUT)
    dq, k_base, v_base = _bwd_dq_inner(
        dq, b_q, b_do, b_lse2, b_delta, k_base, v_base, o_k, o_v, n_full_hi, n_end, o_m, o_md,
        m_d, T_k, diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
        am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop, True, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK, MASK_IS_BOOL, HAS_DROPOUT)

    p_dq = DQ + i_b * stride_dqb + i_h * stride_dqh + o_m.to(tl.int64)[:, None] * stride_dqt + o_d[None, :]
    tl.store(p_dq, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=m_qd)


def backward_inputs(dout, q, lse, causal: bool, config: BwdConfig | None):
    """``(config, dout, lse, HEAD_DIM)`` as the backward kernels take them: the default config when
    None, dout in q's dtype with its last dim contiguous, lse contiguous, the padded head dim."""
    if config is None:
        config = get_bwd_config(q.shape[-1], q.dtype, causal, interpret=_env.interpret())
    if dout.dtype != q.dtype or dout.stride(-1) != 1:
        dout = dout.to(q.dtype).contiguous()
    return config, dout, lse.contiguous(), padded_head_dim(q.shape[-1])


def backward_buffers(q, k, v):
    """``(delta, dq, dk, dv)`` of the dense backward: delta fp32 ``[B, H, Tq]``, the gradients
    contiguous with the shapes and dtypes of q, k, v; every element is written by the kernels."""
    B, T_q, H, D = q.shape
    delta = empty((B, H, T_q), dtype=torch.float32, device=q.device)
    return (delta, *(empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)))


def flash_bwd_triton(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int, *,
                     window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
                     dropout_p: float = 0.0, seed: int = 0, config: BwdConfig | None = None):
    """Attention backward with the portable Triton kernels; inputs already validated by the caller.

    Args:
        dout: ``[B, Tq, H, D]`` gradient of out, any strides (made last-dim contiguous here).
        q, k, v, softmax_scale, causal, diag_offset, window, softcap, alibi_slopes, attn_mask,
            dropout_p, seed: as given to :func:`ioattn.flash.fwd.flash_fwd_triton` (the same seed
            regenerates its dropout mask).
        out, lse: what that forward returned (out ``[B, Tq, H, D]``, lse fp32 ``[B, H, Tq]``).
        config: tiles and launch settings; :func:`get_bwd_config` picks one when None.

    fp16/bf16 use tensor-core dots with fp32 accumulation (P and dS are rounded to the inputs'
    dtype before their dots); fp32 inputs use ``input_precision="ieee"``: exact fp32 math.

    Returns:
        ``(dq, dk, dv)``, contiguous, with the shapes and dtypes of q, k, v. A query row that sees
        no key gets dq 0 and adds nothing to dk, dv. The ALiBi slopes get no gradient (as in
        flash-attn).
    """
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    config, dout, lse, HEAD_DIM = backward_inputs(dout, q, lse, causal, config)
    meta = dict(**diag_band(T_q, T_k, causal, diag_offset, window),
                **score_args(softmax_scale, softcap, alibi_slopes, H, diag_offset),
                D=D, HEAD_DIM=HEAD_DIM, DOT_PRECISION=dot_precision(q.dtype),
                CU_SEQLENS_Q=None, CU_SEQLENS_K=None, IS_VARLEN=False, **mask_args(attn_mask),
                **dropout_args(dropout_p, seed),
                num_warps=config.num_warps, num_stages=config.num_stages)

    delta, dq, dk, dv = backward_buffers(q, k, v)
    with device_guard(q):
        bwd_preprocess(out, dout, delta, HEAD_DIM)
        launch(
            _bwd_dkdv_kernel, (cdiv(T_k, config.BLOCK_N1), B * H_kv),
            q, k, v, dout, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            T_q, T_k, H, H_kv, H // H_kv, softmax_scale,
            BLOCK_M=config.BLOCK_M1, BLOCK_N=config.BLOCK_N1, **meta,
        )
        launch(
            _bwd_dq_kernel, (cdiv(T_q, config.BLOCK_M2), B * H),
            q, k, v, dout, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            T_q, T_k, H, H // H_kv, softmax_scale,
            BLOCK_M=config.BLOCK_M2, BLOCK_N=config.BLOCK_N2, **meta,
        )
    return dq, dk, dv
