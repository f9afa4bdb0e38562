"""Tile sizes and launch settings of the FlashAttention-2 Triton kernels, chosen by heuristics.

Configs are plain data: the launchers take one as an argument, so tests and benchmarks can force
any of them. Each branch says what it rests on: a short sweep of these kernels on the H200
(triton 3.6, do_bench median, hidden 2048 as in shared/anchors) or, where none was run, what its
starting point is based on. Autotuning is left out on purpose: it cannot run under the
interpreter, and one pinned config keeps results reproducible.
"""
import dataclasses
from dataclasses import dataclass

import torch

from .._utils import next_pow2


@dataclass(frozen=True)
class FwdConfig:
    """Forward kernel: a program holds BLOCK_M query rows and steps over BLOCK_N keys at a time."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """Backward kernels: 1 = the dK/dV kernel (holds BLOCK_N1 keys, steps over BLOCK_M1 queries),
    2 = the dQ kernel (holds BLOCK_M2 queries, steps over BLOCK_N2 keys)."""

    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    num_warps: int
    num_stages: int


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels tile with: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(head_dim))


def get_fwd_config(head_dim: int, dtype: torch.dtype, causal: bool, *, interpret: bool) -> FwdConfig:
    """Pick the forward config for a head dim ``D`` (any integer 8..256) and input dtype."""
    HEAD_DIM = padded_head_dim(head_dim)
    if interpret:
        # The interpreter runs each program in numpy: few, mid-sized tiles are fastest there.
        return FwdConfig(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # Starting point: ieee fp32 dots run on FMA units, whose operands live in registers;
        # small tiles keep them from spilling. Exactness, not speed, is the point of fp32.
        if HEAD_DIM <= 64:
            return FwdConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        return FwdConfig(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if HEAD_DIM <= 64:
        # H200, bf16, T=4096, B*H=64: 402 / 368 TFLOP/s (full / causal); 64 x 64 with 4 warps
        # ran 389 / 371, 128 x 128 with 4 warps 382 / 298.
        return FwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if HEAD_DIM <= 128:
        # H200, bf16, T=4096, B*H=64: 439 / 390 TFLOP/s (full / causal); 128 x 64 with 4 warps
        # (shared/GPU.md's choice for a TMA kernel) spilled registers here and ran 140 / 135.
        return FwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    # H200, bf16, T=4096, B*H=32: 499 / 448 TFLOP/s (full / causal); 64 x 64 with 4 warps ran
    # 350 / 315. Q plus 2 stages of K and V take 192 KB of the 227 KB of Hopper shared memory.
    return FwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def get_bwd_config(head_dim: int, dtype: torch.dtype, causal: bool, *, interpret: bool) -> BwdConfig:
    """Pick the backward config for a head dim ``D`` (any integer 8..256) and input dtype."""
    HEAD_DIM = padded_head_dim(head_dim)
    if interpret:
        # One small config, fast in numpy and valid for tl.dot (every side at least 16).
        return BwdConfig(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # Starting point: ieee fp32 dots run on FMA units with register operands; the dK/dV
        # program keeps four [BLOCK_N1, HEAD_DIM] tiles live, so tiles stay small.
        if HEAD_DIM <= 64:
            return BwdConfig(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)
        return BwdConfig(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    if HEAD_DIM <= 64:
        # H200, bf16, causal, T=4096, B*H=128: 291 TFLOP/s; the Triton tutorial's Hopper choice
        # (the same tiles with 4 warps, 5 stages) ran 238, 64 x 64 tiles 272.
        return BwdConfig(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=8, num_stages=3)
    if HEAD_DIM <= 128:
        # H200, bf16, causal, T=4096, B*H=64: 323 TFLOP/s; 32 x 128 / 128 x 32 tiles with
        # 8 warps ran 242, with 4 warps 125 (register spills).
        return BwdConfig(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, num_warps=8, num_stages=2)
    # H200, bf16, causal, T=4096, B*H=32: 143 TFLOP/s, the only tried config without register
    # spills; 32 x 64 / 64 x 32 tiles with 8 warps ran 139, 64 x 64 with 8 warps 125. Weak:
    # the 256-wide dK/dV accumulators leave little room; a later kernel should split HEAD_DIM.
    return BwdConfig(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4, num_stages=2)


@dataclass(frozen=True)
class TmaFwdConfig:
    """Hopper forward kernel (fwd_tma.py): tiles as in :class:`FwdConfig`; ``num_stages`` is the
    depth of the K/V pipeline of its key loop; ``warp_specialize`` asks triton to split that loop
    into producer and consumer warps (on sm_90 triton 3.6 emits the same PTX either way).
    For the Gluon kernels: ``warp_specialize`` picks fwd_gluon.py's loader-warp kernel;
    ``pingpong`` fwd_pingpong.py's (``BLOCK_M`` rows shared by two warpgroups, ``num_warps`` 4
    per warpgroup), whose warpgroups take turns on the tensor cores unless ``turns`` is off, and
    with ``persistent`` its persistent form (fwd_persistent.py: one program per SM);
    ``exp2_emu`` = n > 0 has the ping-pong kernels compute one exponential in n by a polynomial on
    the FMA pipes instead of the special-function unit (gluon_exp2.py's ``_exp2``; measured slower,
    unused by the tables); ``warpgroups`` = 3 has the ping-pong kernel hold 192 rows in three
    compute warpgroups taking turns round robin (D = 64 only); ``p_early`` has the ping-pong
    kernel cast each block's P to 16 bits right after its softmax (fwd_gluon_loop.py's ``P_EARLY``);
    ``half_last`` has the ping-pong kernels run a last key block that a warpgroup's rows see only
    the first half of (causal: the upper rows of a diagonal tile) as a 64-key step
    (fwd_gluon_loop.py's ``HALF_LAST``; BLOCK_N = 128). For fwd_gluon.py's kernel without warp
    specialization: ``v_stages`` (0: ``num_stages``) the depth of V's ring, ``num_stages`` then
    K's; ``maxnreg`` (0: none) a cap on registers a thread. At D = 64 with 64 x 64 tiles, K in 3
    slots and V in 2 take 49.2 KB of shared memory a program, and a cap of 128 registers lets
    four programs share an SM (228 KB, 1 KB more a program for the driver; 64K registers) where
    3 and 3 slots (57.4 KB) and 132 registers fit three."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    pingpong: bool = False
    turns: bool = True
    persistent: bool = False
    exp2_emu: int = 0
    warpgroups: int = 2
    p_early: bool = False
    half_last: bool = False
    v_stages: int = 0
    maxnreg: int = 0


# At or below this many keys / queries a sequence is "short": 128-row tiles then leave few
# programs per head and the diagonal block is a large share of each causal program's work, so
# the tables below have a branch for it (swept at T = 1024 and 2048). At T = 512 the configs
# these tables pick, the Gluon one included, were again the fastest candidates, or within 2%
# of them (results/2026-12-03_nvidia-h200_sweep-fwd-{tma,gluon}-512.json), so there is no
# branch for shorter sequences.
SHORT_SEQLEN = 1024


def get_tma_fwd_config(head_dim: int, dtype: torch.dtype, causal: bool, *, interpret: bool,
                       seqlen: int = 0) -> TmaFwdConfig:
    """Pick the Hopper forward config for a power-of-two head dim 16..256 (fp16/bf16 on the GPU);
    ``seqlen``: the longer of Tq and Tk (0: unknown, treated as long)."""
    if interpret:
        # Small tiles: the interpreter pays per element, and tiny test shapes still span tiles.
        return TmaFwdConfig(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # The dispatch never sends fp32 here (its ieee dots run on FMA units); small tiles only
        # keep direct calls and the tests on a GPU within registers and shared memory.
        return TmaFwdConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    short = 0 < seqlen <= SHORT_SEQLEN
    # The branches below: benchmarks/sweep_fwd_tma.py on the H200 (bf16, triton 3.6, paper grid
    # B = 16384 // T, H = 2048 // D, do_bench median), results in benchmarks/results/
    # 2026-11-29_nvidia-h200_sweep-fwd-tma{,-short,-long}.json; TFLOP/s at T = 16384 / 4096 / 1024
    # (the last from -short; "was" is the config used before the short-sequence sweep).
    if head_dim <= 64:
        if causal and short:
            # 306 at T = 1024; 64 x 128 with 2 stages 294, with 3 (was) 267.
            return TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        # full 446 / 441 / 393, causal 429 / 397 / 294; was 128 x 128 with 3 stages (full: 424 /
        # 411 / 358) and 64 x 128 with 3 stages (causal: 414 / 395 / 267).
        return TmaFwdConfig(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)
    if head_dim <= 128:
        if short:
            # 456 full at T = 1024 (128 x 128 with 8 warps 436); causal 64 x 64 with 3 stages
            # 360 (324). At T = 2048 the 128 x 128 tiles lead again: 497 / 412 full / causal.
            if causal:
                return TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
            return TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
        # 529 / 532 full, 527 / 465 causal; 128 x 64 with 4 warps and 2 stages 517 / 513 and
        # 485 / 448; the portable kernel 435 / 437 and 460 / 391.
        return TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    # 520 / 527 (508 / 451) full / causal at T = 16384 (4096); 64 x 64 with 4 warps and 3 stages
    # 491 / 483; the portable kernel 510 / 498. Q plus 2 stages of K and V fill 192 KB of shared memory.
    return TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


# The Gluon forward replaces the Triton TMA kernel at D = 128, where it was faster on the H200.
# The ping-pong kernel (fwd_pingpong.py, 128 x 128 tiles, 2 stages) against the Triton TMA
# kernel's default (128 x 128, 8 warps, 3 stages) and fwd_gluon.py's loader-warp kernel (64 x 64),
# TFLOP/s at T = 1024 / 4096 / 16384 (sweep_fwd_tma.py --gluon, bf16, paper grid shapes,
# benchmarks/results/2026-12-03_nvidia-h200_sweep-fwd-pingpong.json):
#   full, with turns 501 / 607 / 626, without 494 / 619 / 614; Triton TMA 438 / 516 / 529.
#   causal, without turns 362 / 573 / 610, with 375 / 515 / 607; Triton TMA 326 / 462 / 532;
#   64 x 64 loader-warp kernel 369 / 497 / 520.
# So full attention takes turns and causal does not (T = 4096 decides it; elsewhere the two are
# within 4%), except short causal sequences: at T = 1024 the turns led in each of three sweeps
# (375 / 373 / 375 against 362 / 364 / 369 TFLOP/s: ..._sweep-fwd-pingpong.json,
# ..._sweep-fwd-exp2-emu.json, ..._sweep-fwd-persistent.json), and without them the paper
# grid's causal forward there ran 0.89-0.90x cuDNN (5f754d2, cae9016, eea3616): causal took
# the turns up to SHORT_SEQLEN until the persistent form took those lengths over (below). At
# D = 64 the ping-pong kernel was within 2% of the Triton kernel at T >= 4096 and 5% behind at
# T = 1024 (372 against 353 full), and fwd_gluon.py's kernels won nowhere by more than noise
# (v1.10): D = 64 keeps the Triton kernel (but see GLUON_FWD_64 below).
# half_last (32ec60b, results/2026-12-04_nvidia-h200_sweep-fwd-128-causal-half-32ec60b.json), ms at
# T = 1024 / 2048 / 4096, causal: with turns 0.182 / 0.291 / 0.520, + half 0.183 / 0.290 / 0.513;
# without turns 0.182 / 0.294 / 0.521, + half 0.181 / 0.290 / 0.473 (the last not seen in that
# call's grid, 0.513). A program ends with its lower warpgroup, whose diagonal block is whole, so
# the half step rarely shortens one (benchmarks/LOG.md v1.25): kept where causal runs without turns
# (the persistent form included: 0.490 / 0.948 ms at T = 4096 / 8192 against 0.503 / 0.955 without).
# At D = 64 it made the persistent kernel 4-5% slower: not in GLUON_FWD_64.


# The persistent form of the ping-pong kernel (fwd_persistent.py) against it, same tiles, TFLOP/s
# at T = 1024 / 2048 / 4096 / 8192 / 16384 (sweep_fwd_tma.py --gluon --D 128, commit 25f21c8,
# benchmarks/results/2026-12-03_nvidia-h200_sweep-fwd-persistent.json):
#   full, with turns: persistent 539 / 580 / 580 / 578 / 597 against 513 / 556 / 590 / 605 / 613.
#   causal, without turns: persistent 341 / 407 / 464 / 487 / 522 against 369 / 457 / 517 / 544 / 591.
# Each tile's start is hidden, but not the two warpgroups' epilogues (both wait for the other's
# turn on the next tile), so the form wins only where tiles are short; causal tiles of unequal
# length, handed to programs in a fixed order, leave some programs working after the others
# (in that order; v1.26 pairs them, below).
# So: the persistent form for full attention up to this many keys / queries.
GLUON_PERSISTENT_MAX_SEQLEN = 2048
# Causal, once its tiles went in pairs of equal work (40427ae; fwd_persistent.py, benchmarks/
# LOG.md v1.26; results/2026-12-04_nvidia-h200_ab-fwd-128-causal-pairs-40427ae.json, three rounds
# on fresh inputs, medians in ms at T = 1024 / 2048 / 4096 / 8192 / 16384): without turns and
# with the half step 0.170 / 0.275 / 0.490 / 0.948 / 1.853, with turns 0.174 / 0.274 / 0.499 /
# 0.952 / 1.838, against the ping-pong kernel the table ran (turns up to 1024, then none and
# the half step) 0.184 / 0.297 / 0.535 / 0.980 / 1.833. So causal up to this many.
GLUON_PERSISTENT_CAUSAL_MAX_SEQLEN = 8192


# D = 64, by causal: (shortest sequence, config) pairs, shortest first, where a Gluon forward beat
# the Triton TMA kernel: each from its length up to the next pair's; below the first, and without
# an entry, D = 64 runs the Triton one. The two-warpgroup ping-pong kernel
# (128 x 128 tiles) was level with it at most: within 2% at T >= 4096 and behind at 1024 at
# cff3764 and 674fce4 (results/2026-12-03_nvidia-h200_sweep-fwd-{exp2-emu,64-long}.json), ahead by
# 1.5-6% at 8192 / 16384 in the runs since (946cad4, eb6884b). The three-warpgroup form at 192 x
# 128 with P cast early (results/2026-12-04_nvidia-h200_sweep-fwd-64-wg3-eb6884b.json), TFLOP/s at
# T = 1024 / 2048 / 4096 / 8192 / 16384 against the Triton kernel and the two-warpgroup one:
#   full, turns, 2 stages: 367 / 444 / 479 / 509 / 515 against 356 / 402 / 431 / 435 / 437 and
#   353 / 409 / 441 / 417 / 440 (3 stages 357 / 434 / 499 / 499 / 510; no turns 348 / 429 / 463 /
#   486 / 443);
#   causal, turns, at 2048 / 4096 / 8192 / 16384: 299 / 383 / 439 / 469 against 349 / 393 / 393 /
#   424 and, without turns, 318 / 388 / 420 / 443.
# So full attention from 2048 keys, causal from 8192: at 1024 the paper grid with the entry there
# (0b0fcac, results/2026-12-04_nvidia-h200_paper-v1.22-0b0fcac.json) ran 0.372 ms against the
# Triton kernel's 0.342 in the grid before (8652d0e), 0.88x cuDNN against 0.96x (192-row
# programs compute 1152 rows for 1024 there).
# Causal below 8192 keys: the persistent two-warpgroup kernel (fwd_persistent.py) once its causal
# tiles went longest first within L2-sized groups of heads (b179b10; results/
# 2026-12-04_nvidia-h200_sweep-fwd-64-causal-persistent-b179b10.json), TFLOP/s at T = 1024 /
# 2048 / 4096 with turns (without): 301 (301) / 372 (374) / 393 (391), against the Triton
# kernel's long-sequence config 292 / 352 / 366 and the ping-pong kernel without turns 243 / 328 /
# 383. At 1024 the Triton kernel's short config runs (0.224 ms in the grids, against 0.228 here):
# from 2048. With the tiles in pairs (v1.26; at D = 64 both orders give the busiest program 3%
# more key blocks than the mean), three rounds at 40427ae (results/2026-12-04_nvidia-h200_ab-fwd-
# 64-causal-pairs-40427ae.json), medians in ms at T = 1024 / 2048 / 4096 / 8192, with turns
# (without): 0.236 (0.234) / 0.381 (0.379) / 0.691 (0.688) / 1.296 (1.278), against the table's
# Triton kernel 0.226 at 1024 and three warpgroups 1.245 at 8192: the entries stay.
_WG3 = TmaFwdConfig(BLOCK_M=192, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, warpgroups=3,
                    p_early=True)
# Full attention at 1024 keys: the persistent kernel without turns (results/
# 2026-12-04_nvidia-h200_sweep-fwd-64-full-persistent-b204c04.json, one sweep): 412 TFLOP/s, with
# turns 401, the Triton kernel 398, three warpgroups 372.
_PERSISTENT_64 = TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, persistent=True)
# Causal below 2048 keys: fwd_gluon.py's one-warpgroup kernel, 64 x 64 tiles, K in 3 slots and V
# in 2, registers capped at 128, so that four programs share an SM (see TmaFwdConfig; the Triton
# kernel's 57,400 bytes of shared memory fit three). ab_fwd.py, three rounds at cf34275
# (results/2026-12-04_nvidia-h200_ab-fwd-64-gluon-v2-causal-cf34275.json), ms at T = 1024 / 2048 /
# 4096: 0.202 / 0.205 / 0.221 at 1024 against the Triton kernel's 0.225 / 0.227 / 0.227; the
# same kernel with 3 and 3 slots (three programs) 0.214-0.247, V in 2 slots uncapped (three)
# 0.212-0.228, 2 and 2 slots capped (four) 0.218-0.225; at 2048 0.374-0.396 against the
# persistent kernel's 0.370-0.375, at 4096 0.710-0.762 against 0.679-0.701: from 2048 the
# persistent kernel stays.
_SHORT_CAUSAL_64 = TmaFwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, v_stages=2, maxnreg=128)
GLUON_FWD_64: dict = {False: ((1024, dataclasses.replace(_PERSISTENT_64, turns=False)), (2048, _WG3)),
                      True: ((1, _SHORT_CAUSAL_64), (2048, _PERSISTENT_64), (8192, _WG3))}


# D = 256: the ping-pong kernel with 64-key blocks (its O takes 128 registers a thread, so S of
# 128 keys would not fit the warpgroup's 240; ptxas: no spills, 197 KB of shared memory, too
# much for the persistent form's O buffers). Against the Triton TMA kernel it replaces (128 x 64,
# 8 warps), three rounds at a4f93b4 (results/2026-12-04_nvidia-h200_ab-fwd-256-a4f93b4.json; B = 16384
# // T, H = 8), medians in ms at T = 2048 / 8192: full, with turns 0.443 / 1.657, without 0.437 /
# 1.636, Triton 0.581 / 2.144; causal, with turns 0.266 / 0.910, without 0.270 / 0.915, Triton
# 0.352 / 1.143. Turns or not within the rounds' spread (up to 3%): the entries keep D = 128's
# choice of before v1.26 (turns for full attention).
GLUON_FWD_256: dict = {False: TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, pingpong=True),
                       True: TmaFwdConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, pingpong=True,
                                          turns=False)}


def get_gluon_fwd_config(head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int) -> TmaFwdConfig | None:
    """The Gluon forward's config where it beats the Triton TMA kernel (see above), else None.
    ``seqlen``: the longer of Tq and Tk (0: unknown, treated as long)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if head_dim == 64:
        chosen = None
        for shortest, config in GLUON_FWD_64.get(bool(causal), ()):
            if seqlen == 0 or seqlen >= shortest:
                chosen = config
        return chosen
    if head_dim == 256:
        return GLUON_FWD_256[bool(causal)]
    if head_dim != 128:
        return None
    longest = GLUON_PERSISTENT_CAUSAL_MAX_SEQLEN if causal else GLUON_PERSISTENT_MAX_SEQLEN
    # Causal without turns and with the half step, persistent or not (the numbers above).
    return TmaFwdConfig(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, pingpong=True, turns=not causal,
                        persistent=0 < seqlen <= longest, half_last=bool(causal))


@dataclass(frozen=True)
class TmaBwdConfig:
    """Hopper TMA backward (bwd_tma.py). Its two passes are separate launches, so each has its own
    tiles, warps and pipeline depth: 1 = dK/dV (holds BLOCK_N1 keys, steps over BLOCK_M1 queries),
    2 = dQ (holds BLOCK_M2 queries, steps over BLOCK_N2 keys). ``device_desc1``: the dK/dV kernel
    builds per-(batch, head) 2D descriptors itself instead of taking the host's 4D ones (same
    bounds), which keeps its K and V tiles in shared memory rather than registers. ``gluon1``:
    the dK/dV pass is bwd_gluon.py's kernel instead (BLOCK_N1 keys in two warpgroups, BLOCK_M1
    query rows a step, a ring of stages1 Q/dO slots; warps1 unused), on GPUs that run Gluon;
    ``overlap1`` there issues each query block's dV and dK with the next block's matrix
    multiplies."""

    BLOCK_M1: int
    BLOCK_N1: int
    warps1: int
    stages1: int
    BLOCK_M2: int
    BLOCK_N2: int
    warps2: int
    stages2: int
    device_desc1: bool = False
    gluon1: bool = False
    overlap1: bool = False


def get_tma_bwd_config(head_dim: int, dtype: torch.dtype, causal: bool, *, interpret: bool,
                       seqlen: int = 0) -> TmaBwdConfig:
    """Pick the TMA backward config for D in (64, 128, 256) (fp16/bf16; fp32 in the interpreter);
    ``seqlen``: the longer of Tq and Tk (0: unknown, treated as long).

    The branches: benchmarks/sweep_bwd_tma.py on the H200 (bf16, triton 3.6, paper grid, each pass
    timed alone; results in benchmarks/results/2026-11-29_nvidia-h200_sweep-bwd-tma{,-short,-long}.json),
    TFLOP/s counted as 2.5× the forward's FLOPs over that pass's time (the passes alone: dK/dV
    2×, dQ 1.5×), full / causal at T = 4096 unless said. Registers from ptxas for sm_90
    (`sweep_bwd_tma.py --ptxas`).
    """
    if interpret:
        # Small tiles, fast in numpy; M and N unequal in both passes, so the diagonal crosses
        # blocks at different offsets.
        return TmaBwdConfig(16, 32, 4, 1, 32, 16, 4, 1)
    short = 0 < seqlen <= SHORT_SEQLEN
    if head_dim <= 64:
        if short:
            # T = 1024, both passes together: 321 / 243 (the long-sequence config 313 / 237).
            return TmaBwdConfig(32, 64, 4, 3, 64, 64, 4, 3)
        # dK/dV 32 x 128 with 4 warps: 451 / 401 (8 warps 442 / 274; 64 x 128 345 / 324), though
        # ptxas reports 396 spilled bytes. dQ 128 x 64, 3 stages: 588 / 539 (64 x 64 567 / 530).
        return TmaBwdConfig(32, 128, 4, 3, 128, 64, 8, 3)
    if head_dim <= 128:
        # dK/dV 64 x 64 with 4 warps and 2 stages: 568 / 518 (276 spilled bytes); the previous
        # choice, 64 x 128 with 8 warps, 481 / 442; 32 x 64 with 3 stages 496 / 455. Whole backward
        # at T = 16384: 430 / 382 against 374 / 379.
        if short:
            # T = 1024: dQ 128 x 32 (full, 551 against 527) and 64 x 32 with 4 warps (causal, 412
            # against 398); both passes together 353 / 277 (the previous config 304 / 238).
            config = TmaBwdConfig(64, 64, 4, 2, 64, 32, 4, 3) if causal else TmaBwdConfig(64, 64, 4, 2, 128, 32, 8, 3)
        else:
            # dQ 128 x 64, 3 stages: 652 / 549 (128 x 128 587 / 538).
            config = TmaBwdConfig(64, 64, 4, 2, 128, 64, 8, 3)
        if head_dim == 128 and dtype in (torch.float16, torch.bfloat16) and not short:
            # The Gluon dK/dV kernel (bwd_gluon.py): 128 keys in two warpgroups, 64-row query
            # steps (ptxas: 56-208 spilled bytes). Alone at T = 4096 (sweep_bwd_tma.py --gluon,
            # results/2026-12-03_nvidia-h200_sweep-bwd-gluon.json), full / causal: 3 slots 595 /
            # 524, 2 slots 589 / 532, against the Triton kernel's 570 / 496; the whole backward
            # 423 / 373 against 411 / 359 TFLOP/s, at T = 16384 429 / 396 against 425 / 390. At
            # T = 1024 it lost in the paper grid (causal forward + backward 0.906 ms against 0.770
            # with the Triton kernel; full 1.202 against 1.226; results/
            # 2026-12-03_nvidia-h200_paper-v1.14-{6e08d51,fwd}.json): short sequences keep the
            # Triton kernel.
            config = dataclasses.replace(config, BLOCK_M1=64, BLOCK_N1=128, stages1=2 if causal else 3, gluon1=True)
        return config
    # dK/dV 64 x 64 with 8 warps: 312 / 255 (328 spilled bytes; the previous 32 x 64 216 / 220;
    # 4-warp tiles spill 1.3-3 KB and ran 59-217). dQ 64 x 32 with 4 warps and 3 stages: 516 / 467
    # (the previous 64 x 64 with 8 warps 285 / 271). Whole backward at T = 4096 / 16384: 266 / 222
    # and 260 / 240 against 171 / 169 and 162 / 176
    # (benchmarks/results/2026-11-29_nvidia-h200_sweep-bwd-tma-4warp.json).
    return TmaBwdConfig(64, 64, 8, 2, 64, 32, 4, 3)


@dataclass(frozen=True)
class FusedBwdConfig:
    """Hopper one-pass backward (bwd_fused.py): a program holds BLOCK_N keys and steps over BLOCK_M
    query rows; ``device_desc`` as :class:`TmaBwdConfig`'s ``device_desc1``; ``tma_reduce`` adds
    the dQ tiles with the copy engine's bulk reduction instead of element-wise atomics; ``dq_t``
    forms each dQ tile transposed (``kᵀ·dSᵀ``). ``gluon`` runs bwd_gluon.py's kernel instead
    (BLOCK_M = 64, BLOCK_N = 128 in two warpgroups, 4 warps; num_stages its Q/dO slots,
    ``dq_early`` its dQ wgmmas queued behind dV's and dK's, ``tma_reduce`` as above; the other
    fields unused); with ``rows`` too, bwd_gluon_rows.py's kernel (scores held by query row,
    BLOCK_M 64 or 128, always the bulk reduction; ``dq_early`` unused; ``dq_rows`` splits each
    step's dQ between the warpgroups by rows, not columns, BLOCK_M = 128 only; ``s_ahead`` issues
    each step's S = q·kᵀ at the end of the step before, behind its dQ). ``expand_kv``: with
    GQA, K and V are repeated to every query head first and the kernel runs as for MHA, and dK
    and dV are summed over each group of query heads after (bwd_fused.py). ``head_groups`` (the
    row-held kernel): programs start key block by key block over groups of heads whose inputs fit
    half the L2 cache, so that causal programs start longest first (bwd_gluon_program.py)."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    device_desc: bool = False
    tma_reduce: bool = False
    dq_t: bool = False
    gluon: bool = False
    dq_early: bool = False
    rows: bool = False
    dq_rows: bool = False
    s_ahead: bool = False
    expand_kv: bool = False
    head_groups: bool = False


# Where the one-pass backward (bwd_fused.py) beat the two-pass one on the H200: the whole backward
# (zeroing, delta, the kernel, dQ's cast) against the whole two-pass backward with its default
# config, bf16, paper grid (B = 16384 // T, H = 2048 // D), benchmarks/sweep_bwd_fused.py. With
# dQ = dS·k every candidate lost (0.53-0.99x, results/2026-12-03_nvidia-h200_sweep-bwd-fused.json);
# with dQᵀ = kᵀ·dSᵀ and the bulk reduction (results/2026-12-03_nvidia-h200_sweep-bwd-fused-t.json)
# D = 64 won: full 32 x 128 tiles with 4 warps and 3 stages 1.05 / 1.09x at T = 4096 / 16384
# (392 / 401 against 374 / 369 TFLOP/s), causal 64 x 64 tiles 0.97 / 1.03x. At D = 128 the best
# stayed at 0.75-0.86x (64 x 128 tiles with 8 warps; 64 x 64 tiles with 4 warps 0.55-0.71x):
# not used there. At T = 2048 / 8192 (..._sweep-bwd-fused-t-64.json): full 1.03 / 0.99x, causal
# 0.93 / 1.02x, within a run's noise of the two-pass backward, so the thresholds stay where the
# wins were clear. Shorter sequences were not timed then; the one-pass path launches two more
# kernels than its own (bwd_fused.py), which short calls pay on the host.
# Full attention at T = 2048, the 32 x 128 tiles against the two-pass backward in six sweeps
# since (262806c to 946cad4, ..._sweep-bwd-fused-*.json, logs/2026-12-03_h200_sweeps_946cad4.log):
# 1.856-1.912 ms against 1.917-2.004, ahead in every one (1.03-1.06x), and ahead of the
# row-held Gluon kernel there (1.875-1.932). So full attention takes it from 2048; at 1024 it
# was 1.049-1.056 ms against 0.958-1.045.
FUSED_BWD_MIN_SEQLEN = {False: 2048, True: 16384}  # by causal

# bwd_gluon.py's kernel as a one-pass backward (ADD_DQ): each step's dSᵀ shared through shared
# memory, each warpgroup adding half of dQ's columns, and bwd_gluon_rows.py's (below). By (D,
# causal): (shortest sequence, config) where one beat the two-pass backward (and, at D = 64, the
# Triton one-pass kernel above). With element-wise atomics bwd_gluon.py's lost at every point at
# 629b3f6 (results/2026-12-03_nvidia-h200_sweep-bwd-fused-gluon.json, T = 2048 / 4096 / 16384, best
# candidate 2 slots: full 0.92 / 0.93 / 0.96x, causal 0.78 / 0.87 / 0.87x): the adds, 17 GB at
# T = 16384, held the compute warps (benchmarks/LOG.md v1.15). With ``tma_reduce`` the copy engine
# adds them from shared memory (b5cf7c3, results/2026-12-03_nvidia-h200_sweep-bwd-fused-gluon-tma.json,
# whole backward against the whole two-pass one at T = 1024 / 2048 / 4096 / 8192 / 16384):
# D = 128 full, 3 slots: 1.09 / 1.15 / 1.13 / 1.18 / 1.18x (500 TFLOP/s at 16384; 2 slots with
# dq_early 1.12x at 1024, behind it beyond); causal, 3 slots: 0.96 / 0.98 / 1.04 / 1.07 / 1.10x.
# D = 64: 0.83-0.98x full, 0.85-1.04x causal, behind the Triton one-pass kernel wherever that one
# runs (full 32 x 128 tiles 1.05-1.10x from 2048 on, causal 64 x 64 tiles 1.02 / 1.06x at 8192 /
# 16384): no D = 64 entry for bwd_gluon.py's kernel.
# GQA (benchmarks/LOG.md v1.27): the entries run with the kernel's own GQA (a program walks every
# query head of its KV head: 512 programs at 32 / 4 heads on the paper grid's 16k tokens) from
# GQA_MIN_SEQLEN keys / queries, and over K and V repeated to the query heads (expand_kv,
# bwd_fused.py: 4096 programs, plus the repeats and the per-group sums) where causal from
# GQA_EXPAND_CAUSAL_MIN_SEQLEN. Three rounds at 84b2391 (results/2026-12-04_nvidia-h200_ab-bwd-
# gqa-{128,64}-84b2391.json, 32 / 4 heads, ms, own GQA / expanded / two-pass): D = 128 full
# 1.524 / 1.973 / 1.774 at T = 1024, 2.785 / 3.231 / 3.391 at 2048, 10.399 / 10.894 / 12.840
# at 8192; causal 1.204 / 1.429 / 1.267, 1.973 / 2.090 / 2.157, 6.299 / 6.020 / 7.298; D = 64
# full 1.710 / 1.934 / 1.956 at 2048, 6.456 / 6.490 / 7.670 at 8192; causal 1.251 / 1.302 /
# 1.464, 4.037 / 3.690 / 5.035. (v1.26's numbers for "expanded", 2c6fb52, were the kernel's
# own GQA: expand_kv did not reach the kernel then.) Not below 2048: at 1024 the own GQA was
# ahead at 32 / 4 above but behind at 16 / 2 heads in v1.26 (0.712 against 0.686 ms, causal).
GQA_MIN_SEQLEN = 2048
GQA_EXPAND_CAUSAL_MIN_SEQLEN = 8192
# bwd_gluon_rows.py's kernel (``rows``; 3d4519f's run, results/2026-12-03_nvidia-h200_sweep-bwd-
# fused-gluon-rows.json, every causal kernel there with split_mask), same measure: D = 128 full,
# 64-row steps, 2 slots: 1.13 / 1.17 / 1.13 / 1.22 / 1.23x (544 TFLOP/s at 16384; bwd_gluon.py's
# kernel 1.10-1.16x in the same run). D = 64, against the Triton one-pass kernel's 1.08 / 1.10 /
# 1.12x at T = 4096 / 8192 / 16384 full (32 x 128 tiles) and 0.98 / 1.02 / 1.06x causal (64 x 64):
# 128-row steps, 2 slots, full 1.09 / 1.12 / 1.15x; 64-row steps, 3 slots, split_mask, causal
# 1.02 / 1.10 / 1.14x (0.97x at 2048, where the two-pass backward stays). split_mask made
# bwd_gluon.py's causal kernel 1.19-1.29x slower at D = 128, though its long loop spills less
# (see bwd_gluon.py's _dkdv_consumer). Without it (155de24, ..._sweep-bwd-fused-gluon-causal-
# 155de24.json, T = 4096 / 16384) D = 128 causal ran: row-held kernel, 64-row steps, 2 slots,
# 1.17 / 1.20x (5.43 ms at 16384); bwd_gluon.py's kernel, 3 slots, 1.03 / 1.09x (6.03 ms; the
# entry until then); with split_mask 0.83 / 0.88x and 0.77 / 0.82x. Shorter causal sequences
# were not timed without split_mask: the entry started at 4096.
# 821ac90 (..._sweep-bwd-fused-gluon-causal-821ac90.json, causal, T = 1024 / 2048 / 4096 / 8192 /
# 16384, ms against the two-pass backward's): D = 128, row-held, 64-row steps, 2 slots, one loop,
# 0.566 / 0.938 / 1.525 / 3.014 / 5.487 against 0.598 / 1.037 / 1.948 / 3.768 / 6.852, so from
# 2048: at 1024 the paper grid's forward + backward waits on the host, and the one-pass path's
# extra launches showed there (1.204 ms at 0c21f44 against 0.974 and 0.775 on the two-pass
# backward in the two grids before, cuDNN 0.70-0.72). D = 64, row-held, 128-row steps, 2 slots,
# one loop, 0.751 / 1.157 / 1.991 / 3.693 / 6.979 against 0.695 / 1.167 / 2.156 / 4.202 / 8.258
# and the 64-row split form's 0.771 / 1.195 / 2.063 / 3.780 / 7.342 (the entry until then), so
# from 2048. The split_mask option was removed then (760a4d0).
# dq_rows (9884ef6, ..._sweep-bwd-dq-rows-9884ef6.json, D = 64, 128-row steps, 2 slots, T = 4096 /
# 16384): full 3.363 / 12.895 ms against 3.551 / 13.622 without, causal 1.947 / 6.921 against
# 1.972 / 6.921 (benchmarks/LOG.md v1.23). Full attention takes it from 2048, where the 128-row
# form without it had run 1.875-1.932 ms against the Triton one-pass kernel's 1.856-1.912.
# s_ahead (1dc6dfd, ..._sweep-bwd-s-ahead-{64,128}-1dc6dfd.json, T = 4096 / 16384, ms against the
# same kernel without it): D = 64 with dq_rows, full 3.291 / 12.295 against 3.414 / 12.886,
# causal 1.905 / 6.626 against 1.960 / 6.861, so the D = 64 entries take it; D = 128 slower,
# full 2.962 / 11.133 against 2.724 / 10.238, causal 1.613 / 5.586 against 1.531 / 5.447 (cause
# not found; 284fb75's form, which released the Q/dO slot after dQ, lost as much), so the D = 128
# entries do not.
# D = 128 causal from 1024 again (fc5c2d7): the paper grid's forward + backward there no longer
# waited on the host in the grids of ad2d928-be56897 (0.770-0.777 ms against a forward of 0.183
# and a two-pass backward of ~0.59), so the one-pass backward's lead at 1024 (0.566 against
# 0.598 ms at 821ac90) could show; the grid at fc5c2d7 ran the point at 0.738 ms (0.96x cuDNN,
# results/2026-12-04_nvidia-h200_paper-v1.24-fc5c2d7.json).
# D = 64 full attention from 1024 (v1.28): ab_bwd.py at T = 1024, whole backward, ms, the two-pass
# backward against the row-held kernel with dq_rows and s_ahead, three rounds at 4085ba8
# (results/2026-12-04_nvidia-h200_ab-bwd-64-1024-full-4085ba8.json) 0.995 / 1.053 / 1.048 against
# 1.023 / 1.017 / 1.013, six at 7326ccd (..._ab-bwd-64-1024-full-7326ccd.json) 0.969 / 1.086 / 1.075 /
# 1.088 / 1.205 / 1.115 against 1.005 / 1.033 / 1.016 / 1.071 / 1.038 / 1.030: lower in 7 of 9
# pairs, medians 3-5% lower, and steadier (32ec60b's sweep, ..._sweep-bwd-fused-64-short-32ec60b.json,
# had 0.977 against 1.022 in one run). Causal keeps the two-pass backward at 1024 (0.694 against 0.722 ms at 4085ba8) and
# the row-held kernel from 2048 (1.114 / 1.941 against 1.203 / 2.208 ms at 2048 / 4096, four
# rounds at 7326ccd, ..._ab-bwd-64-causal-7326ccd.json).
# head_groups on the causal entries up to HEAD_GROUPS_MAX_SEQLEN (v1.30; bwd_gluon_program.py's
# HEAD_GROUPS order, ..._ab-bwd-head-groups-4cac51b.json, three rounds, ms, without / with): D =
# 64 1.111 / 1.087 at T = 2048, 1.890 / 1.875 at 4096, 3.424 / 3.430 at 8192, 6.581 / 6.663 at
# 16384; D = 128 0.868 / 0.846, 1.527 / 1.501, 2.852 / 2.723 at 2048 / 4096 / 8192 (16384 not
# timed). Nsight Compute had the D = 64 kernel's SMs idle 4% of the time at 2048 (the tail of
# programs started head by head), 1.2% at 16384.
HEAD_GROUPS_MAX_SEQLEN = 8192
# Entries: (shortest sequence, config).
GLUON_FUSED_BWD: dict = {
    (128, False): (1024, FusedBwdConfig(64, 128, 4, 2, tma_reduce=True, gluon=True, rows=True)),
    (128, True): (1024, FusedBwdConfig(64, 128, 4, 2, tma_reduce=True, gluon=True, rows=True)),
    (64, False): (1024, FusedBwdConfig(128, 128, 4, 2, tma_reduce=True, gluon=True, rows=True, dq_rows=True,
                                       s_ahead=True)),
    (64, True): (2048, FusedBwdConfig(128, 128, 4, 2, tma_reduce=True, gluon=True, rows=True, dq_rows=True,
                                      s_ahead=True)),
}


def get_fused_bwd_config(head_dim: int, dtype: torch.dtype, causal: bool, *, interpret: bool,
                         seqlen: int = 0, gluon: bool = False, group: int = 1) -> FusedBwdConfig | None:
    """The one-pass backward's config where it beats the two-pass one (see above), else None (then
    the two-pass backward runs). ``seqlen``: the longer of Tq and Tk (0: unknown, treated as long);
    ``gluon``: whether bwd_gluon.py's kernel can run on these inputs (D = 128 needs it; D = 64
    runs it where GLUON_FUSED_BWD has an entry, else the Triton one-pass kernel); ``group``: query
    heads per KV head (the Gluon entries are for 1)."""
    if interpret:
        # Element-wise atomics (the interpreter has no bulk reduction), so that CI runs the
        # one-pass backward through the public functions too.
        return FusedBwdConfig(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, dq_t=True)
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    entry = GLUON_FUSED_BWD.get((head_dim, bool(causal))) if gluon else None
    if entry is not None:
        shortest, chosen = entry
        if group > 1:
            # GQA: the kernel's own, or over K and V repeated to the query heads (see above).
            shortest = max(shortest, GQA_MIN_SEQLEN)
            if causal and (seqlen == 0 or seqlen >= GQA_EXPAND_CAUSAL_MIN_SEQLEN):
                chosen = dataclasses.replace(chosen, expand_kv=True)
        if not 0 < seqlen < shortest:
            if causal and chosen.rows and 0 < seqlen <= HEAD_GROUPS_MAX_SEQLEN:
                chosen = dataclasses.replace(chosen, head_groups=True)
            return chosen
    if head_dim != 64:
        return None
    if 0 < seqlen < FUSED_BWD_MIN_SEQLEN[bool(causal)]:
        return None
    if causal:
        return FusedBwdConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, tma_reduce=True, dq_t=True)
    return FusedBwdConfig(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3, tma_reduce=True, dq_t=True)
