"""Public function of the decode family: flash-attn 2.x's ``flash_attn_with_kvcache``."""
from .checks import capacity, check_call_lengths, check_kvcache_args
from .ops import kvcache_attention

__all__ = ["flash_attn_with_kvcache"]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Attention of new queries over a KV cache, appending new keys and values to it in place.

    Same signature and semantics as ``flash_attn.flash_attn_with_kvcache`` (flash-attn 2.x).
    Decoding (Tq = 1), speculative decoding and chunked prefill (Tq > 1) alike. The key range is
    split over several programs when B·Hkv alone would not fill the GPU (flash-decoding), and the
    H / Hkv query heads that share a KV head are processed together, so the cache is read once.

    Args:
        q: ``[B, Tq, H, D]``.
        k_cache, v_cache: ``[B_cache, Tcache, Hkv, D]``, or with ``block_table`` a paged cache
            ``[num_blocks, page_size, Hkv, D]`` (page_size any power of two >= 16). Written in
            place when k, v are given; last dim contiguous. H must be a multiple of Hkv.
        k, v: None, or new keys/values ``[B, Tnew, Hkv, D]``, written to rows
            ``cache_seqlens[b] .. cache_seqlens[b] + Tnew - 1`` of sequence b before the attention.
        rotary_cos, rotary_sin: None, or ``[T_ro, rotary_dim / 2]`` tables in q's dtype
            (``rotary_dim <= D``; needs k, v). The new k is rotated at positions
            ``cache_seqlens[b] + i`` before it is written; q at ``cache_seqlens[b] + i`` when
            causal or windowed, else every query at ``cache_seqlens[b]``. Positions count from
            the start of the cache, leftpad included (as in flash-attn).
        cache_seqlens: int, or int32 ``[B]``: keys already in each sequence's cache (0 allowed).
            None means every sequence fills its whole cache.
        cache_batch_idx: None, or int32 ``[B]``: sequence b uses row ``cache_batch_idx[b]`` of a
            contiguous cache (which may hold more rows than B). Not with block_table.
        cache_leftpad: None, or int32 ``[B]``: sequence b's cache starts at row
            ``cache_leftpad[b]`` (<= cache_seqlens[b]); the rows before it are never seen.
        block_table: None, or int32 ``[B, max_blocks]``: key j of sequence b is row
            ``j % page_size`` of page ``block_table[b, j // page_size]``. Pages in any order.
        softmax_scale: default ``1/sqrt(D)``.
        causal: sequence b sees keys ``[cache_leftpad[b], L_b)`` with ``L_b = cache_seqlens[b] +
            Tnew``; with causal, query i sees key j iff ``j <= i + L_b - Tq`` (bottom-right, as
            in :func:`ioattn.flash_attn_func`). For Tq = 2, L_b = 5::

                1 1 1 1 0
                1 1 1 1 1

        window_size: ``(left, right)``: query i sees keys
            ``i + L_b - Tq - left <= j <= i + L_b - Tq + right``; −1 = unbounded.
        softcap: if > 0, scores become ``softcap · tanh(s / softcap)``.
        rotary_interleaved: True pairs features (0, 1), (2, 3), … (GPT-J); False pairs i with
            ``i + rotary_dim / 2`` (GPT-NeoX).
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``: adds ``−slope · |i + L_b − Tq − j|``.
        num_splits: pieces the key range is split into; 0 picks by a heuristic from B·Hkv, the
            longest sequence and the GPU's SM count (up to four waves of programs); 1 disables
            splitting.
            Only the Triton backend splits; results agree for every value.
        return_softmax_lse: also return lse, fp32 ``[B, H, Tq]`` (natural log).

    Returns:
        out ``[B, Tq, H, D]`` in q's dtype, or ``(out, lse)``. A query that sees no key (an
        empty cache and no new keys, say) gets out 0 and lse −inf.

    Bad arguments raise ValueError/TypeError naming the argument before the cache is changed,
    values included (lengths past the cache, page numbers out of range, rotary tables too
    short): those checks read the index tensors on the host (one synchronization per call,
    which IOATTN_CHECK_VALUES=0 skips, and a call captured in a CUDA graph skips too: check
    the values in an eager call first; ``cache_seqlens`` given as an int or None, without
    index tensors, is checked on the host as it is, without a read-back; :class:`ioattn.KVCache`
    and :class:`ioattn.PagedKVCache` run the same checks on their host copy of the lengths
    instead). CUDA tensors run the split-KV Triton kernel, CPU tensors the CPU backend
    (:func:`ioattn.backend_for` says which). No gradients.
    """
    return _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                         cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                         rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)


def _with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                  cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                  window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                  return_softmax_lse=False, *, known_seqlen_k=-1):
    """:func:`flash_attn_with_kvcache`, for callers that keep the lengths on the host and checked
    them there (cache.py): ``known_seqlen_k``, the longest sequence after the append, skips the
    value checks' read-back (and its synchronization) and sizes the split heuristic. Types,
    shapes and devices are still checked."""
    a = check_kvcache_args(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                           cache_batch_idx, cache_leftpad, block_table, softmax_scale, window_size,
                           softcap, alibi_slopes, num_splits)
    if known_seqlen_k < 0 and a["host_seqlen"] is not None and cache_batch_idx is None and cache_leftpad is None \
            and block_table is None:
        # cache_seqlens given as an int (or None: full caches): every value to check is on the
        # host already, so the checks run here and the op reads nothing back (no synchronization).
        known_seqlen_k = check_call_lengths([a["host_seqlen"]] * q.shape[0], 0 if k is None else k.shape[1],
                                            capacity(k_cache, None), rotary_cos, q.shape[1], causal,
                                            a["window"])
    out, lse = kvcache_attention(a["q"], k_cache, v_cache, a["k"], a["v"], a["rotary_cos"],
                                 a["rotary_sin"], a["cache_seqlens"], a["cache_batch_idx"],
                                 a["cache_leftpad"], a["block_table"], a["alibi_slopes"],
                                 a["softmax_scale"], bool(causal), a["window"][0], a["window"][1],
                                 a["softcap"], bool(rotary_interleaved), int(num_splits), int(known_seqlen_k))
    return (out, lse) if return_softmax_lse else out
