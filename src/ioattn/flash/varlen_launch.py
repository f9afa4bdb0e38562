"""The Triton launchers for packed variable-length sequences (varlen.py's GPU path): one launch
of the forward, dK/dV and dQ kernels of fwd.py and bwd.py for the whole batch, each program
reading its sequence's bounds from cu_seqlens (``IS_VARLEN``)."""
import torch

from .. import _env
from .._utils import cdiv, empty
from ..launch import launch
from .bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, backward_inputs
from .bwd_preprocess import bwd_preprocess
from .config import BwdConfig, FwdConfig, get_fwd_config, padded_head_dim
from .dropout import dropout_args
from .fwd import _fwd_kernel, device_guard, dot_precision, mask_args, score_args


def varlen_band(causal: bool, window, max_seqlen_q: int, max_seqlen_k: int) -> dict:
    """The band of :func:`diag_band` relative to each sequence's own diagonal, which the kernels
    shift by ``T_k - T_q`` of the sequence. A bound is kept whenever it is set (whether a row
    reaches it depends on the sequence) and clamped at the longest sequences, past which it hides
    nothing, so that the shifted values stay in int32."""
    left, right = window
    if causal:
        right = 0
    reach = max_seqlen_q + max_seqlen_k
    return dict(diag_lo=-min(left, reach) if left >= 0 else 0,
                diag_hi=min(right, reach) if right >= 0 else 0,
                HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)


def flash_varlen_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                            softmax_scale: float, causal: bool, *, window=(-1, -1), softcap: float = 0.0,
                            alibi_slopes=None, dropout_p: float = 0.0, seed: int = 0,
                            config: FwdConfig | None = None):
    """:func:`flash_fwd_triton` on packed sequences, in one launch.

    Args:
        q: ``[total_q, H, D]``; k, v: ``[total_k, Hkv, D]``; cu_seqlens_q/k: int32 ``[B + 1]``,
            contiguous, already validated (sequence b is rows ``cu[b]:cu[b + 1]``).
        max_seqlen_q, max_seqlen_k: the longest sequences (they size the grid).
        causal, window: as in :func:`flash_fwd_triton`, with ``diag_offset = T_k - T_q`` of each
            sequence (bottom-right); alibi_slopes ``[H]`` or ``[B, H]``; dropout_p, seed as there
            (dropout.py says how the packed rows number the mask).

    Returns:
        ``(out, lse)``: out ``[total_q, H, D]``, lse fp32 ``[H, total_q]``; rows past
        ``cu_seqlens_q[-1]`` hold 0 and -inf.
    """
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    if config is None:
        config = get_fwd_config(D, q.dtype, causal, interpret=_env.interpret())
    band = varlen_band(causal, window, max_seqlen_q, max_seqlen_k)
    # diag_offset is read from cu_seqlens in the kernel; 0 here keeps ALiBi's argument an int.
    mods = score_args(softmax_scale, softcap, alibi_slopes, H, 0)
    # Zeros, not empty(): the kernel writes only the rows of sequences.
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or max_seqlen_q == 0:
        return out, lse
    grid = (cdiv(max_seqlen_q, config.BLOCK_M), B * H)
    with device_guard(q):
        launch(
            _fwd_kernel, grid,
            q, k, v, out, lse,
            0, q.stride(0), q.stride(1),
            0, k.stride(0), k.stride(1),
            0, v.stride(0), v.stride(1),
            0, out.stride(0), out.stride(1),
            total_q, max_seqlen_k, H, H // H_kv, **band, **mods,
            CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k, **mask_args(None),
            **dropout_args(dropout_p, seed),
            D=D, HEAD_DIM=padded_head_dim(D), IS_VARLEN=True,
            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out, lse


def flash_varlen_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                            max_seqlen_k: int, softmax_scale: float, causal: bool, *, window=(-1, -1),
                            softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, seed: int = 0,
                            config: BwdConfig | None = None):
    """:func:`flash_bwd_triton` on packed sequences, from the ``(out, lse)`` of
    :func:`flash_varlen_fwd_triton` (same arguments; lse ``[H, total_q]``).

    Returns:
        ``(dq, dk, dv)``, contiguous, packed like q, k, v; rows outside every sequence get 0.
    """
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    config, dout, lse, HEAD_DIM = backward_inputs(dout, q, lse, causal, config)
    meta = dict(**varlen_band(causal, window, max_seqlen_q, max_seqlen_k),
                **score_args(softmax_scale, softcap, alibi_slopes, H, 0),
                D=D, HEAD_DIM=HEAD_DIM, DOT_PRECISION=dot_precision(q.dtype),
                CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k, IS_VARLEN=True,
                **mask_args(None), **dropout_args(dropout_p, seed),
                num_warps=config.num_warps, num_stages=config.num_stages)
    # Zeros: the kernels write only the rows of sequences.
    dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if B == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    # delta [H, total_q], lse's layout: the packed rows are one sequence of total_q rows here.
    delta = empty((H, total_q), dtype=torch.float32, device=q.device)
    with device_guard(q):
        bwd_preprocess(out[None], dout[None], delta, HEAD_DIM)
        launch(
            _bwd_dkdv_kernel, (cdiv(max_seqlen_k, config.BLOCK_N1), B * H_kv),
            q, k, v, dout, lse, delta, dk, dv,
            0, q.stride(0), q.stride(1),
            0, k.stride(0), k.stride(1),
            0, v.stride(0), v.stride(1),
            0, dout.stride(0), dout.stride(1),
            0, dk.stride(0), dk.stride(1),
            0, dv.stride(0), dv.stride(1),
            total_q, max_seqlen_k, H, H_kv, H // H_kv, softmax_scale,
            BLOCK_M=config.BLOCK_M1, BLOCK_N=config.BLOCK_N1, **meta,
        )
        launch(
            _bwd_dq_kernel, (cdiv(max_seqlen_q, config.BLOCK_M2), B * H),
            q, k, v, dout, lse, delta, dq,
            0, q.stride(0), q.stride(1),
            0, k.stride(0), k.stride(1),
            0, v.stride(0), v.stride(1),
            0, dout.stride(0), dout.stride(1),
            0, dq.stride(0), dq.stride(1),
            total_q, max_seqlen_k, H, H // H_kv, softmax_scale,
            BLOCK_M=config.BLOCK_M2, BLOCK_N=config.BLOCK_N2, **meta,
        )
    return dq, dk, dv
