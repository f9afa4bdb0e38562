"""Dense reference of flash_attn_with_kvcache: the specification the backends are tested against.

It never touches the caches it is given: it appends to copies, gathers each sequence's visible
keys into a plain ``[1, L, Hkv, D]`` tensor and runs the flash family's dense reference on it.
"""
import torch

from ..flash.reference import attention_ref
from .rotary import apply_rotary, rotary_positions


def _sequence_kv(cache, b: int, L: int, *, batch_idx, block_table):
    """Keys (or values) ``[0, L)`` of sequence b as a ``[L, Hkv, D]`` tensor."""
    if block_table is None:
        row = b if batch_idx is None else int(batch_idx[b])
        return cache[row, :L]
    page = cache.shape[1]
    pages = block_table[b, : (L + page - 1) // page].long()
    return cache[pages].flatten(0, 1)[:L]


def append_ref(k_cache, v_cache, k, v, cache_seqlens, *, batch_idx=None, block_table=None):
    """Copies of the caches with ``k``/``v [B, Tnew, Hkv, D]`` written at rows
    ``cache_seqlens[b] ..`` of each sequence (paged: through its block table)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b in range(k.shape[0]):
        for i in range(k.shape[1]):
            pos = int(cache_seqlens[b]) + i
            if block_table is None:
                row = b if batch_idx is None else int(batch_idx[b])
                k_cache[row, pos], v_cache[row, pos] = k[b, i], v[b, i]
            else:
                page = k_cache.shape[1]
                blk = int(block_table[b, pos // page])
                k_cache[blk, pos % page], v_cache[blk, pos % page] = k[b, i], v[b, i]
    return k_cache, v_cache


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, *, rotary_cos=None, rotary_sin=None,
                cache_seqlens, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0,
                rotary_interleaved=True, alibi_slopes=None, upcast=True):
    """Reference of :func:`ioattn.flash_attn_with_kvcache` (same arguments; cache_seqlens an int32
    tensor ``[B]``).

    Sequence b attends to keys ``[cache_leftpad[b], cache_seqlens[b] + Tnew)`` of its cache after
    the append; causal and the window are aligned to the end of that range (bottom-right). With
    rotary tables, q and the new k are rotated first (see rotary.py for the positions).
    ``upcast`` as in :func:`ioattn.flash.reference.attention_ref`: True gives the fp64/fp32
    reference, False the plain-PyTorch baseline in the inputs' dtype.

    Returns:
        ``(out, lse, k_cache_new, v_cache_new)``: out ``[B, Tq, H, D]``, lse fp32 ``[B, H, Tq]``,
        and appended copies of the caches (the inputs are left as they are).
    """
    B, Tq = q.shape[:2]
    if upcast:
        dt = torch.float64 if q.device.type == "cpu" or q.dtype == torch.float32 else torch.float32
        q, k_cache, v_cache = q.to(dt), k_cache.to(dt), v_cache.to(dt)
        k, v = (None, None) if k is None else (k.to(dt), v.to(dt))
    Tnew = 0 if k is None else k.shape[1]
    if rotary_cos is not None:
        local = causal or tuple(window) != (-1, -1)
        pos_q = rotary_positions(cache_seqlens, Tq, same_position=not local)
        q = apply_rotary(q, rotary_cos, rotary_sin, pos_q, interleaved=rotary_interleaved)
        pos_k = rotary_positions(cache_seqlens, Tnew)
        k = apply_rotary(k, rotary_cos, rotary_sin, pos_k, interleaved=rotary_interleaved)
    if k is not None:
        k_cache, v_cache = append_ref(k_cache, v_cache, k, v, cache_seqlens, batch_idx=cache_batch_idx,
                                      block_table=block_table)
    outs, lses = [], []
    for b in range(B):
        L = int(cache_seqlens[b]) + Tnew
        lp = 0 if cache_leftpad is None else int(cache_leftpad[b])
        where = dict(batch_idx=cache_batch_idx, block_table=block_table)
        kb = _sequence_kv(k_cache, b, L, **where)[lp:]
        vb = _sequence_kv(v_cache, b, L, **where)[lp:]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        # Keys [lp, L) renumbered from 0: the diagonal stays at the end (offset len - Tq), and
        # ALiBi's distance |i + L - Tq - j| is unchanged by the shift.
        o, lse = attention_ref(q[b:b + 1], kb[None], vb[None], softmax_scale=softmax_scale,
                               causal=causal, diag_offset=(L - lp) - Tq, window=window,
                               softcap=softcap, alibi_slopes=slopes, upcast=False)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache
