"""Packed-input entry points (flash-attn 2.x): q, k, v stacked in one tensor, or k and v.

They only unpack views and call :func:`flash_attn_func`; autograd assembles the packed gradient.
"""
import torch

from .api import flash_attn_func

__all__ = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]


def _unpack(x, name: str, n: int, layout: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5 or x.shape[2] != n:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    return x.unbind(2)


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
