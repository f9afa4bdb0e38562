"""One-pass Hopper backward: the dK/dV kernel of bwd_tma.py also adds each block's dQ share into
an fp32 accumulator with atomic adds, as FlashAttention-2's own CUDA backward does.

The two-pass backward (bwd_tma.py) computes ``q·kᵀ`` and ``dO·vᵀ`` twice, once per pass: seven
block matmuls per (query block, key block) pair. Here the dK/dV program, which has P and dS in
registers already, also forms ``dS·K`` and adds it to the rows of dQ it touched: five matmuls and
one fp32 atomic add of a ``[BLOCK_M, D]`` tile. The order of those adds varies between runs, so dq
is not bitwise deterministic; the two-pass backward stays the default until this one is measured
faster (benchmarks/sweep_bwd_tma.py times both).

Layout and bounds as in bwd_tma.py: q, k, v, dO and dk, dv through 4D host descriptors of the
``[B, H, T, D]`` views; the accumulator is a plain fp32 ``[B, Tq, H, D]`` tensor (zeroed first)
written with masked pointer atomics, so rows past Tq are never touched.
"""
import torch
import triton
import triton.language as tl

from .._utils import cdiv
from .bwd import _load_lse2, _query_range
from .bwd_preprocess import bwd_preprocess
from .bwd_tma import _band, _desc, _load_tile, _store_tile
from .config import TmaBwdConfig
from .fwd import LOG2E, device_guard, dot_precision


@triton.jit
def _fused_inner(dk, dv, b_k, b_v, desc_q, desc_do, p_lse, p_delta, p_dq, stride_dqt, i_b, i_h, start_m,
                 end_m, o_n, T_q, diag_hi, softmax_scale, qk_scale, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """bwd_tma's dK/dV step over query rows ``[start_m, end_m)``, plus their dQ share
    ``softmax_scale · dS·K`` added into ``p_dq`` (head ``i_h``'s rows of the accumulator)."""
    o_m0 = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    for start in range(start_m, end_m, BLOCK_M):
        o_m = start + o_m0
        m_m = o_m < T_q
        b_q = _load_tile(desc_q, i_b, start, i_h, BLOCK_M, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
        b_do = _load_tile(desc_do, i_b, start, i_h, BLOCK_M, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
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
        b_dq = tl.dot(tl.trans(b_dsT), b_k, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        # Relaxed: the adds only need to be atomic, not ordered against other memory traffic.
        tl.atomic_add(p_dq + o_m.to(tl.int64)[:, None] * stride_dqt + o_d[None, :], b_dq * softmax_scale,
                      mask=m_m[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_fused_tma_kernel(desc_q, desc_k, desc_v, desc_do, LSE, DELTA, desc_dk, desc_dv, DQ_ACC,
                          stride_dqb, stride_dqt, stride_dqh, T_q, T_k, H, H_kv, GROUP, softmax_scale,
                          qk_scale, diag_hi, HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bh // H_kv, i_bh % H_kv
    start_n = i_n * BLOCK_N
    o_n = start_n + tl.arange(0, BLOCK_N)
    b_k = _load_tile(desc_k, i_b, start_n, i_hkv, BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
    b_v = _load_tile(desc_v, i_b, start_n, i_hkv, BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_lo, m_full_lo, m_full_hi, m_end = _query_range(start_n, T_q, T_k, 0, diag_hi, False, HAS_RIGHT,
                                                     BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        i_h = i_hkv * GROUP + g
        row0 = (i_b * H + i_h).to(tl.int64) * T_q
        p_dq = DQ_ACC + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
        dk, dv = _fused_inner(dk, dv, b_k, b_v, desc_q, desc_do, LSE + row0, DELTA + row0, p_dq, stride_dqt,
                              i_b, i_h, m_lo, m_full_lo, o_n, T_q, diag_hi, softmax_scale, qk_scale, True,
                              BLOCK_M, HEAD_DIM, DOT_PRECISION)
        dk, dv = _fused_inner(dk, dv, b_k, b_v, desc_q, desc_do, LSE + row0, DELTA + row0, p_dq, stride_dqt,
                              i_b, i_h, m_full_lo, m_full_hi, o_n, T_q, diag_hi, softmax_scale, qk_scale,
                              False, BLOCK_M, HEAD_DIM, DOT_PRECISION)
    _store_tile(desc_dk, i_b, start_n, i_hkv, dk * softmax_scale, BLOCK_N, HEAD_DIM)
    _store_tile(desc_dv, i_b, start_n, i_hkv, dv, BLOCK_N, HEAD_DIM)


def flash_bwd_fused_tma(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, diag_offset: int, *,
                        config: TmaBwdConfig):
    """:func:`ioattn.flash.bwd_tma.flash_bwd_tma`'s contract (inputs it accepts, already aligned and
    contiguous as it makes them), in one pass with the dK/dV tiles of ``config`` (BLOCK_M1,
    BLOCK_N1, warps1, stages1; the dQ fields are unused). dq is not bitwise deterministic."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    M, N = config.BLOCK_M1, config.BLOCK_N1
    delta = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)
    dq_acc = torch.zeros((B, T_q, H, D), dtype=torch.float32, device=q.device)
    dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
    lse = lse.contiguous()
    with device_guard(q):
        bwd_preprocess(out, dout, delta, D)
        _bwd_fused_tma_kernel[(cdiv(T_k, N), B * H_kv)](
            _desc(q, M), _desc(k, N), _desc(v, N), _desc(dout, M), lse, delta, _desc(dk, N), _desc(dv, N),
            dq_acc, *dq_acc.stride()[:3], T_q, T_k, H, H_kv, H // H_kv, softmax_scale,
            softmax_scale * LOG2E, **_band(T_q, T_k, causal, diag_offset), HEAD_DIM=D, BLOCK_M=M,
            BLOCK_N=N, DOT_PRECISION=dot_precision(q.dtype), num_warps=config.warps1,
            num_stages=config.stages1,
        )
    return dq_acc.to(q.dtype), dk, dv
