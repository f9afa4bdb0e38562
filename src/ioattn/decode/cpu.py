"""The CPU backend of flash_attn_with_kvcache: the same contract on CPU tensors.

Each sequence's visible keys ``[leftpad[b], seqlens[b])`` are a view of a contiguous cache (or,
paged, a gather of its pages: a copy linear in its length) and go through the flash family's CPU
forward (torch's CPU flash kernel, or its blocked path for windows, softcap and ALiBi) with the
diagonal at ``seqlens[b] - leftpad[b] - Tq``. When every sequence has the same length, no
leftpad and no row index, the batch is one call on a view of the cache, which is the common case
of a generation loop (paged, one gather of all pages). Memory stays linear in the keys; no score matrix of the whole cache.
"""
import torch

from .._utils import empty
from ..flash.cpu import flash_fwd_cpu


def _keys(cache, b: int, lo: int, hi: int, *, batch_idx, block_table):
    """Rows ``[lo, hi)`` of sequence b as ``[1, hi - lo, Hkv, D]``."""
    if block_table is None:
        row = b if batch_idx is None else batch_idx[b]
        return cache[row, lo:hi].unsqueeze(0)
    page = cache.shape[1]
    first, last = lo // page, (hi + page - 1) // page
    pages = block_table[b, first:last].long()
    return cache[pages].flatten(0, 1)[lo - first * page: hi - first * page].unsqueeze(0)


def kvcache_fwd_cpu(q, k_cache, v_cache, seqlens: list, softmax_scale: float, causal: bool, *,
                    leftpad=None, batch_idx=None, block_table=None, window=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None):
    """Attention of q ``[B, Tq, H, D]`` over a KV cache on CPU; inputs already validated.

    ``seqlens`` is a host list of each sequence's keys (after any append), ``leftpad`` and
    ``batch_idx`` host lists or None; the rest as in :func:`ioattn.decode.kernel.kvcache_fwd_triton`.
    Returns ``(out, lse)``: out ``[B, Tq, H, D]`` in q's dtype, lse fp32 ``[B, H, Tq]``.
    """
    B, Tq, H, D = q.shape
    opts = dict(window=window, softcap=softcap)
    L = seqlens[0] if seqlens else 0
    if batch_idx is None and leftpad is None and L > 0 and all(s == L for s in seqlens):
        if block_table is None:
            kb, vb = k_cache[:B, :L], v_cache[:B, :L]
        else:
            # One gather of every sequence's pages: [B, pages, page, Hkv, D] -> [B, L, Hkv, D]
            pages = block_table[:, : (L + k_cache.shape[1] - 1) // k_cache.shape[1]].long()
            kb, vb = (c[pages].flatten(1, 2)[:, :L] for c in (k_cache, v_cache))
        return flash_fwd_cpu(q, kb, vb, softmax_scale, causal, L - Tq, alibi_slopes=alibi_slopes, **opts)
    out = empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, Tq), dtype=torch.float32, device=q.device)
    where = dict(batch_idx=batch_idx, block_table=block_table)
    for b in range(B):
        lo, hi = (0 if leftpad is None else leftpad[b]), seqlens[b]
        if hi <= lo:
            # No key at all: the contract's empty rows.
            out[b].zero_()
            lse[b].fill_(float("-inf"))
            continue
        kb = _keys(k_cache, b, lo, hi, **where)
        vb = _keys(v_cache, b, lo, hi, **where)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        o, l = flash_fwd_cpu(q[b:b + 1], kb, vb, softmax_scale, causal, (hi - lo) - Tq,
                             alibi_slopes=slopes, **opts)
        out[b] = o[0]
        lse[b] = l[0]
    return out, lse
