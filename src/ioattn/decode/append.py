"""The in-place append of flash_attn_with_kvcache as one Triton launch.

Written with torch ops, the append is an index computation and two ``index_put_`` (six launches
on a GPU, and as many trips through torch's dispatcher on the host), plus the ``cache_seqlens +
Tnew`` the attention kernel reads: on the H200's host an eager decoding call spent more time
there than in the attention. Here a program copies one new row of k and v (every KV head) to
its place, contiguous or paged, rotating k on the way when rotary tables are given, and the
first program of each sequence writes its new length.

The CPU backend keeps the torch version (ops.py's ``append_kv``); the tests run this kernel in
Triton's interpreter against it.
"""
import torch
import triton
import triton.language as tl

from .._utils import empty
from ..flash.fwd import device_guard
from ..launch import address, launch_site
from .rotary_kernel import _rotate_heads, rotary_blocks


@triton.jit
def _append_kernel(K, V, K_CACHE, V_CACHE, SEQLENS, NEW_SEQLENS, BATCH_IDX, BLOCK_TABLE, COS, SIN,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, stride_bt, stride_cos,
                   T_new, H_kv, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, IS_PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                   ROTARY: tl.constexpr = False, ROT_HALF: tl.constexpr = 1, INTERLEAVED: tl.constexpr = True,
                   BLOCK_R: tl.constexpr = 1):
    """Program ``b · T_new + i`` writes new row i of sequence b at position ``SEQLENS[b] + i``:
    row ``BATCH_IDX[b]`` (or b) of a contiguous cache, or row ``pos % PAGE_SIZE`` of page
    ``BLOCK_TABLE[b, pos // PAGE_SIZE]``; with ``ROTARY`` the key rotated at that position
    (rotary_kernel.py). Row 0's program also writes ``NEW_SEQLENS[b]``."""
    i_bt = tl.program_id(0)
    i_b, i_t = i_bt // T_new, i_bt % T_new
    seqlen = tl.load(SEQLENS + i_b)
    pos = seqlen + i_t
    if IS_PAGED:
        row = tl.load(BLOCK_TABLE + i_b.to(tl.int64) * stride_bt + pos // PAGE_SIZE)
        t = pos % PAGE_SIZE
    else:
        if HAS_BATCH_IDX:
            row = tl.load(BATCH_IDX + i_b)
        else:
            row = i_b
        t = pos
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_h < H_kv)[:, None] & (o_d < D)[None, :]
    row, t, i_b64, i_t64 = row.to(tl.int64), t.to(tl.int64), i_b.to(tl.int64), i_t.to(tl.int64)
    if ROTARY:
        _rotate_heads(K + i_b64 * stride_kb + i_t64 * stride_kt, K_CACHE + row * stride_kcb + t * stride_kct, COS,
                      SIN, pos, stride_kh, stride_kch, stride_cos, H_kv, D, ROT_HALF, INTERLEAVED, BLOCK_H, BLOCK_R,
                      BLOCK_D)
    else:
        b_k = tl.load(K + i_b64 * stride_kb + i_t64 * stride_kt + o_h[:, None] * stride_kh + o_d[None, :], mask=m)
        tl.store(K_CACHE + row * stride_kcb + t * stride_kct + o_h[:, None] * stride_kch + o_d[None, :], b_k,
                 mask=m)
    b_v = tl.load(V + i_b64 * stride_vb + i_t64 * stride_vt + o_h[:, None] * stride_vh + o_d[None, :], mask=m)
    tl.store(V_CACHE + row * stride_vcb + t * stride_vct + o_h[:, None] * stride_vch + o_d[None, :], b_v, mask=m)
    if i_t == 0:
        tl.store(NEW_SEQLENS + i_b, seqlen + T_new)


def append_kv_triton(k_cache, v_cache, k, v, cache_seqlens, *, batch_idx=None, block_table=None, rotary=None):
    """Write ``k``/``v [B, Tnew, Hkv, D]`` into the caches at rows ``cache_seqlens[b] + i`` of each
    sequence, in place (ops.py's ``append_kv``, in one launch), and return ``cache_seqlens + Tnew``
    (int32 ``[B]``). ``rotary``: None, or ``(cos, sin, interleaved)``: k is rotated at its
    position as it is written (rotary.py's ``apply_rotary``). Arguments already validated,
    values included where checked: the caches with a contiguous last dim, the index tensors
    int32 and contiguous, the rotary tables contiguous in k's dtype."""
    B, T_new, H_kv, D = k.shape
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    new_seqlens = empty((B,), dtype=torch.int32, device=k.device)
    if B * T_new == 0:
        new_seqlens.copy_(cache_seqlens + T_new)
        return new_seqlens
    paged = block_table is not None
    cos, sin, interleaved = rotary if rotary is not None else (None, None, True)
    rot_half = 1 if cos is None else cos.shape[1]
    blocks = rotary_blocks(H_kv, D, rot_half)
    BLOCK_H, BLOCK_D = blocks["BLOCK_H"], blocks["BLOCK_D"]
    key = ("append", k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cache_seqlens.data_ptr(),
           new_seqlens.data_ptr(), address(batch_idx),
           None if block_table is None else (block_table.data_ptr(), block_table.stride(0)),
           None if cos is None else (cos.data_ptr(), sin.data_ptr(), cos.shape, cos.stride(0), bool(interleaved)),
           k.shape, k.stride(), v.stride(), k_cache.shape, k_cache.stride(), v_cache.stride(), k.dtype, v.dtype,
           k_cache.dtype, v_cache.dtype)
    with device_guard(k):
        launch_site(key, lambda: (
            _append_kernel, (B * T_new,),
            (k, v, k_cache, v_cache, cache_seqlens, new_seqlens, batch_idx, block_table, cos, sin,
             *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
             block_table.stride(0) if paged else 0, 0 if cos is None else cos.stride(0), T_new, H_kv),
            dict(D=D, PAGE_SIZE=k_cache.shape[1] if paged else 1, IS_PAGED=paged,
                 HAS_BATCH_IDX=batch_idx is not None, ROTARY=cos is not None, ROT_HALF=rot_half,
                 INTERLEAVED=bool(interleaved), **blocks,
                 # A row of every KV head: 1-64k elements; 4 warps up to 8k of them.
                 num_warps=4 if BLOCK_H * BLOCK_D <= 8192 else 8)))
    return new_seqlens
