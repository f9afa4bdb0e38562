"""Tiles of the split-KV decoding kernel and the number of splits, chosen by heuristics.

Configs are data: the launcher takes one as an argument, so tests can force any of them. The
decoding branch (Tq = 1) rests on an H200 sweep (benchmarks/sweep_decode.py); the others say
what they start from.
"""
import dataclasses
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
    # Paged caches: load each tile's page numbers one tile ahead.
    prefetch_pages: bool = False


def get_decode_config(rows: int, head_dim: int, dtype: torch.dtype, *, interpret: bool,
                      paged_split: bool = False, full_grid: bool = False) -> DecodeConfig:
    """Config for ``rows = (H / Hkv) · Tq`` packed query rows per KV head. ``paged_split``: the
    cache is paged and the key range is split over programs (the grid alone would not fill the
    GPU), where the block table's latency shows (:func:`paged_split_config`). ``full_grid``: every
    program streams a long range of a contiguous cache: at least FULL_GRID_MIN_KEYS keys with B ·
    Hkv programs that fill the GPU unsplit, or splits of at least LONG_SPLIT_MIN_KEYS keys each."""
    config = _base_config(rows, head_dim, dtype, interpret=interpret)
    if paged_split:
        return paged_split_config(config)
    if full_grid and not interpret and config == _DECODE:
        # 128-key tiles with 8 warps and 3 stages (sweep with graph replays and L2 flushed,
        # benchmarks/results/2026-11-29_nvidia-h200_sweep-decode-tiles{,-grid}.json): B = 64 x
        # 8k / 32k / 128k 4.39 / 4.52 / 4.57 TB/s against 4.34 / 4.36 / 4.46, B = 32 x 128k 4.51
        # against 4.13; where the keys are split they lose (B = 1 x 32k 2.41 against 2.71), and
        # so do short caches (B = 64 x 1k 3.32 against 3.52: 8 tiles a program, one program per
        # SM at 192 KB of shared memory): full_grid asks for >= 4096 keys. Paged caches keep
        # 64-key tiles (not timed with 128).
        return DecodeConfig(BLOCK_M=_DECODE.BLOCK_M, BLOCK_N=128, num_warps=8, num_stages=3)
    return config


def paged_split_config(config: DecodeConfig) -> DecodeConfig:
    """Paged caches read through the block table: each K/V tile's addresses wait on a load of its
    page numbers. With few programs per SM (the split case) nothing hides that wait, so the
    numbers are loaded a tile ahead. benchmarks/sweep_decode.py on the H200 (16-token pages, graph
    replay, splits as get_num_splits picks them; benchmarks/results/
    2026-11-29_nvidia-h200_sweep-decode-paged.json), µs at B×ctx = 1×1k / 1×8k / 1×128k / 8×8k /
    8×32k: contiguous 5.6 / 10.7 / 127.9 / 67.6 / 247.0; paged 6.3 / 12.6 / 132.6 / 70.2 / 253.2,
    with the prefetch 6.1 / 12.5 / 131.6 / 70.3 / 251.1; one more stage as well (chosen from an
    earlier sweep with fewer splits) 6.4 / 16.5 / 156.5 / - / 251.4. Unsplit grids (B = 64) keep
    the base config: the prefetch ran 0.74x there. (The sweep replays without flushing L2, so
    caches up to 1×8k are timed from L2; the comparison holds, the absolute speed does not.)"""
    return dataclasses.replace(config, prefetch_pages=True)


def _base_config(rows: int, head_dim: int, dtype: torch.dtype, *, interpret: bool) -> DecodeConfig:
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


# Fewer keys than this keep the base tiles on a full grid (see get_decode_config).
FULL_GRID_MIN_KEYS = 4096
# Split paged caches of fewer keys keep the base config, without the page-number prefetch
# (paged_split_config): at B = 8 x 1k (8 splits of 2 tiles) it ran 24.1 against 23.3 us, 0.87
# against 0.90x the contiguous cache, and at B = 1 x 1k 11.9 against 12.0 us
# (benchmarks/results/2026-12-03_nvidia-h200_sweep-decode-paged-1k.json, 16-token pages).
PAGED_PREFETCH_MIN_KEYS = 2048
# Split programs that each stream at least this many keys take the full-grid tiles too (the same
# long loops): B = 8 x 128k (8 splits of 16k keys) 4.56 against 4.50 TB/s with them, B = 8 x 32k
# (4k keys a split) 0.99x, B = 1 (~2k keys a split) 0.72-0.95x (sweep_decode --tiles at dbe4827,
# benchmarks/LOG.md v1.10; the decode suite's run in v1.11 times the adopted rule).
LONG_SPLIT_MIN_KEYS = 16384
# The decoding branch at H / Hkv <= 16 (Tq = 1): the full-grid variant replaces only this one.
_DECODE = DecodeConfig(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)


# A split should stream at least this many key blocks. The H200 sweep (graph replays back to
# back, so caches up to 8k keys at B = 1 were read from L2; the decode benchmark, which flushes
# L2, is the check; benchmarks/results/2026-11-29_nvidia-h200_sweep-decode-graph.json) ran
# fastest with one block per split at the shortest caches: B = 1 x 1k keys took 5.6 us with 16
# splits of one 64-key block, 8.4 us with 4 splits of 4 blocks (the previous minimum).
MIN_BLOCKS_PER_SPLIT = 1
# Splits aim at this many waves of programs over the SMs. Fastest split counts in that sweep:
# B = 1 (8 programs) 16 / 32 / 64 at 1k / 8k / 128k keys, B = 8 (64 programs) 8 at 1k and 32k,
# i.e. about 4 waves where the length allows (2 waves, the previous aim, gave 134 against 127 us
# at B = 1 x 128k and 10.9 against 10.2 us at B = 8 x 1k).
WAVES = 4
MAX_SPLITS = 128
# Long splits instead run about three programs an SM at once. (Chosen as the slots the decoding
# config was thought to have: three, by 64 KB of shared memory. ptxas for sm_90a gives it 38.9 KB
# and 107 registers, so four fit, by registers; the count stays for what it measured, below and in
# benchmarks/LOG.md v1.29, where 49 splits again beat 66 at B = 1 x 128k, and a cap of 96
# registers, five programs an SM, won at no split count.) sweep_decode.py --splits at 7a94ac0 (graph replays, L2 flushed;
# logs/2026-12-03_h200_call1_7a94ac0.log), µs: B = 1 x 128k 139.6 with 66 splits (4 waves, 1986
# keys each), 138.3 with 49 (~3 programs an SM), 142.0 / 146.7 with 44 / 33; B = 8 x 32k 258.0
# with 8 splits, 255.9 with 6, 262.2 / 271.5 with 16 / 4. At B = 1 x 32k (497 keys a split) the
# 4 waves stayed ahead, 48.9 against 50.3 with 49: short splits hide each other's start. So from
# this many keys a split (under the long-split tiles' LONG_SPLIT_MIN_KEYS, where one program
# fills an SM).
ONE_WAVE_MIN_KEYS = 1536
RESIDENT_PER_SM = 3


def resident_per_sm(config: DecodeConfig, head_dim: int, dtype: torch.dtype) -> int:
    """Programs of ``config`` an SM runs at once for long splits, where measured (the decoding
    config at D = 128, 16-bit caches: RESIDENT_PER_SM, a tuned count), else 0 (unknown: the
    splits follow WAVES alone)."""
    if config == _DECODE and next_pow2(head_dim) == 128 and dtype in (torch.float16, torch.bfloat16):
        return RESIDENT_PER_SM
    return 0


# A grid that fills the GPU unsplit still ends in a partial wave: B = 64 x 128k keys is 512
# programs of the full-grid tiles, one per SM, 3.9 waves over 132 SMs. Split into this many, each
# split keeping at least FULL_GRID_SPLIT_MIN_KEYS keys (the full-grid tiles' long loops), the same
# work is 15.5 waves. sweep_decode.py --splits at 10ae03f, three rounds in one process (graph
# replays, L2 flushed; benchmarks/results/2026-12-04_nvidia-h200_sweep-decode-b64-10ae03f.json):
# 7464 / 7461 / 7465 us with 4 splits against 7538 / 7537 / 7543 unsplit and 7532 / 7539 / 7523
# with 2; cuDNN 7494 / 7513 / 7496. Contiguous caches at Tq = 1 only: a split paged cache takes
# the page prefetch, 0.74x on full grids (paged_split_config), and chunked prefill was not timed.
FULL_GRID_SPLITS = 4
FULL_GRID_SPLIT_MIN_KEYS = 32768


def get_num_splits(programs: int, max_seqlen_k: int, BLOCK_N: int, num_sms: int, resident: int = 0, *,
                   split_full_grid: bool = False) -> int:
    """How many splits of the key range to use (flash-decoding) when the caller passes 0.

    ``programs`` is the number of programs without splitting (B · Hkv · query tiles). With
    ``programs >= num_sms`` the grid fills the GPU already: one split, or with
    ``split_full_grid`` (a contiguous cache at Tq = 1) FULL_GRID_SPLITS where each keeps
    FULL_GRID_SPLIT_MIN_KEYS keys; otherwise split so that ``programs · splits <= WAVES ·
    num_sms``, as long as every split keeps ``MIN_BLOCKS_PER_SPLIT`` key blocks. ``resident``:
    programs an SM runs at once for long splits (:func:`resident_per_sm`; 0 unknown); where
    known, splits of ONE_WAVE_MIN_KEYS keys or more (and fewer than LONG_SPLIT_MIN_KEYS) are made
    so that the programs fill that many an SM once.
    """
    if programs >= num_sms:
        long = split_full_grid and max_seqlen_k >= FULL_GRID_SPLITS * FULL_GRID_SPLIT_MIN_KEYS
        return FULL_GRID_SPLITS if long else 1
    # Rounded down: one program past a whole number of waves leaves a tail wave of a few programs
    # (B = 8 x 32k keys: 9 splits of 64 programs ran 0.76x cuDNN, 8 splits 1.0x; bench decode).
    by_waves = max(1, WAVES * num_sms // programs)
    by_length = max(1, cdiv(max_seqlen_k, BLOCK_N) // MIN_BLOCKS_PER_SPLIT)
    splits = max(1, min(by_waves, by_length, MAX_SPLITS))
    if resident and ONE_WAVE_MIN_KEYS <= cdiv(max_seqlen_k, splits) < LONG_SPLIT_MIN_KEYS:
        splits = max(1, min(resident * num_sms // programs, splits))
    return splits
