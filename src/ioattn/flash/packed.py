"""Packed-input entry points (flash-attn 2.x): q, k, v stacked in one tensor, or k and v.

They only unpack views and call :func:`flash_attn_func` or :func:`flash_attn_varlen_func`
(the kernels take any strides with a contiguous last dim, so nothing is copied); autograd
assembles the packed gradient.
"""
import torch

from .api import flash_attn_func
from .varlen import flash_attn_varlen_func

__all__ = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]


def _unpack(x, name: str, n: int, layout: str, *, dim: int = 2):
    """Views of the ``n`` tensors stacked on ``dim`` of ``x`` (``dim`` 2 for ``[B, T, n, H, D]``,
    1 for the varlen ``[total, n, H, D]``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim + 3 or x.shape[dim] != n:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    return x.unbind(dim)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False,
                              return_attn_probs=False):
    """:func:`flash_attn_func` on ``qkv [B, T, 3, H, D]`` (q, k, v stacked on dim 2).

    Faster than separate tensors when the projection writes q, k and v in one matmul: no
    concatenation backwards, the gradient comes out packed ``[B, T, 3, H, D]``. No GQA here (use
    :func:`flash_attn_kvpacked_func`). Other arguments (``dropout_p`` included) and the return
    value as in :func:`flash_attn_func`.
    """
    q, k, v = _unpack(qkv, "qkv", 3, "[B, T, 3, H, D]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False,
                             return_attn_probs=False):
    """:func:`flash_attn_func` on ``q [B, Tq, H, D]`` and ``kv [B, Tk, 2, Hkv, D]`` (k, v stacked
    on dim 2; GQA/MQA when Hkv < H). Other arguments (``dropout_p`` included) and the return
    value as in :func:`flash_attn_func`."""
    k, v = _unpack(kv, "kv", 2, "[B, Tk, 2, Hkv, D]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on ``qkv [total, 3, H, D]`` (q, k, v stacked on dim 1),
    the same sequences for queries and keys: ``cu_seqlens`` int32 ``[B + 1]``, ``max_seqlen``
    the longest (None: computed, which synchronizes with the device). No GQA here. Other
    arguments and the return value as in :func:`flash_attn_varlen_func`."""
    q, k, v = _unpack(qkv, "qkv", 3, "[total, 3, H, D]", dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on ``q [total_q, H, D]`` and ``kv [total_k, 2, Hkv, D]``
    (k, v stacked on dim 1; GQA/MQA when Hkv < H). Other arguments and the return value as in
    :func:`flash_attn_varlen_func`."""
    k, v = _unpack(kv, "kv", 2, "[total_k, 2, Hkv, D]", dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)
