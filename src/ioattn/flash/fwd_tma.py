"""FlashAttention-2 forward for Hopper (sm_90): Q, K, V and O move through host-side tensor
descriptors, i.e. the TMA engine, instead of pointer loads.

Same algorithm and contract as the portable kernel in fwd.py (online softmax in fp32, scores in
the log2 domain), for the plain case only: causal or not, GQA/MQA, Tq != Tk; no window, softcap,
ALiBi, attn_mask, varlen or dropout (:func:`tma_supported` says when it applies).

The descriptors are 4D over the ``[B, H, T, D]`` views of the ``[B, T, H, D]`` tensors (strides
swapped, nothing copied) with blocks ``[1, 1, BLOCK, D]``: TMA checks bounds per dimension, so a
tile that runs past T reads zeros, never the next head's or batch's rows, and a store past Tq
writes nothing. Key tiles zero-filled past Tk still need their scores masked, which only the last
key block (and the causal diagonal) pays for. The unit dims lead so that triton lands each tile
in shared memory as a plain ``[BLOCK, D]`` matrix: with ``[1, BLOCK, 1, D]`` blocks of the
``[B, T, H, D]`` tensors it reshaped Q through registers and fed QKᵀ from there, 64 more
registers a thread at 4 warps (TTGIR and ptxas for sm_90, D=128, 128 x 64 tiles).
"""
import torch
import triton
import triton.language as tl

from .. import _env
from .._utils import cdiv, empty
from ..launch import launch_site
from .config import TmaFwdConfig, get_tma_fwd_config
from .fwd import LOG2E, _key_range, device_guard, diag_band, dot_precision
from .tma import head_major_desc, hopper_inputs


@triton.jit
def _fwd_tma_loop(acc, l_i, m_i, b_q, desc_k, desc_v, i_b, i_hkv, end_n, mask_from, o_m, T_k, diag_hi,
                  qk_scale, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Fold key blocks ``[0, end_n)`` into the softmax state. Blocks from ``mask_from`` on (the
    causal diagonal and the Tk tail) hide the keys past Tk and, with ``HAS_RIGHT``, right of the
    diagonal; the blocks before it are seen whole by every row and skip the mask.

    One loop with a branch that is uniform over the program, rather than fwd.py's unmasked and
    masked loops one after the other: with two pipelined loops ptxas spilled at 4 warps (sm_90,
    D=128, 128 x 64 tiles: 100-120 bytes), with one loop it fits in 255 registers."""
    o_n0 = tl.arange(0, BLOCK_N)
    for start in tl.range(0, end_n, BLOCK_N, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
        b_k = desc_k.load([i_b, i_hkv, start, 0]).reshape(BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if start >= mask_from:
            o_n = start + o_n0
            m_s = (o_n < T_k)[None, :]
            if HAS_RIGHT:
                m_s = m_s & (o_n[None, :] <= o_m[:, None] + diag_hi)
            b_qk = tl.where(m_s, b_qk, float("-inf"))
        # qk_scale > 0 (tma_supported), so the row max of the raw dot, scaled, is exactly the max
        # of the scaled scores; scale and shift then fuse into one FMA per score.
        m_new = tl.maximum(m_i, tl.max(b_qk, 1) * qk_scale)
        # A row that has seen no visible key keeps m = -inf; shifting by 0 instead makes its
        # alpha and p exactly 0 rather than exp2(-inf - (-inf)) = NaN. One select per row.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        b_p = tl.exp2(b_qk * qk_scale - m_shift[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v = desc_v.load([i_b, i_hkv, start, 0]).reshape(BLOCK_N, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tma_kernel(desc_q, desc_k, desc_v, desc_o, LSE, T_q, T_k, H, GROUP, diag_hi, qk_scale,
                    HEAD_DIM: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
                    WARP_SPECIALIZE: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    if HAS_RIGHT:
        # Causal tiles lower down see more keys: launch them first, so that the short ones fill
        # the gaps at the end instead of a long one running alone. Query tiles stay on the fast
        # grid axis, so the programs running together share their head's K/V in L2.
        i_m = tl.num_programs(0) - 1 - i_m
    i_b, i_h = i_bh // H, i_bh % H
    # Query head h reads KV head h // GROUP (GQA/MQA).
    i_hkv = i_h // GROUP
    start_m = i_m * BLOCK_M
    o_m = start_m + tl.arange(0, BLOCK_M)

    # Rows past Tq load as zeros, get finite scores and are never stored.
    b_q = desc_q.load([i_b, i_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Without a left bound the key range starts at 0: blocks every row sees whole, then the
    # diagonal (causal) and the Tk tail, the only ones that pay for masks.
    _, _, n_full_hi, n_end = _key_range(start_m, T_q, T_k, 0, diag_hi, False, HAS_RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tma_loop(acc, l_i, m_i, b_q, desc_k, desc_v, i_b, i_hkv, n_end, n_full_hi, o_m, T_k,
                                  diag_hi, qk_scale, HAS_RIGHT, BLOCK_N, HEAD_DIM, DOT_PRECISION, NUM_STAGES,
                                  WARP_SPECIALIZE)

    # Rows that saw no key have l_i = 0 (and acc = 0): output 0 and lse -inf, not NaN.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    desc_o.store([i_b, i_h, start_m, 0], acc.to(b_q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    p_lse = LSE + i_bh.to(tl.int64) * T_q + o_m
    tl.store(p_lse, lse, mask=o_m < T_q)


def tma_supported(q, k, v, softmax_scale: float, *, window=(-1, -1), softcap: float = 0.0,
                  alibi_slopes=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0,
                  **other_features) -> bool:
    """Whether :func:`flash_fwd_tma` computes this forward call: the plain case (no window, softcap,
    ALiBi, attn_mask, dropout; varlen has its own launcher and never asks), fp16/bf16 ``[B, T, H, D]``
    with D in :data:`ioattn.flash.tma.TMA_HEAD_DIMS`, TMA-aligned tensors, a positive scale, on a Hopper GPU or,
    for tests, on CPU tensors in Triton's interpreter. Any feature keyword this kernel does not
    know means no."""
    if other_features or tuple(window) != (-1, -1) or softcap > 0:
        return False
    if alibi_slopes is not None or attn_mask is not None or dropout_p > 0 or not softmax_scale > 0:
        return False
    return q.numel() > 0 and k.numel() > 0 and hopper_inputs(q, k, v)


def flash_fwd_tma(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *,
                  config: TmaFwdConfig | None = None):
    """Attention forward with the Hopper TMA kernel; same arguments and results as
    :func:`ioattn.flash.fwd.flash_fwd_triton` without its feature options.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]``, ``H % Hkv == 0``, one dtype, D a power of
            two 16..256, every tensor TMA-aligned (see :func:`tma_supported`). fp32 runs too
            (exact ``ieee`` dots), for the interpreter's tests.
        softmax_scale: multiplies q·kᵀ before the softmax; must be > 0.
        causal: query i sees key j iff ``j <= i + diag_offset`` (bottom-right when ``Tk - Tq``).
        config: tiles and launch settings; :func:`get_tma_fwd_config` picks one when None.

    Returns:
        ``(out, lse)``: out ``[B, Tq, H, D]`` contiguous in q's dtype; lse fp32 ``[B, H, Tq]``
        contiguous, natural log. A row that sees no key gets out 0 and lse -inf.
    """
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    if config is None:
        config = get_tma_fwd_config(D, q.dtype, causal, interpret=_env.interpret(), seqlen=max(T_q, T_k))
    band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))

    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)

    def build():
        M, N = config.BLOCK_M, config.BLOCK_N
        return (_fwd_tma_kernel, (cdiv(T_q, M), B * H),
                (head_major_desc(q, M), head_major_desc(k, N), head_major_desc(v, N), head_major_desc(out, M), lse,
                 T_q, T_k, H, H // H_kv, band["diag_hi"], softmax_scale * LOG2E),
                dict(HEAD_DIM=D, HAS_RIGHT=band["HAS_RIGHT"], BLOCK_M=M, BLOCK_N=N,
                     DOT_PRECISION=dot_precision(q.dtype), NUM_STAGES=config.num_stages,
                     WARP_SPECIALIZE=config.warp_specialize, num_warps=config.num_warps,
                     num_stages=config.num_stages))

    key = ("fwd_tma", q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), q.shape, k.shape,
           q.stride(), k.stride(), v.stride(), q.dtype, softmax_scale, causal, diag_offset, config)
    with device_guard(q):
        launch_site(key, build)
    return out, lse
