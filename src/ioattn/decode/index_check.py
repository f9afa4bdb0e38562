"""The device half of flash_attn_with_kvcache's value checks as one Triton launch.

checks.py reads the index vectors back to the host in one transfer. With a leftpad, a batch index
or a block table, torch ops gathered them first: a cast and a concatenation, and for a paged cache
a flag of pages out of range computed over the block table (about a dozen small launches, each
host time on an eager decoding step, ~50-170 µs more than a contiguous cache's step in the decode
suite at 4085ba8). Here program b writes sequence b's length, leftpad and row into one int32
vector, and for a paged cache how many of the pages holding its keys point outside the cache
(entries past those pages are never read and may hold anything); the host reads that vector once.

The CPU backend keeps the torch ops (checks.py); the tests run this kernel in Triton's
interpreter against them.
"""
import torch
import triton
import triton.language as tl

from .._utils import empty
from ..flash.fwd import device_guard
from ..launch import address, launch_site

# Block-table entries a program reads at a time.
BLOCK_P = 256


@triton.jit
def _index_values_kernel(SEQLENS, LEFTPAD, BATCH_IDX, BLOCK_TABLE, OUT, B, max_blocks, stride_bt, T_new, num_pages,
                         HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, IS_PAGED: tl.constexpr,
                         PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr):
    # OUT: [lengths | leftpads | rows | bad pages], each B long, the absent ones left out.
    i_b = tl.program_id(0)
    seqlen = tl.load(SEQLENS + i_b)
    tl.store(OUT + i_b, seqlen)
    at = B
    if HAS_LEFTPAD:
        tl.store(OUT + at + i_b, tl.load(LEFTPAD + i_b))
        at += B
    if HAS_BATCH_IDX:
        tl.store(OUT + at + i_b, tl.load(BATCH_IDX + i_b))
        at += B
    if IS_PAGED:
        # The pages that will hold keys after the append (a length past the table is reported
        # by the host's length checks; only the table's own entries are read).
        used = tl.minimum((tl.maximum(seqlen + T_new, 0) + PAGE_SIZE - 1) // PAGE_SIZE, max_blocks)
        bad = tl.zeros([], dtype=tl.int32)
        for start in range(0, used, BLOCK_P):
            o_p = start + tl.arange(0, BLOCK_P)
            m_p = o_p < used
            page = tl.load(BLOCK_TABLE + i_b.to(tl.int64) * stride_bt + o_p, mask=m_p, other=0)
            bad += tl.sum((m_p & ((page < 0) | (page >= num_pages))).to(tl.int32), 0)
        tl.store(OUT + at + i_b, bad)


def index_values(cache_seqlens, cache_leftpad, cache_batch_idx, block_table, T_new: int, page_size: int,
                 num_pages: int):
    """int32 ``[n · B]``: the lengths, then the leftpads and the rows when given, then with a
    block table each sequence's count of used pages outside ``[0, num_pages)`` (all int32 and
    contiguous, on one device)."""
    B = cache_seqlens.shape[0]
    parts = 1 + sum(t is not None for t in (cache_leftpad, cache_batch_idx, block_table))
    out = empty((parts * B,), dtype=torch.int32, device=cache_seqlens.device)
    if B == 0:
        return out
    paged = block_table is not None
    max_blocks = block_table.shape[1] if paged else 0
    key = ("index_values", cache_seqlens.data_ptr(), address(cache_leftpad), address(cache_batch_idx),
           None if block_table is None else (block_table.data_ptr(), block_table.shape, block_table.stride(0)),
           out.data_ptr(), B, T_new, page_size, num_pages)
    with device_guard(cache_seqlens):
        launch_site(key, lambda: (
            _index_values_kernel, (B,),
            (cache_seqlens, cache_leftpad, cache_batch_idx, block_table, out, B, max_blocks,
             block_table.stride(0) if paged else 0, T_new, num_pages),
            dict(HAS_LEFTPAD=cache_leftpad is not None, HAS_BATCH_IDX=cache_batch_idx is not None, IS_PAGED=paged,
                 PAGE_SIZE=page_size if paged else 1, BLOCK_P=BLOCK_P, num_warps=1)))
    return out
