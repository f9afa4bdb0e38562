"""FlashAttention-2 forward: a portable Triton kernel and its host launcher.

A program holds one tile of BLOCK_M query rows of one (batch, head) and streams the K/V tiles of
its KV head through on-chip memory, keeping the online softmax state ``m_i`` (running max),
``l_i`` (running sum) and ``acc`` (unnormalized output) in fp32. Scores live in the log2 domain:
``s = q·kᵀ · softmax_scale · log2(e)``, so that exp2 does the exponentials.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import cdiv, empty
from .config import FwdConfig, get_fwd_config, padded_head_dim

LOG2E = math.log2(math.e)


@triton.jit
def _key_range(start_m, T_q, T_k, diag_offset, IS_CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[0, n_end)`` that query rows ``[start_m, start_m + BLOCK_M)`` must visit, split at
    ``n_full``: every key block before it is inside Tk and visible to every row, so needs no mask."""
    if IS_CAUSAL:
        # The tile's last real row sees keys up to row + diag_offset.
        n_end = tl.minimum(tl.minimum(start_m + BLOCK_M, T_q) + diag_offset, T_k)
        n_end = tl.maximum(n_end, 0)
        # The tile's first row sees keys [0, start_m + diag_offset]: whole blocks inside that
        # range are visible to all rows. Clamped first so that // never sees a negative number.
        n_full = tl.maximum(start_m + diag_offset + 1, 0) // BLOCK_N * BLOCK_N
        n_full = tl.minimum(n_full, T_k // BLOCK_N * BLOCK_N)
    else:
        n_end = T_k
        n_full = T_k // BLOCK_N * BLOCK_N
    return n_full, n_end


@triton.jit
def _fwd_inner(acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, start_n, end_n, o_m, m_d, T_k,
               diag_offset, qk_scale, stride_kt, stride_vt, MASK: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks ``[start_n, end_n)`` into the softmax state. ``k_base``/``v_base`` are
    scalar pointers to key ``start_n``, returned advanced to ``end_n``; ``o_k``/``o_v`` are the
    tile's offsets from them. With ``MASK`` the keys past Tk and (when causal) past the diagonal
    are masked out; without it none may be."""
    o_n0 = tl.arange(0, BLOCK_N)
    for start in range(start_n, end_n, BLOCK_N):
        o_n = start + o_n0
        if MASK:
            m_kv = (o_n < T_k)[:, None] & m_d[None, :]
        else:
            m_kv = m_d[None, :]
        b_k = tl.load(k_base + o_k, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASK:
            m_s = (o_n < T_k)[None, :]
            if IS_CAUSAL:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + diag_offset)
            b_s = tl.where(m_s, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        if MASK:
            # A row that has seen no visible key keeps m = -inf; shifting by 0 instead makes its
            # alpha and p exactly 0 rather than exp2(-inf - (-inf)) = NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        alpha = tl.exp2(m_i - m_shift)
        b_p = tl.exp2(b_s - m_shift[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_v, mask=m_kv, other=0.0)  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        m_i = m_new
        # Only scalar pointers are carried through the loop: a carried tensor of pointers costs
        # two registers per element and made every config spill on the H200.
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt
    return acc, l_i, m_i, k_base, v_base


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qt, stride_qh,
                stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh,
                stride_ob, stride_ot, stride_oh,
                T_q, T_k, H, GROUP, qk_scale, diag_offset,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    # Query head h reads KV head h // GROUP (GQA/MQA).
    i_hkv = i_h // GROUP
    i_b, i_h, i_hkv = i_b.to(tl.int64), i_h.to(tl.int64), i_hkv.to(tl.int64)

    start_m = i_m * BLOCK_M
    o_m = start_m + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < T_q
    # HEAD_DIM pads D to a power of two; the tail columns load as 0 and are never stored.
    m_d = o_d < D

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

    n_full, n_end = _key_range(start_m, T_q, T_k, diag_offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    # Blocks every row sees whole run without masks; only the diagonal and the Tk tail pay for them.
    acc, l_i, m_i, k_base, v_base = _fwd_inner(acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, 0, n_full,
                                               o_m, m_d, T_k, diag_offset, qk_scale, stride_kt, stride_vt,
                                               False, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i, k_base, v_base = _fwd_inner(acc, l_i, m_i, b_q, k_base, v_base, o_k, o_v, n_full, n_end,
                                               o_m, m_d, T_k, diag_offset, qk_scale, stride_kt, stride_vt,
                                               True, IS_CAUSAL, BLOCK_N, DOT_PRECISION)

    # Rows that saw no key have l_i = 0 (and acc = 0): output 0 and lse -inf, not NaN.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_ot + o_d[None, :]
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    p_lse = LSE + (i_b * H + i_h) * T_q + o_m
    tl.store(p_lse, lse, mask=m_m)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee"), not TF32; fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU; nothing to select for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def flash_fwd_triton(q, k, v, softmax_scale: float, causal: bool, diag_offset: int,
                     config: FwdConfig | None = None):
    """Attention forward with the portable Triton kernel; inputs already validated by the caller.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``, ``H % Hkv == 0``, one dtype (fp16, bf16 or
            fp32), any strides with the last dim contiguous. D is any integer in 8..256.
        softmax_scale: multiplies q·kᵀ before the softmax.
        causal: query i sees key j iff ``j <= i + diag_offset`` (``Tk - Tq``: bottom-right, as in
            flash-attn; 0: top-left, as in torch SDPA). Ignored when False.
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
    # Beyond these bounds every key (or no key) is visible anyway; clamping keeps it in int32.
    diag_offset = max(-T_q, min(diag_offset, T_k))

    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)
    grid = (cdiv(T_q, config.BLOCK_M), B * H)
    with device_guard(q):
        _fwd_kernel[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            T_q, T_k, H, H // H_kv, softmax_scale * LOG2E, diag_offset,
            D=D, HEAD_DIM=padded_head_dim(D), IS_CAUSAL=causal,
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out, lse
