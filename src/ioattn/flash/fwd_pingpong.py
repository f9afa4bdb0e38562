"""FlashAttention forward for Hopper with two (or three) compute warpgroups taking turns on the
tensor cores (FlashAttention-3's "ping-pong" schedule), written in Gluon.

Why: fwd_gluon.py's warp-specialized kernel overlaps one warpgroup's softmax with its own P·V
(intra-warpgroup overlap) but stays at ~530 TFLOP/s at D = 128 (cuDNN ~617): with 64-row tiles
each K/V tile feeds only 64 query rows, and the softmax still leaves the tensor cores idle for
the part of it that the one P·V in flight does not cover. Here one program holds 128 query
rows: two warpgroups of 64 rows each share every K/V tile of the ring (half the shared-memory
traffic per FLOP), and a pair of mbarriers hands the right to issue matrix multiplies from one
warpgroup to the other, so that while one runs its exponentials the other's QKᵀ and P·V keep
the tensor cores busy. Each warpgroup keeps fwd_gluon.py's intra-warpgroup overlap inside its
turn.

Partitions (``gl.warp_specialize``): warpgroup 0 is the default partition, warpgroup 1 a 4-warp
worker, and fwd_gluon_loop.py's loader warp streams K and V; a slot is released when both
warpgroups have arrived at its "empty" barrier (count 2). With 4 + 4 + 1 warps (padded to three
warpgroups) the compute warpgroups get 240 registers each and the loader 24.

The turn: warpgroup w's step s (one step issues block s's QKᵀ and block s-1's P·V) waits on
``turn[w]`` and, once its wgmmas are issued, arrives at ``turn[1 - w]``. The prologue arrives at
``turn[0]`` once, so warpgroup 0 starts; warpgroup 0's step s then waits for phase s of
``turn[0]`` (warpgroup 1's step s - 1) and warpgroup 1's step s for phase s of ``turn[1]``
(warpgroup 0's step s). Both run the same number of steps (the program's key range), so no
barrier is more than one phase ahead of its waiter. ``PINGPONG=False`` drops the turns (both
warpgroups free-running on shared tiles), for the sweep to show what the schedule alone moves.

Three warpgroups (``NUM_WG = 3``, 192 rows; D = 64): the turn passes round robin, warpgroup w to
w + 1 mod 3, by the same argument. At D = 64 a warpgroup's softmax takes about as long as its
matrix multiplies, so with two warpgroups it has one turn to hide in and the tensor cores wait;
with three it has two (FlashAttention-3's layout at D = 64). The workers get 160 registers each
(the default partition what is left), which holds 128-key blocks only with ``P_EARLY`` (P cast
to 16 bits right after its softmax; fwd_gluon_loop.py's ``_ws_consumer``).

Contract: fwd_gluon.py's (fp16/bf16, D 64/128, and here 256 too with 64-key blocks; TMA-aligned,
every feature off; 4D descriptors per (batch, head), rows past T read as zeros and stores past Tq
dropped). GPU only; tests in tests/flash/test_fwd_gluon.py.
"""
import torch

from .._utils import cdiv, empty
from ..launch import launch_site
from . import fwd_gluon, fwd_persistent
from .fwd import LOG2E, diag_band, device_guard
from .fwd_gluon import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    from .fwd_gluon import COMPUTE_REGS, LOADER_REGS, _desc, _epilogue, _invalidate_ring, _key_blocks, _ring_barriers
    from .fwd_gluon_loop import _ws_consumer, _ws_loader


if HAS_GLUON:

    # Registers per thread of three 4-warp compute partitions (NUM_WG = 3) beside the loader's
    # padded warpgroup: 3 x 128 x 160 + 128 x 24 fits the SM's 64K. Enough for D = 64 (S 64, P 32
    # and O 32 registers a thread at 128-key blocks), not for D = 128's 64-register O.
    COMPUTE_REGS_3 = gl.constexpr(160)

    @gluon.jit
    def _pp_consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                     n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale,
                     WG: gl.constexpr, HAS_RIGHT: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                     EXP2_EMU: gl.constexpr, NUM_WG: gl.constexpr, P_EARLY: gl.constexpr,
                     HALF_LAST: gl.constexpr):
        """One compute warpgroup: rows ``[tile_m + WG * BLOCK_M, + BLOCK_M)``, fwd_gluon.py's
        overlapped loop with its wgmma issues inside turns, then its own epilogue (lse, and O
        through its Q slot and one TMA store: a worker partition returns nothing)."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        start_m = tile_m + WG * BLOCK_M
        q_slot = q_smem.index(WG)
        acc, m_i, l_i = _ws_consumer(q_slot, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                                     n_blocks, mask_from, start_m, T_k, diag_hi, qk_scale, HAS_RIGHT, BLOCK_M,
                                     BLOCK_N, HEAD_DIM, NUM_STAGES, 4, WG, PINGPONG, EXP2_EMU=EXP2_EMU,
                                     NUM_WG=NUM_WG, P_EARLY=P_EARLY, HALF_LAST=HALF_LAST)
        _epilogue(acc, m_i, l_i, q_slot, desc_o, LSE, i_b, i_h, i_bh, start_m, T_q, BLOCK_M, HEAD_DIM, row_o)

    @gluon.jit
    def _fwd_pingpong_kernel(desc_q, desc_k, desc_v, desc_o, LSE, T_q, T_k, H, GROUP, diag_hi, qk_scale,
                             HEAD_DIM: gl.constexpr, HAS_RIGHT: gl.constexpr, PINGPONG: gl.constexpr,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                             EXP2_EMU: gl.constexpr = 0, NUM_WG: gl.constexpr = 2, P_EARLY: gl.constexpr = False,
                             HALF_LAST: gl.constexpr = False):
        """One program: NUM_WG * BLOCK_M query rows of one (batch, head), NUM_WG (2 or 3) compute
        warpgroups of BLOCK_M rows (launched with num_warps=4: the default partition is
        warpgroup 0) taking turns round robin; ``EXP2_EMU``: gluon_exp2.py's ``_exp2``;
        ``P_EARLY``, ``HALF_LAST``: fwd_gluon_loop.py's ``_ws_consumer``'s."""
        dtype: gl.constexpr = desc_q.dtype
        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        if HAS_RIGHT:
            # Longest causal tiles first (see fwd_tma.py).
            i_m = gl.num_programs(0) - 1 - i_m
        i_b, i_h = i_bh // H, i_bh % H
        i_hkv = i_h // GROUP
        tile_m = i_m * (NUM_WG * BLOCK_M)
        # Key range of the whole program: every warpgroup steps through the same blocks (the
        # turns need equal step counts); the first warpgroup's rows set where masking starts.
        n_blocks, mask_from = _key_blocks(tile_m, NUM_WG * BLOCK_M, T_q, T_k, diag_hi, HAS_RIGHT, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, [NUM_WG, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        # Slots released by every warpgroup.
        k_ready, v_ready, k_empty, v_empty = _ring_barriers(NUM_STAGES, NUM_WG)
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NUM_WG):
            mbarrier.init(turn.index(w), count=1)
        fence_async_shared()
        # Warpgroup 0 takes the first turn.
        mbarrier.arrive(turn.index(0), count=1)
        mbarrier.expect(q_bar, NUM_WG * desc_q.block_type.nbytes)
        for w in gl.static_range(NUM_WG):
            tma.async_copy_global_to_shared(desc_q, [i_b, i_h, tile_m + w * BLOCK_M, 0], q_bar, q_smem.index(w))

        # Each warpgroup's argument tuple written out: Gluon's frontend neither adds tuples nor
        # keeps a function in a tuple variable, so the lists cannot be built from shared parts.
        if NUM_WG == 3:
            gl.warp_specialize([
                (_pp_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                                n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale, 0,
                                HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, EXP2_EMU, NUM_WG,
                                P_EARLY, HALF_LAST)),
                (_pp_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                                n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale, 1,
                                HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, EXP2_EMU, NUM_WG,
                                P_EARLY, HALF_LAST)),
                (_pp_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                                n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale, 2,
                                HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, EXP2_EMU, NUM_WG,
                                P_EARLY, HALF_LAST)),
                (_ws_loader, (desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_blocks, i_b,
                              i_hkv, BLOCK_N, NUM_STAGES)),
            ], [4, 4, 1], [COMPUTE_REGS_3, COMPUTE_REGS_3, LOADER_REGS])
        else:
            gl.warp_specialize([
                (_pp_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                                n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale, 0,
                                HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, EXP2_EMU, NUM_WG,
                                P_EARLY, HALF_LAST)),
                (_pp_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, desc_o, LSE,
                                n_blocks, mask_from, tile_m, T_q, T_k, i_b, i_h, i_bh, diag_hi, qk_scale, 1,
                                HAS_RIGHT, PINGPONG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, EXP2_EMU, NUM_WG,
                                P_EARLY, HALF_LAST)),
                (_ws_loader, (desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, n_blocks, i_b,
                              i_hkv, BLOCK_N, NUM_STAGES)),
            ], [4, 1], [COMPUTE_REGS, LOADER_REGS])

        mbarrier.invalidate(q_bar)
        for w in gl.static_range(NUM_WG):
            mbarrier.invalidate(turn.index(w))
        _invalidate_ring(k_ready, v_ready, k_empty, v_empty, NUM_STAGES)


def flash_fwd_pingpong(q, k, v, softmax_scale: float, causal: bool, diag_offset: int, *, config):
    """Attention forward with the ping-pong Gluon kernel: :func:`ioattn.flash.fwd_gluon.flash_fwd_gluon`'s
    arguments and results; ``config`` a :class:`ioattn.flash.config.TmaFwdConfig` with
    ``pingpong`` set, ``BLOCK_M`` the program's rows (``warpgroups`` of 64, 2 or 3),
    ``num_warps`` 4 (per warpgroup); ``turns=False`` runs the warpgroups without turns;
    ``persistent`` runs fwd_persistent.py's form (one program per SM over the tiles; two
    warpgroups); ``exp2_emu`` n computes one exponential in n with FMAs (gluon_exp2.py's ``_exp2``);
    ``half_last`` runs a last key block that a warpgroup's rows see only half of at half width."""
    wgs = config.warpgroups
    if (wgs not in (2, 3) or config.BLOCK_M != 64 * wgs or config.num_warps != 4 or config.BLOCK_N not in (64, 128)
            or (wgs == 3 and (config.persistent or q.shape[-1] > 64))
            or (q.shape[-1] > 128 and (config.persistent or config.BLOCK_N > 64))):
        # Warpgroups of 4 warps and 64 rows (a wgmma's M dimension per warpgroup); three fit
        # their registers at D = 64 only (COMPUTE_REGS_3), and the persistent form has two. At
        # D = 256 O takes 128 registers a thread: 64-key blocks only, and no room in shared
        # memory for the persistent form's O buffers.
        raise ValueError(f"config: the ping-pong kernel takes warpgroups = 2 or 3 (3: D <= 64, not persistent), "
                         f"BLOCK_M = 64 * warpgroups, num_warps = 4 and BLOCK_N in (64, 128) (64 and not "
                         f"persistent at D = 256), got {config}")
    if config.half_last and config.BLOCK_N != 128:
        # Half of a 128-key block: 64 keys, the width the tests and the sweeps ran.
        raise ValueError(f"config: half_last needs BLOCK_N = 128, got {config}")
    if config.exp2_emu not in (0, 2, 4, 8) or (config.exp2_emu and config.persistent):
        # One element of each group of n a thread holds (n divides a thread's 32 or 64 scores).
        raise ValueError(f"config: exp2_emu must be 0, 2, 4 or 8, and 0 in the persistent kernel, got {config}")
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    band = diag_band(T_q, T_k, causal, diag_offset, (-1, -1))
    out = empty((B, T_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T_q), dtype=torch.float32, device=q.device)
    M, N = 64, config.BLOCK_N
    tiles = cdiv(T_q, wgs * M)
    if config.persistent:
        # The persistent kernel numbers the tiles itself; it takes B * H to do so.
        kernel, grid, extra, extra_kw = (fwd_persistent._fwd_persistent_kernel,
                                         (fwd_persistent.persistent_programs(q, tiles * B * H, band["HAS_RIGHT"]),),
                                         (B * H,), {"HALF_LAST": config.half_last})
    else:
        kernel, grid, extra, extra_kw = _fwd_pingpong_kernel, (tiles, B * H), (), {"EXP2_EMU": config.exp2_emu,
                                                                                     "NUM_WG": wgs,
                                                                                     "P_EARLY": config.p_early,
                                                                                     "HALF_LAST": config.half_last}
    def build():
        return (kernel, grid,
                (_desc(q, M), _desc(k, N), _desc(v, N), _desc(out, M), lse, T_q, T_k, H, H // H_kv, *extra,
                 band["diag_hi"], softmax_scale * LOG2E),
                dict(HEAD_DIM=D, HAS_RIGHT=band["HAS_RIGHT"], PINGPONG=config.turns, BLOCK_M=M, BLOCK_N=N,
                     NUM_STAGES=config.num_stages, **extra_kw, num_warps=4))

    key = ("fwd_pingpong", q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), q.shape, k.shape,
           q.stride(), k.stride(), v.stride(), q.dtype, softmax_scale, causal, diag_offset, config)
    with device_guard(q):
        launch_site(key, build)
    return out, lse


def gluon_launcher(config):
    """The Gluon forward that runs ``config``: this module's for ``pingpong`` configs, else
    fwd_gluon.py's (same arguments and results). Looked up at each call, so a test can watch it."""
    return flash_fwd_pingpong if config.pingpong else fwd_gluon.flash_fwd_gluon
