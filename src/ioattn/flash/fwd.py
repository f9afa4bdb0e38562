"""FlashAttention-2 forward: a portable Triton kernel and its host launcher.

A program holds one tile of BLOCK_M query rows of one (batch, head) and streams the K/V tiles of
its KV head through on-chip memory, keeping the online softmax state ``m_i`` (running max),
``l_i`` (running sum) and ``acc`` (unnormalized output) in fp32. Scores live in the log2 domain:
``s = q·kᵀ · softmax_scale · log2(e)``, so that exp2 does the exponentials.

The flash-attn 2.x features are constexpr flags that compile to nothing when off:

- a band of visible diagonals (causal and the sliding window): query i sees key j iff
  ``diag_lo <= j - i`` (``HAS_LEFT``) and ``j - i <= diag_hi`` (``HAS_RIGHT``). Only the key
  blocks that meet the band are visited, and only those crossing one of its edges are masked;
- ``HAS_SOFTCAP``: ``s = softcap · tanh(softmax_scale · q·kᵀ / softcap)``;
- ``HAS_ALIBI``: ``s -= slope[b, h] · |i + diag_offset - j|``;
- ``HAS_ATTN_MASK``: torch SDPA's ``attn_mask``, read tile by tile through its four strides
  (broadcast dims have stride 0): bool (``MASK_IS_BOOL``, False hides the key) or added to s.
  Since it may hide any key, every loop then guards rows that have seen no key yet.
- ``HAS_DROPOUT``: the normalized probabilities are dropped by a keep mask made in the kernel
  (dropout.py) and the kept ones scaled by ``1 / (1 - dropout_p)``; the row sum ``l_i``, and so
  lse, is that of the undropped probabilities, as in flash-attn.
"""
import contextlib
import math
import threading

import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import cdiv, empty
from ..launch import launch
from .config import FwdConfig, get_fwd_config, padded_head_dim
from .dropout import _dropout_keep, dropout_args

LOG2E = math.log2(math.e)


@triton.jit
def _tanh(x):
    """tanh from one exp2, for any finite x: exp2 of -2|x|·log2(e) lies in (0, 1], so nothing
    overflows and large |x| gives exactly ±1 (tl.math has no tanh in triton 3.6, and libdevice's
    fails in the interpreter). Within 3 fp32 ulp of tanh, where torch's is within 1.4."""
    a = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    # Near 0, 1 - e cancels and would leave an absolute error of one fp32 ulp of 1, large against
    # a small tanh; the Taylor series to x^9 is exact to below fp32 rounding for |x| < 1/4.
    x2 = x * x
    t_series = -0.05396825396825397 + x2 * 0.021869488536155203
    t_series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * t_series)))
    return tl.where(a < 0.25, t_series, t)


@triton.jit
def _scores(b_qk, o_i, o_j, qk_scale, softcap2, b_slope2, HAS_SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr):
    """Scores in log2 units from the raw dot ``b_qk``. ``o_i``, ``o_j`` are query and key indices
    that broadcast to its shape (in either orientation), one of them shifted so that
    ``|o_i - o_j| = |i + diag_offset - j|``, ALiBi's distance. Returns ``(b_s, b_t)``, ``b_t``
    the tanh the backward needs for the softcap's derivative (``b_qk`` without softcap).

    Without softcap ``qk_scale = softmax_scale·log2(e)``; with it ``qk_scale = softmax_scale /
    softcap`` and ``softcap2 = softcap·log2(e)``. ``b_slope2`` is the ALiBi slope · log2(e)."""
    if HAS_SOFTCAP:
        b_t = _tanh(b_qk * qk_scale)
        b_s = b_t * softcap2
    else:
        b_t = b_qk
        b_s = b_qk * qk_scale
    if HAS_ALIBI:
        b_s = b_s - b_slope2 * tl.abs(o_i - o_j).to(tl.float32)
    return b_s, b_t


@triton.jit
def _attn_mask(b_s, p_am, m_am, MASK_IS_BOOL: tl.constexpr):
    """Apply a tile of SDPA's attn_mask (pointers ``p_am``, in bounds where ``m_am``) to the
    log2-domain scores ``b_s``. Bool masks arrive as uint8 (0 hides the key); float masks are in
    natural-log units, hence the log2(e)."""
    b_am = tl.load(p_am, mask=m_am, other=0)
    if MASK_IS_BOOL:
        b_s = tl.where(b_am != 0, b_s, float("-inf"))
    else:
        b_s = b_s + b_am.to(tl.float32) * 1.4426950408889634
    return b_s


@triton.jit
def _varlen_seq(CU_SEQLENS_Q, CU_SEQLENS_K, i_b, diag_lo, diag_hi):
    """Sequence ``i_b`` of a packed batch: its first query and key rows ``bos_q``, ``bos_k``
    (int64), its lengths ``T_q``, ``T_k`` and the band shifted to its own bottom-right diagonal
    (the launchers pass the band relative to that diagonal, whose offset is ``T_k - T_q``)."""
    bos_q = tl.load(CU_SEQLENS_Q + i_b).to(tl.int64)
    bos_k = tl.load(CU_SEQLENS_K + i_b).to(tl.int64)
    T_q = (tl.load(CU_SEQLENS_Q + i_b + 1) - bos_q).to(tl.int32)
    T_k = (tl.load(CU_SEQLENS_K + i_b + 1) - bos_k).to(tl.int32)
    diag_offset = T_k - T_q
    return bos_q, bos_k, T_q, T_k, diag_offset, diag_lo + diag_offset, diag_hi + diag_offset


@triton.jit
def _key_range(start_m, T_q, T_k, diag_lo, diag_hi, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[n_lo, n_end)`` that query rows ``[start_m, start_m + BLOCK_M)`` must visit, with
    ``[n_full_lo, n_full_hi)`` the key blocks inside Tk and visible to every real row of the tile,
    which need no mask. ``n_lo``, ``n_full_lo`` and ``n_full_hi`` are multiples of BLOCK_N (or
    equal ``n_end``, and then the loops after them are empty), so that masked blocks
    ``[n_lo, n_full_lo)``, unmasked ``[n_full_lo, n_full_hi)`` and masked ``[n_full_hi, n_end)``
    follow each other. Everything is clamped at 0 before ``//``, which truncates toward zero."""
    # The first row has the lowest bounds, the last real row the highest: the union of the rows'
    # ranges runs from the first row's lower bound to the last row's upper bound, the
    # intersection from the last row's lower bound to the first row's upper bound.
    last_m = tl.minimum(start_m + BLOCK_M, T_q) - 1
    if HAS_LEFT:
        n_first = tl.maximum(start_m + diag_lo, 0)
        n_lo = n_first // BLOCK_N * BLOCK_N
        n_full_lo = (tl.maximum(last_m + diag_lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        n_lo = 0
        n_full_lo = 0
    if HAS_RIGHT:
        n_end = tl.maximum(tl.minimum(last_m + diag_hi + 1, T_k), 0)
        n_full_hi = tl.maximum(tl.minimum(start_m + diag_hi + 1, T_k), 0) // BLOCK_N * BLOCK_N
    else:
        n_end = T_k
        n_full_hi = T_k // BLOCK_N * BLOCK_N
    # Without a left bound n_lo = n_full_lo = 0 stay constants (the compiler then drops the empty
    # loop before them), and the order below holds already.
    if HAS_LEFT:
        # A tile below the band sees no key: n_first >= n_end. Flooring n_first to a block start
        # would still reach back into the last block of Tk; end there instead.
        n_end = tl.where(n_first < n_end, n_end, 0)
        # No unmasked block past the end, none before the start; a tile that sees no key gets
        # three empty loops.
        n_full_hi = tl.minimum(n_full_hi, n_end)
        n_full_lo = tl.minimum(n_full_lo, n_end)
        n_lo = tl.minimum(n_lo, n_full_lo)
        n_full_hi = tl.maximum(n_full_hi, n_full_lo)
    return n_lo, n_full_lo, n_full_hi, n_end


@triton.jit
def _fwd_inner(acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, start_n, end_n, o_m, o_md, m_d, T_k,
               diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
               am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
               HAS_DROPOUT: tl.constexpr):
    """Fold key blocks ``[start_n, end_n)`` into the softmax state. ``k_base``/``v_base`` are
    scalar pointers to key ``start_n``, returned advanced to ``end_n``; ``o_k``/``o_v`` are the
    tile's offsets from them. With ``MASK`` the keys past Tk and outside the band of diagonals
    are masked out; without it none may be. ``am_base + o_am_m`` points at the tile rows of the
    attn_mask (``HAS_ATTN_MASK``); ``o_drop`` holds each row's first dropout counter."""
    o_n0 = tl.arange(0, BLOCK_N)
    for start in range(start_n, end_n, BLOCK_N):
        o_n = start + o_n0
        if MASK:
            m_kv = (o_n < T_k)[:, None] & m_d[None, :]
        else:
            m_kv = m_d[None, :]
        b_k = tl.load(k_base + o_k, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_s, b_t = _scores(b_qk, o_md[:, None], o_n[None, :], qk_scale, softcap2, b_slope2,
                           HAS_SOFTCAP, HAS_ALIBI)
        if HAS_ATTN_MASK:
            p_am = am_base + o_am_m[:, None] + o_n.to(tl.int64)[None, :] * stride_amn
            b_s = _attn_mask(b_s, p_am, m_m[:, None] & (o_n < T_k)[None, :], MASK_IS_BOOL)
        if MASK:
            m_s = (o_n < T_k)[None, :]
            if HAS_RIGHT:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + diag_hi)
            if HAS_LEFT:
                m_s = m_s & (o_n[None, :] >= o_m[:, None] + diag_lo)
            b_s = tl.where(m_s, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        if MASK or HAS_ATTN_MASK:
            # A row that has seen no visible key keeps m = -inf; shifting by 0 instead makes its
            # alpha and p exactly 0 rather than exp2(-inf - (-inf)) = NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        alpha = tl.exp2(m_i - m_shift)
        b_p = tl.exp2(b_s - m_shift[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        if HAS_DROPOUT:
            # After the row sum: dropout acts on the normalized P, whose normalizer it leaves alone.
            b_p = tl.where(_dropout_keep(seed, o_drop[:, None], o_n[None, :], dropout_p), b_p, 0.0)
        b_v = tl.load(v_base + o_v, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        m_i = m_new
        # Only scalar pointers are carried through the loop: a carried tensor of pointers costs
        # two registers per element and made every config spill on the H200.
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt
    return acc, l_i, m_i, k_base, v_base


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qt, stride_qh,
                stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh,
                stride_ob, stride_ot, stride_oh,
                T_q, T_k, H, GROUP, diag_lo, diag_hi, qk_scale, softcap2, ALIBI, stride_ab, diag_offset,
                CU_SEQLENS_Q, CU_SEQLENS_K,
                ATTN_MASK, stride_amb, stride_amh, stride_amm, stride_amn, seed, dropout_p,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                HAS_DROPOUT: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    # Query head h reads KV head h // GROUP (GQA/MQA).
    i_hkv = i_h // GROUP
    i_b, i_h, i_hkv = i_b.to(tl.int64), i_h.to(tl.int64), i_hkv.to(tl.int64)

    start_m = i_m * BLOCK_M
    # Row r of lse's layout owns the dropout counters [r·T_k, (r + 1)·T_k) (dropout.py), T_k
    # the longest key sequence under varlen.
    drop_cols = T_k
    if IS_VARLEN:
        # Packed sequences: the batch strides are 0 and sequence i_b is rows [bos, eos) of the
        # packed tensors. The grid covers the longest sequence; tiles past this one's end exit.
        # The launcher passes T_q = total_q (lse is [H, total_q]) and the band relative to the
        # diagonal, which is aligned bottom-right in each sequence: diag_offset = T_k - T_q.
        p_lse_base = LSE + i_h * T_q
        drop_row0 = i_h * T_q
        bos_q, bos_k, T_q, T_k, diag_offset, diag_lo, diag_hi = _varlen_seq(
            CU_SEQLENS_Q, CU_SEQLENS_K, i_b, diag_lo, diag_hi)
        if start_m >= T_q:
            return
        p_lse_base += bos_q
        drop_row0 += bos_q
        Q += bos_q * stride_qt
        K += bos_k * stride_kt
        V += bos_k * stride_vt
        O += bos_q * stride_ot
    else:
        drop_row0 = (i_b * H + i_h) * T_q
    o_m = start_m + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < T_q
    if HAS_DROPOUT:
        o_drop = (drop_row0 + o_m) * drop_cols  # [BLOCK_M], int64
    else:
        o_drop = 0
    # HEAD_DIM pads D to a power of two; the tail columns load as 0 and are never stored.
    m_d = o_d < D
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

    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m.to(tl.int64)[:, None] * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_base = K + i_b * stride_kb + i_hkv * stride_kh
    v_base = V + i_b * stride_vb + i_hkv * stride_vh
    # Offsets inside one tile stay small (BLOCK_N rows), so int32 is enough for them.
    o_k = o_n[:, None] * stride_kt + o_d[None, :]
    o_v = o_n[:, None] * stride_vt + o_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_lo, n_full_lo, n_full_hi, n_end = _key_range(start_m, T_q, T_k, diag_lo, diag_hi,
                                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # Blocks every row sees whole run without masks; only the band's edges and the Tk tail pay for
    # them. Keys before n_lo are outside the window of every row: never loaded.
    if HAS_LEFT:
        k_base += tl.cast(n_lo, tl.int64) * stride_kt
        v_base += tl.cast(n_lo, tl.int64) * stride_vt
        acc, l_i, m_i, k_base, v_base = _fwd_inner(
            acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, n_lo, n_full_lo, o_m, o_md, m_d, T_k,
            diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
            am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop,
            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK,
            MASK_IS_BOOL, HAS_DROPOUT)
    acc, l_i, m_i, k_base, v_base = _fwd_inner(
        acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, n_full_lo, n_full_hi, o_m, o_md, m_d, T_k,
        diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
        am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK,
        MASK_IS_BOOL, HAS_DROPOUT)
    acc, l_i, m_i, k_base, v_base = _fwd_inner(
        acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, n_full_hi, n_end, o_m, o_md, m_d, T_k,
        diag_lo, diag_hi, qk_scale, softcap2, b_slope2, stride_kt, stride_vt,
        am_base, o_am_m, m_m, stride_amn, seed, dropout_p, o_drop,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, BLOCK_N, DOT_PRECISION, HAS_ATTN_MASK,
        MASK_IS_BOOL, HAS_DROPOUT)

    # Rows that saw no key have l_i = 0 (and acc = 0): output 0 and lse -inf, not NaN.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    if HAS_DROPOUT:
        # Kept probabilities are scaled by 1 / (1 - p), so that the output is unbiased.
        acc = acc / (l_safe * (1.0 - dropout_p))[:, None]
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_ot + o_d[None, :]
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    if IS_VARLEN:
        p_lse = p_lse_base + o_m
    else:
        p_lse = LSE + (i_b * H + i_h) * T_q + o_m
    tl.store(p_lse, lse, mask=m_m)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32; fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


_context_bound = threading.local()


def _bind_context(device: torch.device) -> None:
    """Make the device's CUDA context current on this thread, once per thread and device.

    Triton fills the TMA descriptors (a driver call that needs a current context) before its
    launcher binds one. A thread whose first CUDA work is such a launch has none: autograd's
    device thread, whose device is already "selected", so selecting it again binds nothing, ran
    the Hopper backward into "Failed to create tensor map descriptor: invalid device context"
    on the H200 when the backward of ioattn's call was the first GPU work of that thread. Any
    runtime call that needs the context binds it; this one neither waits for the GPU nor
    enqueues work on a stream. Once per thread, so it runs in a CUDA-graph capture only when a
    thread's very first ioattn launch is captured (not tried)."""
    seen = getattr(_context_bound, "devices", None)
    if seen is None:
        seen = _context_bound.devices = set()
    if device.index not in seen:
        torch.cuda.mem_get_info(device)
        seen.add(device.index)


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU, with its context current on this thread (see
    :func:`_bind_context`); nothing to select for CPU tensors under the interpreter."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    device = t.device
    _bind_context(device)
    if device.index == torch.cuda.current_device():
        # Nothing to switch: skips torch.cuda.device's index parsing and its two device
        # exchanges (several µs a launcher on the H200's host, more on autograd's thread).
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def diag_band(T_q: int, T_k: int, causal: bool, diag_offset: int, window) -> dict:
    """The kernels' band of visible diagonals: query i sees key j iff ``diag_lo <= j - i``
    (when ``HAS_LEFT``) and ``j - i <= diag_hi`` (when ``HAS_RIGHT``).

    ``(left, right) = window``, −1 unbounded; causal forces right = 0. A bound that no row
    reaches is dropped (a window wider than the sequence costs nothing), and a kept one is
    clamped where it already hides every key, which keeps it in int32 whatever diag_offset is.
    """
    left, right = window
    if causal:
        right = 0
    # The last row, T_q - 1, has the highest lower bound; row 0 the lowest upper bound.
    has_left = left >= 0 and (T_q - 1) + diag_offset - left > 0
    has_right = right >= 0 and diag_offset + right < T_k - 1
    return dict(diag_lo=min(diag_offset - left, T_k) if has_left else 0,
                diag_hi=max(diag_offset + right, -T_q) if has_right else 0,
                HAS_LEFT=has_left, HAS_RIGHT=has_right)


def score_args(softmax_scale: float, softcap: float, alibi_slopes, H: int, diag_offset: int) -> dict:
    """Kernel arguments of the score modifications (see ``_scores``); slopes ``[H]`` get a batch
    stride of 0, ``[B, H]`` one of H."""
    if softcap > 0:
        scale = dict(qk_scale=softmax_scale / softcap, softcap2=softcap * LOG2E, HAS_SOFTCAP=True)
    else:
        scale = dict(qk_scale=softmax_scale * LOG2E, softcap2=0.0, HAS_SOFTCAP=False)
    if alibi_slopes is None:
        # Only ALiBi reads diag_offset; 0 otherwise, so that its value never picks a specialization.
        return dict(scale, ALIBI=None, stride_ab=0, diag_offset=0, HAS_ALIBI=False)
    slopes = alibi_slopes.contiguous()
    return dict(scale, ALIBI=slopes, stride_ab=0 if slopes.dim() == 1 else H, diag_offset=diag_offset,
                HAS_ALIBI=True)


def mask_args(attn_mask) -> dict:
    """Kernel arguments of SDPA's attn_mask (already expanded to ``[B, H, Tq, Tk]``, see
    checks.check_attn_mask): its pointer and four strides. A bool mask is passed as its uint8
    view (the same bytes), which the kernels load like any integer."""
    if attn_mask is None:
        return dict(ATTN_MASK=None, stride_amb=0, stride_amh=0, stride_amm=0, stride_amn=0,
                    HAS_ATTN_MASK=False, MASK_IS_BOOL=False)
    is_bool = attn_mask.dtype == torch.bool
    am = attn_mask.view(torch.uint8) if is_bool else attn_mask
    return dict(ATTN_MASK=am, stride_amb=am.stride(0), stride_amh=am.stride(1), stride_amm=am.stride(2),
                stride_amn=am.stride(3), HAS_ATTN_MASK=True, MASK_IS_BOOL=is_bool)


def flash_fwd_triton(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *,
                     window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
                     dropout_p: float = 0.0, seed: int = 0, config: FwdConfig | None = None):
    """Attention forward with the portable Triton kernel; inputs already validated by the caller.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``, ``H % Hkv == 0``, one dtype (fp16, bf16 or
            fp32), any strides with the last dim contiguous. D is any integer in 8..256.
        softmax_scale: multiplies q·kᵀ before the softmax.
        causal: query i sees key j iff ``j <= i + diag_offset`` (``Tk - Tq``: bottom-right, as in
            flash-attn; 0: top-left, as in torch SDPA). Ignored when False.
        window: ``(left, right)``: query i sees keys ``i + diag_offset - left <= j <= i +
            diag_offset + right``, −1 leaving a side unbounded; causal forces right = 0.
        softcap: when > 0, scores become ``softcap · tanh(s / softcap)``.
        alibi_slopes: None or fp32 ``[H]`` or ``[B, H]``: scores get ``−slope · |i + diag_offset − j|``
            (after the softcap).
        attn_mask: None or SDPA's mask expanded to ``[B, H, Tq, Tk]`` (any strides), bool or
            float (added to the scaled scores, last).
        dropout_p, seed: when ``dropout_p > 0``, each probability is kept with probability
            ``1 - dropout_p`` (a mask made from the int64 ``seed``, see dropout.py) and the kept
            ones are scaled by ``1 / (1 - dropout_p)``; lse is unchanged.
        config: tiles and launch settings; :func:`get_fwd_config` picks one when None.

    fp16/bf16 use tensor-core dots with fp32 accumulation (P is rounded to v's dtype before P·V);
    fp32 inputs use ``input_precision="ieee"`` dots, i.e. exact fp32 math, no TF32.

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` contiguous in q's dtype; lse fp32 ``[B, H, Tq]``
        contiguous, natural log. A row that sees no key gets out 0 and lse -inf.
    """
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    if config is None:
        config = get_fwd_config(D, q.dtype, causal, interpret=_env.interpret())
    band = diag_band(T_q, T_k, causal, diag_offset, window)
    mods = score_args(softmax_scale, softcap, alibi_slopes, H, diag_offset)

    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)
    grid = (cdiv(T_q, config.BLOCK_M), B * H)
    with device_guard(q):
        launch(
            _fwd_kernel, grid,
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            T_q, T_k, H, H // H_kv, **band, **mods, CU_SEQLENS_Q=None, CU_SEQLENS_K=None,
            **mask_args(attn_mask), **dropout_args(dropout_p, seed), D=D, HEAD_DIM=padded_head_dim(D),
            IS_VARLEN=False,
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out, lse
