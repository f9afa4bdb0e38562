"""Public functions of the flash family: flash-attn 2.x and torch SDPA compatible entry points."""
import torch

from .checks import (check_alibi, check_attn_mask, check_dropout, check_qkv, check_scale, check_softcap,
                     check_window)
from .dispatch import backend_for
from .ops import attention

__all__ = ["flash_attn_func", "scaled_dot_product_attention", "backend_for"]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention that never writes the ``Tq × Tk`` score matrix to memory.

    Same signature and semantics as ``flash_attn.flash_attn_func`` (flash-attn 2.x), so
    switching is one import line. Forward and backward; extra memory is linear in T.

    Args:
        q: ``[B, Tq, H, D]``.
        k, v: ``[B, Tk, Hkv, D]``. ``H`` must be a multiple of ``Hkv`` (GQA/MQA): query head
            ``h`` reads KV head ``h // (H // Hkv)``.
            D may be any value in [8, 256]. dtypes: float16 and bfloat16 everywhere; float32
            too (exact fp32 math, no TF32); float64 on CPU (then lse is float64 too). Any strides with a contiguous last
            dim (other inputs are copied).
        dropout_p: must be 0.0 for now (dropout arrives with the training-features issue).
        softmax_scale: scale of ``q·kᵀ`` before the softmax; default ``1/sqrt(D)``.
        causal: mask keys after the diagonal, aligned to the bottom-right corner of the score
            matrix: query i sees key j iff ``j <= i + Tk - Tq``. For Tq=2, Tk=5::

                1 1 1 1 0
                1 1 1 1 1

            and for Tq=5, Tk=2::

                0 0
                0 0
                0 0
                1 0
                1 1

            A row that sees no key gives output 0 (and lse −inf), never NaN.
        window_size: ``(left, right)`` sliding window, −1 = unbounded on that side: query i sees
            key j iff ``i + Tk - Tq - left <= j <= i + Tk - Tq + right`` (bottom-right aligned,
            as causal; ``causal=True`` sets right = 0). Key tiles outside the window are skipped,
            so work grows with the window, not with T.
        softcap: if > 0, scores ``s = softmax_scale · q·kᵀ`` become ``softcap · tanh(s / softcap)``
            (Gemma-2/Grok style), with its derivative in the backward.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``: adds ``−slope · |i + Tk − Tq − j|`` to the
            scores (after softcap). No gradient flows to the slopes.
        deterministic: accepted for compatibility. The backward is always deterministic: dK/dV
            and dQ are computed by separate passes without atomics, so this flag costs nothing.
        return_attn_probs: if True return ``(out, lse, None)`` with lse the fp32 natural-log
            log-sum-exp of each row's scaled scores, ``[B, H, Tq]``. (The attention
            probabilities themselves are never materialized; flash-attn also returns them only
            for testing with dropout.) The gradient flows through ``out`` only.

    Returns:
        out ``[B, Tq, H, D]`` with q's dtype, or ``(out, lse, None)``.

    Empty inputs: B, H or Tq = 0 gives empty results; Tk = 0 gives out 0 and lse −inf.
    Runs the Triton kernels on CUDA tensors and the CPU backend on CPU tensors
    (:func:`backend_for` says which; IOATTN_BACKEND overrides it).
    """
    q, k, v = check_qkv(q, k, v)
    check_dropout(dropout_p)
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    alibi_slopes = check_alibi(alibi_slopes, q)
    scale = check_scale(softmax_scale, q.shape[-1])
    Tq, Tk = q.shape[1], k.shape[1]
    out, lse = attention(q, k, v, scale, bool(causal), Tk - Tq, window=window, softcap=softcap,
                         alibi_slopes=alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on the ioattn kernels.

    Args:
        query: ``[B, H, Tq, D]``; key, value: ``[B, Hkv, Tk, D]`` (torch's layout).
        attn_mask: None, or a mask broadcastable to ``[B, H, Tq, Tk]``: bool (True = the key takes
            part in attention, torch's convention) or float (added to the scaled scores). The
            kernels read it tile by tile through its strides, so a broadcast mask (``[Tq, Tk]``,
            a ``[B, 1, 1, Tk]`` padding mask) is never expanded in memory. A row the mask hides
            entirely gives 0 (torch's math backend gives NaN there). A float mask that requires
            grad is rejected (ValueError): no gradient flows to the mask. Not with ``is_causal``
            (as in torch).
        dropout_p: must be 0.0 for now.
        is_causal: torch's semantics: the mask is aligned to the top-left corner, query i sees
            key j iff ``j <= i`` (unlike :func:`flash_attn_func`, which aligns bottom-right).
        scale: default ``1/sqrt(D)``.
        enable_gqa: allow ``H != Hkv`` (H a multiple of Hkv), as in torch.

    Returns:
        ``[B, H, Tq, D]`` with query's dtype.
    """
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, T, D], got shape {tuple(t.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined (as in torch): fold the "
                         "causal mask into attn_mask")
    check_dropout(dropout_p)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA"
        )
    q, k, v = check_qkv(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), names=names)
    scale = check_scale(scale, q.shape[-1], name="scale")
    attn_mask = check_attn_mask(attn_mask, q, k)
    out, _ = attention(q, k, v, scale, bool(is_causal), 0, attn_mask=attn_mask)
    return out.transpose(1, 2)
