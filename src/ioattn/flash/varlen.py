"""Variable-length (packed, unpadded) attention, flash-attn 2.x's ``flash_attn_varlen_func``, and
the bert_padding helpers that convert between padded ``[B, T, ...]`` and packed ``[total, ...]``.

Sequence b of a packed batch is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. On the Triton
backend (GPU, or the interpreter) the whole batch is one launch of the dense kernels with
IS_VARLEN on: the grid covers the longest sequence × B·H, each program reads its sequence's start
and length from cu_seqlens and exits if its tile is past the end. The CPU backend runs each
sequence through the dense implementation of ops.py (``[1, len, H, D]`` views, no copy of the
inputs) and writes into preallocated packed outputs. Both read the lengths on the host.

Layers as in ops.py: `_fwd_impl`/`_bwd_impl`, custom ops with fake impls for torch.compile, an
eager autograd.Function over the same impls, then the public function with the argument checks.
"""
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import backend_for
from .checks import check_alibi, check_dropout, check_qkv, check_scale, check_softcap, check_window
from .cpu_blocked import sequence_seed
from .ops import _bwd_impl as _dense_bwd
from .ops import _fwd_impl as _dense_fwd
from .ops import _lse_dtype, _seed_value, draw_seed

__all__ = ["flash_attn_varlen_func", "unpad_input", "pad_input"]


def _seq_bounds(cu_seqlens: Tensor, total: int, max_seqlen: int, name: str, max_name: str):
    """Host copy of ``cu_seqlens`` as a list, after the checks that need its values.

    These run inside the op (so also under torch.compile, where the public function only sees
    fake tensors) and before any launch. Reading the values synchronizes with the device.
    """
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {cu}")
    if cu[-1] > total:
        raise ValueError(f"{name}[-1] = {cu[-1]} is past the {total} rows of the packed tensor")
    if max_seqlen >= 0 and lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is less than the longest sequence ({max(lengths)})")
    return cu


def _longest(cu) -> int:
    # The real maximum, not max_seqlen (which may be larger): it sizes the Triton grid.
    return max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)


def _slopes_of(alibi_slopes, b: int):
    # [B, H] slopes hold one row per sequence; [H] slopes are shared by all of them.
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b:b + 1]


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
              softmax_scale, causal, window_left, window_right, softcap, dropout_p, seed):
    total_q, H, D = q.shape
    cu_q = _seq_bounds(cu_seqlens_q, total_q, max_seqlen_q, "cu_seqlens_q", "max_seqlen_q")
    cu_k = _seq_bounds(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
    if backend_for(q.device) != "cpu":
        # One launch for the whole batch; the grid is sized by the longest sequences.
        from .varlen_launch import flash_varlen_fwd_triton

        return flash_varlen_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, _longest(cu_q), _longest(cu_k),
                                       softmax_scale, causal, window=(window_left, window_right),
                                       softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                       seed=_seed_value(seed))
    # Zeros and −inf, not empty(): rows past cu_seqlens_q[-1] belong to no sequence and are
    # documented to hold out 0, lse −inf (as a row that sees no key).
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((H, total_q), float("-inf"), dtype=_lse_dtype(q), device=q.device)
    for b in range(len(cu_q) - 1):
        sq, eq, sk, ek = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if eq == sq:
            continue
        o_b, lse_b = _dense_fwd(q[None, sq:eq], k[None, sk:ek], v[None, sk:ek],
                                _slopes_of(alibi_slopes, b), None, softmax_scale, causal,
                                (ek - sk) - (eq - sq), window_left, window_right, softcap, dropout_p,
                                _sequence_seed(seed, b))
        out[sq:eq] = o_b[0]
        lse[:, sq:eq] = lse_b[0]
    return out, lse


def _sequence_seed(seed, b: int) -> int:
    # Each sequence runs as a batch of one on CPU; its own seed keeps equal-length ones apart.
    return sequence_seed(_seed_value(seed), b) if seed is not None else 0


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
              max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, dropout_p, seed):
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if backend_for(q.device) != "cpu":
        from .varlen_launch import flash_varlen_bwd_triton

        return flash_varlen_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                       _longest(cu_q), _longest(cu_k), softmax_scale, causal,
                                       window=(window_left, window_right), softcap=softcap,
                                       alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                       seed=_seed_value(seed))
    # Rows outside every sequence, and keys of sequences without queries, get gradient 0.
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    for b in range(len(cu_q) - 1):
        sq, eq, sk, ek = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if eq == sq or ek == sk:
            continue
        # The dense backward wants lse [1, H, Tq] contiguous; the packed one is [H, total_q].
        dq_b, dk_b, dv_b = _dense_bwd(dout[None, sq:eq], q[None, sq:eq], k[None, sk:ek],
                                      v[None, sk:ek], out[None, sq:eq],
                                      lse[None, :, sq:eq].contiguous(), _slopes_of(alibi_slopes, b),
                                      None, softmax_scale, causal, (ek - sk) - (eq - sq), window_left,
                                      window_right, softcap, dropout_p, _sequence_seed(seed, b))
        dq[sq:eq], dk[sk:ek], dv[sk:ek] = dq_b[0], dk_b[0], dv_b[0]
    return dq, dk, dv


@torch.library.custom_op("ioattn::flash_varlen_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     alibi_slopes: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool, window_left: int, window_right: int,
                     softcap: float, dropout_p: float,
                     dropout_seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed)


@flash_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options):
    total_q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(H, total_q, dtype=_lse_dtype(q))


@torch.library.custom_op("ioattn::flash_varlen_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def flash_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, alibi_slopes: Optional[Tensor],
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                     window_left: int, window_right: int, softcap: float, dropout_p: float,
                     dropout_seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                     max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, dropout_p,
                     dropout_seed)


@flash_varlen_bwd.register_fake
def _(dout, q, k, v, *rest):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed)
    ctx.options = tuple(options)
    # Gradients flow through `out` only; lse is returned for inspection (as in flash-attn).
    ctx.mark_non_differentiable(lse)


def _grads(ctx, dout, bwd):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *ctx.options,
                     seed)
    # No gradient for cu_seqlens, the ALiBi slopes, the scalar options or the seed.
    return (dq, dk, dv, None, None, None) + (None,) * len(ctx.options) + (None,)


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, flash_varlen_bwd)


flash_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerVarlenAttention(torch.autograd.Function):
    """The custom ops' autograd without their dispatch cost (see ops.attention for why)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options):
        out, lse = _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options)
        _setup_context(ctx, (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _bwd_impl)


def _check_packed(q, k, v):
    """Validate ``q [total_q, H, D]``, ``k``/``v`` ``[total_k, Hkv, D]`` with the dense checks."""
    for name, t in zip("qkv", (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dims [total, H, D], got shape {tuple(t.shape)}")
    q, k, v = check_qkv(q[None], k[None], v[None])
    return q[0], k[0], v[0]


def _check_cu_seqlens(cu_q, cu_k, q):
    """dtype/shape/device checks of cu_seqlens (their values are checked in the op, see `_seq_bounds`)."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [B + 1], got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q ({cu_q.shape[0]}) and cu_seqlens_k ({cu_k.shape[0]}) must have the same "
            "length B + 1"
        )
    return cu_q.contiguous(), cu_k.contiguous()


def _max_seqlen(max_seqlen, cu, name: str) -> int:
    if max_seqlen is None:
        if torch.compiler.is_compiling():
            # Reading the lengths here would break the graph; the op computes what it needs.
            return -1
        return int((cu[1:] - cu[:-1]).max().item()) if cu.shape[0] > 1 else 0
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {max_seqlen!r}")
    return int(max_seqlen)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False):
    """:func:`flash_attn_func` on a packed batch of sequences of different lengths (no padding).

    Same signature and semantics as ``flash_attn.flash_attn_varlen_func`` (flash-attn 2.x).

    Args:
        q: ``[total_q, H, D]``: the queries of all sequences, one after the other.
        k, v: ``[total_k, Hkv, D]`` (GQA/MQA: ``H`` a multiple of ``Hkv``). dtypes, head dims
            and strides as in :func:`flash_attn_func`.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``, on q's device, starting at 0 and
            non-decreasing: sequence b is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and
            key rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. Lengths 0 and 1 are valid; the
            last entry may be less than the total (the rows after it belong to no sequence).
            Checking the values (monotone, first 0, last within the tensor) reads them on the
            host, which synchronizes with the device.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence, as Python ints. None
            computes them from cu_seqlens (a device synchronization); a value smaller than
            the real maximum is rejected.
        dropout_p: dropout on the attention probabilities, as in :func:`flash_attn_func`. On
            CUDA the mask numbers the packed rows one after the other; on CPU each sequence
            gets a seed of its own. Either way sequences get independent masks.
        softmax_scale: default ``1/sqrt(D)``.
        causal, window_size: as in :func:`flash_attn_func`, aligned to the bottom-right corner
            of *each sequence's* score matrix: in sequence b, with lengths ``Tq_b``, ``Tk_b``,
            query i sees key j iff ``j <= i + Tk_b - Tq_b``. A sequence never sees another's keys.
        softcap: as in :func:`flash_attn_func`.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]`` (one row per sequence); distances are
            measured inside each sequence, bottom-right aligned.
        deterministic: accepted for compatibility; the backward is always deterministic.
        return_attn_probs: if True return ``(out, lse, None)`` with lse fp32 ``[H, total_q]``
            (flash-attn 2.x's varlen layout; the probabilities are never materialized, with
            dropout too). The gradient flows through ``out`` only.

    Returns:
        out ``[total_q, H, D]`` with q's dtype, or ``(out, lse, None)``. Rows past
        ``cu_seqlens_q[-1]`` hold 0 in out and −inf in lse (flash-attn leaves them unspecified),
        and get gradient 0, as do keys past ``cu_seqlens_k[-1]``. A query row whose sequence has
        no key gives 0 and −inf, as in :func:`flash_attn_func`.

    On CUDA one launch of the Triton kernels covers the whole batch (the grid is sized by the
    longest sequences; each program reads its sequence's bounds from cu_seqlens). On CPU each
    non-empty sequence runs through the CPU backend of :func:`flash_attn_func`.
    """
    q, k, v = _check_packed(q, k, v)
    cu_seqlens_q, cu_seqlens_k = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q)
    dropout_p = check_dropout(dropout_p)
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    B, H = cu_seqlens_q.shape[0] - 1, q.shape[1]
    # check_alibi reads B and H from a [B, T, H, D] shape; an empty stand-in carries them.
    alibi_slopes = check_alibi(alibi_slopes, q.new_empty(B, 0, H, 0))
    scale = check_scale(softmax_scale, q.shape[-1])
    max_q = _max_seqlen(max_seqlen_q, cu_seqlens_q, "max_seqlen_q")
    max_k = _max_seqlen(max_seqlen_k, cu_seqlens_k, "max_seqlen_k")
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_q, max_k, scale, bool(causal),
            window[0], window[1], softcap, dropout_p, draw_seed(dropout_p))
    if torch.compiler.is_compiling():
        out, lse = flash_varlen_fwd(*args)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _EagerVarlenAttention.apply(*args)
    else:
        out, lse = _fwd_impl(*args)
    return (out, lse, None) if return_attn_probs else out


def unpad_input(hidden_states, attention_mask):
    """Pack the rows of a padded batch that the mask keeps (flash-attn's ``bert_padding``).

    Args:
        hidden_states: ``[B, T, ...]``.
        attention_mask: ``[B, T]``, bool or 0/1 ints: 1 marks a real token. Kept tokens need
            not be contiguous; they are packed in order.

    Returns:
        ``(hidden_unpadded [total, ...], indices [total] int64 into the flattened B·T rows,
        cu_seqlens int32 [B + 1], max_seqlen int)``. Differentiable in hidden_states. Reading
        max_seqlen synchronizes with the device.
    """
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    hidden_unpadded = hidden_states.flatten(0, 1)[indices]
    return hidden_unpadded, indices, cu_seqlens, max_seqlen


def pad_input(hidden_unpadded, indices, batch: int, seqlen: int):
    """Inverse of :func:`unpad_input`: ``[total, ...]`` back to ``[batch, seqlen, ...]``, with
    zeros at the padded positions. Differentiable in hidden_unpadded."""
    rest = hidden_unpadded.shape[1:]
    out = hidden_unpadded.new_zeros(batch * seqlen, *rest).index_copy(0, indices, hidden_unpadded)
    return out.unflatten(0, (batch, seqlen))
