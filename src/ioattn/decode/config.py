"""Tiles of the split-KV decoding kernel and the number of splits, chosen by heuristics.

Configs are data: the launcher takes one as an argument, so tests can force any of them. The
decoding branch (Tq = 1) rests on an H200 sweep (benchmarks/sweep_decode.py); the others say
what they start from.
"""
import functools
from dataclasses import dataclass

import torch

from .._utils import cdiv, next_pow2


@dataclass(frozen=True)
class DecodeConfig:
    """A program holds BLOCK_M query rows (the group's heads × Tq, packed) of one KV head and
    steps over BLOCK_N keys at a time."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    # With several splits, the last one of each tile merges them (kernel.py) instead of a
    # separate combine launch (combine.py).
    fuse_combine: bool = True
    # Paged caches: load each tile's page numbers one tile ahead.
    prefetch_pages: bool = False


def get_decode_config(rows: int, head_dim: int, dtype: torch.dtype, *, interpret: bool) -> DecodeConfig:
    """Config for ``rows = (H / Hkv) · Tq`` packed query rows per KV head."""
    # tl.dot needs every side >= 16; decoding rows (a GQA group of 4-8 heads, Tq = 1) fill one
    # small tile, chunked prefill gets several of 64 rows.
    if interpret:
        # Small tiles: several key blocks and splits even at the tests' tiny caches.
        return DecodeConfig(BLOCK_M=min(32, max(16, next_pow2(rows))), BLOCK_N=16, num_warps=4,
                            num_stages=1)
    # Register counts below are ptxas's for sm_90a (compiled without a GPU, bf16, D = 128; see
    # tests/decode/test_kernel.py::test_gpu_configs_compile_without_spills); no timing yet.
    BLOCK_M = min(64, max(16, next_pow2(rows)))
    if dtype == torch.float32 or head_dim > 128:
        # Starting point: fp32 ieee dots and 256-wide heads keep register tiles small.
        return DecodeConfig(BLOCK_M=BLOCK_M, BLOCK_N=32, num_warps=4, num_stages=2)
    if BLOCK_M >= 64:
        # Chunked prefill: 64 x 64 tiles need 232 registers with 4 warps, 176 with 8.
        return DecodeConfig(BLOCK_M=BLOCK_M, BLOCK_N=64, num_warps=8, num_stages=2)
    # Decoding streams K and V (memory bound at Tq = 1). benchmarks/sweep_decode.py on the H200
    # (bf16, H=32, Hkv=8, D=128, eager calls; benchmarks/results/2026-11-29_nvidia-h200_sweep-decode.json),
    # TB/s at B×ctx = 1×128k / 8×32k / 64×8k / 64×32k: 64-key tiles, 4 warps, 2 stages 3.65 / 4.07
    # / 4.34 / 4.43; with 3 stages (the first choice) 3.03 / 3.88 / 3.80 / 3.88, with 4 stages
    # 2.57 / 3.34 / 4.33 / 4.45; 128-key tiles with 8 warps and 3 stages 3.74 / 3.72 / 4.39 / 4.53.
    return DecodeConfig(BLOCK_M=BLOCK_M, BLOCK_N=64, num_warps=4, num_stages=2)


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# A split should stream at least this many key blocks: below it, writing and merging the
# partial results costs about as much as the keys it saves.
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 128


def get_num_splits(programs: int, max_seqlen_k: int, BLOCK_N: int, num_sms: int) -> int:
    """How many splits of the key range to use (flash-decoding) when the caller passes 0.

    ``programs`` is the number of programs without splitting (B · Hkv · query tiles). Aim at
    about two waves over the SMs: with ``programs >= num_sms`` the grid fills the GPU already
    and splitting only adds the combine; otherwise split so that ``programs · splits ≈ 2 ·
    num_sms``, as long as every split keeps ``MIN_BLOCKS_PER_SPLIT`` key blocks.
    """
    if programs >= num_sms:
        return 1
    by_waves = cdiv(2 * num_sms, programs)
    by_length = max(1, cdiv(max_seqlen_k, BLOCK_N) // MIN_BLOCKS_PER_SPLIT)
    return max(1, min(by_waves, by_length, MAX_SPLITS))
