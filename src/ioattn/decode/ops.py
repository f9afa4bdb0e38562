"""The custom op of flash_attn_with_kvcache: value checks, rotary, the in-place append and the
attention, in this order, so that a call either fails before touching the cache or completes.

Registered with torch.library (mutating k_cache and v_cache, with a fake impl) so torch.compile
traces through it; eager calls run the implementation directly, which skips the op dispatch's
overhead (see :func:`ioattn.flash.ops.attention`). Decoding has no backward: q, k and v get no
gradient.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _env
from ..flash.dispatch import backend_for
from .checks import check_kvcache_values
from .rotary import apply_rotary, rotary_positions


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, batch_idx=None, block_table=None):
    """Write ``k``/``v [B, Tnew, Hkv, D]`` into the caches at rows ``cache_seqlens[b] + i`` of
    each sequence, in place, with one indexed copy per cache (no host synchronization). The CPU
    backend's append; the Triton backends use append.py's single launch."""
    B, T_new = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(T_new, device=k.device)  # [B, Tnew]
    if block_table is None:
        rows = torch.arange(B, device=k.device) if batch_idx is None else batch_idx.long()
        index = (rows[:, None].expand(B, T_new), pos)
    else:
        page = k_cache.shape[1]
        index = (torch.gather(block_table.long(), 1, pos // page), pos % page)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                  cache_leftpad, block_table, alibi_slopes, softmax_scale, causal, window_left,
                  window_right, softcap, rotary_interleaved, num_splits, known_seqlen_k):
    T_q = q.shape[1]
    T_new = 0 if k is None else k.shape[1]
    local = causal or (window_left, window_right) != (-1, -1)
    on_cpu = backend_for(q.device) == "cpu"
    max_seqlen_k = None
    # The checks read the indices back to the host, which a CUDA-graph capture cannot do: a
    # captured call skips them (as IOATTN_CHECK_VALUES=0 does), the eager calls before it check.
    # known_seqlen_k >= 0: the caller checked the lengths on its host copy of them (the cache
    # classes) and says how long the longest sequence is after the append.
    if known_seqlen_k >= 0:
        max_seqlen_k = known_seqlen_k
    elif _env.check_values() and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        rotary_len = 0 if rotary_cos is None else rotary_cos.shape[0]
        max_seqlen_k = check_kvcache_values(k_cache, cache_seqlens, T_new, cache_batch_idx, cache_leftpad,
                                            block_table, rotary_len, T_q if local else 1,
                                            kernel=not on_cpu)
    # flash-attn's rotary positions: the new keys at cache_seqlens[b] + i; the queries there too
    # when causal or local, else all of them at cache_seqlens[b]. The Triton backends rotate q in
    # one launch and k inside the append's launch; the CPU backend with torch ops.
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved)
    seqlens = cache_seqlens  # each sequence's keys after the append
    if on_cpu:
        if rotary is not None:
            pos_q = rotary_positions(cache_seqlens, T_q, same_position=not local)
            q = apply_rotary(q, rotary_cos, rotary_sin, pos_q, interleaved=rotary_interleaved)
            k = apply_rotary(k, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, T_new),
                             interleaved=rotary_interleaved)
        if k is not None:
            append_kv(k_cache, v_cache, k, v, cache_seqlens, batch_idx=cache_batch_idx, block_table=block_table)
    else:
        if rotary is not None:
            from .rotary_kernel import rotary_q_triton

            q = rotary_q_triton(q, rotary_cos, rotary_sin, cache_seqlens, interleaved=rotary_interleaved,
                                same_position=not local)
        if k is not None:
            from .append import append_kv_triton

            seqlens = append_kv_triton(k_cache, v_cache, k, v, cache_seqlens, batch_idx=cache_batch_idx,
                                       block_table=block_table, rotary=rotary)
    if q.numel() == 0:
        B, _, H, D = q.shape
        return q.new_zeros(B, T_q, H, D), q.new_zeros(B, H, T_q, dtype=torch.float32)
    window = (window_left, window_right)
    opts = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if on_cpu:
        from .cpu import kvcache_fwd_cpu

        lengths = (cache_seqlens + T_new).tolist()
        host = [None if t is None else t.tolist() for t in (cache_leftpad, cache_batch_idx)]
        return kvcache_fwd_cpu(q, k_cache, v_cache, lengths, softmax_scale, causal, leftpad=host[0],
                               batch_idx=host[1], block_table=block_table, **opts)
    from .kernel import kvcache_fwd_triton

    return kvcache_fwd_triton(q, k_cache, v_cache, seqlens, softmax_scale, causal,
                              leftpad=cache_leftpad, batch_idx=cache_batch_idx, block_table=block_table,
                              num_splits=num_splits, max_seqlen_k=max_seqlen_k,
                              **opts)


@torch.library.custom_op("ioattn::flash_kvcache", mutates_args=("k_cache", "v_cache"),
                         device_types=("cpu", "cuda"))
def flash_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                  rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Tensor,
                  cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                  block_table: Optional[Tensor], alibi_slopes: Optional[Tensor], softmax_scale: float,
                  causal: bool, window_left: int, window_right: int, softcap: float,
                  rotary_interleaved: bool, num_splits: int, known_seqlen_k: int) -> tuple[Tensor, Tensor]:
    out, lse = _kvcache_impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                             cache_batch_idx, cache_leftpad, block_table, alibi_slopes, softmax_scale,
                             causal, window_left, window_right, softcap, rotary_interleaved, num_splits,
                             known_seqlen_k)
    # The fake impl promises contiguous outputs; compiled graphs rely on those strides.
    return out.contiguous(), lse.contiguous()


@flash_kvcache.register_fake
def _(q, *args):
    B, T_q, H, D = q.shape
    return q.new_empty(B, T_q, H, D), q.new_empty(B, H, T_q, dtype=torch.float32)


def kvcache_attention(*args):
    """``(out, lse)`` of validated arguments in the op's order: the op under torch.compile, its
    implementation called directly in eager mode."""
    if torch.compiler.is_compiling():
        return flash_kvcache(*args)
    return _kvcache_impl(*args)
