"""FlashAttention-2 backward for Hopper (sm_90): the kernels of bwd.py with q, k, v, dO read, and
dq, dk, dv written, through host-side tensor descriptors (TMA).

The same math as bwd.py (deterministic, no atomics) in two launches instead of its three: a dQ
kernel holding BLOCK_M2 query rows that visits the key blocks they see, and on the way writes
``delta = rowsum(dO ∘ O)`` of its rows (bwd.py has a launch of its own for it); then a dK/dV
kernel holding BLOCK_N1 keys of one KV head that visits, for each of the GROUP query heads
sharing it, the query blocks that see those keys, reading that delta. ``P = exp2(q·kᵀ ·
qk_scale − lse · log2(e))`` is recomputed with the scale folded into one multiply.

Each of q, k, v, dO, dq, dk, dv is described as the 4D ``[B, H, T, D]`` view of the ``[B, T, H,
D]`` tensor it is (strides swapped, nothing copied), with tiles ``[1, 1, BLOCK, D]``: the copy
engine checks bounds per dimension, so rows past T load as zeros (and are dropped on store)
without ever reading the next head's rows, which a flattened ``[B·T·H, D]`` view would. Only the
plain kernels' features-off path exists here: no window, softcap, ALiBi, attn_mask, dropout or
varlen (:func:`tma_bwd_supported` says when it applies); lse and delta, a few bytes per row, keep
plain masked loads.

Why the unit dims lead (ptxas for sm_90, triton 3.6, no GPU needed): with ``[1, BLOCK, 1, D]``
tiles of the ``[B, T, H, D]`` tensors, the K and V tiles that the dK/dV kernel holds (the dots'
A operand after a reshape) were kept in registers, where they competed with the fp32 dK, dV
accumulators, and every D=128 tile spilled; with the unit dims first the tiles land in shared
memory as plain matrices (D=128, 32 x 128: 44 spilled bytes before, 0 now; D=256, 16 x 64: 452
before, 0 now). ``TmaBwdConfig.device_desc1`` makes the dK/dV kernel build one 2D ``[T, D]``
descriptor per (batch, head) itself instead (the same bounds); it needs Triton's scratch
allocator for the descriptors, which the launcher provides.
"""
import contextvars

import torch
import triton
import triton.language as tl

from .. import _env
from . import bwd_gluon
from .._utils import cdiv
from ..launch import launch_site
from .bwd import _load_lse2, _query_range, backward_buffers
from .config import TmaBwdConfig, get_tma_bwd_config
from .fwd import LOG2E, _key_range, device_guard, diag_band, dot_precision
from .tma import aligned, head_major_desc, hopper_inputs


@triton.jit
def _load_tile(desc, i_b, start, i_h, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DEVICE_DESC: tl.constexpr = False):
    """Rows ``[start, start + BLOCK)`` of head ``i_h`` of batch ``i_b``; rows past T are 0. With
    ``DEVICE_DESC``, ``desc`` is that head's own 2D descriptor (:func:`_head_desc`)."""
    if DEVICE_DESC:
        b_x = desc.load([start, 0])
    else:
        b_x = desc.load([i_b, i_h, start, 0]).reshape(BLOCK, HEAD_DIM)
    return b_x


@triton.jit
def _store_tile(desc, i_b, start, i_h, b_x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                DEVICE_DESC: tl.constexpr = False):
    """Store ``b_x`` ``[BLOCK, HEAD_DIM]`` at rows ``[start, start + BLOCK)``; rows past T are dropped."""
    if DEVICE_DESC:
        desc.store([start, 0], b_x.to(desc.dtype))
    else:
        desc.store([i_b, i_h, start, 0], b_x.to(desc.dtype).reshape(1, 1, BLOCK, HEAD_DIM))


@triton.jit
def _head_desc(X, i_b, i_h, T, stride_b, stride_t, stride_h, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head ``i_h`` of batch ``i_b`` of ``X [B, T, H, D]`` as a 2D ``[T, D]`` descriptor made on the
    device: the same per-(batch, head) bounds as the 4D one, but its tiles need no reshape, so a
    tile that is a dot's A operand stays in shared memory (the 4D one's lands in registers)."""
    base = X + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h
    return tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _add_dq(desc_dq, p_dq, i_b, i_h, start, o_m, T_q, stride_dqt, b_dq, BLOCK_M: tl.constexpr,
            HEAD_DIM: tl.constexpr, TMA_REDUCE: tl.constexpr, DEVICE_DESC: tl.constexpr, DQ_T: tl.constexpr):
    """Add ``b_dq [BLOCK_M, HEAD_DIM]`` into rows ``[start, start + BLOCK_M)`` of head ``i_h``'s fp32
    dQ buffer; rows past Tq are dropped (by the descriptor's bounds, or the mask). ``TMA_REDUCE``:
    the copy engine's bulk reduction, a whole tile per instruction (no interpreter path);
    otherwise element-wise atomics, relaxed (only the final sum matters, and the next launch
    reads it). With ``DQ_T`` the tile comes transposed, ``[HEAD_DIM, BLOCK_M]``."""
    if TMA_REDUCE:
        if DQ_T:
            b_dq = tl.trans(b_dq)
        if DEVICE_DESC:
            desc_dq.atomic_add([start, 0], b_dq)
        else:
            desc_dq.atomic_add([i_b, i_h, start, 0], b_dq.reshape(1, 1, BLOCK_M, HEAD_DIM))
    elif DQ_T:
        o_d = tl.arange(0, HEAD_DIM)
        p = p_dq + o_m.to(tl.int64)[None, :] * stride_dqt + o_d[:, None]
        tl.atomic_add(p, b_dq, mask=(o_m < T_q)[None, :], sem="relaxed")
    else:
        o_d = tl.arange(0, HEAD_DIM)
        p = p_dq + o_m.to(tl.int64)[:, None] * stride_dqt + o_d[None, :]
        tl.atomic_add(p, b_dq, mask=(o_m < T_q)[:, None], sem="relaxed")


@triton.jit
def _dkdv_tma_inner(dk, dv, b_k, b_v, desc_q, desc_do, desc_dq, p_dq, p_lse, p_delta, i_b, i_h, start_m, end_m,
                    o_n, T_q, stride_dqt, diag_hi, qk_scale, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, DEVICE_DESC: tl.constexpr,
                    ADD_DQ: tl.constexpr, TMA_REDUCE: tl.constexpr, DQ_T: tl.constexpr):
    """Add query rows ``[start_m, end_m)`` of head ``i_h`` into dK/dV of the keys ``o_n`` (and with
    ``ADD_DQ`` their ``dS·k`` into dQ of those rows). ``MASK`` applies the causal mask. Rows past
    Tq load q = dO = 0 and lse = +inf, so add nothing; keys past Tk load k = v = 0, so their dS,
    which is not 0 (P = exp2(−lse) > 0), meets a zero row of k and adds nothing to dQ."""
    o_m0 = tl.arange(0, BLOCK_M)
    for start in range(start_m, end_m, BLOCK_M):
        o_m = start + o_m0
        m_m = o_m < T_q
        b_q = _load_tile(desc_q, i_b, start, i_h, BLOCK_M, HEAD_DIM, DEVICE_DESC)  # [BLOCK_M, HEAD_DIM]
        b_do = _load_tile(desc_do, i_b, start, i_h, BLOCK_M, HEAD_DIM, DEVICE_DESC)  # [BLOCK_M, HEAD_DIM]
        b_lse2 = _load_lse2(p_lse + o_m, m_m)  # [BLOCK_M]
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        b_qkT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        b_pT = tl.exp2(b_qkT * qk_scale - b_lse2[None, :])
        if MASK:
            b_pT = tl.where(o_n[:, None] <= o_m[None, :] + diag_hi, b_pT, 0.0)
        dv = tl.dot(b_pT.to(b_do.dtype), b_do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        b_dsT = (b_pT * (b_dpT - b_delta[None, :])).to(b_q.dtype)
        dk = tl.dot(b_dsT, b_q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        if ADD_DQ:
            if DQ_T:
                # dQᵀ = kᵀ·dSᵀ: kᵀ is a view of the tile in shared memory and dSᵀ is stored there
                # as it is, where dS·k would transpose dSᵀ through shared memory first.
                b_dq = tl.dot(tl.trans(b_k), b_dsT, input_precision=DOT_PRECISION)  # [HEAD_DIM, BLOCK_M]
            else:
                b_dq = tl.dot(tl.trans(b_dsT), b_k, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
            _add_dq(desc_dq, p_dq, i_b, i_h, start, o_m, T_q, stride_dqt, b_dq, BLOCK_M, HEAD_DIM, TMA_REDUCE,
                    DEVICE_DESC, DQ_T)
    return dk, dv


@triton.jit
def _bwd_dkdv_tma_kernel(desc_q, desc_k, desc_v, desc_do, LSE, DELTA, desc_dk, desc_dv, desc_dq, DQ,
                         stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                         stride_dkb, stride_dkt, stride_dkh, stride_dqb, stride_dqt, stride_dqh,
                         T_q, T_k, H, H_kv, GROUP, softmax_scale, qk_scale, diag_hi,
                         HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DEVICE_DESC: tl.constexpr,
                         ADD_DQ: tl.constexpr = False, TMA_REDUCE: tl.constexpr = False,
                         DQ_T: tl.constexpr = False):
    """``desc_*`` are the host's 4D descriptors, or with ``DEVICE_DESC`` the tensors themselves (then
    the strides, unused otherwise, build per-head 2D descriptors here; dk and dv share theirs).
    With ``ADD_DQ`` (the one-pass backward, bwd_fused.py) each query block's ``dS·k`` is added
    into ``DQ``, the fp32 dQ buffer ``[B, Tq, H, D]``, through ``desc_dq``, its host descriptor,
    when ``TMA_REDUCE`` without ``DEVICE_DESC``; otherwise ``desc_dq``, ``DQ`` and their strides
    are unused."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bh // H_kv, i_bh % H_kv
    start_n = i_n * BLOCK_N
    o_n = start_n + tl.arange(0, BLOCK_N)
    if DEVICE_DESC:
        desc_k = _head_desc(desc_k, i_b, i_hkv, T_k, stride_kb, stride_kt, stride_kh, BLOCK_N, HEAD_DIM)
        desc_v = _head_desc(desc_v, i_b, i_hkv, T_k, stride_vb, stride_vt, stride_vh, BLOCK_N, HEAD_DIM)
    b_k = _load_tile(desc_k, i_b, start_n, i_hkv, BLOCK_N, HEAD_DIM, DEVICE_DESC)  # [BLOCK_N, HEAD_DIM]
    b_v = _load_tile(desc_v, i_b, start_n, i_hkv, BLOCK_N, HEAD_DIM, DEVICE_DESC)  # [BLOCK_N, HEAD_DIM]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Without a window there is no left edge: rows [m_lo, m_full_lo) cross the diagonal and pay
    # for the mask, rows [m_full_lo, m_full_hi) see every key of the block.
    m_lo, m_full_lo, m_full_hi, m_end = _query_range(start_n, T_q, T_k, 0, diag_hi, False, HAS_RIGHT,
                                                     BLOCK_M, BLOCK_N)
    # The GROUP query heads that read this KV head add into the same dK/dV: no atomics needed.
    for g in range(GROUP):
        i_h = i_hkv * GROUP + g
        p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
        desc_dqh = desc_dq
        if DEVICE_DESC:
            desc_qh = _head_desc(desc_q, i_b, i_h, T_q, stride_qb, stride_qt, stride_qh, BLOCK_M, HEAD_DIM)
            desc_doh = _head_desc(desc_do, i_b, i_h, T_q, stride_dob, stride_dot, stride_doh, BLOCK_M, HEAD_DIM)
            if ADD_DQ and TMA_REDUCE:
                desc_dqh = _head_desc(DQ, i_b, i_h, T_q, stride_dqb, stride_dqt, stride_dqh, BLOCK_M, HEAD_DIM)
        else:
            desc_qh, desc_doh = desc_q, desc_do
        # lse and delta are [B, H, Tq], contiguous.
        row0 = (i_b * H + i_h).to(tl.int64) * T_q
        dk, dv = _dkdv_tma_inner(dk, dv, b_k, b_v, desc_qh, desc_doh, desc_dqh, p_dq, LSE + row0, DELTA + row0,
                                 i_b, i_h, m_lo, m_full_lo, o_n, T_q, stride_dqt, diag_hi, qk_scale, True, BLOCK_M,
                                 HEAD_DIM, DOT_PRECISION, DEVICE_DESC, ADD_DQ, TMA_REDUCE, DQ_T)
        dk, dv = _dkdv_tma_inner(dk, dv, b_k, b_v, desc_qh, desc_doh, desc_dqh, p_dq, LSE + row0, DELTA + row0,
                                 i_b, i_h, m_full_lo, m_full_hi, o_n, T_q, stride_dqt, diag_hi, qk_scale, False,
                                 BLOCK_M, HEAD_DIM, DOT_PRECISION, DEVICE_DESC, ADD_DQ, TMA_REDUCE, DQ_T)
    if DEVICE_DESC:
        desc_dk = _head_desc(desc_dk, i_b, i_hkv, T_k, stride_dkb, stride_dkt, stride_dkh, BLOCK_N, HEAD_DIM)
        desc_dv = _head_desc(desc_dv, i_b, i_hkv, T_k, stride_dkb, stride_dkt, stride_dkh, BLOCK_N, HEAD_DIM)
    _store_tile(desc_dk, i_b, start_n, i_hkv, dk * softmax_scale, BLOCK_N, HEAD_DIM, DEVICE_DESC)
    _store_tile(desc_dv, i_b, start_n, i_hkv, dv, BLOCK_N, HEAD_DIM, DEVICE_DESC)


@triton.jit
def _dq_tma_inner(dq, b_q, b_do, b_lse2, b_delta, desc_k, desc_v, i_b, i_hkv, start_n, end_n, o_m,
                  T_k, diag_hi, qk_scale, MASK: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add key blocks ``[start_n, end_n)`` into dQ of the rows ``o_m``. ``MASK`` masks keys past Tk
    (loaded as 0, they would still get P = exp2(−lse) > 0) and, when causal, past the diagonal."""
    o_n0 = tl.arange(0, BLOCK_N)
    for start in range(start_n, end_n, BLOCK_N):
        b_k = _load_tile(desc_k, i_b, start, i_hkv, BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_v = _load_tile(desc_v, i_b, start, i_hkv, BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_p = tl.exp2(b_qk * qk_scale - b_lse2[:, None])
        if MASK:
            o_n = start + o_n0
            m_s = (o_n < T_k)[None, :]
            if HAS_RIGHT:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + diag_hi)
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_ds = b_p * (b_dp - b_delta[:, None])
        dq = tl.dot(b_ds.to(b_k.dtype), b_k, dq, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
    return dq


@triton.jit
def _bwd_dq_tma_kernel(desc_q, desc_k, desc_v, desc_do, O, LSE, DELTA, desc_dq,
                       stride_ob, stride_ot, stride_oh,
                       T_q, T_k, H, GROUP, softmax_scale, qk_scale, diag_hi,
                       HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Also writes ``DELTA = rowsum(dO ∘ O)`` of its rows, which it needs itself and the dK/dV
    pass, launched after it, reads: the rows of the grid's programs cover every row once, so the
    separate Δ launch of the portable backward is not needed."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // GROUP
    start_m = i_m * BLOCK_M
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < T_q
    b_q = _load_tile(desc_q, i_b, start_m, i_h, BLOCK_M, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    b_do = _load_tile(desc_do, i_b, start_m, i_h, BLOCK_M, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    row0 = i_bh.to(tl.int64) * T_q
    b_lse2 = _load_lse2(LSE + row0 + o_m, m_m)  # [BLOCK_M]
    # O is read once per row, here only: plain masked loads, no descriptor to build on the host.
    o_d = tl.arange(0, HEAD_DIM)
    p_o = (O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
           + o_m.to(tl.int64)[:, None] * stride_ot + o_d[None, :])
    b_o = tl.load(p_o, mask=m_m[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + row0 + o_m, b_delta, mask=m_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # No left edge without a window, so n_lo = n_full_lo = 0: whole blocks first, then the
    # blocks crossing the diagonal or Tk, masked.
    n_lo, n_full_lo, n_full_hi, n_end = _key_range(start_m, T_q, T_k, 0, diag_hi, False, HAS_RIGHT,
                                                   BLOCK_M, BLOCK_N)
    dq = _dq_tma_inner(dq, b_q, b_do, b_lse2, b_delta, desc_k, desc_v, i_b, i_hkv, n_full_lo, n_full_hi,
                       o_m, T_k, diag_hi, qk_scale, False, HAS_RIGHT, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    dq = _dq_tma_inner(dq, b_q, b_do, b_lse2, b_delta, desc_k, desc_v, i_b, i_hkv, n_full_hi, n_end,
                       o_m, T_k, diag_hi, qk_scale, True, HAS_RIGHT, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    _store_tile(desc_dq, i_b, start_m, i_h, dq * softmax_scale, BLOCK_M, HEAD_DIM)


def _band(T_q: int, T_k: int, causal: bool, diag_offset: int) -> dict:
    band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))
    return dict(diag_hi=band["diag_hi"], HAS_RIGHT=band["HAS_RIGHT"])


def dkdv_tma(q, k, v, dout, lse, delta, dk, dv, softmax_scale: float, causal: bool, diag_offset: int,
             config: TmaBwdConfig):
    """Launch the dK/dV kernel alone, writing ``dk``, ``dv`` (the sweep times it on its own): the
    Gluon one (bwd_gluon.py) where ``config.gluon1`` asks for it and it can run (IOATTN_GLUON=0
    keeps the Triton one)."""
    if config.gluon1 and _env.gluon() and bwd_gluon.gluon_dkdv_supported(q):
        bwd_gluon.dkdv_gluon(q, k, v, dout, lse, delta, dk, dv, softmax_scale, causal, diag_offset, config)
        return
    dkdv_launch(q, k, v, dout, lse, delta, dk, dv, softmax_scale, causal, diag_offset, config.BLOCK_M1,
                config.BLOCK_N1, config.warps1, config.stages1, config.device_desc1)


def dkdv_launch(q, k, v, dout, lse, delta, dk, dv, softmax_scale: float, causal: bool, diag_offset: int,
                M: int, N: int, num_warps: int, num_stages: int, device_desc: bool, dq_acc=None,
                tma_reduce: bool = False, dq_t: bool = False):
    """The dK/dV kernel with M-row query tiles and N-key programs; with ``dq_acc`` (fp32, q's shape,
    holding zeros or what to add to) it also adds each query block's unscaled ``dS·k`` there."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    assert dk.stride() == dv.stride()
    add_dq = dq_acc is not None
    dq_buf = dq_acc if add_dq else dk  # a stand-in the kernel never touches without ADD_DQ

    def build():
        # The descriptors here, not before: a call whose site key was seen makes none.
        if device_desc:
            descs = (q, k, v, dout, lse, delta, dk, dv, dq_buf)
        else:
            desc_dq = head_major_desc(dq_acc, M) if add_dq and tma_reduce else dq_buf
            descs = (head_major_desc(q, M), head_major_desc(k, N), head_major_desc(v, N), head_major_desc(dout, M),
                     lse, delta, head_major_desc(dk, N), head_major_desc(dv, N), desc_dq)
        strides = [s for x in (q, k, v, dout, dk, dq_buf) for s in x.stride()[:3]]
        return (_bwd_dkdv_tma_kernel, (cdiv(T_k, N), B * H_kv),
                (*descs, dq_buf, *strides, T_q, T_k, H, H_kv, H // H_kv, softmax_scale, softmax_scale * LOG2E),
                dict(**_band(T_q, T_k, causal, diag_offset), HEAD_DIM=D, BLOCK_M=M, BLOCK_N=N,
                     DOT_PRECISION=dot_precision(q.dtype), DEVICE_DESC=device_desc, ADD_DQ=add_dq,
                     TMA_REDUCE=add_dq and tma_reduce, DQ_T=add_dq and dq_t, num_warps=num_warps,
                     num_stages=num_stages))

    if device_desc:
        # Scratch for the descriptors, allocated by Triton's launcher per launch: no site.
        _with_scratch(q.device, lambda: launch_site(None, build))
        return
    key = ("dkdv_tma", q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(), delta.data_ptr(),
           dk.data_ptr(), dv.data_ptr(), dq_buf.data_ptr(), q.shape, k.shape, q.stride(), k.stride(), v.stride(),
           dout.stride(), dk.stride(), dq_buf.stride(), q.dtype, dq_buf.dtype, softmax_scale, causal, diag_offset, M,
           N, num_warps, num_stages, add_dq, tma_reduce, dq_t)
    launch_site(key, build)


def _with_scratch(device, run):
    """Call ``run`` with the global scratch that descriptors made on the device need (128 bytes
    each per program), from torch's allocator. The allocator is set in a copy of the current
    context only, so a caller's own Triton allocator is left as it was."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    contextvars.copy_context().run(lambda: (triton.set_allocator(alloc), run()))


def dq_tma(q, k, v, dout, out, lse, delta, dq, softmax_scale: float, causal: bool, diag_offset: int,
           config: TmaBwdConfig):
    """Launch the dQ kernel alone, writing ``dq`` and ``delta`` (which the dK/dV kernel reads)."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    M, N = config.BLOCK_M2, config.BLOCK_N2

    def build():
        return (_bwd_dq_tma_kernel, (cdiv(T_q, M), B * H),
                (head_major_desc(q, M), head_major_desc(k, N), head_major_desc(v, N), head_major_desc(dout, M),
                 out, lse, delta, head_major_desc(dq, M), *out.stride()[:3], T_q, T_k, H, H // H_kv, softmax_scale,
                 softmax_scale * LOG2E),
                dict(**_band(T_q, T_k, causal, diag_offset), HEAD_DIM=D, BLOCK_M=M, BLOCK_N=N,
                     DOT_PRECISION=dot_precision(q.dtype), num_warps=config.warps2, num_stages=config.stages2))

    key = ("dq_tma", q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), out.data_ptr(), lse.data_ptr(),
           delta.data_ptr(), dq.data_ptr(), q.shape, k.shape, q.stride(), k.stride(), v.stride(), dout.stride(),
           out.stride(), dq.stride(), q.dtype, out.dtype, softmax_scale, causal, diag_offset, M, N, config.warps2,
           config.stages2)
    launch_site(key, build)


def hopper_bwd_inputs(dout, q, out, lse):
    """``(dout, out, lse)`` as the Hopper backwards (this one and bwd_fused.py) read them: dout
    TMA-aligned in q's dtype, out with a unit last stride (read with plain loads for Δ), lse
    contiguous; copied only where they are not."""
    if dout.dtype != q.dtype or not aligned(dout):
        # A copy even when dout is contiguous already (its base may be what is misaligned).
        dout = dout.to(q.dtype, copy=True, memory_format=torch.contiguous_format)
    if out.stride(-1) != 1:
        out = out.contiguous()
    return dout, out, lse.contiguous()


def tma_bwd_supported(q, k, v, *, window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, attn_mask=None,
                      dropout_p: float = 0.0, seed: int = 0, varlen: bool = False, **other_features) -> bool:
    """Whether :func:`flash_bwd_tma` applies to these (already validated) inputs: every feature off,
    fp16/bf16, D in (64, 128, 256), q, k, v TMA-aligned, on a Hopper GPU (capability 9.x) or CPU
    tensors under the interpreter (tests). ``seed`` matters only with dropout. A feature this
    function does not know yet (one added to the portable launcher later) counts as on unless it
    is None, 0 or False."""
    if tuple(window) != (-1, -1) or softcap or alibi_slopes is not None or attn_mask is not None:
        return False
    if dropout_p or varlen or any(x is not None and x is not False and x != 0 for x in other_features.values()):
        return False
    return hopper_inputs(q, k, v)


def flash_bwd_tma(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int, *,
                  config: TmaBwdConfig | None = None):
    """Attention backward with the Hopper TMA kernels: :func:`ioattn.flash.bwd.flash_bwd_triton`'s
    contract with every feature off, for inputs :func:`tma_bwd_supported` accepts.

    Args:
        dout: ``[B, Tq, H, D]`` gradient of out, any strides (copied when not TMA-aligned).
        q, k, v, out, lse, softmax_scale, causal, diag_offset: as for ``flash_bwd_triton``, with D a
            power of two from 16 to 256 (the kernels tile the whole head dim).
        config: tiles and launch settings of both passes; :func:`get_tma_bwd_config` picks one
            when None.

    fp16/bf16 dots accumulate in fp32, P and dS rounded to the inputs' dtype before their dots.
    fp32 inputs also run (exact ``ieee`` dots; the tests use them), but are not dispatched here.

    Returns:
        ``(dq, dk, dv)``, contiguous, with the shapes and dtypes of q, k, v. A query row that sees
        no key gets dq 0 and adds nothing to dk, dv.
    """
    D = q.shape[-1]
    if config is None:
        config = get_tma_bwd_config(D, q.dtype, causal, interpret=_env.interpret(),
                                    seqlen=max(q.shape[1], k.shape[1]))
    dout, out, lse = hopper_bwd_inputs(dout, q, out, lse)
    delta, dq, dk, dv = backward_buffers(q, k, v)
    with device_guard(q):
        # dQ first: it writes delta, which the dK/dV pass reads (same stream, so in order).
        dq_tma(q, k, v, dout, out, lse, delta, dq, softmax_scale, causal, diag_offset, config)
        dkdv_tma(q, k, v, dout, lse, delta, dk, dv, softmax_scale, causal, diag_offset, config)
    return dq, dk, dv
